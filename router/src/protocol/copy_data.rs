//! COPY FROM STDIN streams cut into rows, with each row's shard-key field, in the text, CSV and
//! binary formats (pure: bytes in, pieces out). The session sends each row to its key's shard;
//! what every shard's stream needs whatever its rows (a CSV or text header line, the binary
//! header and trailer) goes to all of them.

/// The format of a COPY stream and the options that shape its rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    /// Text: a row per line, fields split by `delimiter`, backslash escapes, `null` for NULL.
    Text {
        /// Field delimiter.
        delimiter: u8,
        /// The NULL marker.
        null: Vec<u8>,
        /// The first line is a header.
        header: bool,
    },
    /// CSV: rows end at a newline outside quotes.
    Csv {
        /// Field delimiter.
        delimiter: u8,
        /// Quote character.
        quote: u8,
        /// Escape character inside quotes.
        escape: u8,
        /// An unquoted field equal to this is NULL.
        null: Vec<u8>,
        /// The first row is a header.
        header: bool,
    },
    /// PostgreSQL's binary COPY format.
    Binary,
}

impl Default for CopyFormat {
    fn default() -> Self {
        CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            header: false,
        }
    }
}

impl CopyFormat {
    /// The CSV format with PostgreSQL's defaults.
    pub fn csv() -> Self {
        CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: false,
        }
    }

    /// The format code of CopyInResponse (0 text, 1 binary).
    pub fn code(&self) -> i8 {
        match self {
            CopyFormat::Binary => 1,
            _ => 0,
        }
    }
}

/// Why a COPY stream cannot be cut into rows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CopyError {
    /// SQLSTATE.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(message: impl Into<String>) -> CopyError {
    CopyError {
        code: "22P04",
        message: message.into(),
    }
}

/// One piece of a COPY stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Goes to every shard before the rows (a header).
    Prefix(Vec<u8>),
    /// A row as sent, and its shard-key field (decoded text, or the binary value); `None` for
    /// NULL.
    Row {
        /// The row's bytes.
        bytes: Vec<u8>,
        /// The key field.
        key: Option<Vec<u8>>,
    },
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The end of a binary stream (a tuple with -1 fields).
pub const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Cuts a COPY stream into pieces as its bytes arrive.
#[derive(Debug)]
pub struct RowSplitter {
    format: CopyFormat,
    key: usize,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already cut off.
    at: usize,
    header_done: bool,
    ended: bool,
}

impl RowSplitter {
    /// A splitter for `format` whose shard key is field `key` (0-based).
    pub fn new(format: CopyFormat, key: usize) -> Self {
        Self {
            format,
            key,
            buffer: Vec::new(),
            at: 0,
            header_done: false,
            ended: false,
        }
    }

    /// The stream's format.
    pub fn format(&self) -> &CopyFormat {
        &self.format
    }

    /// Takes more bytes of the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.at > 0 && self.at * 2 >= self.buffer.len() {
            self.buffer.drain(..self.at);
            self.at = 0;
        }
        self.buffer.extend_from_slice(data);
    }

    /// The next whole piece, or `None` until more bytes come.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, CopyError> {
        self.cut(false)
    }

    /// The last piece once the client ended the stream (a last line without its newline), or
    /// an error if it stopped inside a row.
    pub fn finish(&mut self) -> Result<Option<Piece>, CopyError> {
        let piece = self.cut(true)?;
        if piece.is_none() && self.format == CopyFormat::Binary && !self.ended {
            return Err(bad(if self.header_done {
                "binary COPY data ended without its trailer"
            } else {
                "COPY file signature not recognized"
            }));
        }
        Ok(piece)
    }

    /// What ends every shard's stream after its rows.
    pub fn trailer(&self) -> &'static [u8] {
        match self.format {
            CopyFormat::Binary => BINARY_TRAILER,
            _ => &[],
        }
    }

    fn cut(&mut self, last: bool) -> Result<Option<Piece>, CopyError> {
        loop {
            if self.ended || self.at >= self.buffer.len() {
                if self.ended && self.at < self.buffer.len() && !last {
                    // PostgreSQL ignores what follows the end marker in text formats.
                    self.at = self.buffer.len();
                }
                return Ok(None);
            }
            let piece = match self.format {
                CopyFormat::Binary => self.cut_binary()?,
                _ => self.cut_line(last)?,
            };
            match piece {
                Some(Cut::Piece(piece)) => return Ok(Some(piece)),
                Some(Cut::Skip) => continue,
                None => return Ok(None),
            }
        }
    }

    fn cut_line(&mut self, last: bool) -> Result<Option<Cut>, CopyError> {
        let rest = &self.buffer[self.at..];
        let end = match &self.format {
            CopyFormat::Csv { quote, escape, .. } => csv_record_end(rest, *quote, *escape),
            _ => rest.iter().position(|b| *b == b'\n').map(|i| i + 1),
        };
        let end = match end {
            Some(end) => end,
            None if last => rest.len(),
            None => return Ok(None),
        };
        let mut line = rest[..end].to_vec();
        self.at += end;
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content == b"\\." {
            self.ended = true;
            return Ok(Some(Cut::Skip));
        }
        if last && !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let header = match &self.format {
            CopyFormat::Text { header, .. } | CopyFormat::Csv { header, .. } => *header,
            CopyFormat::Binary => false,
        };
        if header && !self.header_done {
            self.header_done = true;
            return Ok(Some(Cut::Piece(Piece::Prefix(line))));
        }
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        let key = match &self.format {
            CopyFormat::Text {
                delimiter, null, ..
            } => text_field(content, *delimiter, null, self.key)?,
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                null,
                ..
            } => csv_field(content, *delimiter, *quote, *escape, null, self.key)?,
            CopyFormat::Binary => None,
        };
        Ok(Some(Cut::Piece(Piece::Row { bytes: line, key })))
    }

    fn cut_binary(&mut self) -> Result<Option<Cut>, CopyError> {
        let rest = &self.buffer[self.at..];
        if !self.header_done {
            // Signature, flags, header extension length and extension.
            if rest.len() < BINARY_SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if !rest.starts_with(BINARY_SIGNATURE) {
                return Err(bad("COPY file signature not recognized"));
            }
            let at = BINARY_SIGNATURE.len() + 4;
            let extension = u32::from_be_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
            let end = at + 4 + extension as usize;
            if rest.len() < end {
                return Ok(None);
            }
            let header = rest[..end].to_vec();
            self.at += end;
            self.header_done = true;
            return Ok(Some(Cut::Piece(Piece::Prefix(header))));
        }
        if rest.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([rest[0], rest[1]]);
        if fields == -1 {
            self.at += 2;
            self.ended = true;
            return Ok(Some(Cut::Skip));
        }
        if fields < 0 {
            return Err(bad(format!(
                "row field count is {fields}, expected -1 or more"
            )));
        }
        let mut at = 2;
        let mut key = None;
        for field in 0..fields as usize {
            if rest.len() < at + 4 {
                return Ok(None);
            }
            let length = i32::from_be_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
            at += 4;
            if length < -1 {
                return Err(bad(format!(
                    "invalid field length {length} in binary COPY data"
                )));
            }
            let len = length.max(0) as usize;
            if rest.len() < at + len {
                return Ok(None);
            }
            if field == self.key && length >= 0 {
                key = Some(rest[at..at + len].to_vec());
            }
            at += len;
        }
        if fields as usize <= self.key {
            return Err(bad(format!(
                "COPY row has {fields} fields, the shard key is field {}",
                self.key + 1
            )));
        }
        let bytes = rest[..at].to_vec();
        self.at += at;
        Ok(Some(Cut::Piece(Piece::Row { bytes, key })))
    }
}

enum Cut {
    Piece(Piece),
    Skip,
}

/// Where a CSV record ends (after its newline), if the bytes hold a whole one.
fn csv_record_end(bytes: &[u8], quote: u8, escape: u8) -> Option<usize> {
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if quoted {
            if escape != quote && b == escape {
                // The escape makes the next byte literal (PostgreSQL: only before a quote or
                // the escape itself; a lone escape stays, which skipping one byte also keeps).
                if i + 1 < bytes.len() && (bytes[i + 1] == quote || bytes[i + 1] == escape) {
                    i += 1;
                }
            } else if b == quote {
                // With escape = quote, a doubled quote closes and reopens: still quoted.
                quoted = false;
            }
        } else if b == quote {
            quoted = true;
        } else if b == b'\n' {
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// The text-format field `index`, unescaped; `None` when it is the NULL marker.
fn text_field(
    line: &[u8],
    delimiter: u8,
    null: &[u8],
    index: usize,
) -> Result<Option<Vec<u8>>, CopyError> {
    let raw = line
        .split(|b| *b == delimiter)
        .nth(index)
        .ok_or_else(|| bad(format!("COPY row has no column {}", index + 1)))?;
    if raw == null {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(b) = bytes.next() {
        if *b != b'\\' {
            out.push(*b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(other) => out.push(*other),
            None => {}
        }
    }
    Ok(Some(out))
}

/// The CSV field `index`, unquoted; `None` when it is unquoted and equal to `null`.
fn csv_field(
    record: &[u8],
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: &[u8],
    index: usize,
) -> Result<Option<Vec<u8>>, CopyError> {
    let mut field = 0;
    let mut i = 0;
    loop {
        // One field from `i`.
        let mut value = Vec::new();
        let mut was_quoted = false;
        let mut quoted = false;
        while i < record.len() {
            let b = record[i];
            if quoted {
                if b == escape
                    && i + 1 < record.len()
                    && (record[i + 1] == quote || record[i + 1] == escape)
                    && (escape != quote || record[i + 1] == quote)
                {
                    value.push(record[i + 1]);
                    i += 2;
                    continue;
                }
                if b == quote {
                    quoted = false;
                } else {
                    value.push(b);
                }
            } else if b == quote {
                quoted = true;
                was_quoted = true;
            } else if b == delimiter {
                break;
            } else {
                value.push(b);
            }
            i += 1;
        }
        if field == index {
            return Ok((was_quoted || value != null).then_some(value));
        }
        if i >= record.len() {
            return Err(bad(format!("COPY row has no column {}", index + 1)));
        }
        i += 1;
        field += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(format: CopyFormat, key: usize, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut splitter = RowSplitter::new(format, key);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk);
            while let Some(piece) = splitter.next_piece().unwrap() {
                out.push(piece);
            }
        }
        out.extend(splitter.finish().unwrap());
        out
    }

    fn keys(pieces: &[Piece]) -> Vec<Option<String>> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Row { key, .. } => Some(
                    key.as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                ),
                Piece::Prefix(_) => None,
            })
            .collect()
    }

    #[test]
    fn text_rows_split_at_newlines_whatever_the_chunks() {
        let data: &[u8] = b"1\ta\\tb\n2\t\\N\n\\N\tx\n7\tlast";
        for cut in 1..data.len() {
            let got = pieces(CopyFormat::default(), 0, &[&data[..cut], &data[cut..]]);
            assert_eq!(
                keys(&got),
                [Some("1".into()), Some("2".into()), None, Some("7".into())]
            );
            let Piece::Row { bytes, .. } = &got[3] else {
                panic!()
            };
            assert_eq!(bytes, b"7\tlast\n", "a last line gets its newline");
        }
        let second = pieces(CopyFormat::default(), 1, &[b"1\ta\\tb\n\\.\n9\tignored\n"]);
        assert_eq!(keys(&second), [Some("a\tb".into())]);
    }

    #[test]
    fn csv_rows_keep_newlines_and_delimiters_inside_quotes() {
        let format = CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: true,
        };
        let data: &[u8] =
            b"id,note,key\n1,\"two\nlines, and \"\"quotes\"\"\",\"k,1\"\n2,,\n3,x,\"\"\n4,y,plain";
        for cut in 1..data.len() {
            let got = pieces(format.clone(), 2, &[&data[..cut], &data[cut..]]);
            assert_eq!(got[0], Piece::Prefix(b"id,note,key\n".to_vec()));
            assert_eq!(
                keys(&got),
                [
                    Some("k,1".into()),
                    None,
                    Some(String::new()),
                    Some("plain".into())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn csv_with_a_backslash_escape() {
        let format = CopyFormat::Csv {
            delimiter: b';',
            quote: b'\'',
            escape: b'\\',
            null: b"NULL".to_vec(),
            header: false,
        };
        let got = pieces(format, 1, &[b"1;'it\\'s;\n'\n2;NULL\n3;'NULL'\n"]);
        assert_eq!(
            keys(&got),
            [Some("it's;\n".into()), None, Some("NULL".into())]
        );
    }

    fn binary_stream(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut out = BINARY_SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        for (id, name) in rows {
            out.extend_from_slice(&2i16.to_be_bytes());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(name) => {
                    out.extend_from_slice(&(name.len() as i32).to_be_bytes());
                    out.extend_from_slice(name.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(BINARY_TRAILER);
        out
    }

    #[test]
    fn binary_tuples_split_whatever_the_chunks() {
        let data = binary_stream(&[(5, Some("five")), (-3, None), (7, Some(""))]);
        for cut in 1..data.len() {
            let got = pieces(CopyFormat::Binary, 1, &[&data[..cut], &data[cut..]]);
            let Piece::Prefix(header) = &got[0] else {
                panic!("header first")
            };
            assert_eq!(header.len(), BINARY_SIGNATURE.len() + 12);
            assert_eq!(keys(&got), [Some("five".into()), None, Some(String::new())]);
            let by_id = pieces(CopyFormat::Binary, 0, &[&data]);
            let Piece::Row { key: Some(key), .. } = &by_id[2] else {
                panic!()
            };
            assert_eq!(key, &(-3i64).to_be_bytes());
        }
    }

    #[test]
    fn broken_binary_streams_are_errors() {
        let mut splitter = RowSplitter::new(CopyFormat::Binary, 0);
        splitter.push(b"not a binary copy stream at all");
        assert_eq!(splitter.next_piece().unwrap_err().code, "22P04");
        let data = binary_stream(&[(1, Some("one"))]);
        let mut cut_off = RowSplitter::new(CopyFormat::Binary, 0);
        cut_off.push(&data[..data.len() - 4]);
        while cut_off.next_piece().unwrap().is_some() {}
        assert!(
            cut_off.finish().is_err(),
            "a row cut off is not dropped silently"
        );
    }
}
