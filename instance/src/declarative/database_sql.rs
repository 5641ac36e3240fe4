//! The acting half of PostgresDatabase: reads `pg_database` and the catalog inside the database,
//! runs the plans of [`super::database_plan`] (CREATE DATABASE alone, as PostgreSQL requires;
//! the rest of the database's statements in one transaction, what lives inside in another), and
//! drops the database (refused while sessions are connected, unless forced).

use std::collections::BTreeMap;

use api::postgres_database::PostgresDatabaseSpec;

use super::database_plan::{self, CatalogDatabase, CatalogInside, ObjectKind, Privileges};
use super::error::{DeclarativeError, Result};
use super::sql::{Connector, check_names, run_alone, run_in_transaction};
use super::statement::Statement;
use crate::quote::identifier;

/// `aclexplode` of an ACL column (defaults filled in) as `grantee=PRIVILEGE` strings; PUBLIC is
/// an empty grantee.
fn acl_array(acl: &str, kind: &str, owner: &str) -> String {
    format!(
        "coalesce(array(SELECT coalesce(r.rolname::text, '') || '=' || a.privilege_type
                        FROM aclexplode(coalesce({acl}, acldefault({kind}, {owner}))) a
                        LEFT JOIN pg_roles r ON r.oid = a.grantee), '{{}}')"
    )
}

fn acl_map(entries: Vec<String>) -> BTreeMap<String, Privileges> {
    let mut map: BTreeMap<String, Privileges> = BTreeMap::new();
    for entry in entries {
        if let Some((grantee, privilege)) = entry.rsplit_once('=') {
            map.entry(grantee.to_string())
                .or_default()
                .insert(privilege.to_string());
        }
    }
    map
}

/// The database `name` as `pg_database` holds it.
pub async fn read_database(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Option<CatalogDatabase>> {
    let query = format!(
        "SELECT pg_get_userbyid(datdba)::text, pg_encoding_to_char(encoding)::text, datcollate::text,
                datconnlimit, {}
         FROM pg_database WHERE datname = $1",
        acl_array("datacl", "'d'", "datdba")
    );
    let row = client
        .query_opt(&query, &[&name])
        .await
        .map_err(DeclarativeError::sql("reading pg_database"))?;
    Ok(row.map(|row| CatalogDatabase {
        owner: row.get(0),
        encoding: row.get(1),
        collate: row.get(2),
        connection_limit: row.get(3),
        acl: acl_map(row.get(4)),
    }))
}

/// What lives inside the connected database, for `schemas`.
pub async fn read_inside(
    client: &tokio_postgres::Client,
    schemas: &[String],
) -> Result<(CatalogInside, bool)> {
    let mut inside = CatalogInside::default();
    let query = format!(
        "SELECT n.nspname::text, pg_get_userbyid(n.nspowner)::text, {}
         FROM pg_namespace n WHERE n.nspname = ANY($1)",
        acl_array("n.nspacl", "'n'", "n.nspowner")
    );
    for row in client
        .query(&query, &[&schemas])
        .await
        .map_err(DeclarativeError::sql("reading pg_namespace"))?
    {
        inside
            .schemas
            .insert(row.get(0), (row.get(1), acl_map(row.get(2))));
    }
    for row in client
        .query(
            "SELECT e.extname::text, e.extversion::text, n.nspname::text
             FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace",
            &[],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_extension"))?
    {
        inside
            .extensions
            .insert(row.get(0), (row.get(1), row.get(2)));
    }
    let query = format!(
        "SELECT n.nspname::text, o.kind, pg_get_userbyid(o.owner)::text, {}
         FROM (SELECT relnamespace AS ns, CASE relkind WHEN 'S' THEN 's' ELSE 'r' END AS kind,
                      relowner AS owner, relacl AS acl
               FROM pg_class WHERE relkind IN ('r', 'v', 'm', 'f', 'p', 'S')
               UNION ALL
               SELECT pronamespace, 'f', proowner, proacl FROM pg_proc WHERE prokind IN ('f', 'a', 'w')) o
         JOIN pg_namespace n ON n.oid = o.ns
         WHERE n.nspname = ANY($1)",
        acl_array("o.acl", "o.kind::\"char\"", "o.owner")
    );
    for row in client
        .query(&query, &[&schemas])
        .await
        .map_err(DeclarativeError::sql(
            "reading the privileges of tables, sequences and functions",
        ))?
    {
        let kind = match row.get::<_, String>(1).as_str() {
            "s" => ObjectKind::Sequence,
            "f" => ObjectKind::Function,
            _ => ObjectKind::Table,
        };
        inside
            .objects
            .entry((row.get(0), kind))
            .or_default()
            .push((row.get(2), acl_map(row.get(3))));
    }
    for row in client
        .query(
            "SELECT pg_get_userbyid(d.defaclrole)::text, n.nspname::text, d.defaclobjtype::text,
                    coalesce(array(SELECT coalesce(r.rolname::text, '') || '=' || a.privilege_type
                                   FROM aclexplode(d.defaclacl) a
                                   LEFT JOIN pg_roles r ON r.oid = a.grantee), '{}')
             FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace
             WHERE n.nspname = ANY($1)",
            &[&schemas],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_default_acl"))?
    {
        let code: String = row.get(2);
        let Some(kind) = ObjectKind::ALL
            .into_iter()
            .find(|kind| kind.default_acl_code() == code)
        else {
            continue;
        };
        inside
            .default_acls
            .insert((row.get(0), row.get(1), kind), acl_map(row.get(3)));
    }
    let public_create: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n,
                            aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                            WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')",
            &[],
        )
        .await
        .map_err(DeclarativeError::sql("reading the privileges of schema public"))?
        .get(0);
    Ok((inside, public_create))
}

/// What applying a database did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedDatabase {
    /// Summaries of the statements that ran.
    pub statements: Vec<String>,
    /// Whether the database was created now.
    pub created: bool,
}

/// Makes the database match `spec`.
pub async fn apply_database(
    connector: &Connector,
    spec: &PostgresDatabaseSpec,
) -> Result<AppliedDatabase> {
    check_names(
        [
            ("database", spec.name.as_str()),
            ("owner", spec.owner.as_str()),
        ]
        .into_iter()
        .chain(spec.privileges.iter().map(|g| ("role", g.role.as_str())))
        .chain(spec.schemas.iter().flat_map(|schema| {
            [("schema", schema.name.as_str())]
                .into_iter()
                .chain(schema.owner.iter().map(|o| ("schema owner", o.as_str())))
                .chain(schema.privileges.iter().map(|g| ("role", g.role.as_str())))
        }))
        .chain(spec.extensions.iter().flat_map(|e| {
            [("extension", e.name.as_str())]
                .into_iter()
                .chain(e.schema.iter().map(|s| ("extension schema", s.as_str())))
        })),
    )?;
    let mut client = connector.connect("postgres").await?;
    let current = read_database(&client, &spec.name).await?;
    let (create, statements) = database_plan::plan_database(spec, current.as_ref())
        .map_err(DeclarativeError::Immutable)?;
    let mut applied = AppliedDatabase::default();
    if let Some(create) = &create {
        run_alone(&client, create).await?;
        applied.created = true;
        applied.statements.push(create.summary.clone());
    }
    run_in_transaction(&mut client, &statements).await?;
    applied
        .statements
        .extend(statements.iter().map(|s| s.summary.clone()));
    let schemas: Vec<String> = spec.schemas.iter().map(|s| s.name.clone()).collect();
    let mut inside_client = connector.connect(&spec.name).await?;
    let (inside, public_create) = read_inside(&inside_client, &schemas).await?;
    let statements = database_plan::plan_inside(spec, &inside, public_create);
    run_in_transaction(&mut inside_client, &statements).await?;
    applied
        .statements
        .extend(statements.iter().map(|s| s.summary.clone()));
    Ok(applied)
}

/// Drops database `name`: refused while other sessions are connected, unless `force`
/// (`WITH (FORCE)` terminates them). Returns the statement run; nothing when it does not exist.
pub async fn drop_database(connector: &Connector, name: &str, force: bool) -> Result<Vec<String>> {
    let client = connector.connect("postgres").await?;
    if read_database(&client, name).await?.is_none() {
        return Ok(Vec::new());
    }
    let sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .map_err(DeclarativeError::sql(
            "counting the sessions of the database",
        ))?
        .get(0);
    if sessions > 0 && !force {
        return Err(DeclarativeError::DeleteRefused(format!(
            "{sessions} session(s) are connected to database {name}: disconnect them, or set spec.forceDelete: true to terminate them, or set reclaimPolicy: Retain"
        )));
    }
    let mut sql = format!("DROP DATABASE {}", identifier(name));
    if force {
        sql.push_str(" WITH (FORCE)");
    }
    let statement = Statement::plain(sql);
    run_alone(&client, &statement).await?;
    Ok(vec![statement.summary])
}
