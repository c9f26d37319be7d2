//! ISO 3166-2 subdivision codes (`US-CA`), stored inline so a lookup never allocates.

use std::fmt;

use super::Country;

/// A country and the 1–3 character code of one of its subdivisions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subdivision {
    country: Country,
    code: [u8; 3],
    len: u8,
}

impl Subdivision {
    /// The subdivision `code` (the part after the dash, as GeoIP2 stores it) of `country`;
    /// `None` unless it is 1–3 ASCII letters or digits.
    pub fn new(country: Country, code: &str) -> Option<Subdivision> {
        let bytes = code.as_bytes();
        if bytes.is_empty() || bytes.len() > 3 || !bytes.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let mut out = [0u8; 3];
        for (o, b) in out.iter_mut().zip(bytes) {
            *o = b.to_ascii_uppercase();
        }
        Some(Subdivision {
            country,
            code: out,
            len: bytes.len() as u8,
        })
    }

    /// Parses the full form, `US-CA`, case-insensitively.
    pub fn parse(full: &str) -> Option<Subdivision> {
        let (country, code) = full.split_once('-')?;
        Subdivision::new(Country::parse(country)?, code)
    }

    /// The country the subdivision belongs to (`US` for `US-CA`).
    pub fn country(&self) -> Country {
        self.country
    }

    /// The part after the dash.
    pub fn code(&self) -> &str {
        // ASCII alphanumerics by construction.
        std::str::from_utf8(&self.code[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Display for Subdivision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.country, self.code())
    }
}

impl fmt::Debug for Subdivision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iso_3166_2_codes() {
        let cases = [
            ("US-CA", Some("US-CA")),
            ("us-ca", Some("US-CA")),
            ("GB-ENG", Some("GB-ENG")),
            ("FR-75", Some("FR-75")),
            ("US-", None),
            ("US-CALI", None),
            ("USA-CA", None),
            ("US_CA", None),
            ("US-C A", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                Subdivision::parse(input).map(|s| s.to_string()).as_deref(),
                want,
                "{input}"
            );
        }
        let us = Country::parse("US").unwrap();
        assert_eq!(Subdivision::new(us, "ca"), Subdivision::parse("US-CA"));
        assert_eq!(Subdivision::new(us, "California"), None);
    }
}
