//! ISO 3166-1 alpha-2 country codes and the embedded table of representative points.
//!
//! The table (`geoip/countries.csv`) is derived from mledoze/countries, ODbL 1.0; see
//! `geoip/COUNTRIES_LICENSE`. It gives a location to clients whose database record has
//! only a country.

use std::fmt;
use std::sync::LazyLock;

use super::GeoPoint;

/// An upper-case ISO 3166-1 alpha-2 code, stored inline so lookups never allocate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// Parses a two-letter code, case-insensitively; `None` for anything else.
    pub fn parse(code: &str) -> Option<Country> {
        match code.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Country([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    /// Parses a code and accepts it only if it is in the embedded ISO 3166 table.
    pub fn known(code: &str) -> Option<Country> {
        Country::parse(code).filter(|c| c.info().is_some())
    }

    pub(crate) fn as_str(&self) -> &str {
        // The two bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("XX")
    }

    /// Dense index in `0..676`, for tables indexed by country.
    pub fn index(&self) -> usize {
        (self.0[0] - b'A') as usize * 26 + (self.0[1] - b'A') as usize
    }

    pub(crate) fn info(&self) -> Option<&'static CountryInfo> {
        COUNTRIES[self.index()].as_ref()
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row of the embedded country table.
#[derive(Debug, Clone)]
pub struct CountryInfo {
    /// The code itself, with a static lifetime for logs and headers.
    pub code: &'static str,
    pub(crate) point: GeoPoint,
    /// Continent code: AF, AN, AS, EU, NA, OC or SA.
    pub continent: &'static str,
    /// The country's English short name (`United Arab Emirates`).
    pub name: &'static str,
}

pub(crate) const TABLE_SIZE: usize = 26 * 26;

static COUNTRIES: LazyLock<Vec<Option<CountryInfo>>> = LazyLock::new(|| {
    let mut table = vec![None; TABLE_SIZE];
    for line in include_str!("../../geoip/countries.csv").lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut cols = line.splitn(5, ',');
        let (Some(code), Some(lat), Some(lon), Some(continent), Some(name)) =
            (cols.next(), cols.next(), cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        let (Some(country), Ok(lat), Ok(lon)) = (Country::parse(code), lat.parse(), lon.parse()) else {
            continue;
        };
        table[country.index()] = Some(CountryInfo {
            code,
            point: GeoPoint { lat, lon },
            continent,
            name,
        });
    }
    table
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_knows_codes() {
        let cases = [
            ("GB", Some("GB"), true),
            ("gb", Some("GB"), true),
            ("US", Some("US"), true),
            ("ZZ", Some("ZZ"), false),
            ("G", None, false),
            ("GBR", None, false),
            ("1A", None, false),
            ("", None, false),
            ("é", None, false),
        ];
        for (input, parsed, known) in cases {
            assert_eq!(
                Country::parse(input).map(|c| c.to_string()).as_deref(),
                parsed,
                "{input}"
            );
            assert_eq!(Country::known(input).is_some(), known, "{input}");
        }
    }

    #[test]
    fn table_has_points_and_continents() {
        let gb = Country::known("GB").unwrap().info().unwrap();
        assert_eq!(gb.continent, "EU");
        assert!((gb.point.lat - 54.0).abs() < 1.0);
        let au = Country::known("AU").unwrap().info().unwrap();
        assert_eq!(au.continent, "OC");
        let br = Country::known("BR").unwrap().info().unwrap();
        assert_eq!(br.continent, "SA");
    }
}
