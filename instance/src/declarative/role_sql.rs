//! The acting half of PostgresUser: reads the role from the catalog, runs the plan of
//! [`super::user_plan`] in one transaction, and drops the role (reassigning or refusing when it
//! owns objects).

use api::postgres_user::RoleAttributes;

use super::error::{DeclarativeError, Result};
use super::scram;
use super::sql::{Connector, check_names, run_in_transaction};
use super::statement::Statement;
use super::user_plan::{self, CatalogMembership, CatalogRole, DesiredRole};
use crate::quote::{identifier, literal};

/// The role `name` as the catalog holds it; `None` when it does not exist.
pub async fn read_role(client: &tokio_postgres::Client, name: &str) -> Result<Option<CatalogRole>> {
    let Some(row) = client
        .query_opt(
            "SELECT rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication,
                    rolbypassrls, rolconnlimit, extract(epoch FROM rolvaliduntil)::float8, rolpassword
             FROM pg_authid WHERE rolname = $1",
            &[&name],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_authid"))?
    else {
        return Ok(None);
    };
    let memberships = client
        .query(
            "SELECT g.rolname::text, gr.rolname::text, m.admin_option, m.inherit_option, m.set_option
             FROM pg_auth_members m
             JOIN pg_roles g ON g.oid = m.roleid
             JOIN pg_roles gr ON gr.oid = m.grantor
             JOIN pg_roles r ON r.oid = m.member
             WHERE r.rolname = $1
             ORDER BY 1, 2",
            &[&name],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_auth_members"))?
        .iter()
        .map(|row| CatalogMembership {
            role: row.get(0),
            grantor: row.get(1),
            admin: row.get(2),
            inherit: row.get(3),
            set: row.get(4),
        })
        .collect();
    Ok(Some(CatalogRole {
        attributes: RoleAttributes {
            superuser: row.get(0),
            inherit: row.get(1),
            create_role: row.get(2),
            create_db: row.get(3),
            login: row.get(4),
            replication: row.get(5),
            bypass_rls: row.get(6),
            connection_limit: row.get(7),
        },
        valid_until: row.get(8),
        verifier: row.get(9),
        memberships,
    }))
}

/// What applying a role did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedRole {
    /// Summaries of the statements that ran (empty when the role already matched).
    pub statements: Vec<String>,
    /// Whether a new password verifier was stored.
    pub password_set: bool,
}

/// The role's desired state, minus the password.
#[derive(Clone, Debug, PartialEq)]
pub struct RoleSpec {
    /// Role name.
    pub name: String,
    /// Attributes.
    pub attributes: RoleAttributes,
    /// `validUntil` as written in the spec.
    pub valid_until: Option<String>,
    /// Groups.
    pub memberships: Vec<api::postgres_user::Membership>,
}

/// Makes the role match `spec`, with `password` (when given) stored as a SCRAM verifier: one
/// transaction, nothing run when it already matches.
pub async fn apply_role(
    connector: &Connector,
    spec: &RoleSpec,
    password: Option<&str>,
) -> Result<AppliedRole> {
    check_names(
        std::iter::once(("role", spec.name.as_str())).chain(
            spec.memberships
                .iter()
                .map(|m| ("group role", m.role.as_str())),
        ),
    )?;
    let valid_until = spec
        .valid_until
        .as_deref()
        .map(user_plan::parse_valid_until)
        .transpose()
        .map_err(DeclarativeError::Invalid)?;
    let mut client = connector.connect("postgres").await?;
    let current = read_role(&client, &spec.name).await?;
    let stored = current.as_ref().and_then(|role| role.verifier.as_deref());
    let new_verifier = password
        .filter(|password| !stored.is_some_and(|stored| scram::matches(stored, password)))
        .map(scram::verifier);
    let desired = DesiredRole {
        name: spec.name.clone(),
        attributes: spec.attributes.clone(),
        valid_until,
        new_verifier,
        memberships: spec.memberships.clone(),
    };
    let statements = user_plan::plan(&desired, current.as_ref());
    run_in_transaction(&mut client, &statements).await?;
    Ok(AppliedRole {
        statements: statements.iter().map(|s| s.summary.clone()).collect(),
        password_set: desired.new_verifier.is_some(),
    })
}

/// Drops role `name`. Its privileges are revoked first (`DROP OWNED` in each database that
/// holds some); objects it owns are reassigned to `reassign_to` or, without it, the drop is
/// refused. Returns the statements run; nothing when the role does not exist.
pub async fn drop_role(
    connector: &Connector,
    name: &str,
    reassign_to: Option<&str>,
) -> Result<Vec<String>> {
    let mut client = connector.connect("postgres").await?;
    if read_role(&client, name).await?.is_none() {
        return Ok(Vec::new());
    }
    // Dependencies on the role in every database (dbid 0: shared objects such as databases).
    let rows = client
        .query(
            "SELECT d.datname::text, s.deptype::text, count(*)
             FROM pg_shdepend s
             LEFT JOIN pg_database d ON d.oid = s.dbid
             WHERE s.refclassid = 'pg_authid'::regclass
               AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = $1)
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[&name],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_shdepend"))?;
    let owned: Vec<String> = rows
        .iter()
        .filter(|row| row.get::<_, String>(1) == "o")
        .map(|row| {
            let database: Option<String> = row.get(0);
            let count: i64 = row.get(2);
            format!(
                "{count} in {}",
                database.unwrap_or_else(|| "the cluster (databases)".into())
            )
        })
        .collect();
    if !owned.is_empty() && reassign_to.is_none() {
        return Err(DeclarativeError::DeleteRefused(format!(
            "role {name} owns objects ({}): set spec.reassignOwnedTo to a role that should receive them, or drop them, or set reclaimPolicy: Retain",
            owned.join(", ")
        )));
    }
    let mut databases: Vec<String> = rows
        .iter()
        .filter_map(|row| row.get::<_, Option<String>>(0))
        .collect();
    databases.retain(|database| database != "postgres");
    databases.dedup();
    // Shared objects and `postgres` itself are handled from the `postgres` database, last.
    databases.push("postgres".to_string());
    let role = identifier(name);
    let mut done = Vec::new();
    for database in &databases {
        let mut statements = Vec::new();
        if let Some(target) = reassign_to {
            statements.push(Statement::plain(format!(
                "REASSIGN OWNED BY {role} TO {}",
                identifier(target)
            )));
        }
        statements.push(Statement::plain(format!("DROP OWNED BY {role}")));
        let mut database_client = connector.connect(database).await?;
        run_in_transaction(&mut database_client, &statements).await?;
        done.extend(
            statements
                .into_iter()
                .map(|s| format!("{} (in {database})", s.summary)),
        );
    }
    let drop = Statement::plain(format!("DROP ROLE {role}"));
    run_in_transaction(&mut client, std::slice::from_ref(&drop)).await?;
    done.push(drop.summary);
    Ok(done)
}

/// Makes login role `name` expire at `at` unless it already expires (a login role that is no
/// longer in the Secret stops working after its grace period). Returns the statement run.
pub async fn expire_unless_expiring(
    connector: &Connector,
    name: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<String>> {
    let mut client = connector.connect("postgres").await?;
    let Some(role) = read_role(&client, name).await? else {
        return Ok(None);
    };
    if role.valid_until.is_some_and(f64::is_finite) {
        return Ok(None);
    }
    let statement = Statement::plain(format!(
        "ALTER ROLE {} VALID UNTIL {}",
        identifier(name),
        literal(&at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    ));
    run_in_transaction(&mut client, std::slice::from_ref(&statement)).await?;
    Ok(Some(statement.summary))
}

/// Makes sessions of login role `login` `SET ROLE` to `group` when they start, so that what
/// they create belongs to the group. Returns the statement run.
pub async fn ensure_login_sets_group(
    connector: &Connector,
    login: &str,
    group: &str,
) -> Result<Option<String>> {
    let mut client = connector.connect("postgres").await?;
    let wanted = format!("role={group}");
    let present: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                            WHERE r.rolname = $1 AND s.setdatabase = 0 AND $2 = ANY(s.setconfig))",
            &[&login, &wanted],
        )
        .await
        .map_err(DeclarativeError::sql("reading pg_db_role_setting"))?
        .get(0);
    if present {
        return Ok(None);
    }
    let statement = Statement::plain(format!(
        "ALTER ROLE {} SET role TO {}",
        identifier(login),
        literal(group)
    ));
    run_in_transaction(&mut client, std::slice::from_ref(&statement)).await?;
    Ok(Some(statement.summary))
}
