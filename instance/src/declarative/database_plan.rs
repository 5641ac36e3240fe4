//! What to run so that a database matches its PostgresDatabase (pure): the database itself
//! (create, owner, connection limit, privileges, PUBLIC's access) and what lives inside it
//! (schemas, extensions, privileges on schemas and their objects, default privileges).
//!
//! Privilege lists are the truth for every grantee except the object's owner and PUBLIC: what a
//! spec no longer names (or a hand-made GRANT) is revoked.

use std::collections::{BTreeMap, BTreeSet};

use api::postgres_database::{PostgresDatabaseSpec, SchemaSpec};

use super::statement::Statement;
use crate::quote::{identifier, literal};

/// Privileges, by name as `aclexplode` spells them.
pub type Privileges = BTreeSet<String>;

/// An ACL: privileges by grantee (`""` for PUBLIC).
pub type Acl = BTreeMap<String, Privileges>;

/// One object of a schema: its owner and its ACL.
pub type ObjectAcl = (String, Acl);

/// The database as `pg_database` describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogDatabase {
    /// Owner.
    pub owner: String,
    /// Encoding name.
    pub encoding: String,
    /// `datcollate`.
    pub collate: String,
    /// `datconnlimit`.
    pub connection_limit: i32,
    /// Privileges by grantee (`""` for PUBLIC), defaults filled in.
    pub acl: BTreeMap<String, Privileges>,
}

/// What lives inside the database, for the schemas the spec names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogInside {
    /// Schemas: name -> (owner, privileges by grantee).
    pub schemas: BTreeMap<String, (String, BTreeMap<String, Privileges>)>,
    /// Extensions: name -> (version, schema).
    pub extensions: BTreeMap<String, (String, String)>,
    /// Objects of the named schemas: (schema, kind) -> one entry per object (its owner and its
    /// privileges by grantee).
    pub objects: BTreeMap<(String, ObjectKind), Vec<ObjectAcl>>,
    /// `pg_default_acl` of the named schemas: (creator, schema, kind) -> privileges by grantee.
    pub default_acls: BTreeMap<(String, String, ObjectKind), BTreeMap<String, Privileges>>,
}

/// Kinds of objects whose privileges a schema grant covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// Tables, views, materialized views, foreign and partitioned tables.
    Table,
    /// Sequences.
    Sequence,
    /// Functions (and aggregates).
    Function,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 3] = [
        ObjectKind::Table,
        ObjectKind::Sequence,
        ObjectKind::Function,
    ];

    /// Plural keyword of GRANT ... ON ALL <x> IN SCHEMA and ALTER DEFAULT PRIVILEGES ON <x>.
    pub fn keyword(self) -> &'static str {
        match self {
            ObjectKind::Table => "TABLES",
            ObjectKind::Sequence => "SEQUENCES",
            ObjectKind::Function => "FUNCTIONS",
        }
    }

    /// `pg_default_acl.defaclobjtype`.
    pub fn default_acl_code(self) -> &'static str {
        match self {
            ObjectKind::Table => "r",
            ObjectKind::Sequence => "S",
            ObjectKind::Function => "f",
        }
    }

    fn all_privileges(self) -> &'static [&'static str] {
        match self {
            ObjectKind::Table => &[
                "SELECT",
                "INSERT",
                "UPDATE",
                "DELETE",
                "TRUNCATE",
                "REFERENCES",
                "TRIGGER",
                "MAINTAIN",
            ],
            ObjectKind::Sequence => &["USAGE", "SELECT", "UPDATE"],
            ObjectKind::Function => &["EXECUTE"],
        }
    }
}

const DATABASE_PRIVILEGES: &[&str] = &["CREATE", "CONNECT", "TEMPORARY"];
const SCHEMA_PRIVILEGES: &[&str] = &["USAGE", "CREATE"];

/// The privileges a spec list names, with `ALL` spelled out.
fn expand(list: &[String], all: &[&str]) -> Privileges {
    let mut out = Privileges::new();
    for privilege in list {
        let privilege = privilege.trim().to_ascii_uppercase();
        match privilege.as_str() {
            "ALL" | "ALL PRIVILEGES" => out.extend(all.iter().map(|p| p.to_string())),
            "TEMP" => {
                out.insert("TEMPORARY".to_string());
            }
            _ => {
                out.insert(privilege);
            }
        }
    }
    out
}

fn join(privileges: &Privileges) -> String {
    privileges.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Statements that make `held` (by grantee) equal `wanted` (by grantee), skipping `owner` and
/// PUBLIC; `grant(privileges, grantee)` and `revoke(privileges, grantee)` render them.
fn reconcile_acl(
    held: &BTreeMap<String, Privileges>,
    wanted: &BTreeMap<String, Privileges>,
    owners: &[&str],
    grant: &dyn Fn(&str, &str) -> String,
    revoke: &dyn Fn(&str, &str) -> String,
) -> Vec<Statement> {
    let mut statements = Vec::new();
    let managed = |grantee: &str| !grantee.is_empty() && !owners.contains(&grantee);
    for (grantee, privileges) in wanted.iter().filter(|(g, _)| managed(g)) {
        let empty = Privileges::new();
        let current = held.get(grantee).unwrap_or(&empty);
        let missing: Privileges = privileges.difference(current).cloned().collect();
        if !missing.is_empty() {
            statements.push(Statement::plain(grant(
                &join(&missing),
                &identifier(grantee),
            )));
        }
    }
    for (grantee, privileges) in held.iter().filter(|(g, _)| managed(g)) {
        let empty = Privileges::new();
        let keep = wanted.get(grantee).unwrap_or(&empty);
        let extra: Privileges = privileges.difference(keep).cloned().collect();
        if !extra.is_empty() {
            statements.push(Statement::plain(revoke(
                &join(&extra),
                &identifier(grantee),
            )));
        }
    }
    statements
}

/// What `spec` asks of the database itself, as (create statement when it must be created, the
/// other statements), or an error naming a create-only field that differs.
pub fn plan_database(
    spec: &PostgresDatabaseSpec,
    current: Option<&CatalogDatabase>,
) -> Result<(Option<Statement>, Vec<Statement>), String> {
    let database = identifier(&spec.name);
    let mut create = None;
    let mut statements = Vec::new();
    let empty = CatalogDatabase::default();
    let held = match current {
        None => {
            let mut sql = format!(
                "CREATE DATABASE {database} OWNER {}",
                identifier(&spec.owner)
            );
            let template = spec.template.clone().or_else(|| {
                (spec.encoding.is_some() || spec.locale.is_some()).then(|| "template0".to_string())
            });
            if let Some(template) = template {
                sql.push_str(&format!(" TEMPLATE {}", identifier(&template)));
            }
            if let Some(encoding) = &spec.encoding {
                sql.push_str(&format!(" ENCODING {}", literal(encoding)));
            }
            if let Some(locale) = &spec.locale {
                sql.push_str(&format!(" LOCALE {}", literal(locale)));
            }
            if spec.connection_limit != -1 {
                sql.push_str(&format!(" CONNECTION LIMIT {}", spec.connection_limit));
            }
            create = Some(Statement::plain(sql));
            // A new database: its owner and PUBLIC hold the defaults, nobody else anything.
            &empty
        }
        Some(current) => {
            if let Some(encoding) = &spec.encoding
                && !encoding.eq_ignore_ascii_case(&current.encoding)
                && !(encoding.eq_ignore_ascii_case("UTF-8") && current.encoding == "UTF8")
            {
                return Err(format!(
                    "encoding is {encoding} in the spec but the database was created with {}: encoding is set only at creation; restore the spec's value or create another database",
                    current.encoding
                ));
            }
            if let Some(locale) = &spec.locale
                && *locale != current.collate
            {
                return Err(format!(
                    "locale is {locale} in the spec but the database was created with {}: locale is set only at creation; restore the spec's value or create another database",
                    current.collate
                ));
            }
            if current.owner != spec.owner {
                statements.push(Statement::plain(format!(
                    "ALTER DATABASE {database} OWNER TO {}",
                    identifier(&spec.owner)
                )));
            }
            if current.connection_limit != spec.connection_limit {
                statements.push(Statement::plain(format!(
                    "ALTER DATABASE {database} WITH CONNECTION LIMIT {}",
                    spec.connection_limit
                )));
            }
            current
        }
    };
    let wanted: BTreeMap<String, Privileges> = spec
        .privileges
        .iter()
        .map(|grant| {
            (
                grant.role.clone(),
                expand(&grant.privileges, DATABASE_PRIVILEGES),
            )
        })
        .collect();
    statements.extend(reconcile_acl(
        &held.acl,
        &wanted,
        &[spec.owner.as_str()],
        &|privileges, grantee| format!("GRANT {privileges} ON DATABASE {database} TO {grantee}"),
        &|privileges, grantee| format!("REVOKE {privileges} ON DATABASE {database} FROM {grantee}"),
    ));
    let public_held = match current {
        // CONNECT and TEMPORARY are PUBLIC's defaults on a new database.
        None => ["CONNECT", "TEMPORARY"]
            .iter()
            .map(|p| p.to_string())
            .collect(),
        Some(current) => current.acl.get("").cloned().unwrap_or_default(),
    };
    let public_extra: Privileges = public_held
        .intersection(
            &["CONNECT", "TEMPORARY"]
                .iter()
                .map(|p| p.to_string())
                .collect(),
        )
        .cloned()
        .collect();
    if spec.revoke_public && !public_extra.is_empty() {
        statements.push(Statement::plain(format!(
            "REVOKE {} ON DATABASE {database} FROM PUBLIC",
            join(&public_extra)
        )));
    }
    Ok((create, statements))
}

fn schema_owner<'a>(spec: &'a PostgresDatabaseSpec, schema: &'a SchemaSpec) -> &'a str {
    schema.owner.as_deref().unwrap_or(&spec.owner)
}

/// What `spec` asks inside the database: schemas and owners, extensions, privileges on schemas
/// and on their objects, default privileges, and PUBLIC's CREATE on `public`.
pub fn plan_inside(
    spec: &PostgresDatabaseSpec,
    current: &CatalogInside,
    public_can_create_in_public: bool,
) -> Vec<Statement> {
    let mut statements = Vec::new();
    for schema in &spec.schemas {
        let name = identifier(&schema.name);
        let owner = schema_owner(spec, schema);
        match current.schemas.get(&schema.name) {
            None => statements.push(Statement::plain(format!(
                "CREATE SCHEMA {name} AUTHORIZATION {}",
                identifier(owner)
            ))),
            Some((current_owner, _)) if current_owner != owner => {
                statements.push(Statement::plain(format!(
                    "ALTER SCHEMA {name} OWNER TO {}",
                    identifier(owner)
                )))
            }
            Some(_) => {}
        }
    }
    for extension in &spec.extensions {
        let name = identifier(&extension.name);
        match current.extensions.get(&extension.name) {
            None => {
                let mut sql = format!("CREATE EXTENSION {name}");
                if let Some(schema) = &extension.schema {
                    sql.push_str(&format!(" SCHEMA {}", identifier(schema)));
                }
                if let Some(version) = &extension.version {
                    sql.push_str(&format!(" VERSION {}", literal(version)));
                }
                statements.push(Statement::plain(sql));
            }
            Some((version, schema)) => {
                if let Some(wanted) = &extension.version
                    && wanted != version
                {
                    statements.push(Statement::plain(format!(
                        "ALTER EXTENSION {name} UPDATE TO {}",
                        literal(wanted)
                    )));
                }
                if let Some(wanted) = &extension.schema
                    && wanted != schema
                {
                    statements.push(Statement::plain(format!(
                        "ALTER EXTENSION {name} SET SCHEMA {}",
                        identifier(wanted)
                    )));
                }
            }
        }
    }
    for schema in &spec.schemas {
        let name = identifier(&schema.name);
        let owner = schema_owner(spec, schema);
        let empty = BTreeMap::new();
        let held = current
            .schemas
            .get(&schema.name)
            .map(|(_, acl)| acl)
            .unwrap_or(&empty);
        let wanted: BTreeMap<String, Privileges> = schema
            .privileges
            .iter()
            .map(|grant| (grant.role.clone(), expand(&grant.schema, SCHEMA_PRIVILEGES)))
            .collect();
        statements.extend(reconcile_acl(
            held,
            &wanted,
            &[owner],
            &|privileges, grantee| format!("GRANT {privileges} ON SCHEMA {name} TO {grantee}"),
            &|privileges, grantee| format!("REVOKE {privileges} ON SCHEMA {name} FROM {grantee}"),
        ));
        for kind in ObjectKind::ALL {
            let wanted: BTreeMap<String, Privileges> = schema
                .privileges
                .iter()
                .map(|grant| {
                    let list = match kind {
                        ObjectKind::Table => &grant.tables,
                        ObjectKind::Sequence => &grant.sequences,
                        ObjectKind::Function => &grant.functions,
                    };
                    (grant.role.clone(), expand(list, kind.all_privileges()))
                })
                .filter(|(_, privileges)| !privileges.is_empty())
                .collect();
            let keyword = kind.keyword();
            statements.extend(plan_objects(
                current
                    .objects
                    .get(&(schema.name.clone(), kind))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
                &wanted,
                &|privileges, grantee| {
                    format!("GRANT {privileges} ON ALL {keyword} IN SCHEMA {name} TO {grantee}")
                },
                &|privileges, grantee| {
                    format!("REVOKE {privileges} ON ALL {keyword} IN SCHEMA {name} FROM {grantee}")
                },
            ));
            let mut creators = vec![owner];
            if spec.owner != owner {
                creators.push(&spec.owner);
            }
            for creator in creators {
                let held = current
                    .default_acls
                    .get(&(creator.to_string(), schema.name.clone(), kind))
                    .unwrap_or(&empty);
                let for_role = identifier(creator);
                statements.extend(reconcile_acl(
                    held,
                    &wanted,
                    &[creator],
                    &|privileges, grantee| {
                        format!("ALTER DEFAULT PRIVILEGES FOR ROLE {for_role} IN SCHEMA {name} GRANT {privileges} ON {keyword} TO {grantee}")
                    },
                    &|privileges, grantee| {
                        format!("ALTER DEFAULT PRIVILEGES FOR ROLE {for_role} IN SCHEMA {name} REVOKE {privileges} ON {keyword} FROM {grantee}")
                    },
                ));
            }
        }
    }
    if spec.revoke_public && public_can_create_in_public {
        statements.push(Statement::plain(
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_string(),
        ));
    }
    statements
}

/// GRANT/REVOKE ... ON ALL <kind> IN SCHEMA: a grantee missing a wanted privilege on any object
/// gets the grant; privileges it holds on some object beyond the wanted ones are revoked.
fn plan_objects(
    objects: &[ObjectAcl],
    wanted: &BTreeMap<String, Privileges>,
    grant: &dyn Fn(&str, &str) -> String,
    revoke: &dyn Fn(&str, &str) -> String,
) -> Vec<Statement> {
    let mut statements = Vec::new();
    for (grantee, privileges) in wanted {
        let missing: Privileges = objects
            .iter()
            .filter(|(owner, _)| owner != grantee)
            .flat_map(|(_, acl)| {
                let held = acl.get(grantee).cloned().unwrap_or_default();
                privileges.difference(&held).cloned().collect::<Vec<_>>()
            })
            .collect();
        if !missing.is_empty() {
            statements.push(Statement::plain(grant(
                &join(privileges),
                &identifier(grantee),
            )));
        }
    }
    let mut extra: BTreeMap<&str, Privileges> = BTreeMap::new();
    for (owner, acl) in objects {
        for (grantee, held) in acl {
            if grantee.is_empty() || grantee == owner {
                continue;
            }
            let empty = Privileges::new();
            let keep = wanted.get(grantee).unwrap_or(&empty);
            extra
                .entry(grantee)
                .or_default()
                .extend(held.difference(keep).cloned());
        }
    }
    for (grantee, privileges) in extra.iter().filter(|(_, p)| !p.is_empty()) {
        statements.push(Statement::plain(revoke(
            &join(privileges),
            &identifier(grantee),
        )));
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_database::{DatabaseGrant, ExtensionSpec, SchemaGrant};

    fn spec() -> PostgresDatabaseSpec {
        serde_json::from_value(serde_json::json!({
            "cluster": {"name": "db"}, "name": "shop", "owner": "owner"
        }))
        .unwrap()
    }

    fn sql(statements: &[Statement]) -> Vec<String> {
        statements.iter().map(|s| s.sql.clone()).collect()
    }

    fn privileges(list: &[&str]) -> Privileges {
        list.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_new_database_is_created_from_template0_when_encoding_or_locale_is_given() {
        let mut wanted = spec();
        wanted.encoding = Some("UTF8".into());
        wanted.locale = Some("C".into());
        wanted.connection_limit = 10;
        wanted.revoke_public = true;
        wanted.privileges = vec![DatabaseGrant {
            role: "app".into(),
            privileges: vec!["CONNECT".into()],
        }];
        let (create, rest) = plan_database(&wanted, None).unwrap();
        assert_eq!(
            create.unwrap().sql,
            "CREATE DATABASE \"shop\" OWNER \"owner\" TEMPLATE \"template0\" ENCODING 'UTF8' LOCALE 'C' CONNECTION LIMIT 10"
        );
        assert_eq!(
            sql(&rest),
            [
                "GRANT CONNECT ON DATABASE \"shop\" TO \"app\"",
                "REVOKE CONNECT, TEMPORARY ON DATABASE \"shop\" FROM PUBLIC"
            ]
        );
    }

    #[test]
    fn an_existing_database_changes_owner_limit_and_privileges_and_refuses_create_only_changes() {
        let current = CatalogDatabase {
            owner: "old".into(),
            encoding: "UTF8".into(),
            collate: "C".into(),
            connection_limit: -1,
            acl: BTreeMap::from([
                ("app".to_string(), privileges(&["CONNECT", "TEMPORARY"])),
                ("intruder".to_string(), privileges(&["CONNECT"])),
                ("".to_string(), privileges(&["CONNECT"])),
            ]),
        };
        let mut wanted = spec();
        wanted.connection_limit = 3;
        wanted.privileges = vec![DatabaseGrant {
            role: "app".into(),
            privileges: vec!["ALL".into()],
        }];
        let (create, rest) = plan_database(&wanted, Some(&current)).unwrap();
        assert!(create.is_none());
        assert_eq!(
            sql(&rest),
            [
                "ALTER DATABASE \"shop\" OWNER TO \"owner\"",
                "ALTER DATABASE \"shop\" WITH CONNECTION LIMIT 3",
                "GRANT CREATE ON DATABASE \"shop\" TO \"app\"",
                "REVOKE CONNECT ON DATABASE \"shop\" FROM \"intruder\"",
            ]
        );
        wanted.encoding = Some("LATIN1".into());
        let error = plan_database(&wanted, Some(&current)).unwrap_err();
        assert!(error.contains("encoding is LATIN1"), "{error}");
    }

    #[test]
    fn schemas_extensions_object_and_default_privileges() {
        let mut wanted = spec();
        wanted.schemas = vec![SchemaSpec {
            name: "sales".into(),
            owner: None,
            privileges: vec![SchemaGrant {
                role: "reader".into(),
                schema: vec!["USAGE".into()],
                tables: vec!["SELECT".into()],
                sequences: vec![],
                functions: vec![],
            }],
        }];
        wanted.extensions = vec![ExtensionSpec {
            name: "hstore".into(),
            version: Some("1.8".into()),
            schema: None,
        }];
        let current = CatalogInside {
            extensions: BTreeMap::from([(
                "hstore".to_string(),
                ("1.7".to_string(), "public".to_string()),
            )]),
            ..CatalogInside::default()
        };
        assert_eq!(
            sql(&plan_inside(&wanted, &current, false)),
            [
                "CREATE SCHEMA \"sales\" AUTHORIZATION \"owner\"",
                "ALTER EXTENSION \"hstore\" UPDATE TO '1.8'",
                "GRANT USAGE ON SCHEMA \"sales\" TO \"reader\"",
                "ALTER DEFAULT PRIVILEGES FOR ROLE \"owner\" IN SCHEMA \"sales\" GRANT SELECT ON TABLES TO \"reader\"",
            ]
        );
        // A table without the grant, and an extra privilege granted by hand.
        let table = |acl: &[(&str, &[&str])]| {
            (
                "owner".to_string(),
                acl.iter()
                    .map(|(g, p)| (g.to_string(), privileges(p)))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let current = CatalogInside {
            schemas: BTreeMap::from([(
                "sales".to_string(),
                (
                    "owner".to_string(),
                    BTreeMap::from([("reader".to_string(), privileges(&["USAGE"]))]),
                ),
            )]),
            extensions: BTreeMap::from([(
                "hstore".to_string(),
                ("1.8".to_string(), "public".to_string()),
            )]),
            objects: BTreeMap::from([(
                ("sales".to_string(), ObjectKind::Table),
                vec![
                    table(&[("reader", &["SELECT", "DELETE"])]),
                    table(&[]),
                    table(&[("other", &["SELECT"])]),
                ],
            )]),
            default_acls: BTreeMap::from([(
                ("owner".to_string(), "sales".to_string(), ObjectKind::Table),
                BTreeMap::from([("reader".to_string(), privileges(&["SELECT"]))]),
            )]),
        };
        assert_eq!(
            sql(&plan_inside(&wanted, &current, true)),
            [
                "GRANT SELECT ON ALL TABLES IN SCHEMA \"sales\" TO \"reader\"",
                "REVOKE SELECT ON ALL TABLES IN SCHEMA \"sales\" FROM \"other\"",
                "REVOKE DELETE ON ALL TABLES IN SCHEMA \"sales\" FROM \"reader\"",
            ]
        );
        wanted.revoke_public = true;
        assert_eq!(
            plan_inside(&wanted, &current, true).last().unwrap().sql,
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        );
    }
}
