//! Where a client is: GeoIP lookup (maxminddb) plus the embedded country table.

mod country;
mod point;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use country::{Country, CountryInfo};
pub use point::GeoPoint;

/// The embedded default database: ip-location-db geo-whois-asn-country (CC BY 4.0, NRO).
static EMBEDDED_DB: &[u8] = include_bytes!("../../geoip/geo-whois-asn-country.mmdb");

/// What a lookup found for one address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Located {
    /// A public address the database places in a country, with coordinates where it has them.
    Country { country: Country, point: Option<GeoPoint> },
    /// Private, loopback, link-local, reserved or documentation space: not on the map.
    Private,
    /// A public address the database does not know.
    Unknown,
}

impl Located {
    pub fn country(&self) -> Option<Country> {
        match self {
            Located::Country { country, .. } => Some(*country),
            _ => None,
        }
    }
}

/// Finds the location of an address. Implemented by [`GeoDb`]; tests may use their own.
pub trait Locate: Send + Sync {
    fn locate(&self, ip: IpAddr) -> Located;
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read GeoIP database {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("GeoIP database {path} is not a valid MaxMind DB file: {source}")]
    Invalid {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
}

enum DbBytes {
    Embedded(&'static [u8]),
    File(Vec<u8>),
}

impl AsRef<[u8]> for DbBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            DbBytes::Embedded(b) => b,
            DbBytes::File(v) => v,
        }
    }
}

/// A MaxMind-format database: GeoIP2/GeoLite2 Country or City, or ip-location-db records.
pub struct GeoDb {
    reader: maxminddb::Reader<DbBytes>,
    description: String,
    /// Size and modification time of the file it was read from (none when embedded).
    stamp: Option<FileStamp>,
}

type FileStamp = (u64, Option<std::time::SystemTime>);

fn stamp(path: &Path) -> Option<FileStamp> {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

/// The fields Meridian reads, in both the MaxMind and the ip-location-db layouts.
/// Strings are borrowed from the database, so a lookup does not allocate.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<NamedCountry<'a>>,
    #[serde(borrow)]
    registered_country: Option<NamedCountry<'a>>,
    country_code: Option<&'a str>,
    location: Option<MaxMindLocation>,
    latitude: Option<f64>,
    longitude: Option<f64>,
}

#[derive(Deserialize)]
struct NamedCountry<'a> {
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct MaxMindLocation {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl GeoDb {
    /// Unix time the database was built, from its metadata.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// The database compiled into the binary.
    pub fn embedded() -> GeoDb {
        // why: the embedded file is checked by the unit tests below; a broken build artifact
        // is the only way this can fail, and it fails at startup, never on a request.
        #[allow(clippy::expect_used)]
        let reader =
            maxminddb::Reader::from_source(DbBytes::Embedded(EMBEDDED_DB)).expect("embedded GeoIP database is valid"); // unwrap-ok: build-time asset
        GeoDb {
            description: describe(&reader, "embedded"),
            reader,
            stamp: None,
        }
    }

    /// Opens a database file, checking that it can answer lookups.
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let before = stamp(path);
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |source| GeoError::Invalid {
            path: path.to_owned(),
            source,
        };
        let reader = maxminddb::Reader::from_source(DbBytes::File(bytes)).map_err(invalid)?;
        // A truncated or corrupt data section only shows on lookup: try a few addresses now
        // rather than failing on a client's request later.
        for probe in ["8.8.8.8", "81.2.69.142", "1.1.1.1", "2001:4860:4860::8888"] {
            let Ok(ip) = probe.parse::<IpAddr>() else { continue };
            if ip.is_ipv6() && reader.metadata().ip_version == 4 {
                continue;
            }
            reader
                .lookup(ip)
                .and_then(|r| r.decode::<Record<'_>>())
                .map_err(invalid)?;
        }
        Ok(GeoDb {
            description: describe(&reader, &path.display().to_string()),
            reader,
            stamp: before,
        })
    }

    /// True when `path` still holds what this database was read from, so a reload may keep
    /// it; a file updated in place (a weekly GeoIP refresh) is read again.
    pub fn is_current(&self, path: Option<&Path>) -> bool {
        match path {
            None => self.stamp.is_none(),
            Some(p) => self.stamp.is_some() && stamp(p) == self.stamp,
        }
    }

    /// Opens the configured file, or the embedded database when none is configured.
    pub fn load(path: Option<&Path>) -> Result<GeoDb, GeoError> {
        match path {
            Some(p) => GeoDb::open(p),
            None => Ok(GeoDb::embedded()),
        }
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    fn lookup_public(&self, ip: IpAddr) -> Located {
        let record = match self.reader.lookup(ip).and_then(|r| r.decode::<Record<'_>>()) {
            Ok(Some(record)) => record,
            Ok(None) | Err(_) => return Located::Unknown,
        };
        let code = record
            .country
            .and_then(|c| c.iso_code)
            .or(record.country_code)
            .or(record.registered_country.and_then(|c| c.iso_code));
        let Some(country) = code.and_then(Country::parse) else {
            return Located::Unknown;
        };
        let (lat, lon) = match record.location {
            Some(l) => (l.latitude, l.longitude),
            None => (record.latitude, record.longitude),
        };
        let point = match (lat, lon) {
            (Some(lat), Some(lon)) if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {
                Some(GeoPoint { lat, lon })
            }
            _ => None,
        };
        Located::Country { country, point }
    }
}

fn describe(reader: &maxminddb::Reader<DbBytes>, origin: &str) -> String {
    format!(
        "{} ({}, built {})",
        reader.metadata().database_type,
        origin,
        reader.metadata().build_epoch
    )
}

impl Locate for GeoDb {
    fn locate(&self, ip: IpAddr) -> Located {
        let ip = ip.to_canonical();
        if !is_public(ip) {
            return Located::Private;
        }
        self.lookup_public(ip)
    }
}

/// False for addresses that are not routable on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || (a == 192 && b == 0 && v4.octets()[2] == 0))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn embedded_database_places_well_known_addresses() -> TestResult {
        let db = GeoDb::embedded();
        let cases = [
            ("81.2.69.142", Some("GB")),
            ("8.8.8.8", Some("US")),
            ("1.1.1.1", Some("AU")),
            ("10.0.0.1", None),
            ("127.0.0.1", None),
            ("::1", None),
            ("192.168.1.1", None),
            ("::ffff:81.2.69.142", Some("GB")),
        ];
        for (ip, country) in cases {
            let located = db.locate(ip.parse()?);
            assert_eq!(
                located.country().map(|c| c.to_string()).as_deref(),
                country,
                "{ip}: {located:?}"
            );
        }
        assert_eq!(db.locate("10.1.2.3".parse()?), Located::Private);
        Ok(())
    }

    #[test]
    fn corrupt_and_missing_files_are_clear_errors() -> TestResult {
        let dir = std::env::temp_dir().join(format!("meridian-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let garbage = dir.join("garbage.mmdb");
        std::fs::write(&garbage, b"this is not a maxmind database")?;
        let err = GeoDb::open(&garbage)
            .err()
            .ok_or("garbage opened as a database")?
            .to_string();
        assert!(err.contains("not a valid MaxMind DB"), "{err}");
        // A real database cut short: metadata is at the end, so truncate from the front.
        let truncated = dir.join("truncated.mmdb");
        std::fs::write(&truncated, &EMBEDDED_DB[EMBEDDED_DB.len() / 2..])?;
        assert!(GeoDb::open(&truncated).is_err());
        let err = GeoDb::open(&dir.join("missing.mmdb"))
            .err()
            .ok_or("a missing file opened")?
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn a_database_file_changed_in_place_is_no_longer_current() -> TestResult {
        let dir = std::env::temp_dir().join(format!("meridian-geo-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("db.mmdb");
        std::fs::write(&path, EMBEDDED_DB)?;
        let db = GeoDb::open(&path)?;
        assert!(db.is_current(Some(&path)));
        assert!(!db.is_current(None), "a file database is not the embedded one");
        assert!(GeoDb::embedded().is_current(None));
        // Same path, new contents (a weekly refresh): must be read again.
        std::fs::write(&path, &EMBEDDED_DB[..EMBEDDED_DB.len() - 1])?;
        assert!(!db.is_current(Some(&path)));
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn public_address_classification() -> TestResult {
        let cases = [
            ("8.8.8.8", true),
            ("100.64.0.1", false),
            ("172.16.0.1", false),
            ("169.254.1.1", false),
            ("203.0.113.9", false),
            ("2606:4700::1111", true),
            ("fd00::1", false),
            ("fe80::1", false),
            ("2001:db8::1", false),
        ];
        for (ip, public) in cases {
            assert_eq!(is_public(ip.parse()?), public, "{ip}");
        }
        Ok(())
    }
}
