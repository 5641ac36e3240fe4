//! What a generated user Secret holds (pure): the keys an application mounts to connect.

use std::collections::BTreeMap;

use rand::Rng;
use rand::distr::Alphanumeric;

/// Length of generated passwords (alphanumeric: about 190 bits).
const PASSWORD_LENGTH: usize = 32;

/// A new random password.
pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(PASSWORD_LENGTH)
        .map(char::from)
        .collect()
}

/// Where an application connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name (the cluster's read-write Service).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub dbname: String,
}

/// The Secret's keys: `username`, `password`, `host`, `port`, `dbname`, `uri`, `jdbc-uri`,
/// `pgpass`.
pub fn connection_data(
    username: &str,
    password: &str,
    endpoint: &Endpoint,
) -> BTreeMap<String, String> {
    let Endpoint { host, port, dbname } = endpoint;
    let uri = format!(
        "postgresql://{}:{}@{host}:{port}/{}",
        percent_encode(username),
        percent_encode(password),
        percent_encode(dbname)
    );
    let jdbc_uri = format!(
        "jdbc:postgresql://{host}:{port}/{}?user={}&password={}",
        percent_encode(dbname),
        percent_encode(username),
        percent_encode(password)
    );
    let pgpass = format!(
        "{}:{port}:{}:{}:{}\n",
        pgpass_field(host),
        pgpass_field(dbname),
        pgpass_field(username),
        pgpass_field(password)
    );
    BTreeMap::from([
        ("username".to_string(), username.to_string()),
        ("password".to_string(), password.to_string()),
        ("host".to_string(), host.clone()),
        ("port".to_string(), port.to_string()),
        ("dbname".to_string(), dbname.clone()),
        ("uri".to_string(), uri),
        ("jdbc-uri".to_string(), jdbc_uri),
        ("pgpass".to_string(), pgpass),
    ])
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A `.pgpass` field: `\` and `:` escaped with a backslash.
fn pgpass_field(value: &str) -> String {
    value.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_what_their_formats_need() {
        let endpoint = Endpoint {
            host: "db-rw.ns.svc".into(),
            port: 5432,
            dbname: "my db".into(),
        };
        let data = connection_data("a:b", "p@ss:w\\", &endpoint);
        assert_eq!(
            data["uri"],
            "postgresql://a%3Ab:p%40ss%3Aw%5C@db-rw.ns.svc:5432/my%20db"
        );
        assert_eq!(
            data["jdbc-uri"],
            "jdbc:postgresql://db-rw.ns.svc:5432/my%20db?user=a%3Ab&password=p%40ss%3Aw%5C"
        );
        assert_eq!(
            data["pgpass"],
            "db-rw.ns.svc:5432:my db:a\\:b:p@ss\\:w\\\\\n"
        );
        assert_eq!(data.len(), 8);
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let one = generate_password();
        assert_eq!(one.len(), 32);
        assert_ne!(one, generate_password());
    }
}
