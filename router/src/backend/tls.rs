//! TLS from the router to its shards, as libpq's `sslmode=verify-full` does it: the shard must
//! accept TLS (SSLRequest answered `S`), its certificate must chain to the configured CA and name
//! the configured server name.
//!
//! The server name is not always the address connected to: on Kubernetes the router reaches a
//! shard's primary by its pod IP (it follows the primary label, not a Service, so a failover
//! reaches it without waiting for the endpoints), while the operator's server certificate names
//! the shard cluster's Services. So each shard's [`EndpointTls`] carries the name to verify
//! (`<shard cluster>-rw.<namespace>.svc` there, the host in a TOML config unless set).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How to reach one shard over TLS: the CA to trust and the name its certificate must carry.
#[derive(Clone)]
pub struct EndpointTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Tells two configurations apart without comparing rustls objects.
    fingerprint: (String, u64),
}

impl EndpointTls {
    /// Trusts the certificates in `ca_pem` (one or more PEM blocks) and expects `server_name`.
    pub fn new(ca_pem: &str, server_name: &str) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let certificate = certificate.map_err(|e| format!("reading the CA: {e}"))?;
            roots
                .add(certificate)
                .map_err(|e| format!("adding the CA: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the CA holds no PEM certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        ca_pem.hash(&mut hasher);
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: name,
            fingerprint: (server_name.to_string(), hasher.finish()),
        })
    }

    /// The name the shard's certificate must carry.
    pub fn server_name(&self) -> &str {
        &self.fingerprint.0
    }

    /// SSLRequest, then the handshake; a shard that refuses TLS is an error (never a fallback
    /// to plain text).
    pub async fn connect(&self, mut stream: TcpStream) -> io::Result<BackendStream> {
        stream.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the shard does not accept TLS (SSLRequest answered N), and the router requires it",
            ));
        }
        let stream = self
            .connector
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("TLS with the shard as {}: {e}", self.server_name()),
                )
            })?;
        Ok(BackendStream::Tls(Box::new(stream)))
    }
}

impl std::fmt::Debug for EndpointTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointTls")
            .field("server_name", &self.fingerprint.0)
            .finish_non_exhaustive()
    }
}

impl PartialEq for EndpointTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for EndpointTls {}

/// A connection to a shard: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum BackendStream {
    /// No TLS.
    Plain(TcpStream),
    /// TLS, verified.
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(stream) => stream.get_ref().0,
        }
    }

    /// Has the shard sent anything (or closed) on this idle connection? Peeks at the socket, so
    /// nothing is consumed: TLS records stay for the TLS layer.
    pub fn has_unexpected_input(&self) -> bool {
        let mut probe = [0u8; 64];
        let mut buf = ReadBuf::new(&mut probe);
        let mut context = Context::from_waker(std::task::Waker::noop());
        self.tcp().poll_peek(&mut context, &mut buf).is_ready()
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
