//! Human-readable durations ("250ms", "2s", "5m") and sizes ("10MiB") in the config file.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer};

/// A duration written as a string in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Duration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write it like \"250ms\", \"2s\" or \"5m\""))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A byte size written as a string ("64KiB", "10MiB") or a plain integer in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?} ({e}); write it like \"64KiB\" or \"10MiB\""))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

/// Parses an RFC 3339 time (`2026-12-01T14:00:00Z`, `2026-12-01T15:00:00+01:00`).
/// humantime reads the UTC form only, so a numeric offset is applied here.
pub(crate) fn parse_rfc3339(s: &str) -> Result<std::time::SystemTime, String> {
    let s = s.trim();
    let bad = |e: &dyn fmt::Display| format!("invalid time {s:?} ({e}); write it like \"2026-12-01T14:00:00Z\"");
    let split = s
        .len()
        .checked_sub(6)
        .filter(|&i| s.is_char_boundary(i))
        .map(|i| s.split_at(i));
    let (utc, offset) = match split {
        Some((head, tail))
            if tail.is_ascii() && matches!(tail.as_bytes()[0], b'+' | b'-') && tail.as_bytes()[3] == b':' =>
        {
            let hours: u64 = tail[1..3].parse().map_err(|_| bad(&"bad offset hours"))?;
            let minutes: u64 = tail[4..6].parse().map_err(|_| bad(&"bad offset minutes"))?;
            if hours > 23 || minutes > 59 {
                return Err(bad(&"offset out of range"));
            }
            let secs = std::time::Duration::from_secs(hours * 3600 + minutes * 60);
            (format!("{head}Z"), Some((tail.as_bytes()[0] == b'+', secs)))
        }
        _ => (s.replace('z', "Z"), None),
    };
    let t = humantime::parse_rfc3339(&utc.replacen(' ', "T", 1)).map_err(|e| bad(&e))?;
    Ok(match offset {
        // Local time ahead of UTC: UTC is earlier.
        Some((true, d)) => t - d,
        Some((false, d)) => t + d,
        None => t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn rfc3339_times_parse_with_offsets() {
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let base = 1_796_133_600; // 2026-12-01T14:00:00Z
        let cases: [(&str, Option<std::time::SystemTime>); 10] = [
            ("2026-12-01T14:00:00Zé+0", None),
            ("2026-12-01T14:00:00Z", Some(at(base))),
            ("2026-12-01T14:00:00z", Some(at(base))),
            (
                "2026-12-01T14:00:00.5Z",
                Some(at(base) + std::time::Duration::from_millis(500)),
            ),
            ("2026-12-01T15:30:00+01:30", Some(at(base))),
            ("2026-12-01T09:00:00-05:00", Some(at(base))),
            ("2026-12-01 14:00:00Z", Some(at(base))),
            ("2026-12-01T14:00:00", None),
            ("tomorrow", None),
            ("2026-12-01T14:00:00+25:00", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rfc3339(text).ok(), want, "{text}");
        }
    }

    #[test]
    fn durations_and_sizes_parse() -> TestResult {
        let cases = [("250ms", 250), ("2s", 2000), ("5m", 300_000), (" 1s ", 1000)];
        for (text, ms) in cases {
            let d: Duration = text.parse()?;
            assert_eq!(d.0.as_millis(), ms, "{text}");
        }
        assert!("2 parsecs".parse::<Duration>().is_err());
        assert!("".parse::<Duration>().is_err());
        let sizes = [
            ("10MiB", 10 << 20),
            ("64KiB", 64 << 10),
            ("1024", 1024),
            ("1 KiB", 1024),
        ];
        for (text, n) in sizes {
            let s: Size = text.parse()?;
            assert_eq!(s.0, n, "{text}");
        }
        assert!("ten".parse::<Size>().is_err());
        assert!("10 furlongs".parse::<Size>().is_err());
        Ok(())
    }
}
