//! Session settings: SET/RESET/startup parameters, tracked so every backend connection a
//! session uses carries them.

use super::*;

/// Fingerprint of a session's settings (0 for none).
pub(super) fn settings_tag(settings: &[String]) -> u64 {
    if settings.is_empty() {
        return 0;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    settings.hash(&mut hasher);
    hasher.finish() | 1
}

/// The setting a `RESET name` names, as PostgreSQL folds it (lower case unless quoted).
pub(super) fn reset_name(sql: &str) -> Option<String> {
    let rest = sql.trim().trim_end_matches(';').trim();
    let name = rest.get(5..)?.trim();
    if name.is_empty() || name.contains(char::is_whitespace) && !name.starts_with('"') {
        return None;
    }
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => Some(quoted.replace("\"\"", "\"")),
        None => Some(name.to_ascii_lowercase()),
    }
}

impl Session {
    /// Applies the client's startup settings (name and value pairs) as session settings,
    /// checked on a shard now. A client that names no application gets an empty
    /// `application_name` on the shards, as PostgreSQL would show it, not the router's own.
    pub async fn apply_startup_settings(
        &mut self,
        settings: &[(String, String)],
    ) -> Result<(), RouterError> {
        let mut settings = settings.to_vec();
        let unnamed = !settings
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("application_name"));
        if unnamed {
            settings.push(("application_name".into(), String::new()));
        }
        let sql = settings
            .iter()
            .map(|(name, value)| {
                format!(
                    "SET {} TO {}",
                    plan::quote_ident(name),
                    plan::quote_literal(value)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        if unnamed && settings.len() == 1 {
            // Nothing to check: remembered, and applied with the first statement's checkout.
            self.settings = vec![sql];
            self.settings_tag = settings_tag(&self.settings);
        } else {
            let runtime = self.state.runtime();
            self.apply_setting(&runtime, &sql).await?;
        }
        self.startup_settings = self.settings.clone();
        self.startup_values = settings
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        // The client learns these from the startup's own ParameterStatus messages.
        self.reports.clear();
        Ok(())
    }

    /// The settings as the client was told at startup (ParameterStatus): what a reset reports.
    pub fn set_reported_defaults(&mut self, defaults: HashMap<String, String>) {
        self.reported_defaults = defaults;
    }

    pub(super) async fn apply_setting(
        &mut self,
        runtime: &Runtime,
        sql: &str,
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        let upper = sql.trim().to_ascii_uppercase();
        let discard_all = upper.starts_with("DISCARD ALL");
        let clears = upper.starts_with("RESET ALL") || discard_all;
        // DISCARD ALL would also deallocate the statements the router keeps prepared on the
        // backend connection; its session part is RESET ALL (the rest does not outlive a
        // pooled transaction anyway).
        let startup_value = if clears || !upper.starts_with("RESET ") {
            None
        } else {
            reset_name(sql).and_then(|name| {
                self.startup_values
                    .iter()
                    .rev()
                    .find(|(startup, _)| *startup == name)
                    .map(|(_, value)| (name, value.clone()))
            })
        };
        // `RESET name` of a setting the client started with goes back to that value, as in
        // PostgreSQL (on a shard it would go back to the router's own connection defaults).
        let restore = startup_value.map(|(name, value)| {
            format!(
                "SET {} TO {}",
                plan::quote_ident(&name),
                plan::quote_literal(&value)
            )
        });
        let sql = match &restore {
            Some(restore) => restore.as_str(),
            None if discard_all => "RESET ALL",
            None => sql,
        };
        let mut settings = self.settings.clone();
        if clears {
            // Back to the session's start, as in PostgreSQL: the client's startup settings stay.
            settings = self.startup_settings.clone();
        } else if !upper.starts_with("DISCARD") {
            settings.push(sql.trim().trim_end_matches(';').to_string());
        }
        let settings_tag = settings_tag(&settings);
        let mut tag = None;
        // Every participant reports the same changes: the client gets them once.
        let mut reports = Vec::new();
        if let Some(transaction) = &self.transaction {
            let participants: Vec<_> = transaction.participants.values().cloned().collect();
            for connection in participants {
                // A rollback would undo the SET on this connection: make the next checkout
                // reset and replay whatever happens.
                connection.lock().await.settings_tag = DIRTY_SETTINGS;
                let handle = BackendHandle::transaction(&connection).await?;
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, sql, &Params::default(), &[], false)
                        .await?;
                cursor.collect().await?;
                tag = cursor.tag.take();
                reports = std::mem::take(&mut cursor.reports);
            }
        }
        if tag.is_none() {
            let shard = self.resolve_target(runtime, &Target::Any, &Params::default())?;
            let mut leased = self.checkout(runtime, shard).await?;
            // Until it succeeds, the connection's settings are unknown.
            leased.settings_tag = DIRTY_SETTINGS;
            let handle = BackendHandle::pooled(leased);
            let mut cursor =
                ShardCursor::open(cancel.as_ref(), handle, sql, &Params::default(), &[], false)
                    .await?;
            cursor.collect().await?;
            if !clears || settings.is_empty() {
                // After RESET ALL the connection lacks the startup settings: it stays dirty, and
                // the next checkout replays them.
                cursor.set_settings_tag(settings_tag);
            }
            tag = cursor.tag.take();
            reports = std::mem::take(&mut cursor.reports);
        }
        // The router speaks for the shards about its own version; after a reset the client's
        // values are those it started with (the shard's would be the router's own defaults).
        reports.retain(|(name, _)| name != "server_version");
        if upper.starts_with("RESET") || discard_all {
            for (name, value) in &mut reports {
                if let Some(default) = self.reported_defaults.get(name.as_str()) {
                    value.clone_from(default);
                }
            }
        }
        if discard_all {
            tag = Some("DISCARD ALL".into());
        } else if restore.is_some() {
            tag = Some("RESET".into());
        }
        self.reports.extend(reports);
        self.settings = settings;
        self.settings_tag = settings_tag;
        Ok(Outcome::Command(tag.unwrap_or_else(|| "SET".into())))
    }

    pub(super) async fn replay_settings(&self, leased: &mut Leased) -> Result<(), RouterError> {
        if leased.settings_tag == self.settings_tag {
            return Ok(());
        }
        let mut sql = String::from("RESET ALL");
        for setting in &self.settings {
            sql.push_str("; ");
            sql.push_str(setting);
        }
        leased.query_text(&sql).await?;
        leased.settings_tag = self.settings_tag;
        Ok(())
    }
}
