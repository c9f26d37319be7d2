//! Spellings of log field values, so every JSON log field is a number, a string or absent,
//! never a Rust debug rendering.

use std::time::Duration;

/// A duration in milliseconds, rounded to the microsecond (`186.458`, not
/// `186.45799999999998`).
pub(crate) fn ms(d: Duration) -> f64 {
    // Rounding in integer microseconds first keeps the decimal short after the division.
    let micros = d.as_nanos().saturating_add(500) / 1000;
    micros as f64 / 1000.0
}

/// A list as one comma-separated string (the JSON log writer has no arrays).
pub(crate) fn joined<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(item.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_table() {
        let cases = [
            (Duration::from_nanos(186_457_999), 186.458),
            (Duration::from_nanos(186_458_000), 186.458),
            (Duration::from_nanos(400), 0.0),
            (Duration::from_nanos(500), 0.001),
            (Duration::from_secs(60), 60000.0),
            (Duration::ZERO, 0.0),
        ];
        for (d, want) in cases {
            assert_eq!(ms(d), want, "{d:?}");
            assert_eq!(ms(d).to_string(), want.to_string(), "{d:?} prints short");
        }
    }

    #[test]
    fn joined_table() {
        assert_eq!(joined(["a.toml", "b.pem"]), "a.toml, b.pem");
        assert_eq!(joined(Vec::<String>::new()), "");
    }
}
