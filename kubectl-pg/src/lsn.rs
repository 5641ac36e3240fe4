//! WAL positions as PostgreSQL prints them (`X/Y`, two hexadecimal halves).

/// `X/Y` as a 64-bit position.
pub fn parse(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_both_halves() {
        assert_eq!(super::parse("0/3000060"), Some(0x3000060));
        assert_eq!(super::parse("1/0"), Some(1 << 32));
        assert_eq!(super::parse("nonsense"), None);
        assert_eq!(super::parse("0/G"), None);
    }
}
