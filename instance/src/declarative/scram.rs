//! SCRAM-SHA-256 verifiers (RFC 5802 / 7677, in PostgreSQL's text form): the role's password is
//! sent to PostgreSQL only as a verifier computed here, so no statement ever holds a cleartext
//! password.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

/// Iterations PostgreSQL uses by default (`scram_iterations`).
const ITERATIONS: u32 = 4096;
/// Salt length PostgreSQL uses.
const SALT_LENGTH: usize = 16;

/// A new verifier for `password`, with a random salt:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn verifier(password: &str) -> String {
    let mut salt = [0u8; SALT_LENGTH];
    rand::rng().fill_bytes(&mut salt);
    verifier_with(password, &salt, ITERATIONS)
}

/// Whether `stored` (PostgreSQL's `rolpassword`) is a SCRAM verifier of `password`: the same
/// salt and iterations give the same keys. Lets a reconcile leave a right password alone (a new
/// verifier has a new salt, so comparing verifiers would say "changed" every time).
pub fn matches(stored: &str, password: &str) -> bool {
    let Some((iterations, salt)) = parse(stored) else {
        return false;
    };
    verifier_with(password, &salt, iterations) == stored
}

fn parse(stored: &str) -> Option<(u32, Vec<u8>)> {
    let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
    let (parameters, _keys) = rest.split_once('$')?;
    let (iterations, salt) = parameters.split_once(':')?;
    Some((iterations.parse().ok()?, STANDARD.decode(salt).ok()?))
}

fn verifier_with(password: &str, salt: &[u8], iterations: u32) -> String {
    // SASLprep as libpq and the server do; a password it refuses is used as raw bytes.
    let prepared = stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| password.to_string());
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(iterations.max(1)).expect("at least one iteration"),
        salt,
        prepared.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key.as_ref()),
        STANDARD.encode(server_key.as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_matches_its_password_only() {
        let stored = verifier("s3cret'; DROP ROLE x; --");
        assert!(stored.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!stored.contains("s3cret"));
        assert!(matches(&stored, "s3cret'; DROP ROLE x; --"));
        assert!(!matches(&stored, "s3cret"));
        assert!(!matches("md5abc", "s3cret"));
    }

    #[test]
    fn verifiers_agree_with_the_postgres_protocol_crate() {
        // postgres-protocol (what tokio-postgres uses) salts randomly: check ours recognises it.
        let theirs = postgres_protocol::password::scram_sha_256("pässword".as_bytes());
        assert!(matches(&theirs, "pässword"));
        assert_ne!(verifier("x"), verifier("x"), "salts differ");
    }
}
