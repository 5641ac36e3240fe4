//! Cosign-compatible blob signatures with a key pair.
//!
//! `cosign sign-blob --key` signs the SHA-256 digest of a file with an ECDSA P-256 key and writes
//! the ASN.1 DER signature in base64; `cosign verify-blob --key cosign.pub --signature file.sig`
//! checks it against a PEM (SPKI) public key. We produce exactly that with `ring` (already in our
//! tree through rustls), instead of the `sigstore` crate: its signing feature pulls in Fulcio, Rekor,
//! OAuth and an HTTP stack (reqwest, openidconnect, tough) that keyless signing needs but a key pair
//! does not, and that cannot reach anything offline. The private key is an unencrypted PKCS#8 PEM
//! (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`
//! writes); keep it in a secret store.

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

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

    /// Loads a PKCS#8 PEM private key (P-256).
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::from_pem(pem).context("parsing the PKCS#8 PEM private key")?;
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

    /// Reads a PKCS#8 PEM private key file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the signing key {}", path.display()))?;
        Self::from_pem(&pem)
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
}
