//! TLS for `tokio-postgres` over rustls that trusts one CA only and checks the server certificate
//! against a given name, as libpq's `sslmode=verify-full` does, whatever address the connection
//! goes to: a Pod IP or a loopback port reached for a Service's name. The instance manager's own
//! connections (the pooler probe, pause and exporter) and the test bed's clients use it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// A client configuration that trusts the certificates of `ca_pem` only (TLS 1.2 and 1.3, ring).
pub fn client_config(ca_pem: impl AsRef<[u8]>) -> io::Result<Arc<rustls::ClientConfig>> {
    let invalid = |error: String| io::Error::new(io::ErrorKind::InvalidData, error);
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_ref()) {
        let certificate = certificate.map_err(|error| invalid(error.to_string()))?;
        roots
            .add(certificate)
            .map_err(|error| invalid(error.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| invalid(error.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Makes TLS connections that verify the server against a CA and a name.
#[derive(Clone)]
pub struct VerifyFull {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    presented: Option<PresentedCertificate>,
}

/// Where a [`VerifyFull`] keeps the certificate the server presented at its last handshake
/// (DER): a metrics exporter reports its validity, as clients see it. Shared by clones.
#[derive(Clone, Debug, Default)]
pub struct PresentedCertificate(Arc<Mutex<Option<Vec<u8>>>>);

impl PresentedCertificate {
    /// The certificate of the last handshake, if one completed.
    pub fn get(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.clone()
    }

    fn set(&self, der: Vec<u8>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(der);
        }
    }
}

impl VerifyFull {
    /// Trusts the certificates of `ca_pem` only and expects the server to be `server_name`.
    pub fn new(ca_pem: impl AsRef<[u8]>, server_name: &str) -> io::Result<Self> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        Ok(Self {
            config: client_config(ca_pem)?,
            server_name,
            presented: None,
        })
    }

    /// Keeps the server's certificate of each handshake in `presented`.
    pub fn recording(mut self, presented: PresentedCertificate) -> Self {
        self.presented = Some(presented);
        self
    }
}

impl<S> MakeTlsConnect<S> for VerifyFull
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = VerifyFull;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> io::Result<VerifyFull> {
        Ok(self.clone())
    }
}

impl<S> TlsConnect<S> for VerifyFull
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.server_name, stream)
                .await?;
            if let Some(presented) = &self.presented
                && let Some(leaf) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
            {
                presented.set(leaf.to_vec());
            }
            Ok(Stream(stream))
        })
    }
}

/// A TLS stream to PostgreSQL (no channel binding: SCRAM without `-PLUS`).
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
