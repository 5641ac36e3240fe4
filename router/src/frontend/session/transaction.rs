//! Transactions: the backend connections a transaction holds, savepoints, rollback.

use super::*;

pub(super) struct Transaction {
    pub(super) runtime: Arc<Runtime>,
    pub(super) begin_sql: String,
    /// Open savepoints, oldest first (replayed on shards that join later).
    pub(super) savepoints: Vec<String>,
    pub(super) participants: BTreeMap<usize, Arc<Mutex<Leased>>>,
    pub(super) failed: bool,
}

pub(super) fn non_transactional(sql: &str) -> bool {
    let upper = sql.to_ascii_uppercase();
    upper.starts_with("VACUUM")
        || upper.starts_with("CLUSTER")
        || upper.starts_with("REINDEX")
        || upper.starts_with("CHECKPOINT")
        || upper.contains("CONCURRENTLY")
        || upper.starts_with("CREATE DATABASE")
        || upper.starts_with("DROP DATABASE")
        || upper.starts_with("ALTER SYSTEM")
}

pub(super) async fn rollback(participants: BTreeMap<usize, Arc<Mutex<Leased>>>) {
    for connection in participants.into_values() {
        let mut guard = connection.lock().await;
        if guard.query_text("ROLLBACK").await.is_err() {
            guard.discard();
        }
    }
}

impl Session {
    pub(super) async fn savepoint(
        &mut self,
        op: &SavepointOp,
        sql: &str,
    ) -> Result<Outcome, RouterError> {
        let Some(transaction) = self.transaction.as_mut() else {
            return Err(RouterError::session(
                "25P01",
                "SAVEPOINT can only be used in transaction blocks",
            ));
        };
        let position = |name: &str, list: &Vec<String>| list.iter().rposition(|s| s == name);
        let tag = match op {
            SavepointOp::Create(name) => {
                transaction.savepoints.push(name.clone());
                "SAVEPOINT"
            }
            SavepointOp::Release(name) | SavepointOp::RollbackTo(name) => {
                let Some(index) = position(name, &transaction.savepoints) else {
                    return Err(RouterError::session(
                        "3B001",
                        format!("savepoint \"{name}\" does not exist"),
                    ));
                };
                if matches!(op, SavepointOp::Release(_)) {
                    transaction.savepoints.truncate(index);
                    "RELEASE"
                } else {
                    transaction.savepoints.truncate(index + 1);
                    transaction.failed = false;
                    "ROLLBACK"
                }
            }
        };
        let participants: Vec<_> = transaction.participants.values().cloned().collect();
        for connection in participants {
            let mut guard = connection.lock().await;
            guard.query_text(sql).await?;
        }
        Ok(Outcome::Command(tag.into()))
    }

    pub(super) async fn participant(
        &mut self,
        runtime: &Runtime,
        shard: usize,
    ) -> Result<Arc<Mutex<Leased>>, RouterError> {
        let transaction = self.transaction.as_ref().expect("in a transaction");
        if let Some(connection) = transaction.participants.get(&shard) {
            return Ok(connection.clone());
        }
        let mut begin = transaction.begin_sql.clone();
        for savepoint in &transaction.savepoints {
            begin.push_str("; SAVEPOINT ");
            begin.push_str(&plan::quote_ident(savepoint));
        }
        let commands = 1 + transaction.savepoints.len() as u32;
        let mut leased = self.checkout(runtime, shard).await?;
        // Sent in front of the first statement on this shard (no extra round trip).
        leased.begin_pending = Some((begin, commands));
        let connection = Arc::new(Mutex::new(leased));
        self.transaction
            .as_mut()
            .expect("in a transaction")
            .participants
            .insert(shard, connection.clone());
        Ok(connection)
    }

    pub(super) async fn handle_for(
        &mut self,
        runtime: &Runtime,
        shard: usize,
    ) -> Result<BackendHandle, RouterError> {
        if self.transaction.is_some() {
            let connection = self.participant(runtime, shard).await?;
            BackendHandle::transaction(&connection).await
        } else {
            Ok(BackendHandle::pooled(self.checkout(runtime, shard).await?))
        }
    }

    pub(super) async fn checkout(
        &self,
        runtime: &Runtime,
        shard: usize,
    ) -> Result<Leased, RouterError> {
        let pool = runtime
            .pools
            .shards
            .get(shard)
            .ok_or_else(|| RouterError::session("XX000", format!("no shard {shard}")))?;
        let mut leased = pool.get().await?;
        if let Err(error) = self.replay_settings(&mut leased).await {
            leased.discard();
            return Err(error);
        }
        Ok(leased)
    }
}
