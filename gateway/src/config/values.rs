//! Scalar value types of the configuration language: durations, sizes, rates, money, methods.
//! Each parser returns a message that quotes the bad input, so errors read well at `FILE:LINE:COL`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use subtle::ConstantTimeEq;

/// A YAML scalar kept as text (numbers included), so typed parsing happens in validation with positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Text {
    pub text: String,
    /// The YAML value was a float literal: money refuses those (they are not exact).
    pub was_float: bool,
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text { text: v.to_string(), was_float: false })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text { text: v.to_string(), was_float: false })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text { text: v.to_string(), was_float: false })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text { text: v.to_string(), was_float: true })
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text { text: v.to_string(), was_float: false })
            }
        }
        d.deserialize_any(V)
    }
}

/// `250ms`, `30s`, `5m`, `1h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad =
        || format!("invalid duration `{s}`: expected a whole number and a unit, e.g. `250ms`, `30s`, `5m`, `1h`, `1d`");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms_per).map(Duration::from_millis).ok_or_else(|| format!("duration `{s}` is too large"))
}

/// `512KiB`, `64MiB`, `1GiB`, `100KB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("invalid size `{s}`: expected e.g. `512KiB`, `64MiB`, `1GiB` or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size `{s}` is too large"))
}

pub use crate::limit::Rate;

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("invalid rate `{s}`: expected `COUNT/UNIT`, e.g. `100/s`, `6000/m`, `10/30s`");
    let (count, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    let per = match per {
        "s" | "m" | "h" | "d" => parse_duration(&format!("1{per}"))?,
        other => parse_duration(other).map_err(|_| bad())?,
    };
    if count == 0 || per.is_zero() {
        return Err(format!("invalid rate `{s}`: count and period must be greater than zero"));
    }
    Ok(Rate { count, per })
}

/// Money as an exact decimal with at most 6 places (micro-units), never negative.
pub fn parse_money(t: &Text) -> Result<Decimal, String> {
    if t.was_float {
        return Err(format!(
            "money amount {} must be a quoted decimal string (\"{}\") so it stays exact",
            t.text, t.text
        ));
    }
    let d = Decimal::from_str(t.text.trim())
        .map_err(|_| format!("invalid money amount `{}`: expected a decimal string such as \"0.002\"", t.text))?;
    if d.is_sign_negative() {
        return Err(format!("invalid money amount `{}`: must not be negative", t.text));
    }
    if d.normalize().scale() > 6 {
        return Err(format!("invalid money amount `{}`: at most 6 decimal places (micro-units)", t.text));
    }
    Ok(d)
}

/// The methods Weir routes; extension methods are refused to catch typos (`GTE`).
pub fn parse_method(s: &str) -> Result<http::Method, String> {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"];
    if KNOWN.contains(&s) {
        http::Method::from_str(s).map_err(|e| e.to_string())
    } else {
        let hint = KNOWN
            .iter()
            .find(|k| k.eq_ignore_ascii_case(s) || strsim::osa_distance(k, &s.to_ascii_uppercase()) <= 1)
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        Err(format!("unknown HTTP method `{s}`{hint}"))
    }
}

/// A bearer token (admin, `Weir-Debug`), kept only as a digest: comparing digests in constant time leaks
/// neither the token's bytes nor its length.
pub struct Token([u8; 32]);

impl Token {
    pub fn new(token: &str) -> Token {
        Token(Self::digest(token.as_bytes()))
    }

    fn digest(b: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&blake3::derive_key("weir admin token v1", b"weir"), b).as_bytes()
    }

    /// Whether an `Authorization` value carries this token (`Bearer` in any case, RFC 9110 §11.1).
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let presented = authorization
            .and_then(|v| {
                let (scheme, rest) = v.split_at_checked(6)?;
                (scheme.eq_ignore_ascii_case(b"bearer") && rest.first() == Some(&b' ')).then(|| rest.trim_ascii())
            })
            .unwrap_or(b"");
        self.matches(presented)
    }

    /// Whether `presented` is this token (constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        Self::digest(presented).ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("64mb").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/s").unwrap(), Rate { count: 100, per: Duration::from_secs(1) });
        assert_eq!(parse_rate("10/30s").unwrap().per, Duration::from_secs(30));
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("0/s").is_err());
    }

    #[test]
    fn money() {
        let t = |s: &str| Text { text: s.into(), was_float: false };
        assert_eq!(parse_money(&t("0.002")).unwrap().to_string(), "0.002");
        assert!(parse_money(&t("-1")).is_err());
        assert!(parse_money(&t("0.0000001")).is_err());
        assert!(parse_money(&Text { text: "0.002".into(), was_float: true }).is_err());
    }

    #[test]
    fn methods() {
        assert!(parse_method("GET").is_ok());
        assert!(parse_method("GTE").unwrap_err().contains("did you mean `GET`"));
    }
}
