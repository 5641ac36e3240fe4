//! A real PgBouncer (Debian's 1.18, what the Pooler image ships) in front of a real PostgreSQL
//! 18, configured with the pgbouncer.ini the Pooler reconciler renders and authenticating through
//! the role and function the primary's instance manager applies (`pooler::auth`), and the Pooler
//! pods' metrics exporter (`pg-instance pooler-exporter`) reading that PgBouncer.

use std::time::{Duration, Instant};

use api::common::ClusterReference;
use api::pooler::{PgBouncerSpec, PoolMode, Pooler, PoolerSpec, PoolerType};
use api::postgres_user::RoleAttributes;
use controllers::pooler::builders::{Target, auth_file_line, pgbouncer_ini, supervisor_script_for};
use instance::declarative::role_sql::{RoleSpec, apply_role};
use instance::declarative::sql::Connector;
use instance::pooler::auth;
use testbed::pgbouncer::PgBouncer;
use testbed::pooler_exporter::{PoolerExporter, sample};
use testbed::{Postgres, PostgresOptions};

const SUPERUSER_PASSWORD: &str = "super'secret";
const AUTH_PASSWORD: &str = "auth\"pa'ss";
const APP_PASSWORD: &str = "app-pa$$";

fn server() -> Postgres {
    Postgres::start_with(
        PostgresOptions {
            auth_method: "scram-sha-256".into(),
            superuser_password: Some(SUPERUSER_PASSWORD.into()),
            ..PostgresOptions::default()
        }
        .setting("log_statement", "all"),
    )
    .expect("PostgreSQL 18 starts")
}

fn connector(server: &Postgres) -> Connector {
    let mut config: tokio_postgres::Config = server.connection_string("postgres").parse().unwrap();
    config.password(SUPERUSER_PASSWORD);
    Connector::new(config)
}

fn pooler(mode: PoolMode) -> Pooler {
    let mut pooler = Pooler::new(
        "pool",
        PoolerSpec {
            cluster: ClusterReference { name: "db".into() },
            type_: PoolerType::Rw,
            instances: 1,
            pgbouncer: PgBouncerSpec {
                pool_mode: mode,
                ..PgBouncerSpec::default()
            },
            resources: None,
            service: None,
        },
    );
    pooler.metadata.namespace = Some("default".into());
    pooler
}

/// The Target of a local PgBouncer in front of `server`.
fn target(server: &Postgres, bouncer: &PgBouncer) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port: server.port(),
        listen_addr: "127.0.0.1".into(),
        listen_port: bouncer.port(),
        auth_file: bouncer.auth_file().display().to_string(),
        unix_socket_dir: bouncer.socket_dir().display().to_string(),
    }
}

/// PostgreSQL with the pooler auth role and function (as the primary applies them) and an
/// application role made by the declarative PostgresUser path.
async fn prepared_server() -> Postgres {
    let server = server();
    let connector = connector(&server);
    let applied = auth::ensure(&connector, AUTH_PASSWORD).await.unwrap();
    assert!(applied.role);
    let spec = RoleSpec {
        name: "app".into(),
        attributes: RoleAttributes {
            login: true,
            ..RoleAttributes::default()
        },
        valid_until: None,
        memberships: Vec::new(),
    };
    apply_role(&connector, &spec, Some(APP_PASSWORD))
        .await
        .unwrap();
    let admin = server.client().await.unwrap();
    admin
        .batch_execute("CREATE DATABASE appdb OWNER app")
        .await
        .unwrap();
    admin
        .batch_execute(
            "CREATE TABLE public.counter (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO public.counter VALUES (1, 0);
             GRANT ALL ON public.counter TO app;",
        )
        .await
        .unwrap();
    server
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
    database: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(database)
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One short write transaction, in the simple protocol (PgBouncer 1.18 keeps no prepared
/// statements across transactions).
async fn bump(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("BEGIN; UPDATE public.counter SET n = n + 1 WHERE id = 1; COMMIT")
        .await
}

async fn single_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

/// The value of `name` in the admin console's `SHOW CONFIG`.
async fn show_config(admin: &tokio_postgres::Client, name: &str) -> String {
    for message in admin.simple_query("SHOW CONFIG").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message
            && row.get(0) == Some(name)
        {
            return row.get(1).unwrap_or_default().to_string();
        }
    }
    panic!("SHOW CONFIG has no {name}");
}

#[tokio::test]
async fn the_auth_role_and_function_are_least_privilege_and_everywhere() {
    let server = server();
    let connector = connector(&server);
    let admin = server.client().await.unwrap();
    admin
        .batch_execute("CREATE DATABASE before_pooler")
        .await
        .unwrap();
    let first = auth::ensure(&connector, AUTH_PASSWORD).await.unwrap();
    assert!(first.role);
    for database in ["postgres", "template1", "before_pooler"] {
        assert!(first.databases.contains(&database.to_string()), "{first:?}");
    }
    // A second pass over a right cluster changes nothing.
    assert_eq!(
        auth::ensure(&connector, AUTH_PASSWORD).await.unwrap(),
        auth::Applied::default()
    );

    let row = admin
        .query_one(
            "SELECT rolsuper, rolcanlogin, rolreplication, rolcreaterole, rolpassword LIKE 'SCRAM-SHA-256$%'
             FROM pg_authid WHERE rolname = 'pgbouncer_auth'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2),
            row.get::<_, bool>(3),
            row.get::<_, bool>(4)
        ),
        (false, true, false, false, true)
    );
    // Databases made after the pooler inherit the function from template1.
    admin
        .batch_execute("CREATE DATABASE after_pooler")
        .await
        .unwrap();
    let after = server.client_for("after_pooler").await.unwrap();
    let row = after
        .query_one(
            "SELECT p.prosecdef, has_function_privilege('pgbouncer_auth', p.oid, 'EXECUTE'),
                    has_function_privilege('public', p.oid, 'EXECUTE')
             FROM pg_proc p WHERE p.proname = 'pgbouncer_user_lookup'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        (true, true, false)
    );

    // As the auth role: a login role's verifier, nothing for a superuser; others may not call it.
    admin
        .batch_execute(
            "CREATE ROLE someone LOGIN PASSWORD 'x'; CREATE ROLE other LOGIN PASSWORD 'y'",
        )
        .await
        .unwrap();
    let as_auth = connect(server.port(), "pgbouncer_auth", AUTH_PASSWORD, "postgres")
        .await
        .unwrap();
    let rows = as_auth
        .query(
            "SELECT usename::text, passwd FROM public.pgbouncer_user_lookup($1)",
            &[&"someone"],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].get::<_, String>(1).starts_with("SCRAM-SHA-256$"));
    for hidden in ["postgres", "pgbouncer_auth", "nobody"] {
        let rows = as_auth
            .query("SELECT * FROM public.pgbouncer_user_lookup($1)", &[&hidden])
            .await
            .unwrap();
        assert!(rows.is_empty(), "{hidden} must not be looked up");
    }
    let as_other = connect(server.port(), "other", "y", "postgres")
        .await
        .unwrap();
    let refused = as_other
        .query(
            "SELECT * FROM public.pgbouncer_user_lookup($1)",
            &[&"someone"],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"));

    // A changed Secret password is applied; the role keeps no other attribute.
    admin
        .batch_execute("ALTER ROLE pgbouncer_auth CREATEDB")
        .await
        .unwrap();
    let repaired = auth::ensure(&connector, "new-password").await.unwrap();
    assert!(repaired.role && repaired.databases.is_empty());
    connect(server.port(), "pgbouncer_auth", "new-password", "postgres")
        .await
        .unwrap();
    // No cleartext password reached the server log.
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("new-password") && !log.contains(AUTH_PASSWORD));
}

#[tokio::test]
async fn clients_connect_through_pgbouncer_in_each_pool_mode_with_auth_query() {
    let server = prepared_server().await;
    for mode in [
        PoolMode::Session,
        PoolMode::Transaction,
        PoolMode::Statement,
    ] {
        let mut bouncer = PgBouncer::prepare().unwrap();
        let ini = pgbouncer_ini(&pooler(mode), &target(&server, &bouncer));
        bouncer.start(&ini, &auth_file_line(AUTH_PASSWORD)).unwrap();

        // A role made by the PostgresUser path logs in through auth_query, in any database.
        for database in ["postgres", "appdb"] {
            let client = connect(bouncer.port(), "app", APP_PASSWORD, database)
                .await
                .unwrap_or_else(|error| panic!("{mode:?} {database}: {error}\n{}", bouncer.log()));
            assert_eq!(single_value(&client, "SELECT current_user").await, "app");
        }
        let client = connect(bouncer.port(), "app", APP_PASSWORD, "postgres")
            .await
            .unwrap();
        match mode {
            // Statement pooling refuses multi-statement transactions by design.
            PoolMode::Statement => client
                .batch_execute("UPDATE public.counter SET n = n + 1 WHERE id = 1")
                .await
                .unwrap(),
            _ => bump(&client).await.unwrap(),
        }
        let admin = connect(bouncer.port(), "pgbouncer_auth", AUTH_PASSWORD, "pgbouncer")
            .await
            .unwrap();
        let expected = format!("{mode:?}").to_lowercase();
        assert_eq!(show_config(&admin, "pool_mode").await, expected);

        // A wrong password and a superuser are refused (the lookup never returns superusers).
        assert!(
            connect(bouncer.port(), "app", "wrong", "postgres")
                .await
                .is_err()
        );
        assert!(
            connect(bouncer.port(), "postgres", SUPERUSER_PASSWORD, "postgres")
                .await
                .is_err()
        );
        drop(bouncer);
    }
    let admin = server.client().await.unwrap();
    assert_eq!(
        single_value(&admin, "SELECT n FROM public.counter WHERE id = 1").await,
        "3"
    );
}

#[tokio::test]
async fn a_config_change_reloads_with_clients_connected() {
    let server = prepared_server().await;
    let mut bouncer = PgBouncer::prepare().unwrap();
    let mut pooler = pooler(PoolMode::Transaction);
    let target = target(&server, &bouncer);
    let ini = pgbouncer_ini(&pooler, &target);
    // Through the Pooler pod's own supervisor script, which reloads on a changed file.
    let script = supervisor_script_for(&bouncer.config_path().display().to_string());
    bouncer
        .start_script(&ini, &auth_file_line(AUTH_PASSWORD), &script)
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = connect(bouncer.port(), "app", APP_PASSWORD, "postgres")
            .await
            .unwrap();
        bump(&client).await.unwrap();
        clients.push(client);
    }
    let admin = connect(bouncer.port(), "pgbouncer_auth", AUTH_PASSWORD, "pgbouncer")
        .await
        .unwrap();
    assert_eq!(show_config(&admin, "default_pool_size").await, "20");

    pooler.spec.pgbouncer.default_pool_size = 7;
    pooler
        .spec
        .pgbouncer
        .parameters
        .insert("server_idle_timeout".into(), "42".into());
    bouncer
        .rewrite_config(&pgbouncer_ini(&pooler, &target))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while show_config(&admin, "default_pool_size").await != "7" {
        assert!(Instant::now() < deadline, "no reload:\n{}", bouncer.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(show_config(&admin, "server_idle_timeout").await, "42");
    // Every client is still connected and its next transaction succeeds.
    for client in &clients {
        bump(client).await.unwrap();
    }
    assert!(
        bouncer.log().contains("RELOAD command issued") || bouncer.log().contains("got SIGHUP")
    );
}

#[tokio::test]
async fn the_exporter_serves_pgbouncer_statistics_and_reports_down_when_pgbouncer_stops() {
    // Arrange: PgBouncer (the Pooler's pgbouncer.ini) in front of PostgreSQL 18, and the exporter
    // logged in to its admin console as the auth user, as in a Pooler pod.
    let server = prepared_server().await;
    let mut bouncer = PgBouncer::prepare().unwrap();
    let pooler = pooler(PoolMode::Transaction);
    let ini = pgbouncer_ini(&pooler, &target(&server, &bouncer));
    bouncer.start(&ini, &auth_file_line(AUTH_PASSWORD)).unwrap();
    let exporter = PoolerExporter::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_pg-instance")),
        bouncer.port(),
        api::contract::POOLER_AUTH_USER,
        AUTH_PASSWORD,
    )
    .unwrap();
    let before = exporter.scrape().unwrap();
    assert_eq!(
        sample(&before, "pgbouncer_up", &[]),
        Some(1.0),
        "{before}\n{}",
        exporter.log()
    );

    // Act: an application runs transactions through PgBouncer and stays connected.
    let client = connect(bouncer.port(), "app", APP_PASSWORD, "postgres")
        .await
        .unwrap();
    for _ in 0..10 {
        bump(&client).await.unwrap();
    }
    assert_eq!(
        single_value(
            &client,
            "SELECT count(*) FROM pg_class WHERE relname = 'counter'"
        )
        .await,
        "1"
    );
    let after = exporter.scrape().unwrap();
    // What one scrape costs (a SCRAM login and seven SHOW commands), for the report.
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let started = Instant::now();
            exporter.scrape().unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "pooler_exporter_scrape_ms_median={:.1} pooler_exporter_scrape_ms_max={:.1}",
        times[5], times[9]
    );

    // Assert: the counters of the application's database moved, and its pool is there with its
    // database and user labels.
    let app_db = [("database", "postgres")];
    let moved = |name: &str| {
        let old = sample(&before, name, &app_db).unwrap_or(0.0);
        let new = sample(&after, name, &app_db)
            .unwrap_or_else(|| panic!("{name}{{database=\"postgres\"}} missing:\n{after}"));
        assert!(new > old, "{name}: {old} -> {new}\n{after}");
        new
    };
    assert!(moved("pgbouncer_stats_queries_pooled_total") >= 10.0);
    assert!(moved("pgbouncer_stats_sql_transactions_pooled_total") >= 10.0);
    moved("pgbouncer_stats_received_bytes_total");
    moved("pgbouncer_stats_sent_bytes_total");
    moved("pgbouncer_stats_queries_duration_seconds_total");
    let pool = [("database", "postgres"), ("user", "app")];
    assert!(
        sample(&after, "pgbouncer_pools_client_active_connections", &pool).unwrap() >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "pgbouncer_pools_server_idle_connections", &pool).unwrap()
            + sample(&after, "pgbouncer_pools_server_used_connections", &pool).unwrap()
            >= 1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "pgbouncer_pools_client_waiting_connections", &pool),
        Some(0.0)
    );
    assert_eq!(
        sample(&after, "pgbouncer_pools_client_maxwait_seconds", &pool),
        Some(0.0)
    );
    assert_eq!(
        sample(&after, "pgbouncer_config_max_client_connections", &[]),
        Some(f64::from(pooler.spec.pgbouncer.max_client_conn))
    );
    assert!(
        sample(
            &after,
            "pgbouncer_databases_current_connections",
            &[("name", "postgres"), ("host", "127.0.0.1")]
        )
        .unwrap()
            >= 1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "pgbouncer_client_connections",
            &[
                ("database", "postgres"),
                ("user", "app"),
                ("state", "active")
            ]
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "pgbouncer_version_info",
            &[(
                "version",
                &format!("PgBouncer {}", testbed::pgbouncer::VERSION)
            )]
        ),
        Some(1.0),
        "{after}"
    );
    // No secret in what is served or logged.
    assert!(!after.contains(AUTH_PASSWORD) && !exporter.log().contains(AUTH_PASSWORD));

    // PgBouncer stops: the exporter still answers, with pgbouncer_up 0.
    drop(client);
    bouncer.stop();
    let down = exporter.scrape().unwrap();
    assert_eq!(sample(&down, "pgbouncer_up", &[]), Some(0.0), "{down}");
    assert!(!down.contains("pgbouncer_pools_"), "{down}");
    assert_eq!(exporter.get("/healthz").unwrap().0, 200);
    assert!(
        exporter.log().contains("pgbouncer_up is 0"),
        "{}",
        exporter.log()
    );
}
