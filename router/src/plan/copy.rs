//! COPY statements: the query a COPY ... TO runs per shard and the options of a COPY ... FROM.

use super::*;

/// COPY (query) TO STDOUT of a query the router runs (merged, in stages, ...): its rows are
/// written out in COPY's text or CSV format by the router.
pub(super) fn copy_query(
    query: Planned,
    options: &[sqlparser::ast::CopyOption],
    legacy_options: &[sqlparser::ast::CopyLegacyOption],
    header: bool,
) -> Result<Planned, PlanError> {
    use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
    let mut copy = CopyQuery {
        query,
        csv: false,
        header,
        delimiter: None,
        null: None,
    };
    let refused =
        |what: String| unsupported(format!("COPY (query) TO STDOUT with {what} across shards"));
    for option in options {
        match option {
            CopyOption::Format(format) if format.value.eq_ignore_ascii_case("csv") => {
                copy.csv = true
            }
            CopyOption::Format(format) if format.value.eq_ignore_ascii_case("text") => {}
            CopyOption::Header(_) => {}
            CopyOption::Delimiter(c) => copy.delimiter = Some(*c),
            CopyOption::Null(null) => copy.null = Some(null.clone()),
            other => return refused(other.to_string()),
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Csv(csv) => {
                copy.csv = true;
                if let Some(other) = csv
                    .iter()
                    .find(|c| !matches!(c, CopyLegacyCsvOption::Header))
                {
                    return refused(other.to_string());
                }
            }
            CopyLegacyOption::Delimiter(c) => copy.delimiter = Some(*c),
            CopyLegacyOption::Null(null) => copy.null = Some(null.clone()),
            other => return refused(other.to_string()),
        }
    }
    if copy.header && !copy.csv {
        return Err(PlanError::Syntax(
            "COPY HEADER in text format is not supported by the router; use CSV".into(),
        ));
    }
    Ok(Planned {
        sql: copy.query.sql.clone(),
        plan: Plan::CopyQuery(Box::new(copy)),
        returns_rows: false,
    })
}

/// A COPY (query) TO STDOUT the router writes itself.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyQuery {
    /// The query.
    pub query: Planned,
    /// CSV (else text).
    pub csv: bool,
    /// A header line with the column names (CSV).
    pub header: bool,
    /// Field delimiter (tab for text, comma for CSV).
    pub delimiter: Option<char>,
    /// The NULL marker (`\N` for text, empty for CSV).
    pub null: Option<String>,
}

/// A COPY TO STDOUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOut {
    /// The shards it reads: every one (`None`), or one.
    pub shard: Option<Target>,
    /// CSV with HEADER: the header line is kept from the first shard only.
    pub header: bool,
}

/// Where the rows of a COPY FROM STDIN go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyDestination {
    /// Each row to the shard of its key (field `key_position` of the text format).
    ByKey {
        /// Field of the shard key; `None` (no column list): looked up in the catalog.
        key_position: Option<usize>,
        /// The table.
        table: String,
        /// Its shard-key column.
        key_column: String,
        /// Table group.
        group: usize,
    },
    /// Every row to every shard (reference table).
    Everywhere,
    /// Every row to the first shard (a table the router does not shard).
    FirstShard,
}

/// The format of a COPY FROM STDIN from its options (PostgreSQL's and the legacy syntax).
pub(super) fn copy_format(
    options: &[sqlparser::ast::CopyOption],
    legacy_options: &[sqlparser::ast::CopyLegacyOption],
) -> Result<crate::protocol::copy_data::CopyFormat, PlanError> {
    use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
    #[derive(Default)]
    struct Chosen {
        format: Option<String>,
        delimiter: Option<char>,
        null: Option<String>,
        header: bool,
        quote: Option<char>,
        escape: Option<char>,
    }
    let mut chosen = Chosen::default();
    for option in options {
        match option {
            CopyOption::Format(name) => chosen.format = Some(name.value.to_ascii_lowercase()),
            CopyOption::Delimiter(c) => chosen.delimiter = Some(*c),
            CopyOption::Null(null) => chosen.null = Some(null.clone()),
            CopyOption::Header(header) => chosen.header = *header,
            CopyOption::Quote(c) => chosen.quote = Some(*c),
            CopyOption::Escape(c) => chosen.escape = Some(*c),
            CopyOption::Freeze(_)
            | CopyOption::ForceQuote(_)
            | CopyOption::ForceNotNull(_)
            | CopyOption::ForceNull(_) => {}
            CopyOption::Encoding(encoding) => {
                let name = encoding.to_ascii_uppercase().replace(['-', '_'], "");
                if name != "UTF8" && name != "UNICODE" {
                    return unsupported("COPY FROM STDIN in an encoding other than UTF8");
                }
            }
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Binary => chosen.format = Some("binary".into()),
            CopyLegacyOption::Delimiter(c) => chosen.delimiter = Some(*c),
            CopyLegacyOption::Null(null) => chosen.null = Some(null.clone()),
            CopyLegacyOption::Csv(csv) => {
                chosen.format = Some("csv".into());
                for option in csv {
                    match option {
                        CopyLegacyCsvOption::Header => chosen.header = true,
                        CopyLegacyCsvOption::Quote(c) => chosen.quote = Some(*c),
                        CopyLegacyCsvOption::Escape(c) => chosen.escape = Some(*c),
                        CopyLegacyCsvOption::ForceQuote(_)
                        | CopyLegacyCsvOption::ForceNotNull(_) => {}
                    }
                }
            }
            other => return unsupported(format!("the COPY option {other}")),
        }
    }
    let byte = |c: Option<char>, default: u8, what: &str| -> Result<u8, PlanError> {
        match c {
            None => Ok(default),
            Some(c) if c.is_ascii() => Ok(c as u8),
            Some(_) => unsupported(format!("a COPY {what} that is not a single-byte character")),
        }
    };
    use crate::protocol::copy_data::CopyFormat;
    match chosen.format.as_deref().unwrap_or("text") {
        "text" => Ok(CopyFormat::Text {
            delimiter: byte(chosen.delimiter, b'\t', "delimiter")?,
            null: chosen.null.unwrap_or_else(|| "\\N".into()).into_bytes(),
            header: chosen.header,
        }),
        "csv" => {
            let quote = byte(chosen.quote, b'"', "quote")?;
            Ok(CopyFormat::Csv {
                delimiter: byte(chosen.delimiter, b',', "delimiter")?,
                quote,
                escape: byte(chosen.escape, quote, "escape")?,
                null: chosen.null.unwrap_or_default().into_bytes(),
                header: chosen.header,
            })
        }
        "binary" => Ok(CopyFormat::Binary),
        other => unsupported(format!("the COPY format {other}")),
    }
}
