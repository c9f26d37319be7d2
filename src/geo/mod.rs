//! Where a client is: a chain of GeoIP databases (city files, then the embedded country
//! database) plus the embedded country table.

mod country;
mod database;
mod memo;
mod point;
mod record;
mod subdivision;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use country::{Country, CountryInfo};
pub use database::Database;
pub use memo::LocateMemo;
pub use point::GeoPoint;
pub use subdivision::Subdivision;

/// Which database of the chain located an address: an index into [`GeoDb::databases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseId(pub u8);

/// What a lookup found for one address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Located {
    /// A public address a database places in a country, with coordinates where it has
    /// them (and they are precise enough) and the subdivision where it gives an ISO code.
    Country {
        /// The country the address is in.
        country: Country,
        /// The client's coordinates, when the database has them within `max_accuracy_radius_km`.
        point: Option<GeoPoint>,
        /// The ISO 3166-2 subdivision, when the database gives one.
        subdivision: Option<Subdivision>,
        /// The database of the chain that answered.
        source: DatabaseId,
    },
    /// Private, loopback, link-local, reserved or documentation space: not on the map.
    Private,
    /// A public address no database knows.
    Unknown,
}

impl Located {
    /// A located client with only a country, as the embedded database (or a test) gives it.
    pub fn in_country(country: Country) -> Located {
        Located::Country {
            country,
            point: None,
            subdivision: None,
            source: DatabaseId(0),
        }
    }

    /// The country, for a located address.
    pub fn country(&self) -> Option<Country> {
        match self {
            Located::Country { country, .. } => Some(*country),
            _ => None,
        }
    }

    /// The database that located the address, if one did.
    pub fn source(&self) -> Option<DatabaseId> {
        match self {
            Located::Country { source, .. } => Some(*source),
            _ => None,
        }
    }
}

/// Finds the location of an address. Implemented by [`GeoDb`]; tests may use their own.
pub trait Locate: Send + Sync {
    /// Where `ip` is, according to the first source that knows it.
    fn locate(&self, ip: IpAddr) -> Located;
}

/// Why the GeoIP database chain could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// A database file could not be read.
    #[error("cannot read GeoIP database {path}: {source}")]
    Read {
        /// The file as configured.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but is not a MaxMind DB.
    #[error("GeoIP database {path} is not a valid MaxMind DB file: {source}")]
    Invalid {
        /// The file as configured.
        path: PathBuf,
        /// What the reader found wrong.
        source: maxminddb::MaxMindDbError,
    },
}

/// Default for `geoip.max_accuracy_radius_km`: coordinates less precise than this are
/// not used; the country's point is.
pub(crate) const DEFAULT_MAX_ACCURACY_RADIUS_KM: u32 = 500;

/// The databases of `geoip.database`, in order, then (unless turned off) the embedded
/// country database: the first that knows an address answers.
pub struct GeoDb {
    databases: Vec<Arc<Database>>,
    max_accuracy_radius_km: f64,
    /// Unique per chain opened (see [`LocateMemo`]).
    id: u64,
}

/// The next [`GeoDb::id`].
fn next_chain_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a [`GeoDb`] is opened from (`[geoip]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a> {
    /// Database files in lookup order.
    pub databases: &'a [std::path::PathBuf],
    /// The embedded country database answers after the listed ones.
    pub embedded_fallback: bool,
    /// Coordinates less precise than this are ignored (the country's point is used).
    pub max_accuracy_radius_km: u32,
}

impl GeoDb {
    /// The database compiled into the binary, alone.
    pub fn embedded() -> GeoDb {
        GeoDb {
            databases: vec![Arc::new(Database::embedded())],
            max_accuracy_radius_km: f64::from(DEFAULT_MAX_ACCURACY_RADIUS_KM),
            id: next_chain_id(),
        }
    }

    /// Opens the configured chain. Files `previous` holds unchanged on disk are kept rather
    /// than read again (a reload of a config that did not touch them).
    pub fn load(geoip: Chain<'_>, previous: Option<&GeoDb>) -> Result<GeoDb, GeoError> {
        let kept =
            |path: Option<&Path>| previous.and_then(|p| p.databases.iter().find(|d| d.is_current(path)).cloned());
        let mut databases = Vec::with_capacity(geoip.databases.len() + 1);
        for path in geoip.databases {
            databases.push(match kept(Some(path)) {
                Some(db) => db,
                None => Arc::new(Database::open(path)?),
            });
        }
        if geoip.embedded_fallback {
            databases.push(kept(None).unwrap_or_else(|| Arc::new(Database::embedded())));
        }
        Ok(GeoDb {
            databases,
            max_accuracy_radius_km: f64::from(geoip.max_accuracy_radius_km),
            id: next_chain_id(),
        })
    }

    /// This chain's identity: no other chain opened by the process has it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The chain in lookup order.
    pub fn databases(&self) -> &[Arc<Database>] {
        &self.databases
    }

    /// The database `id` names, if it is part of this chain.
    pub fn database(&self, id: DatabaseId) -> Option<&Database> {
        self.databases.get(usize::from(id.0)).map(|d| &**d)
    }

    /// Every database of the chain, for `meridian check` and the admin status.
    pub fn description(&self) -> String {
        let parts: Vec<String> = self.databases.iter().map(|d| d.describe()).collect();
        parts.join(", then ")
    }

    /// Sets `meridian_geoip_database_build_timestamp_seconds{database}` to this chain,
    /// dropping databases that left it.
    pub(crate) fn publish_build_times(&self, gauge: &prometheus::IntGaugeVec) {
        gauge.reset();
        for db in &self.databases {
            gauge
                .with_label_values(&[db.label()])
                .set(i64::try_from(db.build_epoch()).unwrap_or(i64::MAX));
        }
    }

    fn lookup_public(&self, ip: IpAddr) -> Located {
        for (i, db) in self.databases.iter().enumerate() {
            let Some(hit) = db.lookup(ip) else { continue };
            db.count_located();
            // Imprecise coordinates (a whole-country guess, often the country's centroid
            // with a radius of 1,000 km) would pull a client to the wrong coast: the
            // country's representative point is the honest answer then.
            let precise = hit.accuracy_radius_km.is_none_or(|r| r <= self.max_accuracy_radius_km);
            return Located::Country {
                country: hit.country,
                point: hit.point.filter(|_| precise),
                subdivision: hit.subdivision,
                // At most a handful of databases: the config allows far fewer than 255.
                source: DatabaseId(u8::try_from(i).unwrap_or(u8::MAX)),
            };
        }
        Located::Unknown
    }
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
pub(crate) fn is_public(ip: IpAddr) -> bool {
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
    use super::database::EMBEDDED_DB;
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
        let err = Database::open(&garbage)
            .err()
            .ok_or("garbage opened as a database")?
            .to_string();
        assert!(err.contains("not a valid MaxMind DB"), "{err}");
        // A real database cut short: metadata is at the end, so truncate from the front.
        let truncated = dir.join("truncated.mmdb");
        std::fs::write(&truncated, &EMBEDDED_DB[EMBEDDED_DB.len() / 2..])?;
        assert!(Database::open(&truncated).is_err());
        let err = Database::open(&dir.join("missing.mmdb"))
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
        let db = Database::open(&path)?;
        assert!(db.is_current(Some(&path)));
        assert!(!db.is_current(None), "a file database is not the embedded one");
        assert!(Database::embedded().is_current(None));
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
