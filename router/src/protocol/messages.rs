//! The protocol v3 messages and values both sides of the router share (the client side in
//! `frontend`, the shard side in `backend`): result columns and rows, errors and notices,
//! parameters, command tags. A leaf: it imports nothing else from the crate.

use bytes::{Bytes, BytesMut};

/// A PostgreSQL error or notice, with its fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, ...).
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail.
    pub detail: Option<String>,
    /// Hint.
    pub hint: Option<String>,
    /// Cursor position.
    pub position: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// A column of a result, as the shard described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Table OID (0 if none).
    pub table_oid: u32,
    /// Column number in the table (0 if none).
    pub column_id: i16,
    /// Type OID.
    pub type_oid: u32,
    /// Type size.
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
    /// Format code (0 text, 1 binary).
    pub format: i16,
}

/// One result row: field count and the length-prefixed field bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Number of fields.
    pub fields: i16,
    /// Field bytes as in a DataRow body after the count.
    pub data: BytesMut,
}

/// Parameters of one execution (owned, so a plan can be re-run per shard).
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// Type OIDs (0 = unspecified).
    pub types: Vec<u32>,
    /// Values.
    pub values: Vec<Option<Bytes>>,
    /// Format codes.
    pub formats: Vec<i16>,
}

impl Params {
    /// The format of parameter `index` (0-based).
    pub fn format_of(&self, index: usize) -> i16 {
        match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => self.formats.get(index).copied().unwrap_or(0),
        }
    }

    /// A subset of the parameters (0-based indexes), for a split statement.
    pub fn subset(&self, indexes: &[usize]) -> Params {
        Params {
            types: indexes
                .iter()
                .map(|i| self.types.get(*i).copied().unwrap_or(0))
                .collect(),
            values: indexes
                .iter()
                .map(|i| self.values.get(*i).cloned().flatten())
                .collect(),
            formats: indexes.iter().map(|i| self.format_of(*i)).collect(),
        }
    }
}

/// Splits a DataRow body into its fields (without copying).
pub fn split_fields(body: &[u8]) -> Vec<Option<&[u8]>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at + 4 <= body.len() {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            fields.push(None);
        } else {
            let end = (at + len as usize).min(body.len());
            fields.push(Some(&body[at..end]));
            at = end;
        }
    }
    fields
}

/// Rows affected according to a command tag (`INSERT 0 5` -> 5, `UPDATE 3` -> 3).
pub fn tag_rows(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next().and_then(|n| n.parse().ok())
}

/// The command word(s) of a tag without the counts (`INSERT 0 5` -> `INSERT`).
pub fn tag_command(tag: &str) -> String {
    tag.split(' ')
        .filter(|part| part.parse::<u64>().is_err())
        .collect::<Vec<_>>()
        .join(" ")
}
