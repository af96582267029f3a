//! IP ranges: CIDR prefixes over 128-bit addresses (IPv4 mapped into `::ffff:0:0/96`), for
//! named locations and trusted proxies.

use std::net::IpAddr;

/// An IPv4 or IPv6 range, as a prefix of the 128-bit (IPv4-mapped) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: u128,
    mask: u128,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::/n` (a bare address is a /32 or /128). Host bits must be
    /// zero, and the prefix wider than /8 (IPv4) or /16 (IPv6) is refused: such a range is
    /// a mistake, not a location.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP range"))?;
        let (bits, offset, min) = match ip {
            IpAddr::V4(_) => (32u32, 96u32, 8u32),
            IpAddr::V6(_) => (128, 0, 16),
        };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
            None => bits,
        };
        if prefix < min {
            return Err(format!("{text:?} is wider than /{min}"));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - (offset + prefix))
        };
        let network = to_u128(ip);
        if network & !mask != 0 {
            return Err(format!("{text:?} has host bits set"));
        }
        Ok(Cidr { network, mask })
    }

    /// Contains `ip`.
    pub fn contains(&self, ip: u128) -> bool {
        ip & self.mask == self.network
    }
}

/// The network an address counts as when attempts are grouped (smart lockout's familiar
/// locations, password spray): its IPv4 /24 or IPv6 /48.
pub fn network_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

/// An address as 128 bits (IPv4 mapped into `::ffff:0:0/96`).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address as bits (a literal that does not parse is a bug in the test: it is `::`).
    fn ip(s: &str) -> u128 {
        to_u128(s.parse().unwrap_or(IpAddr::from([0u16; 8])))
    }

    #[test]
    fn cidr_ranges_match_their_addresses_only() -> Result<(), String> {
        let office = Cidr::parse("203.0.113.0/24")?;
        assert!(office.contains(ip("203.0.113.77")));
        assert!(!office.contains(ip("203.0.114.1")));
        assert!(office.contains(ip("::ffff:203.0.113.9")));
        let v6 = Cidr::parse("2001:db8::/32")?;
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.77")));
        assert!(Cidr::parse("10.0.0.1/8").is_err(), "host bits");
        assert!(Cidr::parse("0.0.0.0/0").is_err(), "too wide");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
        assert!(Cidr::parse("198.51.100.7")?.contains(ip("198.51.100.7")));
        Ok(())
    }
}
