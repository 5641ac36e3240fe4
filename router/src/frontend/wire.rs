//! The client side of protocol v3 as bytes: decoding the messages a client sends and encoding
//! the ones the router answers with, straight into one output buffer (written once per Sync or
//! simple query, not once per message).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::protocol::messages::Row;
use crate::protocol::messages::{Column, ServerError};

/// Largest message a client may send (PostgreSQL's own limit for most messages is 1 GB).
pub const MAX_MESSAGE: usize = 1 << 30;
/// Largest startup packet (PostgreSQL: 10000 bytes).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Startup packet codes.
pub const PROTOCOL_3_0: i32 = 196_608;
/// `SSLRequest`.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest`.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest`.
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A message the client sent that does not follow the protocol.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolViolation(pub String);

type Result<T> = std::result::Result<T, ProtocolViolation>;

fn violation(what: impl Into<String>) -> ProtocolViolation {
    ProtocolViolation(what.into())
}

/// Reads a NUL-terminated UTF-8 string.
pub fn cstr(body: &mut Bytes) -> Result<String> {
    let text = cstr_in(body)?.to_string();
    body.advance(text.len() + 1);
    Ok(text)
}

/// The NUL-terminated string at the start of `body`, borrowed: a Query's text is read in place
/// (no copy per simple query).
pub fn cstr_in(body: &[u8]) -> Result<&str> {
    let end = body
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| violation("string without its terminating NUL"))?;
    std::str::from_utf8(&body[..end]).map_err(|_| violation("string is not valid UTF-8"))
}

fn i16_of(body: &mut Bytes) -> Result<i16> {
    if body.remaining() < 2 {
        return Err(violation("message too short"));
    }
    Ok(body.get_i16())
}

fn i32_of(body: &mut Bytes) -> Result<i32> {
    if body.remaining() < 4 {
        return Err(violation("message too short"));
    }
    Ok(body.get_i32())
}

/// `Parse`: statement name, SQL, parameter type OIDs.
pub struct Parse {
    /// Statement name (empty: the unnamed statement).
    pub name: String,
    /// SQL text.
    pub sql: String,
    /// Parameter type OIDs (0: unspecified).
    pub param_types: Vec<u32>,
}

/// Decodes a `Parse` body.
pub fn parse(mut body: Bytes) -> Result<Parse> {
    let name = cstr(&mut body)?;
    let sql = cstr(&mut body)?;
    let count = i16_of(&mut body)?;
    let mut param_types = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        param_types.push(i32_of(&mut body)? as u32);
    }
    Ok(Parse {
        name,
        sql,
        param_types,
    })
}

/// `Bind`: portal, statement, parameter values and formats, result formats.
pub struct Bind {
    /// Portal name.
    pub portal: String,
    /// Statement name.
    pub statement: String,
    /// Parameter format codes (none: text; one: for all; else per parameter).
    pub param_formats: Vec<i16>,
    /// Parameter values (`None`: NULL); slices of the message, not copies.
    pub params: Vec<Option<Bytes>>,
    /// Result column format codes.
    pub result_formats: Vec<i16>,
}

fn codes(body: &mut Bytes) -> Result<Vec<i16>> {
    let count = i16_of(body)?;
    if count < 0 {
        return Err(violation("negative format code count"));
    }
    (0..count).map(|_| i16_of(body)).collect()
}

/// Decodes a `Bind` body.
pub fn bind(mut body: Bytes) -> Result<Bind> {
    let portal = cstr(&mut body)?;
    let statement = cstr(&mut body)?;
    let param_formats = codes(&mut body)?;
    let count = i16_of(&mut body)?;
    if count < 0 {
        return Err(violation("negative parameter count"));
    }
    let mut params = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = i32_of(&mut body)?;
        if len < 0 {
            params.push(None);
        } else if body.remaining() < len as usize {
            return Err(violation("parameter value longer than the message"));
        } else {
            params.push(Some(body.split_to(len as usize)));
        }
    }
    let result_formats = codes(&mut body)?;
    Ok(Bind {
        portal,
        statement,
        param_formats,
        params,
        result_formats,
    })
}

/// `Describe` or `Close`: `S` (statement) or `P` (portal) and the name.
pub fn target(mut body: Bytes) -> Result<(u8, String)> {
    if body.is_empty() {
        return Err(violation("message too short"));
    }
    let kind = body.get_u8();
    if kind != b'S' && kind != b'P' {
        return Err(violation(format!(
            "invalid target type '{}' (expected 'S' or 'P')",
            kind.escape_ascii()
        )));
    }
    Ok((kind, cstr(&mut body)?))
}

/// `Execute`: portal and row limit (0: all).
pub fn execute(mut body: Bytes) -> Result<(String, usize)> {
    let portal = cstr(&mut body)?;
    let max_rows = i32_of(&mut body)?;
    Ok((portal, max_rows.max(0) as usize))
}

/// The startup packet's parameters (name, value), in order.
pub fn startup_parameters(mut body: Bytes) -> Result<Vec<(String, String)>> {
    let mut parameters = Vec::new();
    loop {
        if body.is_empty() || body[0] == 0 {
            return Ok(parameters);
        }
        let name = cstr(&mut body)?;
        let value = cstr(&mut body)?;
        parameters.push((name, value));
    }
}

/// Starts a message of type `kind`; [`end`] fills in its length.
fn begin(out: &mut BytesMut, kind: u8) -> usize {
    out.put_u8(kind);
    let at = out.len();
    out.put_i32(0);
    at
}

fn end(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

/// A message with no body (`ParseComplete`, `BindComplete`, ...).
pub fn empty(out: &mut BytesMut, kind: u8) {
    out.put_u8(kind);
    out.put_i32(4);
}

/// `ReadyForQuery` with the transaction status (`I`, `T` or `E`).
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

/// `CommandComplete`.
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    let at = begin(out, b'C');
    put_cstr(out, tag);
    end(out, at);
}

/// `RowDescription`; `format` overrides each column's own format code when given.
pub fn row_description(out: &mut BytesMut, columns: &[Column], formats: Option<&[i16]>) {
    let at = begin(out, b'T');
    out.put_i16(columns.len() as i16);
    for (i, column) in columns.iter().enumerate() {
        put_cstr(out, &column.name);
        out.put_u32(column.table_oid);
        out.put_i16(column.column_id);
        out.put_u32(column.type_oid);
        out.put_i16(column.type_size);
        out.put_i32(column.type_modifier);
        out.put_i16(match formats {
            Some(formats) => format_for(formats, i),
            None => column.format,
        });
    }
    end(out, at);
}

/// The format code of column `index` under the protocol's rules (none: text; one: for all).
pub fn format_for(formats: &[i16], index: usize) -> i16 {
    match formats.len() {
        0 => 0,
        1 => formats[0],
        _ => formats.get(index).copied().unwrap_or(0),
    }
}

/// `ParameterDescription`.
pub fn parameter_description(out: &mut BytesMut, types: &[u32]) {
    let at = begin(out, b't');
    out.put_i16(types.len() as i16);
    for oid in types {
        out.put_u32(*oid);
    }
    end(out, at);
}

/// `DataRow` from a row as the shard sent it.
pub fn data_row(out: &mut BytesMut, row: &Row) {
    out.put_u8(b'D');
    out.put_i32((4 + 2 + row.data.len()) as i32);
    out.put_i16(row.fields);
    out.put_slice(&row.data);
}

/// `ErrorResponse` (`kind` `E`) or `NoticeResponse` (`N`).
pub fn error_fields(out: &mut BytesMut, kind: u8, error: &ServerError) {
    let at = begin(out, kind);
    let severity = if error.severity.is_empty() {
        "ERROR"
    } else {
        &error.severity
    };
    out.put_u8(b'S');
    put_cstr(out, severity);
    out.put_u8(b'V');
    put_cstr(out, severity);
    out.put_u8(b'C');
    put_cstr(out, &error.code);
    out.put_u8(b'M');
    put_cstr(out, &error.message);
    for (field, value) in [
        (b'D', &error.detail),
        (b'H', &error.hint),
        (b'P', &error.position),
    ] {
        if let Some(value) = value {
            out.put_u8(field);
            put_cstr(out, value);
        }
    }
    out.put_u8(0);
    end(out, at);
}

/// `ParameterStatus`.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let at = begin(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    end(out, at);
}

/// `BackendKeyData`.
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: &[u8]) {
    let at = begin(out, b'K');
    out.put_i32(pid);
    out.put_slice(secret);
    end(out, at);
}

/// `Authentication*` with a code and a payload.
pub fn authentication(out: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(out, b'R');
    out.put_i32(code);
    out.put_slice(payload);
    end(out, at);
}

/// `NegotiateProtocolVersion`: the newest minor version we speak and the options we ignored.
pub fn negotiate_protocol_version(out: &mut BytesMut, minor: i32, unrecognized: &[String]) {
    let at = begin(out, b'v');
    out.put_i32(PROTOCOL_3_0 + minor);
    out.put_i32(unrecognized.len() as i32);
    for option in unrecognized {
        put_cstr(out, option);
    }
    end(out, at);
}

/// `CopyInResponse`: overall `format` (0 text, 1 binary) and `columns` columns in it.
pub fn copy_in_response(out: &mut BytesMut, format: i8, columns: i16) {
    let at = begin(out, b'G');
    out.put_i8(format);
    out.put_i16(columns.max(0));
    for _ in 0..columns.max(0) {
        out.put_i16(format.into());
    }
    end(out, at);
}

/// `CopyOutResponse`.
pub fn copy_out_response(out: &mut BytesMut, format: i8, formats: &[i16]) {
    let at = begin(out, b'H');
    out.put_i8(format);
    out.put_i16(formats.len() as i16);
    for code in formats {
        out.put_i16(*code);
    }
    end(out, at);
}

/// `CopyData`.
pub fn copy_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(b'd');
    out.put_i32(4 + data.len() as i32);
    out.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_decodes_values_and_nulls() {
        let mut body = BytesMut::new();
        body.put_slice(b"p\0s\0");
        body.put_i16(1);
        body.put_i16(1);
        body.put_i16(2);
        body.put_i32(3);
        body.put_slice(b"abc");
        body.put_i32(-1);
        body.put_i16(0);
        let bind = bind(body.freeze()).unwrap();
        assert_eq!(bind.portal, "p");
        assert_eq!(bind.statement, "s");
        assert_eq!(bind.param_formats, vec![1]);
        assert_eq!(bind.params, vec![Some(Bytes::from_static(b"abc")), None]);
        assert!(bind.result_formats.is_empty());
    }

    #[test]
    fn truncated_bind_is_a_violation_not_a_panic() {
        let mut body = BytesMut::new();
        body.put_slice(b"\0\0");
        body.put_i16(0);
        body.put_i16(1);
        body.put_i32(100);
        body.put_slice(b"short");
        assert!(bind(body.freeze()).is_err());
        assert!(bind(Bytes::from_static(b"\0")).is_err());
        assert!(execute(Bytes::from_static(b"portal")).is_err());
        assert!(target(Bytes::from_static(b"X\0")).is_err());
    }

    #[test]
    fn messages_carry_their_length() {
        let mut out = BytesMut::new();
        command_complete(&mut out, "SELECT 1");
        assert_eq!(&out[..], b"C\0\0\0\rSELECT 1\0");
        let mut out = BytesMut::new();
        ready_for_query(&mut out, b'I');
        assert_eq!(&out[..], b"Z\0\0\0\x05I");
    }
}
