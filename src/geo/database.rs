//! One MaxMind-format database (a file, or the one embedded in the binary) and the raw
//! answer it gives for an address.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::record::Record;
use super::{Country, GeoError, GeoPoint, Subdivision};

/// The embedded default database: ip-location-db geo-whois-asn-country (CC BY 4.0, NRO).
pub(super) static EMBEDDED_DB: &[u8] = include_bytes!("../../geoip/geo-whois-asn-country.mmdb");

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

type FileStamp = (u64, Option<std::time::SystemTime>);

fn stamp(path: &Path) -> Option<FileStamp> {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

/// What one database says about an address it knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Hit {
    pub country: Country,
    pub point: Option<GeoPoint>,
    pub(crate) accuracy_radius_km: Option<f64>,
    pub subdivision: Option<Subdivision>,
}

/// A MaxMind-format database: GeoIP2/GeoLite2, DB-IP Lite or ip-location-db records.
pub struct Database {
    reader: maxminddb::Reader<DbBytes>,
    /// The file it was read from; `None` for the embedded database.
    path: Option<PathBuf>,
    label: String,
    /// Size and modification time of the file when it was read.
    stamp: Option<FileStamp>,
    /// An IPv4-only tree: IPv6 addresses are not looked up at all (the reader would build
    /// an error, which allocates).
    ipv4_only: bool,
    /// Addresses this database located, for `/status`; survives reloads with the database.
    located: AtomicU64,
}

impl Database {
    pub(crate) fn embedded() -> Database {
        // why: the embedded file is checked by the unit tests; a broken build artifact is the
        // only way this can fail, and it fails at startup, never on a request.
        #[allow(clippy::expect_used)]
        let reader =
            maxminddb::Reader::from_source(DbBytes::Embedded(EMBEDDED_DB)).expect("embedded GeoIP database is valid"); // unwrap-ok: build-time asset
        Database::new(reader, None, None)
    }

    /// Reads a database file, checking that its records can be decoded.
    pub fn open(path: &Path) -> Result<Database, GeoError> {
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
        for probe in ["8.8.8.8", "81.2.69.142", "1.1.1.1", "13.56.0.1", "2001:4860:4860::8888"] {
            let Ok(ip) = probe.parse::<IpAddr>() else { continue };
            if ip.is_ipv6() && reader.metadata().ip_version == 4 {
                continue;
            }
            reader
                .lookup(ip)
                .and_then(|r| r.decode::<Record<'_>>())
                .map_err(invalid)?;
        }
        Ok(Database::new(reader, Some(path.to_owned()), before))
    }

    fn new(reader: maxminddb::Reader<DbBytes>, path: Option<PathBuf>, stamp: Option<FileStamp>) -> Database {
        let label = match &path {
            Some(p) => p.display().to_string(),
            None => "embedded".to_string(),
        };
        Database {
            ipv4_only: reader.metadata().ip_version == 4,
            reader,
            path,
            label,
            stamp,
            located: AtomicU64::new(0),
        }
    }

    /// True when `path` still holds what this database was read from (same size and
    /// modification time), so a reload may keep it; a file updated in place is read again.
    pub(crate) fn is_current(&self, path: Option<&Path>) -> bool {
        match path {
            None => self.path.is_none(),
            Some(p) => self.path.as_deref() == Some(p) && self.stamp.is_some() && stamp(p) == self.stamp,
        }
    }

    /// `embedded`, or the path as configured: the `database` label of metrics and `/status`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The file the database was read from; `None` for the embedded database.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// `database_type` from the file's metadata, e.g. `GeoLite2-City` or `city ipv4`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// When the database was built, seconds since the Unix epoch (its metadata).
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// 4 for an IPv4-only file, 6 for one that also holds IPv6.
    pub fn ip_version(&self) -> u16 {
        self.reader.metadata().ip_version
    }

    /// How many addresses this database has located since it was loaded.
    pub fn located(&self) -> u64 {
        self.located.load(Ordering::Relaxed)
    }

    pub(super) fn count_located(&self) {
        self.located.fetch_add(1, Ordering::Relaxed);
    }

    /// `type (origin, built N)`, for `meridian check` and logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, built {})",
            self.database_type(),
            self.label,
            self.build_epoch()
        )
    }

    /// The record for a public address, if this database has one that names a country.
    /// A record that cannot be decoded counts as no record.
    pub(super) fn lookup(&self, ip: IpAddr) -> Option<Hit> {
        if self.ipv4_only && ip.is_ipv6() {
            return None;
        }
        let record = self.reader.lookup(ip).and_then(|r| r.decode::<Record<'_>>()).ok()??;
        let country = record.country_code().and_then(Country::parse)?;
        Some(Hit {
            country,
            point: record.coordinates().map(|(lat, lon)| GeoPoint { lat, lon }),
            accuracy_radius_km: record.accuracy_radius_km(),
            subdivision: record.subdivision_code().and_then(|s| Subdivision::new(country, s)),
        })
    }
}
