//! Where an IP address is, from MaxMind-format databases configured by path: the country
//! (`country.iso_code`) and coordinates (`location.latitude` / `longitude`) from a GeoIP2 /
//! GeoLite2 Country or City database, the network operator (`autonomous_system_number`) from
//! an ASN database (or the same file when it carries both). Without a database every address
//! is of unknown place, and country conditions never match.

use maxminddb::{Reader, path};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::Path;

/// The GeoIP databases, if configured.
#[derive(Default)]
pub struct Geo {
    reader: Option<Reader<Vec<u8>>>,
    asn: Option<Reader<Vec<u8>>>,
}

/// Everything known about where an address is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// ISO 3166-1 alpha-2, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Degrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    /// Degrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
    /// The autonomous system (network operator) number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
}

impl Location {
    /// Great-circle distance to `other` in kilometres, when both have coordinates.
    pub fn distance_km(&self, other: &Location) -> Option<f64> {
        let (lat1, lon1) = (self.latitude?, self.longitude?);
        let (lat2, lon2) = (other.latitude?, other.longitude?);
        let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
        let dphi = (lat2 - lat1).to_radians();
        let dlambda = (lon2 - lon1).to_radians();
        let a =
            (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlambda / 2.0).sin().powi(2);
        Some(2.0 * 6371.0 * a.sqrt().min(1.0).asin())
    }
}

impl Geo {
    /// No database: nothing is located.
    pub fn none() -> Self {
        Geo::default()
    }

    /// Opens the database at `path` (read whole into memory).
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = Reader::open_readfile(path)
            .map_err(|e| format!("GeoIP database {}: {e}", path.display()))?;
        Ok(Geo {
            reader: Some(reader),
            asn: None,
        })
    }

    /// Adds an ASN database (GeoLite2-ASN or any with `autonomous_system_number`).
    pub fn with_asn_database(mut self, path: Option<&Path>) -> Result<Self, String> {
        if let Some(path) = path {
            let reader = Reader::open_readfile(path)
                .map_err(|e| format!("GeoIP ASN database {}: {e}", path.display()))?;
            self.asn = Some(reader);
        }
        Ok(self)
    }

    /// Opens `path` when given.
    pub fn open_optional(path: Option<&Path>) -> Result<Self, String> {
        path.map_or_else(|| Ok(Geo::none()), Geo::open)
    }

    /// The ISO 3166-1 alpha-2 country of `ip`, upper case.
    pub fn country(&self, ip: IpAddr) -> Option<[u8; 2]> {
        let result = self.reader.as_ref()?.lookup(ip).ok()?;
        let code: String = result
            .decode_path(&path!["country", "iso_code"])
            .ok()
            .flatten()?;
        let code = <[u8; 2]>::try_from(code.to_ascii_uppercase().as_bytes()).ok()?;
        code.iter().all(u8::is_ascii_uppercase).then_some(code)
    }

    /// Country, coordinates and network operator of `ip`, as far as the databases know.
    pub fn locate(&self, ip: IpAddr) -> Location {
        let mut location = Location {
            country: self
                .country(ip)
                .map(|c| String::from_utf8_lossy(&c).into_owned()),
            ..Location::default()
        };
        // Numbers are read whatever width the database's writer chose.
        let number = |reader: Option<&Reader<Vec<u8>>>, path: &[maxminddb::PathElement]| {
            reader?
                .lookup(ip)
                .ok()?
                .decode_path::<serde_json::Value>(path)
                .ok()
                .flatten()?
                .as_f64()
                .filter(|v| v.is_finite())
        };
        let reader = self.reader.as_ref();
        location.latitude =
            number(reader, &path!["location", "latitude"]).filter(|v| v.abs() <= 90.0);
        location.longitude =
            number(reader, &path!["location", "longitude"]).filter(|v| v.abs() <= 180.0);
        let asn = |reader| {
            number(reader, &path!["autonomous_system_number"])
                .filter(|v| *v >= 0.0 && *v <= f64::from(u32::MAX) && v.fract() == 0.0)
                .map(|v| v as u32)
        };
        location.asn = asn(self.asn.as_ref()).or_else(|| asn(reader));
        location
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paris_to_new_york_is_about_5800_km() {
        let paris = Location {
            latitude: Some(48.8566),
            longitude: Some(2.3522),
            ..Location::default()
        };
        let new_york = Location {
            latitude: Some(40.7128),
            longitude: Some(-74.0060),
            ..Location::default()
        };
        let km = paris.distance_km(&new_york).unwrap_or_default();
        assert!((5800.0..5900.0).contains(&km), "{km}");
        assert_eq!(paris.distance_km(&Location::default()), None);
    }
}
