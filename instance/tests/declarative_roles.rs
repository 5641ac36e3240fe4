//! PostgresUser's SQL on a real PostgreSQL 18: attributes, memberships with their PG16+ options,
//! validity, SCRAM verifiers (the cleartext never in a statement; neither it nor the verifier in
//! the log or pg_stat_statements), drift repair, hostile names, and dropping with owned objects.

use std::time::Duration;

use api::postgres_user::{Membership, RoleAttributes};
use instance::declarative::error::DeclarativeError;
use instance::declarative::role_sql::{RoleSpec, apply_role, drop_role};
use instance::declarative::sql::Connector;
use testbed::{Postgres, PostgresOptions};

const SUPERUSER_PASSWORD: &str = "super-secret";

fn server() -> Postgres {
    Postgres::start_with(
        PostgresOptions {
            auth_method: "scram-sha-256".into(),
            superuser_password: Some(SUPERUSER_PASSWORD.into()),
            ..PostgresOptions::default()
        }
        .setting("log_statement", "all")
        .setting("shared_preload_libraries", "pg_stat_statements"),
    )
    .expect("PostgreSQL 18 starts")
}

fn connector(server: &Postgres) -> Connector {
    let mut config: tokio_postgres::Config = server.connection_string("postgres").parse().unwrap();
    config.password(SUPERUSER_PASSWORD);
    Connector::new(config)
}

fn role(name: &str) -> RoleSpec {
    RoleSpec {
        name: name.into(),
        attributes: RoleAttributes::default(),
        valid_until: None,
        memberships: Vec::new(),
    }
}

/// Logs in as `user` with `password` over TCP (SCRAM); the error's SQLSTATE when refused.
async fn login(server: &Postgres, user: &str, password: &str) -> Result<(), String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(server.port())
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    match config.connect(tokio_postgres::NoTls).await {
        Ok(_) => Ok(()),
        Err(error) => Err(error
            .as_db_error()
            .map(|db| db.code().code().to_string())
            .unwrap_or_else(|| error.to_string())),
    }
}

async fn attributes_of(client: &tokio_postgres::Client, name: &str) -> Vec<String> {
    let row = client
        .query_one(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit,
                    rolcanlogin, rolconnlimit, rolvaliduntil::text
             FROM pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await
        .unwrap();
    vec![
        format!("super={}", row.get::<_, bool>(0)),
        format!("createdb={}", row.get::<_, bool>(1)),
        format!("createrole={}", row.get::<_, bool>(2)),
        format!("replication={}", row.get::<_, bool>(3)),
        format!("bypassrls={}", row.get::<_, bool>(4)),
        format!("inherit={}", row.get::<_, bool>(5)),
        format!("login={}", row.get::<_, bool>(6)),
        format!("connlimit={}", row.get::<_, i32>(7)),
        format!("validuntil={:?}", row.get::<_, Option<String>>(8)),
    ]
}

#[tokio::test]
async fn every_attribute_and_validity_is_applied_changed_and_repaired_after_drift() {
    let server = server();
    let connector = connector(&server);
    let client = server.client().await.unwrap();
    client.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();

    let mut spec = role("app");
    spec.attributes = RoleAttributes {
        login: false,
        superuser: true,
        create_db: true,
        create_role: true,
        replication: true,
        bypass_rls: true,
        inherit: false,
        connection_limit: 7,
    };
    spec.valid_until = Some("2031-02-03T04:05:06Z".into());
    let applied = apply_role(&connector, &spec, None).await.unwrap();
    assert_eq!(applied.statements.len(), 1, "{:?}", applied.statements);
    assert_eq!(
        attributes_of(&client, "app").await,
        [
            "super=true",
            "createdb=true",
            "createrole=true",
            "replication=true",
            "bypassrls=true",
            "inherit=false",
            "login=false",
            "connlimit=7",
            "validuntil=Some(\"2031-02-03 04:05:06+00\")"
        ]
    );
    // Nothing differs: nothing runs.
    assert!(
        apply_role(&connector, &spec, None)
            .await
            .unwrap()
            .statements
            .is_empty()
    );

    // Every attribute flips back.
    let defaults = role("app");
    let applied = apply_role(&connector, &defaults, None).await.unwrap();
    assert_eq!(applied.statements.len(), 1, "{:?}", applied.statements);
    assert_eq!(
        attributes_of(&client, "app").await,
        [
            "super=false",
            "createdb=false",
            "createrole=false",
            "replication=false",
            "bypassrls=false",
            "inherit=true",
            "login=true",
            "connlimit=-1",
            "validuntil=Some(\"infinity\")"
        ]
    );

    // Drift: changed by hand, repaired by the next apply.
    client
        .batch_execute(
            "ALTER ROLE app CREATEDB NOLOGIN CONNECTION LIMIT 3 VALID UNTIL '2020-01-01'",
        )
        .await
        .unwrap();
    let repaired = apply_role(&connector, &defaults, None).await.unwrap();
    assert_eq!(
        repaired.statements,
        ["ALTER ROLE \"app\" WITH NOCREATEDB LOGIN CONNECTION LIMIT -1 VALID UNTIL 'infinity'"]
    );
    assert_eq!(attributes_of(&client, "app").await[1], "createdb=false");
}

#[tokio::test]
async fn memberships_carry_admin_inherit_and_set_options_and_are_revoked_when_removed() {
    let server = server();
    let connector = connector(&server);
    let client = server.client().await.unwrap();
    client
        .batch_execute("CREATE ROLE readers; CREATE ROLE writers; CREATE ROLE by_hand")
        .await
        .unwrap();
    let membership = |role: &str, admin, inherit, set| Membership {
        role: role.into(),
        admin,
        inherit,
        set,
    };
    let options = || async {
        client
            .query(
                "SELECT g.rolname::text || ':' || m.admin_option || ':' || m.inherit_option || ':' || m.set_option
                 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
                 WHERE r.rolname = 'app' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let mut spec = role("app");
    spec.memberships = vec![
        membership("readers", true, false, true),
        membership("writers", false, true, false),
    ];
    apply_role(&connector, &spec, None).await.unwrap();
    assert_eq!(
        options().await,
        ["readers:true:false:true", "writers:false:true:false"]
    );

    // Options change in place; a membership granted by hand and one removed from the spec go.
    client.batch_execute("GRANT by_hand TO app").await.unwrap();
    spec.memberships = vec![membership("readers", false, true, false)];
    apply_role(&connector, &spec, None).await.unwrap();
    assert_eq!(options().await, ["readers:false:true:false"]);

    // PostgreSQL's refusal comes back verbatim.
    spec.memberships = vec![membership("missing_group", false, true, true)];
    match apply_role(&connector, &spec, None).await {
        Err(DeclarativeError::Sql {
            sqlstate, message, ..
        }) => {
            assert_eq!(sqlstate, "42704");
            assert_eq!(message, "role \"missing_group\" does not exist");
        }
        other => panic!("expected an SQL error, got {other:?}"),
    }
    assert_eq!(
        options().await,
        ["readers:false:true:false"],
        "the failed plan ran in one transaction: nothing of it stayed"
    );
}

#[tokio::test]
async fn passwords_are_scram_verifiers_never_in_the_log_or_pg_stat_statements() {
    let server = server();
    let connector = connector(&server);
    let client = server.client().await.unwrap();
    client
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    let first = "Very'Secret\"Pass;word\\1";
    let second = "Another-Secret-2";

    let applied = apply_role(&connector, &role("app"), Some(first))
        .await
        .unwrap();
    assert!(applied.password_set);
    let verifier: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    login(&server, "app", first).await.unwrap();
    assert_eq!(login(&server, "app", "wrong").await, Err("28P01".into()));

    // The same password: the stored verifier is recognised, nothing runs.
    let again = apply_role(&connector, &role("app"), Some(first))
        .await
        .unwrap();
    assert!(!again.password_set && again.statements.is_empty());

    // A new password replaces the old one.
    let changed = apply_role(&connector, &role("app"), Some(second))
        .await
        .unwrap();
    assert!(changed.password_set);
    assert!(
        changed
            .statements
            .iter()
            .all(|s| !s.contains("SCRAM-SHA-256$"))
    );
    login(&server, "app", second).await.unwrap();
    assert_eq!(login(&server, "app", first).await, Err("28P01".into()));

    // A role without a password: its statement is logged as any other.
    apply_role(&connector, &role("plain"), None).await.unwrap();
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        log.contains("CREATE ROLE \"plain\""),
        "log_statement=all logs the role statements without a secret"
    );
    // Nor a verifier: it lets anyone who reads it try passwords offline.
    assert!(
        !log.contains("SCRAM-SHA-256$") && !log.contains("PASSWORD"),
        "the server log holds no verifier"
    );
    let statements: Vec<String> = client
        .query("SELECT query FROM pg_stat_statements", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        statements
            .iter()
            .all(|query| !query.contains("SCRAM-SHA-256$")),
        "pg_stat_statements holds no verifier: {statements:?}"
    );
    for password in [first, second, "Very'"] {
        assert!(
            !log.contains(password),
            "the server log holds no cleartext password"
        );
        assert!(
            statements.iter().all(|query| !query.contains(password)),
            "pg_stat_statements holds no cleartext password"
        );
    }
}

#[tokio::test]
async fn hostile_role_names_and_passwords_neither_break_nor_inject() {
    let server = server();
    let connector = connector(&server);
    let client = server.client().await.unwrap();
    client.batch_execute("CREATE ROLE victim").await.unwrap();
    let long = "ü".repeat(31) + "x"; // 63 bytes
    let names = [
        "it's",
        "quote\"d",
        "x\"; DROP ROLE victim; --",
        "x'; DROP ROLE victim; --",
        "back\\slash",
        "ünï©ødé ß",
        long.as_str(),
    ];
    for name in names {
        let mut spec = role(name);
        spec.memberships = vec![Membership {
            role: "victim".into(),
            admin: false,
            inherit: true,
            set: true,
        }];
        let password = format!("{name}'; ALTER ROLE victim SUPERUSER; --");
        apply_role(&connector, &spec, Some(&password))
            .await
            .unwrap_or_else(|error| panic!("{name:?}: {error}"));
        let found: i64 = client
            .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 1, "role {name:?} exists under its exact name");
        login(&server, name, &password).await.unwrap();
        assert!(
            apply_role(&connector, &spec, Some(&password))
                .await
                .unwrap()
                .statements
                .is_empty()
        );
    }
    let victim: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !victim,
        "the victim still exists and was not made superuser"
    );
    for name in names {
        drop_role(&connector, name, None).await.unwrap();
    }
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)",
            &[&names.to_vec()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn dropping_a_role_refuses_while_it_owns_objects_and_reassigns_when_asked() {
    let server = server();
    let connector = connector(&server);
    let client = server.client().await.unwrap();
    client.batch_execute("CREATE ROLE heir").await.unwrap();
    client.batch_execute("CREATE DATABASE shop").await.unwrap();
    apply_role(&connector, &role("owner"), None).await.unwrap();
    let shop = server.client_for("shop").await.unwrap();
    shop.batch_execute(
        "CREATE TABLE orders (id int); ALTER TABLE orders OWNER TO owner;
         CREATE TABLE items (id int); GRANT SELECT ON items TO owner",
    )
    .await
    .unwrap();

    match drop_role(&connector, "owner", None).await {
        Err(DeclarativeError::DeleteRefused(message)) => {
            assert!(message.contains("owns objects (1 in shop)"), "{message}");
            assert!(message.contains("reassignOwnedTo"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let exists = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&name])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        }
    };
    assert!(exists("owner").await);

    let done = drop_role(&connector, "owner", Some("heir")).await.unwrap();
    assert!(done.last().unwrap().starts_with("DROP ROLE"), "{done:?}");
    assert!(!exists("owner").await);
    let table_owner: String = shop
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(table_owner, "heir");

    // A role with privileges only (no objects) drops without reassigning.
    apply_role(&connector, &role("reader"), None).await.unwrap();
    shop.batch_execute("GRANT SELECT ON items TO reader")
        .await
        .unwrap();
    drop_role(&connector, "reader", None).await.unwrap();
    assert!(!exists("reader").await);
    // Dropping what does not exist is done.
    assert!(
        drop_role(&connector, "reader", None)
            .await
            .unwrap()
            .is_empty()
    );
}
