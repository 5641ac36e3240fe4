//! Decoding and encoding the column values the merger must understand (sort keys, group keys,
//! partial aggregates), in PostgreSQL's text and binary formats.

use std::cmp::Ordering;

/// Type OIDs the merger knows.
pub mod oid {
    /// bool
    pub const BOOL: u32 = 16;
    /// name
    pub const NAME: u32 = 19;
    /// int8
    pub const INT8: u32 = 20;
    /// int2
    pub const INT2: u32 = 21;
    /// int4
    pub const INT4: u32 = 23;
    /// text
    pub const TEXT: u32 = 25;
    /// text[]
    pub const TEXT_ARRAY: u32 = 1009;
    /// oid
    pub const OID: u32 = 26;
    /// float4
    pub const FLOAT4: u32 = 700;
    /// float8
    pub const FLOAT8: u32 = 701;
    /// bpchar
    pub const BPCHAR: u32 = 1042;
    /// varchar
    pub const VARCHAR: u32 = 1043;
    /// date
    pub const DATE: u32 = 1082;
    /// timestamp
    pub const TIMESTAMP: u32 = 1114;
    /// timestamptz
    pub const TIMESTAMPTZ: u32 = 1184;
    /// numeric
    pub const NUMERIC: u32 = 1700;

    /// The name of a built-in type in `pg_catalog` (`typname`), if it is one of these.
    pub fn builtin_name(oid: u32) -> Option<&'static str> {
        Some(match oid {
            BOOL => "bool",
            17 => "bytea",
            NAME => "name",
            INT8 => "int8",
            INT2 => "int2",
            INT4 => "int4",
            TEXT => "text",
            OID => "oid",
            114 => "json",
            FLOAT4 => "float4",
            FLOAT8 => "float8",
            BPCHAR => "bpchar",
            VARCHAR => "varchar",
            DATE => "date",
            1083 => "time",
            TIMESTAMP => "timestamp",
            TIMESTAMPTZ => "timestamptz",
            1186 => "interval",
            1266 => "timetz",
            NUMERIC => "numeric",
            2950 => "uuid",
            3802 => "jsonb",
            _ => return None,
        })
    }

    /// The array type of a built-in type (`pg_type.typarray`), if it is one of these.
    pub fn array_of(element: u32) -> Option<u32> {
        Some(match element {
            BOOL => 1000,
            17 => 1001, // bytea
            18 => 1002, // char
            NAME => 1003,
            INT8 => 1016,
            INT2 => 1005,
            INT4 => 1007,
            TEXT => 1009,
            OID => 1028,
            114 => 199, // json
            142 => 143, // xml
            650 => 651, // cidr
            FLOAT4 => 1021,
            FLOAT8 => 1022,
            790 => 791,  // money
            829 => 1040, // macaddr
            869 => 1041, // inet
            BPCHAR => 1014,
            VARCHAR => 1015,
            DATE => 1182,
            1083 => 1183, // time
            TIMESTAMP => 1115,
            TIMESTAMPTZ => 1185,
            1186 => 1187, // interval
            1266 => 1270, // timetz
            1560 => 1561, // bit
            1562 => 1563, // varbit
            NUMERIC => 1231,
            2950 => 2951, // uuid
            3802 => 3807, // jsonb
            _ => return None,
        })
    }
}

/// A fixed-point decimal: `mantissa * 10^-scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal {
    /// Digits.
    pub mantissa: i128,
    /// Digits after the point (PostgreSQL's display scale).
    pub scale: u32,
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

impl Decimal {
    /// An integer.
    pub fn from_i64(value: i64) -> Self {
        Self {
            mantissa: value as i128,
            scale: 0,
        }
    }

    /// Parses PostgreSQL's numeric text output (`-12.340`).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part
            .chars()
            .chain(frac_part.chars())
            .all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let mut mantissa: i128 = 0;
        for c in int_part.chars().chain(frac_part.chars()) {
            mantissa = mantissa
                .checked_mul(10)?
                .checked_add((c as u8 - b'0') as i128)?;
        }
        Some(Self {
            mantissa: if negative { -mantissa } else { mantissa },
            scale: frac_part.len() as u32,
        })
    }

    /// Rescales (exactly when growing; truncating toward zero when shrinking).
    pub fn rescale(self, scale: u32) -> Option<Self> {
        if scale >= self.scale {
            Some(Self {
                mantissa: self.mantissa.checked_mul(pow10(scale - self.scale)?)?,
                scale,
            })
        } else {
            Some(Self {
                mantissa: self.mantissa / pow10(self.scale - scale)?,
                scale,
            })
        }
    }

    /// Sum; the scale is the larger one (as PostgreSQL's numeric addition).
    pub fn checked_add(self, other: Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        let a = self.rescale(scale)?;
        let b = other.rescale(scale)?;
        Some(Self {
            mantissa: a.mantissa.checked_add(b.mantissa)?,
            scale,
        })
    }

    fn int_digits(&self) -> (i32, u32) {
        // (weight in base-10000 digits, first base-10000 digit) as PostgreSQL's NumericVar has.
        let abs = self.mantissa.unsigned_abs();
        if abs == 0 {
            return (0, 0);
        }
        let text = abs.to_string();
        let scale = self.scale as usize;
        let (int_part, frac_part) = if text.len() > scale {
            (
                text[..text.len() - scale].to_string(),
                text[text.len() - scale..].to_string(),
            )
        } else {
            (
                String::new(),
                format!("{}{}", "0".repeat(scale - text.len()), text),
            )
        };
        let int_trim = int_part.trim_start_matches('0');
        if !int_trim.is_empty() {
            let groups = int_trim.len().div_ceil(4);
            let first_len = int_trim.len() - (groups - 1) * 4;
            let first: u32 = int_trim[..first_len].parse().unwrap_or(0);
            return (groups as i32 - 1, first);
        }
        // Pure fraction: find the first non-zero base-10000 group after the point.
        let padded = format!("{}{}", frac_part, "0".repeat((4 - frac_part.len() % 4) % 4));
        for (i, chunk) in padded.as_bytes().chunks(4).enumerate() {
            let value: u32 = std::str::from_utf8(chunk)
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
            if value != 0 {
                return (-(i as i32) - 1, value);
            }
        }
        (0, 0)
    }

    /// Division with PostgreSQL's result scale (`select_div_scale`) and rounding, as `avg`
    /// computes `sum / count`.
    pub fn div_pg(self, divisor: Self) -> Option<Self> {
        if divisor.mantissa == 0 {
            return None;
        }
        let (weight1, first1) = self.int_digits();
        let (weight2, first2) = divisor.int_digits();
        let mut qweight = weight1 - weight2;
        if first1 < first2 {
            qweight -= 1;
        }
        let mut rscale = 16 - qweight * 4;
        rscale = rscale
            .max(self.scale as i32)
            .max(divisor.scale as i32)
            .clamp(0, 1000);
        let rscale = rscale as u32;
        // value = (a / 10^sa) / (b / 10^sb); result mantissa = a * 10^(rscale + sb - sa) / b.
        let shift = rscale as i64 + divisor.scale as i64 - self.scale as i64;
        let (mut numerator, mut denominator) = (self.mantissa, divisor.mantissa);
        if shift >= 0 {
            numerator = numerator.checked_mul(pow10(shift as u32)?)?;
        } else {
            denominator = denominator.checked_mul(pow10((-shift) as u32)?)?;
        }
        let quotient = numerator / denominator;
        let remainder = numerator % denominator;
        // Round half away from zero.
        let round = if remainder.unsigned_abs() * 2 >= denominator.unsigned_abs() {
            if (numerator < 0) != (denominator < 0) {
                -1
            } else {
                1
            }
        } else {
            0
        };
        Some(Self {
            mantissa: quotient + round,
            scale: rscale,
        })
    }

    /// Decodes PostgreSQL's binary numeric.
    pub fn from_binary(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 8 {
            return None;
        }
        let ndigits = i16::from_be_bytes([bytes[0], bytes[1]]) as usize;
        let weight = i16::from_be_bytes([bytes[2], bytes[3]]) as i32;
        let sign = u16::from_be_bytes([bytes[4], bytes[5]]);
        let dscale = i16::from_be_bytes([bytes[6], bytes[7]]).max(0) as u32;
        if sign == 0xC000 || bytes.len() < 8 + ndigits * 2 {
            return None;
        }
        let mut mantissa: i128 = 0;
        for i in 0..ndigits {
            let digit = u16::from_be_bytes([bytes[8 + 2 * i], bytes[9 + 2 * i]]) as i128;
            mantissa = mantissa.checked_mul(10_000)?.checked_add(digit)?;
        }
        let exponent = 4 * (weight - ndigits as i32 + 1);
        let value = if exponent >= 0 {
            Self {
                mantissa: mantissa.checked_mul(pow10(exponent as u32)?)?,
                scale: 0,
            }
        } else {
            Self {
                mantissa,
                scale: (-exponent) as u32,
            }
        };
        let mut value = value.rescale(dscale)?;
        if sign == 0x4000 {
            value.mantissa = -value.mantissa;
        }
        Some(value)
    }

    /// Encodes PostgreSQL's binary numeric.
    pub fn to_binary(self) -> Vec<u8> {
        let negative = self.mantissa < 0;
        let pad = (4 - self.scale % 4) % 4;
        let mut magnitude = self.mantissa.unsigned_abs() * 10u128.pow(pad);
        let frac_groups = ((self.scale + pad) / 4) as i32;
        let mut groups = Vec::new(); // least significant first
        while magnitude > 0 {
            groups.push((magnitude % 10_000) as u16);
            magnitude /= 10_000;
        }
        let mut weight = groups.len() as i32 - 1 - frac_groups;
        groups.reverse(); // most significant first
        while groups.last() == Some(&0) {
            groups.pop();
        }
        let leading = groups.iter().take_while(|d| **d == 0).count();
        groups.drain(..leading);
        weight -= leading as i32;
        if groups.is_empty() {
            weight = 0;
        }
        let mut out = Vec::with_capacity(8 + groups.len() * 2);
        out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
        out.extend_from_slice(&(weight as i16).to_be_bytes());
        out.extend_from_slice(
            &(if negative && !groups.is_empty() {
                0x4000u16
            } else {
                0
            })
            .to_be_bytes(),
        );
        out.extend_from_slice(&(self.scale as i16).to_be_bytes());
        for digit in groups {
            out.extend_from_slice(&digit.to_be_bytes());
        }
        out
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
        } else {
            digits
        };
        let (int_part, frac_part) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int_part}.{frac_part}")
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let scale = self.scale.max(other.scale);
        match (self.rescale(scale), other.rescale(scale)) {
            (Some(a), Some(b)) => a.mantissa.cmp(&b.mantissa),
            _ => (self.mantissa as f64 / 10f64.powi(self.scale as i32))
                .total_cmp(&(other.mantissa as f64 / 10f64.powi(other.scale as i32))),
        }
    }
}

/// A decoded value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Any integer type.
    Int(i64),
    /// float4 / float8.
    Float(f64),
    /// numeric.
    Numeric(Decimal),
    /// Text-like types, compared bytewise (C collation) and anything else, compared as bytes.
    Bytes(Vec<u8>),
    /// bool.
    Bool(bool),
}

/// Decodes a field of type `type_oid` in `format` (0 text, 1 binary).
pub fn decode(type_oid: u32, format: i16, bytes: Option<&[u8]>) -> Value {
    let Some(bytes) = bytes else {
        return Value::Null;
    };
    let text = || std::str::from_utf8(bytes).unwrap_or("");
    match (type_oid, format) {
        (oid::INT2 | oid::INT4 | oid::INT8 | oid::OID, 0) => text()
            .parse()
            .map(Value::Int)
            .unwrap_or_else(|_| Value::Bytes(bytes.to_vec())),
        (oid::INT2, 1) if bytes.len() == 2 => {
            Value::Int(i16::from_be_bytes([bytes[0], bytes[1]]) as i64)
        }
        (oid::INT4, 1) if bytes.len() == 4 => {
            Value::Int(i32::from_be_bytes(bytes.try_into().unwrap()) as i64)
        }
        (oid::OID, 1) if bytes.len() == 4 => {
            Value::Int(u32::from_be_bytes(bytes.try_into().unwrap()) as i64)
        }
        (oid::INT8, 1) if bytes.len() == 8 => {
            Value::Int(i64::from_be_bytes(bytes.try_into().unwrap()))
        }
        (oid::FLOAT4 | oid::FLOAT8, 0) => match text() {
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            "NaN" => Value::Float(f64::NAN),
            t => t
                .parse()
                .map(Value::Float)
                .unwrap_or_else(|_| Value::Bytes(bytes.to_vec())),
        },
        (oid::FLOAT4, 1) if bytes.len() == 4 => {
            Value::Float(f32::from_be_bytes(bytes.try_into().unwrap()) as f64)
        }
        (oid::FLOAT8, 1) if bytes.len() == 8 => {
            Value::Float(f64::from_be_bytes(bytes.try_into().unwrap()))
        }
        (oid::NUMERIC, 0) => Decimal::parse(text())
            .map(Value::Numeric)
            .unwrap_or_else(|| Value::Bytes(bytes.to_vec())),
        (oid::NUMERIC, 1) => Decimal::from_binary(bytes)
            .map(Value::Numeric)
            .unwrap_or_else(|| Value::Bytes(bytes.to_vec())),
        (oid::BOOL, 0) => Value::Bool(bytes == b"t"),
        (oid::BOOL, 1) => Value::Bool(bytes.first() == Some(&1)),
        // date (int32) and timestamps (int64) in binary compare as integers; in text, ISO
        // output compares bytewise.
        (oid::DATE, 1) if bytes.len() == 4 => {
            Value::Int(i32::from_be_bytes(bytes.try_into().unwrap()) as i64)
        }
        (oid::TIMESTAMP | oid::TIMESTAMPTZ, 1) if bytes.len() == 8 => {
            Value::Int(i64::from_be_bytes(bytes.try_into().unwrap()))
        }
        _ => Value::Bytes(bytes.to_vec()),
    }
}

/// Orders two values of the same column (NULLs handled by the caller).
pub fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Greater,
        (_, Value::Null) => Ordering::Less,
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        // -0 equals 0 (total_cmp tells them apart); NaN equals NaN and sorts last, as in
        // PostgreSQL.
        (Value::Float(x), Value::Float(y)) if x == y => Ordering::Equal,
        (Value::Float(x), Value::Float(y)) => match (x.is_nan(), y.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.total_cmp(y),
        },
        (Value::Numeric(x), Value::Numeric(y)) => x.cmp(y),
        (Value::Int(x), Value::Numeric(y)) => Decimal::from_i64(*x).cmp(y),
        (Value::Numeric(x), Value::Int(y)) => x.cmp(&Decimal::from_i64(*y)),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Bytes(x), Value::Bytes(y)) => x.cmp(y),
        (x, y) => format!("{x:?}").cmp(&format!("{y:?}")),
    }
}

/// Formats a float8 as PostgreSQL's `float8out` does (shortest exact, exponent outside
/// [-4, 15)).
pub fn format_float8(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let exponent = value.abs().log10().floor() as i32;
    if (-4..15).contains(&exponent) {
        format!("{value}")
    } else {
        let text = format!("{value:e}");
        let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

/// Encodes a computed value as a field of type `type_oid` in `format`.
pub fn encode(value: &Value, type_oid: u32, format: i16) -> Option<Vec<u8>> {
    match value {
        Value::Null => None,
        Value::Int(v) => Some(match (type_oid, format) {
            (oid::INT8, 1) => v.to_be_bytes().to_vec(),
            (oid::INT4, 1) => (*v as i32).to_be_bytes().to_vec(),
            (oid::INT2, 1) => (*v as i16).to_be_bytes().to_vec(),
            (oid::NUMERIC, 1) => Decimal::from_i64(*v).to_binary(),
            (oid::FLOAT8, 1) => (*v as f64).to_be_bytes().to_vec(),
            _ => v.to_string().into_bytes(),
        }),
        Value::Float(v) => Some(match format {
            1 if type_oid == oid::FLOAT4 => (*v as f32).to_be_bytes().to_vec(),
            1 => v.to_be_bytes().to_vec(),
            _ => format_float8(*v).into_bytes(),
        }),
        Value::Numeric(d) => Some(match format {
            1 => d.to_binary(),
            _ => d.to_string().into_bytes(),
        }),
        Value::Bool(b) => Some(match format {
            1 => vec![*b as u8],
            _ => {
                if *b {
                    b"t".to_vec()
                } else {
                    b"f".to_vec()
                }
            }
        }),
        Value::Bytes(b) => Some(b.clone()),
    }
}

/// Splits a text-format DataRow body into strings.
pub fn split_text_row(body: &[u8]) -> Vec<Option<String>> {
    crate::protocol::messages::split_fields(body)
        .into_iter()
        .map(|f| f.map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_text_round_trip() {
        for text in ["0", "-1.50", "123456789.000001", "0.0001", "-0.5"] {
            assert_eq!(Decimal::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn numeric_binary_round_trip() {
        for text in [
            "0",
            "-1.50",
            "123456789.000001",
            "0.0001",
            "10000",
            "99999999.9",
        ] {
            let value = Decimal::parse(text).unwrap();
            assert_eq!(
                Decimal::from_binary(&value.to_binary()).unwrap(),
                value,
                "{text}"
            );
        }
    }

    #[test]
    fn avg_division_matches_postgres() {
        // SELECT avg(x) FROM generate_series(1, 4) x  =>  2.5000000000000000
        let avg = Decimal::from_i64(10).div_pg(Decimal::from_i64(4)).unwrap();
        assert_eq!(avg.to_string(), "2.5000000000000000");
        // SELECT 100000::numeric / 3  =>  33333.333333333333
        let q = Decimal::from_i64(100_000)
            .div_pg(Decimal::from_i64(3))
            .unwrap();
        assert_eq!(q.to_string(), "33333.333333333333");
    }

    #[test]
    fn float_format_matches_float8out() {
        assert_eq!(format_float8(1.5), "1.5");
        assert_eq!(format_float8(1e20), "1e+20");
        assert_eq!(format_float8(0.00001), "1e-05");
    }
}
