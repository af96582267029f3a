//! Where an IP address is: the country from a MaxMind-format database (GeoIP2 / GeoLite2
//! Country or City, or any database with `country.iso_code`), configured by path. Without a
//! database every address is of unknown country, and country conditions never match.

use maxminddb::{Reader, path};
use std::net::IpAddr;
use std::path::Path;

/// The GeoIP database, if one is configured.
#[derive(Default)]
pub struct Geo {
    reader: Option<Reader<Vec<u8>>>,
}

impl Geo {
    /// No database: nothing is located.
    pub fn none() -> Self {
        Geo { reader: None }
    }

    /// Opens the database at `path` (read whole into memory).
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = Reader::open_readfile(path)
            .map_err(|e| format!("GeoIP database {}: {e}", path.display()))?;
        Ok(Geo {
            reader: Some(reader),
        })
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
}
