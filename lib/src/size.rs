//! Sizes as qemu's tools write them: `512`, `4k`, `1M`, `2G`, `1.5T`.

use crate::{Error, Result};

/// Parses a size with an optional k/M/G/T/P/E suffix (powers of 1024; a
/// bare number is bytes, `b`/`B` suffix too).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || Error::invalid(format!("invalid size '{s}'"));
    if t.is_empty() {
        return Err(bad());
    }
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    if let Some((int, frac)) = num.split_once('.') {
        let i: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
        let f: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let whole = i.checked_mul(mult).ok_or_else(bad)?;
        let part = (f * mult as f64) as u64;
        whole.checked_add(part).ok_or_else(bad)
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(mult).ok_or_else(bad)
    }
}

/// Formats bytes the way qemu-img's human output does: `1 MiB`, `1.5 GiB`,
/// `512 B`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // qemu prints 3 significant digits (%0.3g).
    let s = if v >= 100.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
        assert!(parse_size("12q").is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(64 << 10), "64 KiB");
    }
}
