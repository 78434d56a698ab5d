//! User filters applied in the kernel: destination prefixes to drop (`--exclude-cidr`,
//! `--exclude-loopback`), written into the programs' LPM tries before they attach.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use aya::{
    Ebpf,
    maps::lpm_trie::{Key, LpmTrie},
};

use super::ProbeError;

/// An address prefix, `10.0.0.0/8` or `fd00::/8`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// What `--exclude-loopback` adds.
    pub const LOOPBACK: [Cidr; 2] = [
        Cidr {
            address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix_len: 8,
        },
        Cidr {
            address: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix_len: 128,
        },
    ];
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| {
            format!("{text:?} is not an address prefix (e.g. 10.0.0.0/8, fd00::/8)")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        // The programs match IPv4-mapped destinations against the IPv4 prefixes.
        if let IpAddr::V6(v6) = address
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix_len >= 96
        {
            return Ok(Self {
                address: IpAddr::V4(v4),
                prefix_len: prefix_len - 96,
            });
        }
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

fn trie<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut aya::maps::MapData, K, u8>, ProbeError> {
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    LpmTrie::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// Writes the prefixes into the programs' tries; returns whether there were any.
pub fn install(ebpf: &mut Ebpf, excluded: &[Cidr]) -> Result<bool, ProbeError> {
    for cidr in excluded {
        let prefix = u32::from(cidr.prefix_len);
        let result = match cidr.address {
            IpAddr::V4(v4) => {
                trie::<[u8; 4]>(ebpf, "EXCLUDED_V4")?.insert(&Key::new(prefix, v4.octets()), 1, 0)
            }
            IpAddr::V6(v6) => {
                trie::<[u8; 16]>(ebpf, "EXCLUDED_V6")?.insert(&Key::new(prefix, v6.octets()), 1, 0)
            }
        };
        result.map_err(|source| ProbeError::Filter {
            cidr: cidr.to_string(),
            source,
        })?;
    }
    Ok(!excluded.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_bad_ones_say_why() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!("fd00::/8".parse::<Cidr>().map(|c| c.prefix_len), Ok(8));
        assert_eq!("192.0.2.7".parse::<Cidr>().map(|c| c.prefix_len), Ok(32));
        assert_eq!("::1".parse::<Cidr>().map(|c| c.prefix_len), Ok(128));
        assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(e) if e.contains("0 to 32")));
        assert!(matches!("fd00::/129".parse::<Cidr>(), Err(e) if e.contains("0 to 128")));
        assert!(
            matches!("example.com/8".parse::<Cidr>(), Err(e) if e.contains("not an address prefix"))
        );
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert_eq!(
            "::ffff:10.0.0.0/104".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.0.0.0/8".into()),
            "an IPv4-mapped prefix is an IPv4 one"
        );
    }
}
