//! The replication connection of a split: a walsender session (`replication=database`) that
//! creates the logical slot and exports its snapshot, which the snapshot copy then reads
//! through. It speaks the protocol itself (startup, SCRAM, one replication command), since
//! tokio-postgres has no replication mode.

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use router::backend::tls::BackendStream;
use router::plan::quote_ident;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use api::contract;

use super::{DATABASE, Endpoint, ShardError};

/// A walsender connection (`replication=database`) holding a slot's exported snapshot: the
/// snapshot stays usable by other sessions (`SET TRANSACTION SNAPSHOT`) while this connection
/// lives and runs nothing else.
pub struct ReplicationConnection {
    stream: BackendStream,
    read: BytesMut,
    shard: String,
}

impl ReplicationConnection {
    fn fail(&self, message: impl Into<String>) -> ShardError {
        ShardError::Replication {
            shard: self.shard.clone(),
            message: message.into(),
        }
    }

    async fn send(&mut self, buffer: &BytesMut) -> Result<(), ShardError> {
        self.stream
            .write_all(buffer)
            .await
            .map_err(|e| self.fail(e.to_string()))
    }

    async fn message(&mut self) -> Result<backend::Message, ShardError> {
        loop {
            if let Some(message) =
                backend::Message::parse(&mut self.read).map_err(|e| self.fail(e.to_string()))?
            {
                return Ok(message);
            }
            let read = self
                .stream
                .read_buf(&mut self.read)
                .await
                .map_err(|e| self.fail(e.to_string()))?;
            if read == 0 {
                return Err(self.fail("the server closed the connection"));
            }
        }
    }

    fn error_text(body: backend::ErrorResponseBody) -> String {
        use postgres_protocol::message::backend::ErrorField;
        let mut fields = body.fields();
        let mut text = String::new();
        while let Ok(Some(field)) = fallible_iterator::FallibleIterator::next(&mut fields) {
            let field: ErrorField = field;
            if field.type_() == b'M' {
                text = String::from_utf8_lossy(field.value_bytes()).into_owned();
            }
        }
        text
    }

    /// Logs in to `endpoint` as a logical walsender.
    pub async fn connect(endpoint: &Endpoint) -> Result<Self, ShardError> {
        let fail = |message: String| ShardError::Replication {
            shard: endpoint.cluster.clone(),
            message,
        };
        let stream = endpoint.stream().await.map_err(fail)?;
        let mut connection = Self {
            stream,
            read: BytesMut::with_capacity(8192),
            shard: endpoint.cluster.clone(),
        };
        let mut buffer = BytesMut::new();
        frontend::startup_message(
            [
                ("user", contract::SUPERUSER),
                ("database", DATABASE),
                ("replication", "database"),
                ("application_name", "postgres-operator-split"),
            ],
            &mut buffer,
        )
        .map_err(|e| fail(e.to_string()))?;
        connection.send(&buffer).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            buffer.clear();
            match connection.message().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(endpoint.password.as_bytes(), &mut buffer)
                        .map_err(|e| fail(e.to_string()))?;
                    connection.send(&buffer).await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        contract::SUPERUSER.as_bytes(),
                        endpoint.password.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut buffer)
                        .map_err(|e| fail(e.to_string()))?;
                    connection.send(&buffer).await?;
                }
                backend::Message::AuthenticationSasl(_) => {
                    let state = ScramSha256::new(
                        endpoint.password.as_bytes(),
                        ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response("SCRAM-SHA-256", state.message(), &mut buffer)
                        .map_err(|e| fail(e.to_string()))?;
                    scram = Some(state);
                    connection.send(&buffer).await?;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| fail("unexpected SASL message".into()))?;
                    state.update(body.data()).map_err(|e| fail(e.to_string()))?;
                    frontend::sasl_response(state.message(), &mut buffer)
                        .map_err(|e| fail(e.to_string()))?;
                    connection.send(&buffer).await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let mut state = scram
                        .take()
                        .ok_or_else(|| fail("unexpected SASL message".into()))?;
                    state.finish(body.data()).map_err(|e| fail(e.to_string()))?;
                }
                backend::Message::ErrorResponse(body) => return Err(fail(Self::error_text(body))),
                backend::Message::ReadyForQuery(_) => return Ok(connection),
                _ => {}
            }
        }
    }

    /// Creates logical slot `slot` (pgoutput) and returns the name of its exported snapshot:
    /// exactly the rows committed before the slot's first change.
    pub async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
    ) -> Result<String, ShardError> {
        let mut buffer = BytesMut::new();
        frontend::query(
            &format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(slot)
            ),
            &mut buffer,
        )
        .map_err(|e| self.fail(e.to_string()))?;
        self.send(&buffer).await?;
        let mut snapshot = None;
        let mut failure = None;
        loop {
            match self.message().await? {
                backend::Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut index = 0;
                    while let Ok(Some(range)) =
                        fallible_iterator::FallibleIterator::next(&mut ranges)
                    {
                        if index == 2 {
                            snapshot = range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned());
                        }
                        index += 1;
                    }
                }
                backend::Message::ErrorResponse(body) => failure = Some(Self::error_text(body)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        if let Some(failure) = failure {
            return Err(self.fail(failure));
        }
        snapshot.ok_or_else(|| self.fail("CREATE_REPLICATION_SLOT returned no snapshot"))
    }

    /// Ends the session (the snapshot goes; the slot stays).
    pub async fn close(mut self) {
        let mut buffer = BytesMut::new();
        frontend::terminate(&mut buffer);
        let _ = self.stream.write_all(&buffer).await;
        let _ = self.read.remaining();
    }
}
