//! The UDP bytes a flow sends after its last record. The kernel adds them up in
//! `UDP_FLOWS` for the flow's next record, which a flow that stops sending never makes;
//! this sweep takes them from flows whose window has been over for a whole window more
//! (the programs' own next record would have taken them by then, had the flow sent
//! again), deletes those entries, and hands the bytes on as metric-only records of the
//! flow's last record: same process, cgroup and destination, so `egress.network.io`
//! counts them under the same container. At shutdown every flow is swept.
//!
//! Attribution: the kernel's key holds the process and the network namespace, not the
//! cgroup, so each flow's last record seen here is kept (up to [`MAX_KNOWN`]) and found
//! again by the same key. Bytes of a flow whose record never reached user space (lost
//! in a full ring buffer, or the table was full) are counted, not reported.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use egress_shared::{EventKind, FlowKey};

use super::{Connection, Delivery, Transport, clock::BootClock};
use crate::probe::flow_sweep::{FlowSweep, SweepError, Swept};

/// Flows whose last record is kept: twice the kernel map's 16,384 entries.
const MAX_KNOWN: usize = 32768;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_UDP: u16 = 17;

pub struct FlowSweeper {
    map: FlowSweep,
    window_ns: u64,
    /// Each flow's last record; `None` for a flow whose records are not counted (a DNS
    /// query's own flow, folded into its DNS record).
    known: HashMap<FlowKey, Option<Connection>>,
    /// The last sweep failed (its successor's failure is not the first).
    failed: bool,
}

/// What one sweep did, for the telemetry.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Bytes that had no record to go with.
    pub unattributed: u64,
    /// The error the sweep stopped at, if any (what it swept before is handed on).
    pub error: Option<SweepError>,
    /// The error is the first since the last sweep that succeeded.
    pub first_failure: bool,
}

impl FlowSweeper {
    pub fn new(map: FlowSweep, window_ns: u64) -> Self {
        Self {
            map,
            window_ns: window_ns.max(1),
            known: HashMap::new(),
            failed: false,
        }
    }

    /// Keeps a UDP flow record to attribute the flow's later bytes with; `counted` false
    /// for a record dropped in user space, whose bytes are not counted either.
    pub fn note(&mut self, connection: &Connection, counted: bool) {
        if !matches!(connection.kind, EventKind::UdpSend | EventKind::UdpConnect) {
            return;
        }
        let key = flow_key(connection);
        if self.known.len() >= MAX_KNOWN && !self.known.contains_key(&key) {
            return;
        }
        self.known.insert(key, counted.then(|| connection.clone()));
    }

    /// Sweeps the flows whose window started two windows ago or more, or every flow with
    /// `all` (the programs are detached), pushing a metric-only record per flow that had
    /// bytes after its record. Reports the bytes that had no record to go with and the
    /// error the sweep stopped at (for the telemetry, which counts every failure and
    /// logs the first of a run).
    pub fn sweep(
        &mut self,
        now_boot_ns: u64,
        all: bool,
        clock: &BootClock,
        out: &mut Vec<Connection>,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        let result = self.try_sweep(now_boot_ns, all, clock, out, &mut report.unattributed);
        if let Err(e) = result {
            report.first_failure = !self.failed;
            report.error = Some(e);
        }
        self.failed = report.error.is_some();
        report
    }

    fn try_sweep(
        &mut self,
        now_boot_ns: u64,
        all: bool,
        clock: &BootClock,
        out: &mut Vec<Connection>,
        unattributed: &mut u64,
    ) -> Result<(), SweepError> {
        let min_age_ns = if all {
            0
        } else {
            self.window_ns.saturating_mul(2)
        };
        let mut present = HashSet::new();
        for (key, state) in self.map.flows()? {
            // Judged from the copy first: a young flow costs no program run.
            if now_boot_ns.saturating_sub(state.last_ns) < min_age_ns {
                present.insert(key);
                continue;
            }
            match self.map.sweep(&key, min_age_ns)? {
                Swept::Kept => {
                    present.insert(key);
                }
                Swept::Unreported | Swept::Reported(0) => {}
                Swept::Reported(bytes) => match self.known.get(&key) {
                    Some(Some(last)) => {
                        out.push(tail(last, bytes, clock.to_unix_nanos(now_boot_ns)))
                    }
                    // Folded into DNS records, whose flows are not counted.
                    Some(None) => {}
                    None => *unattributed += bytes,
                },
            }
        }
        // Flows the kernel no longer holds (swept, or evicted) start again with their
        // next record.
        self.known.retain(|key, _| present.contains(key));
        Ok(())
    }
}

/// The metric-only record of `bytes` a flow sent after its `last` record.
fn tail(last: &Connection, bytes: u64, time_unix_nano: u64) -> Connection {
    let mut record = last.clone();
    record.time_unix_nano = time_unix_nano;
    record.delivery = Delivery::MetricsOnly;
    record.udp_bytes = Some(bytes);
    // Not a connection: `egress.connections` counts nothing for it.
    record.count = 0;
    record.rate_limited_before = 0;
    record.aggregate = None;
    record
}

/// The kernel's `FlowKey` of a UDP record: the inverse of how `decode` makes addresses.
fn flow_key(c: &Connection) -> FlowKey {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    FlowKey {
        netns: c.namespaces.net,
        family: if c.destination.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        },
        protocol: match c.transport {
            Transport::Udp => IPPROTO_UDP,
            Transport::Tcp => 6,
        },
        src_port: c.source.port(),
        dst_port: c.destination.port(),
        tgid: c.process.pid,
        src_addr: bytes(c.source.ip()),
        dst_addr: bytes(c.destination.ip()),
    }
}

#[cfg(test)]
mod tests {
    use egress_shared::ConnectEvent;

    use super::*;
    use crate::events::{decode::decode_connect, identities::Identities};

    fn decoded(ev: &ConnectEvent) -> Connection {
        decode_connect(ev.as_bytes(), &BootClock::now(), &mut Identities::default())
            .expect("decodes")
    }

    fn udp_event(family: u16, src: &[u8], dst: &[u8]) -> ConnectEvent {
        let mut ev = ConnectEvent::zeroed();
        ev.kind = EventKind::UdpSend as u8;
        ev.protocol = 17;
        ev.family = family;
        ev.src_addr[..src.len()].copy_from_slice(src);
        ev.dst_addr[..dst.len()].copy_from_slice(dst);
        ev.src_port = 40000;
        ev.dst_port = 443;
        ev.tgid = 4242;
        ev.flow_netns = 4026531840;
        ev
    }

    fn kernel_key(ev: &ConnectEvent) -> FlowKey {
        FlowKey {
            netns: ev.flow_netns,
            family: ev.family,
            protocol: u16::from(ev.protocol),
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            tgid: ev.tgid,
            src_addr: ev.src_addr,
            dst_addr: ev.dst_addr,
        }
    }

    #[test]
    fn a_record_finds_the_kernel_key_of_its_flow_ipv4_and_ipv6() {
        let v4 = udp_event(AF_INET, &[10, 0, 0, 2], &[1, 1, 1, 1]);
        assert_eq!(flow_key(&decoded(&v4)), kernel_key(&v4));
        let mut v6_dst = [0u8; 16];
        v6_dst[0] = 0x20;
        v6_dst[1] = 0x01;
        v6_dst[15] = 1;
        // An IPv4-mapped source stays IPv6, as the kernel keeps it.
        let v6 = udp_event(
            AF_INET6,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2],
            &v6_dst,
        );
        assert_eq!(flow_key(&decoded(&v6)), kernel_key(&v6));
    }

    #[test]
    fn the_tail_record_counts_bytes_but_no_connection() {
        let last = decoded(&udp_event(AF_INET, &[10, 0, 0, 2], &[1, 1, 1, 1]));
        let record = tail(&last, 77, 123);
        assert_eq!(record.udp_bytes, Some(77));
        assert_eq!(record.count, 0);
        assert_eq!(record.delivery, Delivery::MetricsOnly);
        assert!(!record.logged() && record.counted());
        assert_eq!(record.time_unix_nano, 123);
        assert_eq!(
            (record.process.pid, &record.cgroup, record.destination),
            (last.process.pid, &last.cgroup, last.destination)
        );
    }
}
