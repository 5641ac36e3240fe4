//! What to run so that a role matches its PostgresUser (pure): desired attributes, validity,
//! password verifier and memberships against what `pg_authid` / `pg_auth_members` hold.

use api::postgres_user::{Membership, RoleAttributes};

use super::statement::Statement;
use crate::quote::{identifier, literal};

/// A role as the catalog describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogRole {
    /// `rolsuper`, `rolinherit`, `rolcreaterole`, `rolcreatedb`, `rolcanlogin`,
    /// `rolreplication`, `rolbypassrls`, `rolconnlimit`.
    pub attributes: RoleAttributes,
    /// `rolvaliduntil` as seconds since the epoch (`f64::INFINITY` for `infinity`).
    pub valid_until: Option<f64>,
    /// `rolpassword` (a verifier), when any.
    pub verifier: Option<String>,
    /// Groups it belongs to.
    pub memberships: Vec<CatalogMembership>,
}

/// A row of `pg_auth_members` for the role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogMembership {
    /// Group role.
    pub role: String,
    /// Role that granted it (a REVOKE must name it).
    pub grantor: String,
    /// `admin_option`.
    pub admin: bool,
    /// `inherit_option`.
    pub inherit: bool,
    /// `set_option`.
    pub set: bool,
}

/// What the role should be.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredRole {
    /// Role name.
    pub name: String,
    /// Attributes.
    pub attributes: RoleAttributes,
    /// `VALID UNTIL` as given (RFC 3339 or `infinity`) and as seconds since the epoch.
    pub valid_until: Option<(String, f64)>,
    /// A new verifier to store, when the stored one does not match the password.
    pub new_verifier: Option<String>,
    /// Groups.
    pub memberships: Vec<Membership>,
}

/// Parses `validUntil` (RFC 3339 or `infinity`) into (text PostgreSQL accepts, epoch seconds).
pub fn parse_valid_until(value: &str) -> Result<(String, f64), String> {
    if value == "infinity" {
        return Ok(("infinity".to_string(), f64::INFINITY));
    }
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|time| {
            let utc = time.with_timezone(&chrono::Utc);
            (
                utc.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                utc.timestamp() as f64 + f64::from(utc.timestamp_subsec_micros()) / 1e6,
            )
        })
        .map_err(|error| {
            format!(
                "validUntil {value:?} is not an RFC 3339 time such as 2027-01-01T00:00:00Z: {error}"
            )
        })
}

/// The options of CREATE/ALTER ROLE that differ (all of them for a new role).
fn attribute_options(wanted: &RoleAttributes, current: Option<&RoleAttributes>) -> Vec<String> {
    let flags = [
        ("SUPERUSER", wanted.superuser, current.map(|c| c.superuser)),
        ("CREATEDB", wanted.create_db, current.map(|c| c.create_db)),
        (
            "CREATEROLE",
            wanted.create_role,
            current.map(|c| c.create_role),
        ),
        ("INHERIT", wanted.inherit, current.map(|c| c.inherit)),
        ("LOGIN", wanted.login, current.map(|c| c.login)),
        (
            "REPLICATION",
            wanted.replication,
            current.map(|c| c.replication),
        ),
        (
            "BYPASSRLS",
            wanted.bypass_rls,
            current.map(|c| c.bypass_rls),
        ),
    ];
    let mut options: Vec<String> = flags
        .iter()
        .filter(|(_, wanted, current)| Some(*wanted) != *current)
        .map(|(name, wanted, _)| {
            if *wanted {
                name.to_string()
            } else {
                format!("NO{name}")
            }
        })
        .collect();
    if current.map(|c| c.connection_limit) != Some(wanted.connection_limit) {
        options.push(format!("CONNECTION LIMIT {}", wanted.connection_limit));
    }
    options
}

/// The statements that make the role match `desired` (`current` is `None` when it does not
/// exist). Empty when nothing differs.
pub fn plan(desired: &DesiredRole, current: Option<&CatalogRole>) -> Vec<Statement> {
    let role = identifier(&desired.name);
    let mut statements = Vec::new();
    let mut options = attribute_options(&desired.attributes, current.map(|c| &c.attributes));
    let wanted_validity = desired
        .valid_until
        .as_ref()
        .map(|(_, epoch)| *epoch)
        .unwrap_or(f64::INFINITY);
    let current_validity = current
        .map(|c| c.valid_until.unwrap_or(f64::INFINITY))
        .unwrap_or(f64::INFINITY);
    if (wanted_validity - current_validity).abs() > 0.5
        && !(wanted_validity.is_infinite() && current_validity.is_infinite())
    {
        let text = desired
            .valid_until
            .as_ref()
            .map(|(text, _)| text.as_str())
            .unwrap_or("infinity");
        options.push(format!("VALID UNTIL {}", literal(text)));
    }
    match current {
        None => {
            let summary = format!("CREATE ROLE {role} WITH {}", options.join(" "));
            match &desired.new_verifier {
                Some(verifier) => statements.push(Statement::secret(
                    format!("{summary} PASSWORD {}", literal(verifier)),
                    format!("{summary} PASSWORD <SCRAM-SHA-256 verifier>"),
                )),
                None => statements.push(Statement::plain(summary)),
            }
        }
        Some(_) => {
            if !options.is_empty() {
                statements.push(Statement::plain(format!(
                    "ALTER ROLE {role} WITH {}",
                    options.join(" ")
                )));
            }
            if let Some(verifier) = &desired.new_verifier {
                statements.push(Statement::secret(
                    format!("ALTER ROLE {role} WITH PASSWORD {}", literal(verifier)),
                    format!("ALTER ROLE {role} WITH PASSWORD <SCRAM-SHA-256 verifier>"),
                ));
            }
        }
    }
    let held: &[CatalogMembership] = current.map(|c| c.memberships.as_slice()).unwrap_or(&[]);
    for wanted in &desired.memberships {
        let group = identifier(&wanted.role);
        let grant = format!(
            "GRANT {group} TO {role} WITH ADMIN {}, INHERIT {}, SET {}",
            bool_word(wanted.admin),
            bool_word(wanted.inherit),
            bool_word(wanted.set)
        );
        let rows: Vec<&CatalogMembership> =
            held.iter().filter(|row| row.role == wanted.role).collect();
        if rows.is_empty() {
            statements.push(Statement::plain(grant));
            continue;
        }
        // Options are per grant row: the row granted by us is the one we keep in line; rows of
        // other grantors are revoked below unless they match.
        let matching = |row: &&CatalogMembership| {
            row.admin == wanted.admin && row.inherit == wanted.inherit && row.set == wanted.set
        };
        if !rows.iter().any(matching) {
            if rows.iter().any(|row| row.admin) && !wanted.admin {
                for row in rows.iter().filter(|row| row.admin) {
                    statements.push(Statement::plain(format!(
                        "REVOKE ADMIN OPTION FOR {group} FROM {role} GRANTED BY {}",
                        identifier(&row.grantor)
                    )));
                }
            }
            statements.push(Statement::plain(grant));
        }
    }
    for row in held {
        if !desired.memberships.iter().any(|m| m.role == row.role) {
            statements.push(Statement::plain(format!(
                "REVOKE {} FROM {role} GRANTED BY {}",
                identifier(&row.role),
                identifier(&row.grantor)
            )));
        }
    }
    statements
}

fn bool_word(value: bool) -> &'static str {
    if value { "TRUE" } else { "FALSE" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(name: &str) -> DesiredRole {
        DesiredRole {
            name: name.into(),
            attributes: RoleAttributes::default(),
            valid_until: None,
            new_verifier: None,
            memberships: Vec::new(),
        }
    }

    fn sql(statements: &[Statement]) -> Vec<String> {
        statements.iter().map(|s| s.sql.clone()).collect()
    }

    #[test]
    fn a_new_role_gets_every_attribute_and_the_verifier_only_in_its_sql() {
        let mut wanted = desired("a\"b");
        wanted.new_verifier = Some("SCRAM-SHA-256$4096:c2FsdA==$x:y".into());
        wanted.valid_until = Some(parse_valid_until("2030-01-01T00:00:00Z").unwrap());
        let statements = plan(&wanted, None);
        assert_eq!(
            sql(&statements),
            [
                "CREATE ROLE \"a\"\"b\" WITH NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT LOGIN NOREPLICATION NOBYPASSRLS CONNECTION LIMIT -1 VALID UNTIL '2030-01-01T00:00:00Z' PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$x:y'"
            ]
        );
        assert!(!statements[0].summary.contains("SCRAM-SHA-256$"));
    }

    #[test]
    fn an_existing_role_gets_only_what_differs() {
        let current = CatalogRole {
            valid_until: None,
            ..CatalogRole::default()
        };
        let mut wanted = desired("app");
        assert!(plan(&wanted, Some(&current)).is_empty());
        wanted.attributes.create_db = true;
        wanted.attributes.connection_limit = 5;
        assert_eq!(
            sql(&plan(&wanted, Some(&current))),
            ["ALTER ROLE \"app\" WITH CREATEDB CONNECTION LIMIT 5"]
        );
        let expiring = CatalogRole {
            valid_until: Some(1.0e9),
            ..CatalogRole::default()
        };
        assert_eq!(
            sql(&plan(&desired("app"), Some(&expiring))),
            ["ALTER ROLE \"app\" WITH VALID UNTIL 'infinity'"]
        );
    }

    #[test]
    fn memberships_are_granted_changed_and_revoked() {
        let row = |role: &str, admin| CatalogMembership {
            role: role.into(),
            grantor: "postgres".into(),
            admin,
            inherit: true,
            set: true,
        };
        let current = CatalogRole {
            memberships: vec![row("old", false), row("readers", true)],
            ..CatalogRole::default()
        };
        let mut wanted = desired("app");
        wanted.memberships = vec![
            Membership {
                role: "readers".into(),
                admin: false,
                inherit: true,
                set: false,
            },
            Membership {
                role: "writers".into(),
                admin: false,
                inherit: false,
                set: true,
            },
        ];
        assert_eq!(
            sql(&plan(&wanted, Some(&current))),
            [
                "REVOKE ADMIN OPTION FOR \"readers\" FROM \"app\" GRANTED BY \"postgres\"",
                "GRANT \"readers\" TO \"app\" WITH ADMIN FALSE, INHERIT TRUE, SET FALSE",
                "GRANT \"writers\" TO \"app\" WITH ADMIN FALSE, INHERIT FALSE, SET TRUE",
                "REVOKE \"old\" FROM \"app\" GRANTED BY \"postgres\"",
            ]
        );
    }

    #[test]
    fn valid_until_must_be_rfc3339() {
        assert!(parse_valid_until("tomorrow").is_err());
        assert_eq!(parse_valid_until("infinity").unwrap().1, f64::INFINITY);
        assert_eq!(
            parse_valid_until("2030-01-01T01:00:00+01:00").unwrap().0,
            "2030-01-01T00:00:00Z"
        );
    }
}
