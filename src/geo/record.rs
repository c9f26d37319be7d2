//! The record shapes Meridian reads from a MaxMind-format database, decoded into one
//! flexible form without allocating: MaxMind GeoIP2/GeoLite2 City and Country, DB-IP Lite,
//! and the ip-location-db country and city layouts.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};

/// The fields Meridian reads, in every layout it knows. Strings are borrowed from the
/// database; unknown fields (names, time zones, postcodes) are skipped.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Record<'a> {
    /// GeoIP2, GeoLite2, DB-IP: `country.iso_code`.
    #[serde(borrow)]
    country: Option<Named<'a>>,
    /// GeoIP2: where the network is registered, for records with no `country`.
    #[serde(borrow)]
    registered_country: Option<Named<'a>>,
    /// ip-location-db: `country_code`.
    country_code: Option<&'a str>,
    /// GeoIP2, GeoLite2, DB-IP City: `location.latitude`, `.longitude`, `.accuracy_radius`.
    location: Option<Location>,
    /// ip-location-db city: top-level `latitude` and `longitude`, 32- or 64-bit floats.
    latitude: Option<Number>,
    longitude: Option<Number>,
    /// GeoIP2 City: `subdivisions[0].iso_code`, the most general subdivision.
    #[serde(borrow)]
    subdivisions: Option<FirstSubdivision<'a>>,
    /// ip-location-db city: `state1`, a code in some builds and a name in others.
    state1: Option<&'a str>,
}

#[derive(Debug, Default, Deserialize)]
struct Named<'a> {
    iso_code: Option<&'a str>,
}

#[derive(Debug, Default, Deserialize)]
struct Location {
    latitude: Option<Number>,
    longitude: Option<Number>,
    accuracy_radius: Option<Number>,
}

impl<'a> Record<'a> {
    /// The ISO 3166-1 code: the country the address is in, else where it is registered.
    pub(super) fn country_code(&self) -> Option<&'a str> {
        let named = |n: &Option<Named<'a>>| n.as_ref().and_then(|n| n.iso_code);
        named(&self.country)
            .or(self.country_code)
            .or_else(|| named(&self.registered_country))
    }

    /// Latitude and longitude in degrees, when both are present and on the globe.
    pub(super) fn coordinates(&self) -> Option<(f64, f64)> {
        let (lat, lon) = match &self.location {
            Some(Location {
                latitude: Some(lat),
                longitude: Some(lon),
                ..
            }) => (lat.0, lon.0),
            _ => (self.latitude?.0, self.longitude?.0),
        };
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
    }

    /// How far off the coordinates may be, in kilometres, where the database says.
    pub(crate) fn accuracy_radius_km(&self) -> Option<f64> {
        self.location.as_ref()?.accuracy_radius.map(|r| r.0)
    }

    /// The subdivision code without its country prefix (`CA` for California), if any.
    pub(crate) fn subdivision_code(&self) -> Option<&'a str> {
        // `state1` is a name ("California") in the GeoLite2 repack: only an upper-case
        // code is taken, so a short name ("Goa") is not mistaken for one.
        let state_code = self
            .state1
            .filter(|s| s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        self.subdivisions.as_ref().and_then(|s| s.0).or(state_code)
    }
}

/// A number stored as any MaxMind numeric type: `float` (32-bit, as ip-location-db writes
/// coordinates), `double` (as MaxMind does), or an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Number(f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f32<E: de::Error>(self, v: f32) -> Result<Number, E> {
                // Widen through the shortest decimal form, so 37.3388f32 reads as 37.3388
                // rather than 37.33879852294922.
                Ok(Number(widen(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// `f32` to `f64` keeping the decimal value the writer meant: a 32-bit float carries about
/// seven significant digits, so round to five decimals (about a metre) instead of exposing
/// the binary expansion.
fn widen(v: f32) -> f64 {
    (f64::from(v) * 100_000.0).round() / 100_000.0
}

/// The `iso_code` of the first element of `subdivisions`; the rest are skipped.
#[derive(Debug, Default)]
struct FirstSubdivision<'a>(Option<&'a str>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstSubdivision<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FirstSubdivision<'a>, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = FirstSubdivision<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of subdivisions")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstSubdivision<'a>, A::Error> {
                let first = seq.next_element::<Named<'a>>()?.and_then(|n| n.iso_code);
                // The decoder must walk past every element to reach the next field.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstSubdivision(first))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}
