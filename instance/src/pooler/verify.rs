//! TLS for the instance manager's own client connections through a Service (the pooler
//! probe of the rw Service): a `tokio-postgres` connector over rustls that trusts the cluster's
//! CA only and checks the server certificate against the Service's name (as libpq's
//! `sslmode=verify-full` does), whatever address the connection goes to; and [`connect`], TLS or
//! plain text, for the probe, the pause and the exporter.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Connects with `config`: over TLS with sslmode `mode` when `tls` gives the CA file to trust and
/// the name the certificate must carry (`Prefer` lets a PgBouncer without TLS answer in plain
/// text), in plain text otherwise; the connection's task is spawned. The error is the server's
/// message or why the connection failed, never a secret.
pub async fn connect(
    config: &mut tokio_postgres::Config,
    tls: Option<(&Path, &str)>,
    mode: tokio_postgres::config::SslMode,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    String,
> {
    let (client, connection) = match tls {
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|error| describe(&error))?;
            (client, tokio::spawn(connection))
        }
        Some((ca_file, server_name)) => {
            let ca = tokio::fs::read(ca_file)
                .await
                .map_err(|error| format!("reading the CA file {}: {error}", ca_file.display()))?;
            let verify = VerifyFull::new(&ca, server_name).map_err(|error| error.to_string())?;
            config.ssl_mode(mode);
            let (client, connection) = config
                .connect(verify)
                .await
                .map_err(|error| describe(&error))?;
            (client, tokio::spawn(connection))
        }
    };
    Ok((client, connection))
}

/// The server's message of a driver error, or the driver's words.
pub fn describe(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| error.to_string())
}

/// Makes TLS connections that verify the server against a CA and a name.
#[derive(Clone)]
pub struct VerifyFull {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl VerifyFull {
    /// Trusts the certificates of `ca_pem` only and expects the server to be `server_name`.
    pub fn new(ca_pem: &[u8], server_name: &str) -> io::Result<Self> {
        let invalid = |error: String| io::Error::new(io::ErrorKind::InvalidData, error);
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            let certificate = certificate.map_err(|error| invalid(error.to_string()))?;
            roots
                .add(certificate)
                .map_err(|error| invalid(error.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| invalid(error.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|error| invalid(error.to_string()))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
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
