//! Ports nothing holds, for a test that needs one: an endpoint that is down, a closed
//! destination, or an address the collector binds itself.
//!
//! Binding port 0 and dropping the listener is not enough: the kernel may hand that port
//! to the next `bind(0)` or `connect()` anywhere on the host. In CI another test's OTLP
//! receiver, started at the same moment, took the "down" endpoint of an outage test; the
//! outage test's collector then exported into the other test's receiver (twice the
//! records there) and its own receiver could not bind. A port outside the kernel's
//! ephemeral range is never handed out on its own, so one that is free now stays free
//! until a test binds it.
//!
//! Within a process no port is handed out twice. Test processes start at different
//! places (by pid), which keeps two of them running at once apart in practice;
//! `scripts/test.sh` runs one test binary at a time.

use std::{
    net::{Ipv4Addr, TcpListener, UdpSocket},
    ops::Range,
    sync::atomic::{AtomicU32, Ordering},
};

/// The lowest port handed out: below it sit the well-known services a host may run.
const LOWEST: u32 = 10_000;

/// How many ports this process has handed out: no two of its tests get the same one.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// An IPv4 port that no TCP or UDP socket holds now, outside the ephemeral range (so no
/// other program's port-0 bind or connect takes it), and not handed out before by this
/// process. Panics, saying why, on a host whose ephemeral range leaves no room.
pub fn unused_port() -> u16 {
    let ranges = outside_ephemeral(ephemeral_range());
    let span: u32 = ranges.iter().map(|r| r.end - r.start).sum();
    assert!(
        span > 0,
        "net.ipv4.ip_local_port_range leaves no port below or above it for the tests"
    );
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < span,
            "every port outside the ephemeral range was handed out"
        );
        let port = nth_port(&ranges, (start + n) % span);
        let free = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
        if free {
            return port;
        }
    }
}

/// The ports from [`LOWEST`] up that lie outside `ephemeral`: below it and above it.
fn outside_ephemeral(ephemeral: Range<u32>) -> [Range<u32>; 2] {
    [
        LOWEST..ephemeral.start.max(LOWEST),
        ephemeral.end.max(LOWEST)..65_536,
    ]
}

/// The `n`th port of `ranges` taken one after the other (`n` below their total length).
fn nth_port(ranges: &[Range<u32>], mut n: u32) -> u16 {
    for range in ranges {
        let len = range.end - range.start;
        if n < len {
            return u16::try_from(range.start + n).expect("a port");
        }
        n -= len;
    }
    unreachable!("n is below the ranges' total length")
}

/// `net.ipv4.ip_local_port_range` as a half-open range (the kernel's default if
/// unreadable).
fn ephemeral_range() -> Range<u32> {
    let read = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = read
        .as_deref()
        .unwrap_or("32768 60999")
        .split_whitespace()
        .map(|b| b.parse::<u32>().ok());
    match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(low), Some(high)) if low <= high => low..high + 1,
        _ => 32_768..61_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ephemeral = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| unused_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(u32::from(port) >= LOWEST && !ephemeral.contains(&u32::from(port)));
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("still free");
        }
    }

    #[test]
    fn a_wide_ephemeral_range_leaves_the_ports_above_it() {
        let ranges = outside_ephemeral(1024..60_000);
        assert_eq!(ranges, [LOWEST..LOWEST, 60_000..65_536]);
        assert_eq!(nth_port(&ranges, 0), 60_000);
        assert_eq!(nth_port(&ranges, 5_535), 65_535);
        let ranges = outside_ephemeral(32_768..61_000);
        assert_eq!(nth_port(&ranges, 22_767), 32_767);
        assert_eq!(nth_port(&ranges, 22_768), 61_000);
    }
}
