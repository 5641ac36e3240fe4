//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL's server speaks it: the verifier is made once
//! per configured user (salt, StoredKey, ServerKey) and each login is one exchange against it.
//! Over TLS, `SCRAM-SHA-256-PLUS` is offered too, with the `tls-server-end-point` channel binding
//! (RFC 5929: a hash of the server's certificate), as PostgreSQL does: a client that uses it
//! knows its password went to the holder of that certificate, not to a man in the middle.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::{digest, hmac, pbkdf2};

/// The mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The mechanism with channel binding.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The gs2 header of the one channel binding type PostgreSQL speaks.
const END_POINT_HEADER: &str = "p=tls-server-end-point,,";

/// The `tls-server-end-point` channel binding data of a DER certificate: its hash with the hash
/// function of its signature (SHA-256 for MD5 and SHA-1). `None` when that function is not one
/// PostgreSQL would use either (then `-PLUS` is not offered).
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, ... }
    fn header(der: &[u8]) -> Option<(u8, usize, usize)> {
        let tag = *der.first()?;
        let first = *der.get(1)? as usize;
        if first < 0x80 {
            return Some((tag, 2, first));
        }
        let count = first & 0x7f;
        if count == 0 || count > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..count {
            len = len << 8 | *der.get(2 + i)? as usize;
        }
        Some((tag, 2 + count, len))
    }
    let (tag, at, _) = header(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let rest = certificate.get(at..)?;
    let (_, tbs_header, tbs_len) = header(rest)?;
    let rest = rest.get(tbs_header + tbs_len..)?;
    let (tag, algorithm_header, _) = header(rest)?;
    if tag != 0x30 {
        return None;
    }
    let rest = rest.get(algorithm_header..)?;
    let (tag, oid_header, oid_len) = header(rest)?;
    if tag != 0x06 {
        return None;
    }
    let oid = rest.get(oid_header..oid_header + oid_len)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let algorithm = match oid {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1: SHA-256 (RFC 5929 4.1).
        [rsa @ .., 0x04 | 0x05] if rsa == RSA => &digest::SHA256,
        [ecdsa @ .., 0x01] if ecdsa == ECDSA => &digest::SHA256,
        [rsa @ .., 0x0b] if rsa == RSA => &digest::SHA256,
        [rsa @ .., 0x0c] if rsa == RSA => &digest::SHA384,
        [rsa @ .., 0x0d] if rsa == RSA => &digest::SHA512,
        [ecdsa @ .., 0x03, 0x02] if ecdsa == ECDSA => &digest::SHA256,
        [ecdsa @ .., 0x03, 0x03] if ecdsa == ECDSA => &digest::SHA384,
        [ecdsa @ .., 0x03, 0x04] if ecdsa == ECDSA => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, certificate).as_ref().to_vec())
}
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
    /// What the client-final `c=` attribute must hold: the gs2 header, and the channel
    /// binding data if the client binds.
    binding: Vec<u8>,
    nonce: String,
}

fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Malformed("SCRAM attribute missing"))
}

impl Exchange {
    /// Handles the client-first message of `mechanism`; `end_point` is the channel binding
    /// data when the connection offers `-PLUS` (TLS). Returns the exchange and the
    /// server-first message.
    pub fn start(
        verifier: &Verifier,
        mechanism: &str,
        end_point: Option<&[u8]>,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first-message is not UTF-8"))?;
        let plus = mechanism == MECHANISM_PLUS;
        // gs2-header: "p=tls-server-end-point,," (binds), "n,," (cannot), "y,," (could, thinks
        // the server cannot).
        let (gs2_header, bare) = if let Some(bare) = text.strip_prefix(END_POINT_HEADER) {
            (END_POINT_HEADER, bare)
        } else if let Some(bare) = text.strip_prefix("n,,") {
            ("n,,", bare)
        } else if let Some(bare) = text.strip_prefix("y,,") {
            ("y,,", bare)
        } else if text.starts_with("p=") {
            return Err(ScramError::Malformed(
                "unsupported SCRAM channel-binding type (only tls-server-end-point)",
            ));
        } else {
            return Err(ScramError::Malformed("unsupported gs2 header"));
        };
        let mut binding = gs2_header.as_bytes().to_vec();
        match (plus, gs2_header, end_point) {
            (true, END_POINT_HEADER, Some(data)) => binding.extend_from_slice(data),
            (true, _, _) => {
                return Err(ScramError::Malformed(
                    "SCRAM-SHA-256-PLUS selected without channel binding, or where it is not offered",
                ));
            }
            (false, END_POINT_HEADER, _) => {
                return Err(ScramError::Malformed(
                    "channel binding requested with SCRAM-SHA-256 instead of SCRAM-SHA-256-PLUS",
                ));
            }
            (false, "y,,", Some(_)) => {
                // A downgrade: this server does support channel binding (RFC 5802 6).
                return Err(ScramError::Malformed(
                    "SCRAM channel binding negotiation error: the client supports channel binding \
                     but thinks the server does not, and this server does support it",
                ));
            }
            (false, _, _) => {}
        }
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
                binding,
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
        if STANDARD.decode(binding).ok().as_deref() != Some(self.binding.as_slice()) {
            return Err(ScramError::Malformed(
                "SCRAM channel binding check failed (the client saw another certificate)",
            ));
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
        login_bound(
            secret,
            password,
            ChannelBinding::unsupported(),
            MECHANISM,
            None,
        )
    }

    fn login_bound(
        secret: &str,
        password: &str,
        binding: ChannelBinding,
        mechanism: &str,
        end_point: Option<&[u8]>,
    ) -> Result<(), ScramError> {
        let verifier = Verifier::from_secret(secret);
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let (exchange, server_first) =
            Exchange::start(&verifier, mechanism, end_point, client.message())?;
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
    fn channel_binding_binds_the_login_to_the_certificate() {
        let certificate = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let end_point = tls_server_end_point(certificate.cert.der()).expect("ECDSA P-256");
        assert_eq!(
            end_point,
            digest::digest(&digest::SHA256, certificate.cert.der()).as_ref()
        );
        let bound = |data: &[u8], offered: &[u8], password: &str| {
            login_bound(
                "s3cret",
                password,
                ChannelBinding::tls_server_end_point(data.to_vec()),
                MECHANISM_PLUS,
                Some(offered),
            )
        };
        assert_eq!(bound(&end_point, &end_point, "s3cret"), Ok(()));
        assert_eq!(
            bound(&end_point, &end_point, "guess"),
            Err(ScramError::WrongPassword)
        );
        assert!(
            matches!(
                bound(b"another certificate", &end_point, "s3cret"),
                Err(ScramError::Malformed(_))
            ),
            "a man in the middle presents another certificate"
        );
        // Without binding over TLS: fine with "n", a downgrade with "y".
        assert_eq!(
            login_bound(
                "s3cret",
                "s3cret",
                ChannelBinding::unsupported(),
                MECHANISM,
                Some(&end_point)
            ),
            Ok(())
        );
        assert!(matches!(
            login_bound(
                "s3cret",
                "s3cret",
                ChannelBinding::unrequested(),
                MECHANISM,
                Some(&end_point)
            ),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn channel_binding_requests_are_refused_cleanly_where_not_offered() {
        let verifier = Verifier::from_secret("x");
        for (mechanism, message) in [
            (MECHANISM, &b"p=tls-server-end-point,,n=,r=abc"[..]),
            (MECHANISM_PLUS, &b"p=tls-server-end-point,,n=,r=abc"[..]),
            (MECHANISM, &b"p=tls-unique,,n=,r=abc"[..]),
            (MECHANISM, &b"garbage"[..]),
        ] {
            assert!(matches!(
                Exchange::start(&verifier, mechanism, None, message),
                Err(ScramError::Malformed(_))
            ));
        }
    }
}
