//! TLS for test clients of PostgreSQL: the `tokio-postgres` connector of [`pgtls`], which
//! verifies the server against a given CA and a given name (as libpq's `sslmode=verify-full`
//! does, even when the test reaches the server by a loopback address), a probe that returns the
//! certificate a server presents, and a test CA.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

pub use pgtls::VerifyFull;

/// A client configuration that trusts `ca_pem` only (TLS 1.2 and 1.3, ring).
pub fn client_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    pgtls::client_config(ca_pem).context("parsing the CA certificate")
}

/// The certificate (DER) PostgreSQL at `host:port` presents, after verifying it against
/// `ca_pem` and `server_name`: an `SSLRequest`, then the TLS handshake.
pub async fn server_certificate(
    host: &str,
    port: u16,
    ca_pem: &str,
    server_name: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    // SSLRequest: length 8, code 80877103.
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await?;
    let answer = stream.read_u8().await?;
    anyhow::ensure!(
        answer == b'S',
        "the server declined TLS ({:?})",
        answer as char
    );
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client_config(ca_pem)?)
        .connect(name, stream)
        .await?;
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("the server sent no certificate")?;
    Ok(certificate.to_vec())
}

/// A CA made for one test, which issues server certificates.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        })
    }

    /// The CA's certificate (PEM): what clients trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses): (certificate, key), PEM.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<ServerTls> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(ServerTls {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: None,
        })
    }
}

/// A server's certificate and private key, PEM.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The certificate.
    pub certificate_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// A CA the server keeps as `ssl_ca_file` (as the operator's instances keep their cluster's
    /// CA): the file its own outgoing connections (a subscription) can verify servers with.
    pub ca_pem: Option<String>,
}

impl ServerTls {
    /// The same certificate, with the server keeping `ca_pem` as its `ssl_ca_file`.
    pub fn with_ca_file(mut self, ca_pem: &str) -> Self {
        self.ca_pem = Some(ca_pem.to_string());
        self
    }
}
