//! Cosign-compatible blob signatures with a key pair.
//!
//! `cosign sign-blob --key` signs the SHA-256 digest of a file with an ECDSA P-256 key and writes
//! the ASN.1 DER signature in base64; `cosign verify-blob --key cosign.pub --signature file.sig`
//! checks it against a PEM (SPKI) public key. We produce exactly that with `ring` (already in our
//! tree through rustls).
//!
//! Why not the `sigstore` crate: its cryptography needs either `aws-lc-rs`, whose metadata drags in
//! `aws-lc-fips-sys` with an OpenSSL license that fails our license policy (see `licenses.rs`), or
//! `openssl`, a C library we do not want to build or link. And its signing features pull in
//! Fulcio, Rekor, OAuth and an HTTP stack (reqwest, openidconnect, tough) that keyless signing needs
//! but a key pair does not, and that cannot reach anything offline.
//!
//! Two kinds of private key are accepted:
//! - the key pairs of `cosign generate-key-pair`: an `ENCRYPTED SIGSTORE PRIVATE KEY` PEM (older
//!   cosign: `ENCRYPTED COSIGN PRIVATE KEY`) whose body is JSON with a PKCS#8 key encrypted with
//!   NaCl secretbox under a key derived by scrypt from the password in `COSIGN_PASSWORD` (as cosign
//!   itself reads it; set it empty for a key without a password). We open it with the pure Rust
//!   `scrypt` and `crypto_secretbox` crates, as cosign's `go-securesystemslib/encrypted` seals it;
//! - an unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as `cargo xtask keygen` or
//!   `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes).
//!
//! Either way the key is ECDSA P-256; keep it in a secret store.

use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Nonce, XSalsa20Poly1305};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde::Deserialize;

/// PEM labels of a private key encrypted by `cosign generate-key-pair` (current, then older cosign).
const COSIGN_LABELS: [&str; 2] = [
    "ENCRYPTED SIGSTORE PRIVATE KEY",
    "ENCRYPTED COSIGN PRIVATE KEY",
];

/// Where cosign, and so we, read the password of an encrypted private key.
pub const PASSWORD_VARIABLE: &str = "COSIGN_PASSWORD";

/// Largest scrypt cost we accept (2^20: 1 GiB of memory at r = 8). Cosign writes 2^15 or 2^16; a
/// larger one is more likely a corrupt key than a careful one, and would exhaust the machine.
const MAX_SCRYPT_LOG_N: u8 = 20;

/// A P-256 signing key.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    public_pem: String,
}

impl SigningKey {
    /// Generates a new key pair; returns it with its private PKCS#8 PEM.
    pub fn generate() -> anyhow::Result<(Self, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a P-256 key")?;
        let pem = key.serialize_pem();
        Ok((Self::from_pem(&pem)?, pem))
    }

    /// Loads an unencrypted PKCS#8 PEM private key (P-256). An encrypted cosign key needs its
    /// password: use [`SigningKey::from_cosign_pem`] or [`SigningKey::load`].
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        if cosign_label(pem).is_some() {
            bail!(
                "the private key is encrypted by cosign: it needs its password (in {PASSWORD_VARIABLE})"
            );
        }
        let key = rcgen::KeyPair::from_pem(pem).context("parsing the PKCS#8 PEM private key")?;
        Self::from_key_pair(&key)
    }

    /// Loads a private key written by `cosign generate-key-pair` (`ENCRYPTED SIGSTORE PRIVATE
    /// KEY`), decrypting it with `password` (empty for a key without one).
    pub fn from_cosign_pem(pem: &str, password: &str) -> anyhow::Result<Self> {
        let label = cosign_label(pem).context(
            "not a cosign private key: expected -----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----",
        )?;
        let body = pem_body(pem, label)?;
        let envelope: CosignEnvelope = serde_json::from_slice(&body)
            .context("the cosign private key is not the JSON cosign writes")?;
        let der = envelope.open(password.as_bytes())?;
        let key = rcgen::KeyPair::try_from(der.as_slice())
            .context("the decrypted cosign private key is not a PKCS#8 key")?;
        Self::from_key_pair(&key)
    }

    fn from_key_pair(key: &rcgen::KeyPair) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng)
                .map_err(|e| anyhow::anyhow!("the signing key is not an ECDSA P-256 key: {e}"))?;
        Ok(Self {
            pair,
            rng,
            public_pem: key.public_key_pem(),
        })
    }

    /// Reads a private key file: a cosign key pair's `cosign.key`, opened with the password in
    /// `COSIGN_PASSWORD`, or an unencrypted PKCS#8 PEM.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the signing key {}", path.display()))?;
        let key = if cosign_label(&pem).is_some() {
            // The error of `env::var` is not shown: for a value that is not UTF-8 it holds it.
            let password = match std::env::var(PASSWORD_VARIABLE) {
                Ok(password) => password,
                Err(std::env::VarError::NotPresent) => bail!(
                    "{} is encrypted by cosign: set {PASSWORD_VARIABLE} to its password (empty \
                     for none)",
                    path.display()
                ),
                Err(std::env::VarError::NotUnicode(_)) => {
                    bail!("{PASSWORD_VARIABLE} is not UTF-8; cosign passwords are text")
                }
            };
            Self::from_cosign_pem(&pem, &password)
        } else {
            Self::from_pem(&pem)
        };
        key.with_context(|| format!("loading the signing key {}", path.display()))
    }

    /// The public key as cosign reads it (`--key cosign.pub`): PEM SubjectPublicKeyInfo.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// Signature of `data` as cosign writes it: base64 of the ASN.1 DER ECDSA signature over SHA-256.
    pub fn sign(&self, data: &[u8]) -> anyhow::Result<String> {
        let signature = self
            .pair
            .sign(&self.rng, data)
            .map_err(|e| anyhow::anyhow!("signing failed: {e}"))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature.as_ref()))
    }

    /// Writes `<file>.sig` next to `file`; returns its path.
    pub fn sign_file(&self, file: &Path) -> anyhow::Result<std::path::PathBuf> {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let mut name = file.as_os_str().to_owned();
        name.push(".sig");
        let signature_path = std::path::PathBuf::from(name);
        std::fs::write(&signature_path, self.sign(&data)?)?;
        Ok(signature_path)
    }
}

/// The cosign PEM label `pem` opens with, if it is an encrypted cosign private key.
fn cosign_label(pem: &str) -> Option<&'static str> {
    COSIGN_LABELS
        .into_iter()
        .find(|label| pem.contains(&format!("-----BEGIN {label}-----")))
}

/// The base64-decoded body between `-----BEGIN label-----` and `-----END label-----`.
fn pem_body(pem: &str, label: &str) -> anyhow::Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = pem
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .with_context(|| format!("the PEM block {label} has no {end} line"))?;
    let text: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .with_context(|| format!("the PEM block {label} is not base64"))
}

/// The JSON body of a cosign private key (go-securesystemslib `encrypted`): a secretbox sealed
/// under an scrypt-derived key. Go writes its byte fields as standard, padded base64.
#[derive(Deserialize)]
struct CosignEnvelope {
    kdf: CosignKdf,
    cipher: CosignCipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct CosignKdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct CosignCipher {
    name: String,
    nonce: String,
}

impl CosignEnvelope {
    /// Derives the key from `password` and opens the secretbox: the PKCS#8 DER private key.
    fn open(&self, password: &[u8]) -> anyhow::Result<Vec<u8>> {
        let base64 = base64::engine::general_purpose::STANDARD;
        anyhow::ensure!(
            self.kdf.name == "scrypt",
            "the cosign private key uses the key derivation {:?}; only scrypt is supported",
            self.kdf.name
        );
        anyhow::ensure!(
            self.cipher.name == "nacl/secretbox",
            "the cosign private key uses the cipher {:?}; only nacl/secretbox is supported",
            self.cipher.name
        );
        let ScryptParams { n, r, p } = self.kdf.params;
        anyhow::ensure!(
            n.is_power_of_two() && n > 1 && n.trailing_zeros() <= u32::from(MAX_SCRYPT_LOG_N),
            "the cosign private key has an scrypt cost N = {n}: expected a power of two up to \
             2^{MAX_SCRYPT_LOG_N}"
        );
        let log_n = u8::try_from(n.trailing_zeros()).expect("checked above");
        let params = scrypt::Params::new(log_n, r, p)
            .map_err(|e| anyhow::anyhow!("invalid scrypt parameters N={n} r={r} p={p}: {e}"))?;
        let salt = base64
            .decode(&self.kdf.salt)
            .context("the salt of the cosign private key is not base64")?;
        let nonce = base64
            .decode(&self.cipher.nonce)
            .context("the nonce of the cosign private key is not base64")?;
        anyhow::ensure!(
            nonce.len() == 24,
            "the secretbox nonce of the cosign private key has {} bytes, not 24",
            nonce.len()
        );
        let ciphertext = base64
            .decode(&self.ciphertext)
            .context("the ciphertext of the cosign private key is not base64")?;

        let mut key = [0u8; 32];
        scrypt::scrypt(password, &salt, &params, &mut key)
            .map_err(|e| anyhow::anyhow!("deriving the key of the cosign private key: {e}"))?;
        let cipher = XSalsa20Poly1305::new(&key.into());
        key.fill(0);
        cipher
            .decrypt(Nonce::from_slice(&nonce), ciphertext.as_slice())
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot decrypt the cosign private key: wrong {PASSWORD_VARIABLE} or corrupt key"
                )
            })
    }
}

/// Writes a new key pair into `folder`: `cosign.key` (mode 0600) and `cosign.pub`.
pub fn write_key_pair(folder: &Path) -> anyhow::Result<SigningKey> {
    let private = folder.join("cosign.key");
    anyhow::ensure!(
        !private.exists(),
        "{} exists; not overwriting a signing key",
        private.display()
    );
    let (key, pem) = SigningKey::generate()?;
    std::fs::create_dir_all(folder)?;
    std::fs::write(&private, pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::write(folder.join("cosign.pub"), key.public_pem())?;
    crate::step(&format!("wrote {} and cosign.pub", private.display()));
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

    #[test]
    fn signatures_verify_with_the_public_key_and_fail_on_other_data() {
        let (key, pem) = SigningKey::generate().unwrap();
        let reloaded = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(reloaded.public_pem(), key.public_pem());
        let signature = base64::engine::general_purpose::STANDARD
            .decode(key.sign(b"artifact").unwrap())
            .unwrap();
        let spki = rcgen::KeyPair::from_pem(&pem)
            .unwrap()
            .public_key_raw()
            .to_vec();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki);
        public.verify(b"artifact", &signature).unwrap();
        assert!(public.verify(b"artifacT", &signature).is_err());
    }

    /// Seals `pkcs8_pem` as cosign does (go-securesystemslib `encrypted`), with a cheap scrypt cost.
    fn cosign_pem(pkcs8_pem: &str, password: &str) -> String {
        let base64 = base64::engine::general_purpose::STANDARD;
        let der = rcgen::KeyPair::from_pem(pkcs8_pem).unwrap().serialize_der();
        let (salt, nonce) = ([7u8; 32], [9u8; 24]);
        let params = scrypt::Params::new(10, 8, 1).unwrap();
        let mut key = [0u8; 32];
        scrypt::scrypt(password.as_bytes(), &salt, &params, &mut key).unwrap();
        let ciphertext = XSalsa20Poly1305::new(&key.into())
            .encrypt(Nonce::from_slice(&nonce), der.as_slice())
            .unwrap();
        let json = serde_json::json!({
            "kdf": {"name": "scrypt", "params": {"N": 1024, "r": 8, "p": 1}, "salt": base64.encode(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": base64.encode(nonce)},
            "ciphertext": base64.encode(ciphertext),
        });
        let body = base64.encode(json.to_string());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{}\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn a_cosign_encrypted_key_opens_with_its_password_only() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let sealed = cosign_pem(&pkcs8, "correct horse");

        let opened = SigningKey::from_cosign_pem(&sealed, "correct horse").unwrap();
        assert_eq!(opened.public_pem(), key.public_pem());

        let error = SigningKey::from_cosign_pem(&sealed, "battery staple")
            .err()
            .unwrap();
        let message = format!("{error:#}");
        assert!(message.contains("wrong COSIGN_PASSWORD"), "{message}");
        assert!(!message.contains("battery"), "never shows the password");

        let error = SigningKey::from_pem(&sealed).err().unwrap();
        assert!(
            format!("{error:#}").contains("COSIGN_PASSWORD"),
            "{error:#}"
        );
    }

    #[test]
    fn an_empty_password_is_a_password() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let sealed = cosign_pem(&pkcs8, "");
        let opened = SigningKey::from_cosign_pem(&sealed, "").unwrap();
        assert_eq!(opened.public_pem(), key.public_pem());
        assert!(SigningKey::from_cosign_pem(&sealed, "x").is_err());
    }
}
