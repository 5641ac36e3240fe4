//! Cancel requests: a client's CancelRequest (its router pid and secret) is forwarded as a
//! CancelRequest to every shard backend running that client's current statement, so PostgreSQL
//! cancels it and the client gets `57014` through the normal result path. A statement the
//! router itself holds (a write to a paused range) is woken instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

/// A backend that can be cancelled: its address and BackendKeyData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    /// Shard host.
    pub host: String,
    /// Shard port.
    pub port: u16,
    /// Backend process id.
    pub pid: i32,
    /// Backend secret key.
    pub secret: i32,
}

/// The backends one client session is using right now.
#[derive(Debug, Default)]
pub struct SessionCancel {
    /// By registration id. A list, not a map: it holds one entry per shard a statement runs on
    /// (usually one), and it is written twice for every statement.
    targets: Mutex<Vec<(u64, Arc<CancelTarget>)>>,
    next: AtomicU64,
    /// Wakes a statement the router itself keeps waiting (held for a paused range).
    interrupt: tokio::sync::Notify,
}

/// Keeps a backend cancellable while a statement runs on it; removed on drop.
#[derive(Debug)]
pub struct CancelGuard {
    session: Arc<SessionCancel>,
    id: u64,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let mut targets = self.session.targets.lock().expect("cancel lock");
        if let Some(at) = targets.iter().position(|(id, _)| *id == self.id) {
            targets.swap_remove(at);
        }
    }
}

impl SessionCancel {
    /// Marks `target` as running this session's statement until the guard drops.
    pub fn register(self: &Arc<Self>, target: Arc<CancelTarget>) -> CancelGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.targets.lock().expect("cancel lock").push((id, target));
        CancelGuard {
            session: self.clone(),
            id,
        }
    }

    /// Resolves when a cancel request for this session arrives (from the moment it is
    /// created, polled or not): for waits in the router, which no shard can cancel.
    pub fn interrupted(&self) -> tokio::sync::futures::Notified<'_> {
        self.interrupt.notified()
    }

    fn targets(&self) -> Vec<Arc<CancelTarget>> {
        self.targets
            .lock()
            .expect("cancel lock")
            .iter()
            .map(|(_, target)| target.clone())
            .collect()
    }
}

/// A client's BackendKeyData: process id and secret key bytes.
type ClientKey = (i32, Vec<u8>);

/// Client sessions by their (pid, secret key) as sent in BackendKeyData.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<ClientKey, Arc<SessionCancel>>>,
}

impl CancelRegistry {
    /// Registers a session (idempotent).
    pub fn session(&self, pid: i32, secret: Vec<u8>) -> Arc<SessionCancel> {
        self.sessions
            .lock()
            .expect("cancel lock")
            .entry((pid, secret))
            .or_default()
            .clone()
    }

    /// Forgets a session (its connection closed).
    pub fn remove(&self, pid: i32, secret: &[u8]) {
        self.sessions
            .lock()
            .expect("cancel lock")
            .remove(&(pid, secret.to_vec()));
    }

    /// Cancels what the session with this key runs; unknown keys are ignored, as PostgreSQL
    /// does.
    pub async fn cancel(&self, pid: i32, secret: &[u8]) {
        let session = self
            .sessions
            .lock()
            .expect("cancel lock")
            .get(&(pid, secret.to_vec()))
            .cloned();
        let Some(session) = session else { return };
        session.interrupt.notify_waiters();
        for target in session.targets() {
            let mut message = BytesMut::new();
            postgres_protocol::message::frontend::cancel_request(
                target.pid,
                target.secret,
                &mut message,
            );
            match tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await {
                Ok(mut stream) => {
                    let _ = stream.write_all(&message).await;
                }
                Err(error) => {
                    tracing::warn!(host = target.host, port = target.port, %error, "forwarding a cancel request")
                }
            }
        }
    }
}
