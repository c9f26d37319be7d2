//! Points on the globe and great-circle distance.

use serde::Serialize;

/// Latitude and longitude in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GeoPoint {
    /// Latitude in degrees, −90 (south) to 90 (north).
    pub lat: f64,
    /// Longitude in degrees, −180 (west) to 180 (east).
    pub lon: f64,
}

const EARTH_RADIUS_KM: f64 = 6371.0088;

impl GeoPoint {
    /// Great-circle distance by the haversine formula, in kilometres.
    pub fn distance_km(&self, other: &GeoPoint) -> f64 {
        let (lat1, lat2) = (self.lat.to_radians(), other.lat.to_radians());
        let dlat = lat2 - lat1;
        let dlon = (other.lon - self.lon).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distances() {
        let london = GeoPoint { lat: 51.51, lon: -0.13 };
        let dublin = GeoPoint { lat: 53.35, lon: -6.26 };
        let ashburn = GeoPoint {
            lat: 39.04,
            lon: -77.49,
        };
        let cases = [
            (london, dublin, 464.0),
            (london, ashburn, 5910.0),
            (dublin, dublin, 0.0),
        ];
        for (a, b, km) in cases {
            let d = a.distance_km(&b);
            assert!((d - km).abs() < 15.0, "{a:?}->{b:?}: {d}");
            assert!((d - b.distance_km(&a)).abs() < 1e-9);
        }
    }
}
