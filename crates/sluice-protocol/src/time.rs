use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with microsecond precision, written as RFC 3339
/// (`2026-11-22T05:00:00.123456Z`) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

/// A string that is not an RFC 3339 UTC timestamp of the form Sluice writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timestamp {0:?}: expected RFC 3339 UTC like 2026-11-22T05:00:00.123456Z")]
pub struct TimestampError(String);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Self(micros)
    }

    /// From microseconds since the Unix epoch.
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds elapsed from `earlier` to `self` (0 if `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        (self.0.saturating_sub(earlier.0).max(0) / 1000) as u64
    }

    /// Appends the RFC 3339 form to `out`.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        let mut buf = [0u8; 27];
        self.write_rfc3339_into(&mut buf);
        out.extend_from_slice(&buf);
    }

    /// Writes the RFC 3339 form (always 27 bytes). Consecutive calls within the same second on
    /// one thread reuse the formatted date and time and only format the microseconds.
    pub fn write_rfc3339_into(self, out: &mut [u8; 27]) {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000) as u32;
        LAST_SECOND.with(|cell| {
            let (cached, prefix) = cell.get();
            if cached == secs {
                out[..20].copy_from_slice(&prefix);
            } else {
                let mut full = [0u8; 27];
                Self::format_full(secs, &mut full);
                out[..20].copy_from_slice(&full[..20]);
                let mut prefix = [0u8; 20];
                prefix.copy_from_slice(&full[..20]);
                cell.set((secs, prefix));
            }
        });
        put(&mut out[20..26], micros);
        out[26] = b'Z';
    }

    fn format_full(secs: i64, buf: &mut [u8; 27]) {
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        put(&mut buf[0..4], y.clamp(0, 9999) as u32);
        buf[4] = b'-';
        put(&mut buf[5..7], m);
        buf[7] = b'-';
        put(&mut buf[8..10], d);
        buf[10] = b'T';
        put(&mut buf[11..13], sod / 3600);
        buf[13] = b':';
        put(&mut buf[14..16], (sod / 60) % 60);
        buf[16] = b':';
        put(&mut buf[17..19], sod % 60);
        buf[19] = b'.';
    }

    /// Parses the RFC 3339 UTC form (`Z` suffix; 0 to 9 fraction digits).
    ///
    /// # Errors
    /// [`TimestampError`] when the text is not of that form or names an impossible date.
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError(s.to_owned());
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
            return Err(err());
        }
        if b[16] != b':' || *b.last().ok_or_else(err)? != b'Z' {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, TimestampError> {
            let mut v = 0u32;
            for &c in &b[r] {
                if !c.is_ascii_digit() {
                    return Err(err());
                }
                v = v * 10 + u32::from(c - b'0');
            }
            Ok(v)
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo)
            || d == 0
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || se > 60
        {
            return Err(err());
        }
        let frac = &b[19..b.len() - 1];
        let mut micros = 0u32;
        if !frac.is_empty() {
            if frac[0] != b'.' || frac.len() < 2 || frac.len() > 10 {
                return Err(err());
            }
            let digits = &frac[1..];
            for (i, &c) in digits.iter().enumerate() {
                if !c.is_ascii_digit() {
                    return Err(err());
                }
                if i < 6 {
                    micros = micros * 10 + u32::from(c - b'0');
                }
            }
            for _ in digits.len()..6 {
                micros *= 10;
            }
        }
        let days = days_from_civil(y as i64, mo, d);
        let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + se);
        Ok(Self(secs * 1_000_000 + i64::from(micros)))
    }
}

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS.` prefix.
    static LAST_SECOND: std::cell::Cell<(i64, [u8; 20])> = const { std::cell::Cell::new((i64::MIN, [0; 20])) };
}

fn put(dst: &mut [u8], mut v: u32) {
    for slot in dst.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn is_leap(y: u32) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days/civil algorithms (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Vec::with_capacity(27);
        self.write_rfc3339(&mut buf);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (1_795_323_600_123_456, "2026-11-22T05:00:00.123456Z"),
            (951_782_400_000_001, "2000-02-29T00:00:00.000001Z"),
        ];
        for (micros, text) in cases {
            let ts = Timestamp::from_micros(micros);
            assert_eq!(ts.to_string(), text);
            assert_eq!(Timestamp::parse(text), Ok(ts));
        }
    }

    #[test]
    fn parses_short_fractions_and_rejects_garbage() {
        assert_eq!(
            Timestamp::parse("1970-01-01T00:00:01.5Z").map(Timestamp::as_micros),
            Ok(1_500_000)
        );
        assert_eq!(
            Timestamp::parse("1970-01-01T00:00:01Z").map(Timestamp::as_micros),
            Ok(1_000_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-02-30T00:00:00Z",
            "2026-11-22T05:00:00.123",
            "2026-13-01T00:00:00Z",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }
}
