//! User filters applied in the kernel: destination prefixes to drop (`--exclude-cidr`,
//! `--exclude-loopback`): a few of each family held in the programs' configuration, more
//! written into their LPM tries before they attach.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::lpm_trie::{Key, LpmTrie},
};

use egress_shared::{ExcludedV4, ExcludedV6};

use super::ProbeError;
use crate::config::settings::Cidr;

fn trie<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut aya::maps::MapData, K, u8>, ProbeError> {
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    LpmTrie::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// The prefixes of `excluded` for the configuration, per family: inline where they fit,
/// else marked for the family's trie ([`install`] then writes them there).
pub fn inline(excluded: &[Cidr]) -> (ExcludedV4, ExcludedV6) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for cidr in excluded {
        match cidr.address() {
            IpAddr::V4(a) => v4.push((a.octets(), cidr.prefix_len())),
            IpAddr::V6(a) => v6.push((a.octets(), cidr.prefix_len())),
        }
    }
    (ExcludedV4::of(&v4), ExcludedV6::of(&v6))
}

/// Writes the prefixes the configuration does not hold (`inline_v4`, `inline_v6`) into
/// the programs' tries; returns whether there were any prefixes at all.
pub fn install(
    ebpf: &mut Ebpf,
    excluded: &[Cidr],
    (inline_v4, inline_v6): (&ExcludedV4, &ExcludedV6),
) -> Result<bool, ProbeError> {
    for cidr in excluded {
        let prefix = u32::from(cidr.prefix_len());
        let result = match cidr.address() {
            IpAddr::V4(_) if inline_v4.in_trie == 0 => continue,
            IpAddr::V6(_) if inline_v6.in_trie == 0 => continue,
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
        assert_eq!("fd00::/8".parse::<Cidr>().map(|c| c.prefix_len()), Ok(8));
        assert_eq!("192.0.2.7".parse::<Cidr>().map(|c| c.prefix_len()), Ok(32));
        assert_eq!("::1".parse::<Cidr>().map(|c| c.prefix_len()), Ok(128));
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
