//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL's server speaks it: the verifier is made once
//! per configured user (salt, StoredKey, ServerKey) and each login is one exchange against it.
//! Channel binding (`-PLUS`) is not offered; clients with `channel_binding=prefer` (libpq's
//! default) proceed without it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::{digest, hmac, pbkdf2};

/// The mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PBKDF2 iterations of verifiers made from a plain password (PostgreSQL's default).
pub const ITERATIONS: u32 = 4096;

/// What the server keeps of a password.
#[derive(Clone)]
pub struct Verifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

impl Verifier {
    /// A verifier from a configured secret: either a plain password, or a verifier as
    /// PostgreSQL stores it in `pg_authid.rolpassword`
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, all base64).
    pub fn from_secret(secret: &str) -> Self {
        if let Some(verifier) = Self::parse_stored(secret) {
            return verifier;
        }
        let salt: [u8; 16] = rand::random();
        // SASLprep as libpq applies it; a password it rejects is used as is (as PostgreSQL does).
        let prepared = stringprep::saslprep(secret)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| secret.to_string());
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(ITERATIONS).expect("nonzero"),
            &salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        Self {
            salt: salt.to_vec(),
            iterations: ITERATIONS,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    fn parse_stored(secret: &str) -> Option<Self> {
        let rest = secret.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            salt: STANDARD.decode(salt).ok()?,
            iterations: iterations.parse().ok()?,
            stored_key: STANDARD.decode(stored).ok()?,
            server_key: STANDARD.decode(server).ok()?,
        })
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ScramError {
    /// The client's message does not follow RFC 5802 (a protocol violation).
    Malformed(&'static str),
    /// The proof is wrong: wrong password (or unknown user).
    WrongPassword,
}

/// One login in progress.
pub struct Exchange {
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Malformed("SCRAM attribute missing"))
}

impl Exchange {
    /// Handles the client-first message; returns the exchange and the server-first message.
    pub fn start(verifier: &Verifier, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first-message is not UTF-8"))?;
        // gs2-header: "n,," (no channel binding), "y,," (client could, thinks we cannot).
        let (gs2_header, bare) = if let Some(bare) = text.strip_prefix("n,,") {
            ("n,,", bare)
        } else if let Some(bare) = text.strip_prefix("y,,") {
            ("y,,", bare)
        } else if text.starts_with("p=") {
            return Err(ScramError::Malformed(
                "channel binding was requested but SCRAM-SHA-256-PLUS was not offered",
            ));
        } else {
            return Err(ScramError::Malformed("unsupported gs2 header"));
        };
        let mut parts = bare.split(',');
        // The user name in the message is ignored: PostgreSQL uses the startup packet's.
        attribute(parts.next(), 'n')?;
        let client_nonce = attribute(parts.next(), 'r')?;
        if client_nonce.is_empty() || parts.next().is_some_and(|p| p.starts_with("m=")) {
            return Err(ScramError::Malformed(
                "unsupported SCRAM extension or empty nonce",
            ));
        }
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", STANDARD.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Self {
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header: gs2_header.to_string(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; returns the server-final message (`v=...`).
    pub fn finish(self, verifier: &Verifier, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final-message without proof"))?;
        let mut parts = without_proof.split(',');
        let binding = attribute(parts.next(), 'c')?;
        if STANDARD.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if attribute(parts.next(), 'r')? != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac_sha256(&verifier.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(ScramError::WrongPassword);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        if !constant_time_eq(&sha256(&client_key), &verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac_sha256(&verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

/// Compares without an early exit, so timing does not tell how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn login(secret: &str, password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::from_secret(secret);
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(&verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected server-first"))?;
        let server_final = exchange.finish(&verifier, client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client rejected the server signature"))
    }

    #[test]
    fn the_right_password_logs_in_and_the_server_is_authenticated_too() {
        assert_eq!(login("s3cret", "s3cret"), Ok(()));
        assert_eq!(login("pässwörd", "pässwörd"), Ok(()));
    }

    #[test]
    fn a_wrong_password_is_refused() {
        assert_eq!(login("s3cret", "guess"), Err(ScramError::WrongPassword));
    }

    #[test]
    fn a_verifier_in_pg_authid_form_is_accepted() {
        let made = Verifier::from_secret("secret");
        let stored = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            made.iterations,
            STANDARD.encode(&made.salt),
            STANDARD.encode(&made.stored_key),
            STANDARD.encode(&made.server_key)
        );
        assert_eq!(login(&stored, "secret"), Ok(()));
        assert_eq!(login(&stored, "other"), Err(ScramError::WrongPassword));
        assert!(Verifier::parse_stored("md5abc").is_none());
    }

    #[test]
    fn channel_binding_requests_are_refused_cleanly() {
        let verifier = Verifier::from_secret("x");
        assert!(matches!(
            Exchange::start(&verifier, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::Malformed(_))
        ));
        assert!(matches!(
            Exchange::start(&verifier, b"garbage"),
            Err(ScramError::Malformed(_))
        ));
    }
}
