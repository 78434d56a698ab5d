//! Ports nothing holds, for a test that needs one: an endpoint that is down, a closed
//! destination, or an address the collector binds itself.
//!
//! Binding port 0 and dropping the listener is not enough: the kernel may hand that port
//! to the next `bind(0)` or `connect()` anywhere on the host. In CI another test's OTLP
//! receiver, started at the same moment, took the "down" endpoint of an outage test; the
//! outage test's collector then exported into the other test's receiver (twice the
//! records there) and its own receiver could not bind. A port below the kernel's
//! ephemeral range is never handed out on its own, so one that is free now stays free
//! until a test binds it.

use std::{
    net::{Ipv4Addr, TcpListener, UdpSocket},
    sync::atomic::{AtomicU32, Ordering},
};

/// The lowest port handed out: below it sit the well-known services a host may run.
const LOWEST: u32 = 10_000;

/// How many ports this process has handed out: no two of its tests get the same one.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A port that no TCP or UDP socket holds now, below the ephemeral range (so no other
/// program's port-0 bind or connect takes it), and not handed out before by this process.
/// Test processes start at different places (by pid), so two of them running at once
/// do not walk the same ports.
pub fn unused_port() -> u16 {
    let span = ephemeral_low().saturating_sub(LOWEST).max(1);
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no unused port below the ephemeral range");
        let port = u16::try_from(LOWEST + (start + n) % span).expect("below 65536");
        let free = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
        if free {
            return port;
        }
    }
}

/// The first port of `net.ipv4.ip_local_port_range` (the kernel's default if unreadable).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| unused_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(u32::from(port) >= LOWEST && u32::from(port) < ephemeral_low());
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("still free");
        }
    }
}
