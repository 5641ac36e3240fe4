//! The role and function PgBouncer's `auth_query` needs, kept applied by the primary: the role
//! `pgbouncer_auth` (login, SCRAM, no other attribute) with the password of the cluster's pooler
//! auth Secret, and in every database that accepts connections (template1 included, so new
//! databases inherit it) the `SECURITY DEFINER` lookup function only that role may execute.
//!
//! PgBouncer 1.18 (Debian's, our image) has no `auth_dbname`: it runs `auth_query` in the
//! database the client asked for, so the function must be in each of them.

use api::contract::{POOLER_AUTH_FUNCTION, POOLER_AUTH_SCHEMA, POOLER_AUTH_USER};

use crate::declarative::error::{DeclarativeError, Result};
use crate::declarative::scram;
use crate::declarative::sql::{Connector, run_in_transaction};
use crate::declarative::statement::Statement;
use crate::quote::{identifier, literal};

/// The auth role as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogAuthRole {
    /// Whether any attribute other than LOGIN is set (superuser, replication, ...), or LOGIN
    /// is missing.
    pub attributes_differ: bool,
    /// `rolpassword` (a SCRAM verifier, or something else).
    pub verifier: Option<String>,
}

/// Attributes of the auth role: it can log in and do nothing else.
const ROLE_ATTRIBUTES: &str =
    "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT";

/// The statement that makes the role right, if any. Its text holds a SCRAM verifier, never the
/// password; its summary holds neither.
pub fn role_statement(current: Option<&CatalogAuthRole>, password: &str) -> Option<Statement> {
    let verb = match current {
        None => "CREATE",
        Some(role)
            if !role.attributes_differ
                && role
                    .verifier
                    .as_deref()
                    .is_some_and(|stored| scram::matches(stored, password)) =>
        {
            return None;
        }
        Some(_) => "ALTER",
    };
    Some(Statement::secret(
        format!(
            "{verb} ROLE {} WITH {ROLE_ATTRIBUTES} PASSWORD {}",
            identifier(POOLER_AUTH_USER),
            literal(&scram::verifier(password))
        ),
        format!(
            "{verb} ROLE {} WITH {ROLE_ATTRIBUTES} PASSWORD '***'",
            identifier(POOLER_AUTH_USER)
        ),
    ))
}

/// Body of the lookup function: the verifier of a login role that is neither a superuser, nor a
/// replication role, nor the auth role itself, and whose password has not expired. No row for
/// anyone else, so PgBouncer refuses them as it refuses an unknown user.
pub fn function_body() -> String {
    format!(
        "SELECT rolname, rolpassword::text FROM pg_catalog.pg_authid \
         WHERE rolname = $1 AND rolcanlogin AND NOT rolsuper AND NOT rolreplication \
         AND rolname <> {} AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())",
        literal(POOLER_AUTH_USER)
    )
}

/// `schema.function(text)`, quoted.
fn function_signature() -> String {
    format!(
        "{}.{}(text)",
        identifier(POOLER_AUTH_SCHEMA),
        identifier(POOLER_AUTH_FUNCTION)
    )
}

/// The statements that create (or repair) the function and its privileges in one database.
/// `SECURITY DEFINER` with a fixed `search_path`, so that a caller's objects cannot stand in for
/// the catalog; `EXECUTE` revoked from PUBLIC and granted to the auth role only.
pub fn function_statements() -> Vec<Statement> {
    let signature = function_signature();
    vec![
        Statement::plain(format!(
            "CREATE OR REPLACE FUNCTION {}.{}(text) \
             RETURNS TABLE (usename name, passwd text) \
             LANGUAGE sql STABLE SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp \
             AS {}",
            identifier(POOLER_AUTH_SCHEMA),
            identifier(POOLER_AUTH_FUNCTION),
            literal(&function_body())
        )),
        Statement::plain(format!("REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")),
        Statement::plain(format!(
            "GRANT USAGE ON SCHEMA {} TO {}",
            identifier(POOLER_AUTH_SCHEMA),
            identifier(POOLER_AUTH_USER)
        )),
        Statement::plain(format!(
            "GRANT EXECUTE ON FUNCTION {signature} TO {}",
            identifier(POOLER_AUTH_USER)
        )),
    ]
}

/// What one pass changed (for the log; no secret in it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Whether the role was created or altered.
    pub role: bool,
    /// Databases whose function was created or repaired.
    pub databases: Vec<String>,
}

/// Applies the role and, in every database that accepts connections, the function. Reads
/// first and writes only what differs, so a pass over a right cluster writes nothing.
pub async fn ensure(connector: &Connector, password: &str) -> Result<Applied> {
    let mut applied = Applied::default();
    let mut client = connector.connect("postgres").await?;
    let current = client
        .query_opt(
            "SELECT NOT (rolcanlogin AND NOT rolsuper AND NOT rolcreatedb AND NOT rolcreaterole \
                    AND NOT rolreplication AND NOT rolbypassrls AND rolinherit), rolpassword \
             FROM pg_authid WHERE rolname = $1",
            &[&POOLER_AUTH_USER],
        )
        .await
        .map_err(DeclarativeError::sql("reading the pooler auth role"))?
        .map(|row| CatalogAuthRole {
            attributes_differ: row.get(0),
            verifier: row.get(1),
        });
    if let Some(statement) = role_statement(current.as_ref(), password) {
        // A secret statement: run_in_transaction keeps it out of the log.
        run_in_transaction(&mut client, &[statement]).await?;
        applied.role = true;
    }
    let databases: Vec<String> = client
        .query(
            "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY 1",
            &[],
        )
        .await
        .map_err(DeclarativeError::sql("listing databases"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    drop(client);
    for database in databases {
        let mut client = match connector.connect(&database).await {
            Ok(client) => client,
            // Dropped since it was listed, or refusing connections for now: the next pass sees.
            Err(error) => {
                tracing::debug!(%database, %error, "skipping a database for the pooler auth function");
                continue;
            }
        };
        if function_is_right(&client).await? {
            continue;
        }
        run_in_transaction(&mut client, &function_statements()).await?;
        applied.databases.push(database);
    }
    Ok(applied)
}

/// Whether the function in the connected database has our body, is `SECURITY DEFINER`, and is
/// executable by the auth role and not by PUBLIC.
async fn function_is_right(client: &tokio_postgres::Client) -> Result<bool> {
    let row = client
        .query_opt(
            "SELECT p.prosrc = $3 AND p.prosecdef \
                    AND has_function_privilege($4, p.oid, 'EXECUTE') \
                    AND NOT has_function_privilege('public', p.oid, 'EXECUTE') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2 AND p.proargtypes = '25'::oidvector",
            &[
                &POOLER_AUTH_SCHEMA,
                &POOLER_AUTH_FUNCTION,
                &function_body(),
                &POOLER_AUTH_USER,
            ],
        )
        .await
        .map_err(DeclarativeError::sql("reading the pooler auth function"))?;
    Ok(row.is_some_and(|row| row.get::<_, bool>(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_statement_holds_a_verifier_and_its_summary_no_secret() {
        let statement = role_statement(None, "pw'x").expect("missing role is created");
        assert!(
            statement
                .sql
                .starts_with("CREATE ROLE \"pgbouncer_auth\" WITH LOGIN NOSUPERUSER")
        );
        assert!(statement.sql.contains("SCRAM-SHA-256$4096:"));
        assert!(!statement.sql.contains("pw'x"));
        assert!(!statement.summary.contains("SCRAM"));
        assert!(statement.summary.ends_with("PASSWORD '***'"));
    }

    #[test]
    fn a_right_role_is_left_alone_and_a_wrong_one_altered() {
        let right = CatalogAuthRole {
            attributes_differ: false,
            verifier: Some(scram::verifier("pw")),
        };
        assert_eq!(role_statement(Some(&right), "pw"), None);
        let other_password = role_statement(Some(&right), "new").unwrap();
        assert!(other_password.sql.starts_with("ALTER ROLE"));
        let superuser = CatalogAuthRole {
            attributes_differ: true,
            ..right
        };
        assert!(role_statement(Some(&superuser), "pw").is_some());
    }

    #[test]
    fn the_function_is_security_definer_with_a_fixed_search_path_and_no_public_execute() {
        let statements = function_statements();
        let create = &statements[0].sql;
        assert!(create.contains("SECURITY DEFINER"));
        assert!(create.contains("SET search_path = pg_catalog, pg_temp"));
        assert!(create.contains("RETURNS TABLE (usename name, passwd text)"));
        assert_eq!(
            statements[1].sql,
            "REVOKE ALL ON FUNCTION \"public\".\"pgbouncer_user_lookup\"(text) FROM PUBLIC"
        );
        assert!(statements[3].sql.ends_with("TO \"pgbouncer_auth\""));
        assert!(function_body().contains("NOT rolsuper"));
    }
}
