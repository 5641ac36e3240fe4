//! The instance manager's own client connections to PgBouncer and through the rw Service (the
//! pooler probe, pause and exporter): TLS verified against the cluster's CA and the name the
//! certificate must carry (see [`pgtls`]), or plain text.

use std::path::Path;

use pgtls::{PresentedCertificate, VerifyFull};

/// Connects with `config`: over TLS with sslmode `mode` when `tls` gives the CA file to trust and
/// the name the certificate must carry (`Prefer` lets a PgBouncer without TLS answer in plain
/// text), in plain text otherwise; the connection's task is spawned. The error is the server's
/// message or why the connection failed, never a secret. With `presented`, the certificate the
/// server presented is kept there.
pub async fn connect(
    config: &mut tokio_postgres::Config,
    tls: Option<(&Path, &str)>,
    mode: tokio_postgres::config::SslMode,
    presented: Option<&PresentedCertificate>,
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
            let mut verify =
                VerifyFull::new(&ca, server_name).map_err(|error| error.to_string())?;
            if let Some(presented) = presented {
                verify = verify.recording(presented.clone());
            }
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

/// The server's message of a driver error (PgBouncer's or PostgreSQL's: it never holds the
/// password), or the driver's words.
pub fn describe(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| error.to_string())
}
