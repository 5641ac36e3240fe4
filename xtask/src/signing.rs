//! Cosign-compatible blob signatures with a key pair, made with the `sigstore` crate.
//!
//! `cosign sign-blob --key` signs the SHA-256 digest of a file with an ECDSA P-256 key and writes
//! the ASN.1 DER signature in base64; `cosign verify-blob --key cosign.pub --signature file.sig`
//! checks it against a PEM (SPKI) public key. The `sigstore` crate's key-pair API
//! (`crypto::signing_key`) does exactly that, and reads and writes cosign's encrypted private keys.
//!
//! The crate is used without its default features: with them it would pull in keyless signing
//! (Fulcio, Rekor, OAuth, TUF) and an HTTP stack that cannot reach anything offline, and, from
//! sigstore 0.14 on, `aws-lc-rs`, whose C sources carry the OpenSSL license our policy refuses
//! (see `licenses.rs`). Version 0.13 without features is pure Rust (RustCrypto `p256`, `scrypt`,
//! `crypto_secretbox`).
//!
//! Two kinds of private key are accepted:
//! - the key pairs of `cosign generate-key-pair`: an `ENCRYPTED SIGSTORE PRIVATE KEY` PEM (older
//!   cosign: `ENCRYPTED COSIGN PRIVATE KEY`), a PKCS#8 key sealed with NaCl secretbox under a key
//!   derived by scrypt from the password in `COSIGN_PASSWORD` (as cosign itself reads it; set it
//!   empty for a key without a password). Only cosign's own scrypt costs are accepted, so a corrupt
//!   or hostile key cannot make us allocate gigabytes;
//! - an unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as `cargo xtask keygen` without a
//!   password or `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes).
//!
//! Either way the key is ECDSA P-256; keep it in a secret store.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use sigstore::crypto::SigningScheme;
use sigstore::crypto::signing_key::ecdsa::{ECDSAKeys, EllipticCurve};
use sigstore::crypto::signing_key::{
    COSIGN_PRIVATE_KEY_PEM_LABEL, SIGSTORE_PRIVATE_KEY_PEM_LABEL, SigStoreKeyPair, SigStoreSigner,
};

/// Where cosign, and so we, read the password of an encrypted private key.
pub const PASSWORD_VARIABLE: &str = "COSIGN_PASSWORD";

/// The signature scheme of `cosign sign-blob --key` with a P-256 key.
const SCHEME: SigningScheme = SigningScheme::ECDSA_P256_SHA256_ASN1;

/// A P-256 signing key.
pub struct SigningKey {
    signer: SigStoreSigner,
    public_pem: String,
}

impl SigningKey {
    /// Generates a new key pair; returns it with the pair itself, to export the private key.
    fn generate() -> anyhow::Result<(Self, SigStoreKeyPair)> {
        let keys = SigStoreKeyPair::ECDSA(
            ECDSAKeys::new(EllipticCurve::P256).context("generating a P-256 key")?,
        );
        Ok((Self::from_keys(&keys)?, keys))
    }

    /// Loads an unencrypted PKCS#8 PEM private key (P-256). An encrypted cosign key needs its
    /// password: use [`SigningKey::from_cosign_pem`] or [`SigningKey::load`].
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        if is_cosign_encrypted(pem) {
            bail!(
                "the private key is encrypted by cosign: it needs its password (in {PASSWORD_VARIABLE})"
            );
        }
        let keys = ECDSAKeys::from_pem(pem.as_bytes())
            .context("the private key is not an ECDSA P-256 key in a PKCS#8 PEM")?;
        Self::from_keys(&SigStoreKeyPair::ECDSA(keys))
    }

    /// Loads a private key written by `cosign generate-key-pair` (`ENCRYPTED SIGSTORE PRIVATE
    /// KEY`), decrypting it with `password` (empty for a key without one).
    pub fn from_cosign_pem(pem: &str, password: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            is_cosign_encrypted(pem),
            "not a cosign private key: expected -----BEGIN {SIGSTORE_PRIVATE_KEY_PEM_LABEL}-----"
        );
        // sigstore's error says which step failed; it never contains the password.
        let keys =
            ECDSAKeys::from_encrypted_pem(pem.as_bytes(), password.as_bytes()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot decrypt the cosign private key: wrong {PASSWORD_VARIABLE} or corrupt \
                     key ({e})"
                )
            })?;
        Self::from_keys(&SigStoreKeyPair::ECDSA(keys))
    }

    fn from_keys(keys: &SigStoreKeyPair) -> anyhow::Result<Self> {
        let signer = keys.to_sigstore_signer(&SCHEME).map_err(|_| {
            anyhow::anyhow!(
                "the signing key is {keys}, not P-256: cosign key pairs are ECDSA P-256"
            )
        })?;
        Ok(Self {
            signer,
            public_pem: keys
                .public_key_to_pem()
                .context("exporting the public key")?,
        })
    }

    /// Reads a private key file: a cosign key pair's `cosign.key`, opened with the password in
    /// `COSIGN_PASSWORD`, or an unencrypted PKCS#8 PEM.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the signing key {}", path.display()))?;
        let key = if is_cosign_encrypted(&pem) {
            match cosign_password()? {
                Some(password) => Self::from_cosign_pem(&pem, &password),
                None => bail!(
                    "{} is encrypted by cosign: set {PASSWORD_VARIABLE} to its password (empty \
                     for none)",
                    path.display()
                ),
            }
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
        let signature = self.signer.sign(data).context("signing failed")?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature))
    }

    /// Writes `<file>.sig` next to `file`; returns its path.
    pub fn sign_file(&self, file: &Path) -> anyhow::Result<PathBuf> {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let mut name = file.as_os_str().to_owned();
        name.push(".sig");
        let signature_path = PathBuf::from(name);
        std::fs::write(&signature_path, self.sign(&data)?)?;
        Ok(signature_path)
    }
}

/// The password in `COSIGN_PASSWORD`, if set.
fn cosign_password() -> anyhow::Result<Option<String>> {
    // The error of `env::var` is not shown: for a value that is not UTF-8 it holds it.
    match std::env::var(PASSWORD_VARIABLE) {
        Ok(password) => Ok(Some(password)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{PASSWORD_VARIABLE} is not UTF-8; cosign passwords are text")
        }
    }
}

/// Whether `pem` is a private key encrypted by cosign (current or older label).
fn is_cosign_encrypted(pem: &str) -> bool {
    [SIGSTORE_PRIVATE_KEY_PEM_LABEL, COSIGN_PRIVATE_KEY_PEM_LABEL]
        .into_iter()
        .any(|label| pem.contains(&format!("-----BEGIN {label}-----")))
}

/// Writes a new key pair into `folder`: `cosign.key` (mode 0600) and `cosign.pub`. With
/// `COSIGN_PASSWORD` set, the private key is encrypted with it exactly as `cosign
/// generate-key-pair` does; without, it is an unencrypted PKCS#8 PEM.
pub fn write_key_pair(folder: &Path) -> anyhow::Result<SigningKey> {
    let private = folder.join("cosign.key");
    anyhow::ensure!(
        !private.exists(),
        "{} exists; not overwriting a signing key",
        private.display()
    );
    let (key, keys) = SigningKey::generate()?;
    let pem = match cosign_password()? {
        Some(password) => keys.private_key_to_encrypted_pem(password.as_bytes()),
        None => keys.private_key_to_pem(),
    }
    .context("exporting the private key")?;
    std::fs::create_dir_all(folder)?;
    std::fs::write(&private, pem.as_bytes())?;
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
    use sigstore::crypto::CosignVerificationKey;

    fn verify(public_pem: &str, data: &[u8], signature: &str) -> bool {
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .unwrap();
        let key = CosignVerificationKey::from_pem(public_pem.as_bytes(), &SCHEME).unwrap();
        key.verify_signature(sigstore::crypto::Signature::Raw(&signature), data)
            .is_ok()
    }

    #[test]
    fn signatures_verify_with_the_public_key_and_fail_on_other_data() {
        let (key, keys) = SigningKey::generate().unwrap();
        let pem = keys.private_key_to_pem().unwrap();
        let reloaded = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(reloaded.public_pem(), key.public_pem());

        let signature = reloaded.sign(b"artifact").unwrap();
        assert!(verify(key.public_pem(), b"artifact", &signature));
        assert!(!verify(key.public_pem(), b"artifacT", &signature));
    }

    #[test]
    fn a_cosign_encrypted_key_opens_with_its_password_only() {
        let (key, keys) = SigningKey::generate().unwrap();
        let sealed = keys.private_key_to_encrypted_pem(b"correct horse").unwrap();
        assert!(
            sealed.contains(SIGSTORE_PRIVATE_KEY_PEM_LABEL),
            "{}",
            *sealed
        );

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
        let (key, keys) = SigningKey::generate().unwrap();
        let sealed = keys.private_key_to_encrypted_pem(b"").unwrap();
        let opened = SigningKey::from_cosign_pem(&sealed, "").unwrap();
        assert_eq!(opened.public_pem(), key.public_pem());
        assert!(SigningKey::from_cosign_pem(&sealed, "x").is_err());
    }

    #[test]
    fn a_key_that_is_not_p256_is_refused_with_what_cosign_expects() {
        let keys = ECDSAKeys::new(EllipticCurve::P384).unwrap();
        let pem = keys.as_inner().private_key_to_pem().unwrap();
        let error = SigningKey::from_pem(&pem).err().unwrap();
        assert!(format!("{error:#}").contains("P-256"), "{error:#}");
    }
}
