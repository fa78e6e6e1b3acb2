//! Time as numbers and text: the one home for Unix time in seconds, milliseconds and
//! microseconds, civil dates (proleptic Gregorian, UTC) and RFC 3339. Every module reads time
//! through here; none keeps its own conversion.

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch(t: SystemTime) -> std::time::Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Unix seconds (0 before the epoch).
pub fn unix_s(t: SystemTime) -> i64 {
    i64::try_from(since_epoch(t).as_secs()).unwrap_or(i64::MAX)
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    unix_s(SystemTime::now())
}

/// Unix milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_millis()).unwrap_or(u64::MAX)
}

/// Unix microseconds.
pub fn unix_us(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_micros()).unwrap_or(u64::MAX)
}

/// Where a component reads "now" (Unix microseconds): the system clock in the gateway, a
/// clock a test moves by hand in unit tests (`Manual`).
pub trait Clock: std::fmt::Debug + Send + Sync {
    fn now_us(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Clock for System {
    fn now_us(&self) -> u64 {
        unix_us(SystemTime::now())
    }
}

/// A clock that stands still until told to move.
#[derive(Debug, Default)]
pub struct Manual(std::sync::atomic::AtomicU64);

impl Manual {
    pub fn at(us: u64) -> Manual {
        Manual(std::sync::atomic::AtomicU64::new(us))
    }

    pub fn advance(&self, by: std::time::Duration) {
        let us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.0.fetch_add(us, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for Manual {
    fn now_us(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Howard Hinnant's `days_from_civil`: days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse: `(year, month, day)` of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// RFC 3339 UTC of Unix seconds (`2026-12-02T13:00:00Z`), with `.mmm` milliseconds when given,
/// appended to `out` digit by digit (the access log writes one per line: `format!` cost 3,000
/// instructions).
fn push_rfc3339(out: &mut String, secs: i64, millis: Option<u32>) {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let year = u32::try_from(y).unwrap_or(0);
    let (hh, mm, ss) = (s / 3600, s / 60 % 60, s % 60);
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    fixed_digits(&mut buf[0..4], u64::from(year));
    fixed_digits(&mut buf[5..7], u64::from(m));
    fixed_digits(&mut buf[8..10], u64::from(d));
    for (at, v) in [(11, hh), (14, mm), (17, ss)] {
        fixed_digits(&mut buf[at..at + 2], u64::try_from(v).unwrap_or(0));
    }
    let text = match millis {
        Some(ms) => {
            fixed_digits(&mut buf[20..23], u64::from(ms));
            &buf[..]
        }
        None => {
            buf[19] = b'Z';
            &buf[..20]
        }
    };
    out.push_str(std::str::from_utf8(text).unwrap_or("1970-01-01T00:00:00Z"));
}

/// The last `out.len()` decimal digits of `v`, zero-padded, into `out`.
pub fn fixed_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
    }
}

fn rfc3339_parts(secs: i64, millis: Option<u32>) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339(&mut out, secs, millis);
    out
}

/// RFC 3339 UTC with milliseconds (`2026-12-02T16:07:50.123Z`) for a run of timestamps, most
/// of them in the same second (an access log's lines): the date and time are rendered once per
/// second, the milliseconds per call.
#[derive(Debug, Default)]
pub struct Rfc3339Ms {
    secs: Option<i64>,
    /// `2026-12-02T16:07:50.` of `secs`.
    prefix: String,
}

impl Rfc3339Ms {
    /// Appends the stamp of `t` to a byte buffer (the access log's line).
    pub fn push(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let secs = unix_s(t);
        if self.secs != Some(secs) {
            self.prefix.clear();
            push_rfc3339(&mut self.prefix, secs, Some(0));
            self.prefix.truncate(20);
            self.secs = Some(secs);
        }
        out.extend_from_slice(self.prefix.as_bytes());
        let mut ms = *b"000Z";
        fixed_digits(&mut ms[..3], u64::from(since_epoch(t).subsec_millis()));
        out.extend_from_slice(&ms);
    }
}

/// RFC 3339 UTC text of Unix seconds (`2026-12-02T13:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    rfc3339_parts(secs, None)
}

/// RFC 3339 UTC with milliseconds (`2026-12-02T16:07:50.123Z`).
pub fn rfc3339_ms(t: SystemTime) -> String {
    rfc3339_parts(unix_s(t), Some(since_epoch(t).subsec_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip_and_render() {
        for z in [-719_468, -1, 0, 1, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        let t = days_from_civil(2026, 12, 2) * 86_400 + 13 * 3600 + 5 * 60;
        assert_eq!(rfc3339(t), "2026-12-02T13:05:00Z");
        let st = UNIX_EPOCH + std::time::Duration::from_millis(1_764_691_670_123);
        assert_eq!(rfc3339_ms(st), "2025-12-02T16:07:50.123Z");
        let mut stamps = Rfc3339Ms::default();
        for (t, want) in [
            (st, "2025-12-02T16:07:50.123Z"),
            (st + std::time::Duration::from_millis(5), "2025-12-02T16:07:50.128Z"),
            (st + std::time::Duration::from_millis(900), "2025-12-02T16:07:51.023Z"),
            (UNIX_EPOCH, "1970-01-01T00:00:00.000Z"),
        ] {
            let mut out = b"x".to_vec();
            stamps.push(&mut out, t);
            assert_eq!(out, format!("x{want}").into_bytes());
        }
        assert_eq!((unix_s(st), unix_ms(st), unix_us(st)), (1_764_691_670, 1_764_691_670_123, 1_764_691_670_123_000));
    }
}
