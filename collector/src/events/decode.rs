//! Checked decoding of ring-buffer records into typed connections. Kernel bytes are
//! never transmuted into types with invariants: every enum-like field is validated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use egress_shared::{
    AggregateKey, CONNECT_EVENT_SIZE, ConnState, ConnectEvent, DNS_EVENT_SIZE, DNS_PAYLOAD_MAX,
    DnsEvent, DnsFlags, EventKind, IDENTITY_EVENT_SIZE, IdentityEvent, TCP_CLOSE_EVENT_SIZE,
    TcpCloseEvent,
};

use super::{
    clock::BootClock,
    identities::{Identities, name_field},
    outcome::{Close, ConnectionState, Outcome, error_type},
    text::Text,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "record is {got} bytes, expected {CONNECT_EVENT_SIZE}, {TCP_CLOSE_EVENT_SIZE}, {DNS_EVENT_SIZE} or {IDENTITY_EVENT_SIZE}"
    )]
    Length { got: usize },
    #[error("DNS record claims {0} payload bytes, at most {DNS_PAYLOAD_MAX} fit")]
    DnsLength(u16),
    #[error("unknown TCP attempt state {0}")]
    State(u8),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown transport protocol {0}")]
    Protocol(u8),
}

impl DecodeError {
    /// A short label for counting by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Length { .. } => "length",
            DecodeError::DnsLength(_) => "dns_length",
            DecodeError::State(_) => "state",
            DecodeError::Kind(_) => "kind",
            DecodeError::Family(_) => "family",
            DecodeError::Protocol(_) => "protocol",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub parent_pid: u32,
    /// Process id inside its own pid namespace.
    pub vpid: u32,
    pub uid: u32,
    pub gid: u32,
    pub name: Text,
    pub thread_name: Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Namespaces {
    pub net: u32,
    pub uts: u32,
    pub mnt: u32,
    pub pid: u32,
    pub ipc: u32,
    pub cgroup: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// cgroup v2 id of the task.
    pub id: u64,
    /// kernfs id of the cgroup named by `leaf_name`.
    pub leaf_id: u64,
    /// Last path component of the task's cgroup in the hierarchy the probes read.
    pub leaf_name: Text,
    /// The component before it.
    pub parent_name: Text,
}

/// One connection attempt, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub time_unix_nano: u64,
    pub kind: EventKind,
    pub transport: Transport,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub process: Process,
    pub namespaces: Namespaces,
    /// UTS nodename the task sees (the pod name, except for hostNetwork pods).
    pub nodename: Text,
    pub cgroup: Cgroup,
    /// Events of this cgroup the kernel dropped for its rate limit just before this one.
    pub rate_limited_before: u32,
    /// Connections this record stands for: 1, or a closed aggregation window's repeats.
    pub count: u64,
    /// The in-kernel aggregate this record opened (its window's repeats are counted
    /// there), or belongs to.
    pub aggregate: Option<AggregateKey>,
    /// TCP: how the attempt went (`None` for UDP).
    pub outcome: Option<Outcome>,
    /// [`EventKind::TcpClose`] records: the connection's life. Boxed: few records are
    /// closes, and every record is moved several times between decode and export.
    pub close: Option<Box<Close>>,
    /// Where the record goes: every record feeds the metrics unless `log_only`; it
    /// becomes a log record (and a line on stdout) unless `metrics_only`.
    pub delivery: Delivery,
    /// The name the workload resolved the destination from (`server.address`).
    pub server: Option<crate::dns::cache::ServerName>,
    /// [`EventKind::DnsAnswer`] records: the lookup.
    pub dns: Option<Box<DnsLookup>>,
    /// DNS records: the socket (`ConnectEvent::sock_id`), to match queries and answers.
    pub dns_sock: u64,
    /// UDP flow records: payload bytes the flow sent since its previous record, this
    /// record's datagram included (`egress.udp.bytes.sent`).
    pub udp_bytes: Option<u64>,
}

/// A DNS answer a workload received (an `egress.dns` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsLookup {
    pub answer: crate::dns::Answer,
    /// From the socket's last query (or its connect) to the answer's read; for an
    /// unanswered query, how long it waited.
    pub latency_ns: u64,
    /// A query no answer came back for (`error.type=timeout`; no response code).
    pub unanswered: bool,
}

/// What a record is for (see [`Connection::delivery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// A log record and the metrics.
    #[default]
    Both,
    /// A pending attempt reported before it completed: its completion counts later.
    LogOnly,
    /// The completion of an attempt already reported as pending, or a close record
    /// without `--close-records`.
    MetricsOnly,
}

impl Connection {
    pub fn kind_str(&self) -> &'static str {
        match self.kind {
            EventKind::TcpConnect => "tcp_connect",
            EventKind::UdpConnect => "udp_connect",
            EventKind::UdpSend => "udp_send",
            EventKind::TcpClose => "tcp_close",
            EventKind::DnsAnswer => "dns",
            // Never a connection's kind (the decoder refuses it).
            EventKind::Identity => "identity",
        }
    }

    /// The socket a DNS record was read from or sent on (`ConnectEvent::sock_id`).
    pub fn outcome_sock(&self) -> u64 {
        self.dns_sock
    }

    /// Whether this record becomes a log record.
    pub fn logged(&self) -> bool {
        self.delivery != Delivery::MetricsOnly
    }

    /// Whether this record counts in the metrics.
    pub fn counted(&self) -> bool {
        self.delivery != Delivery::LogOnly
    }

    pub fn network_type(&self) -> &'static str {
        if self.destination.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        }
    }
}

fn address(family: u16, bytes: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    };
    SocketAddr::new(ip, port)
}

/// A ring-buffer record: a connection (attempt or flow), or the close of a TCP one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "most records are connections: boxing them was an allocation per record"
)]
pub enum Decoded {
    Connection(Connection),
    Close(TcpCloseEvent),
    /// A DNS message a workload read: the reading socket and task, and the bytes.
    Dns(Box<RawDns>),
    /// A process's identity, learned (for the records that refer to it).
    Identity,
}

/// A DNS record before its payload is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDns {
    /// The reader, the workload's socket (source) and the resolver (destination).
    pub head: Connection,
    pub payload: Vec<u8>,
    pub tcp: bool,
    pub truncated: bool,
    /// A query the workload sent (not an answer it read).
    pub query: bool,
    pub latency_ns: u64,
}

/// Decodes one ring-buffer record; the record types differ in length. Identities are
/// learned into `identities`, and connections joined with theirs.
pub fn decode(
    bytes: &[u8],
    clock: &BootClock,
    identities: &mut Identities,
) -> Result<Decoded, DecodeError> {
    match bytes.len() {
        CONNECT_EVENT_SIZE => {
            let c = decode_connect(bytes, clock, identities)?;
            if c.kind == EventKind::DnsAnswer {
                return Err(DecodeError::Kind(EventKind::DnsAnswer as u8));
            }
            Ok(Decoded::Connection(c))
        }
        TCP_CLOSE_EVENT_SIZE => {
            // SAFETY: the length is checked; TcpCloseEvent is plain old data for which
            // every bit pattern is valid; read_unaligned needs no alignment.
            let raw: TcpCloseEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if raw.kind != EventKind::TcpClose as u8 {
                return Err(DecodeError::Kind(raw.kind));
            }
            Ok(Decoded::Close(raw))
        }
        DNS_EVENT_SIZE => decode_dns(bytes, clock, identities).map(|d| Decoded::Dns(Box::new(d))),
        IDENTITY_EVENT_SIZE => {
            // SAFETY: the length is checked; IdentityEvent is plain old data for which
            // every bit pattern is valid; read_unaligned needs no alignment.
            let raw: IdentityEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if raw.kind != EventKind::Identity as u8 {
                return Err(DecodeError::Kind(raw.kind));
            }
            identities.learn(&raw);
            Ok(Decoded::Identity)
        }
        got => Err(DecodeError::Length { got }),
    }
}

fn decode_dns(
    bytes: &[u8],
    clock: &BootClock,
    identities: &mut Identities,
) -> Result<RawDns, DecodeError> {
    // SAFETY: the length is checked (by the caller), DnsEvent is plain old data for
    // which every bit pattern is valid; read_unaligned needs no alignment.
    let raw: DnsEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if raw.head.kind != EventKind::DnsAnswer as u8 {
        return Err(DecodeError::Kind(raw.head.kind));
    }
    let len = usize::from(raw.payload_len);
    if len > DNS_PAYLOAD_MAX {
        return Err(DecodeError::DnsLength(raw.payload_len));
    }
    let head = decode_connect(raw.head.as_bytes(), clock, identities)?;
    Ok(RawDns {
        head,
        payload: raw.payload[..len].to_vec(),
        tcp: raw.flags & DnsFlags::TCP != 0,
        truncated: raw.flags & DnsFlags::TRUNCATED != 0,
        query: raw.flags & DnsFlags::QUERY != 0,
        latency_ns: u64::from(raw.latency_ns),
    })
}

/// Decodes a [`ConnectEvent`] (also what user space reads from the pending-attempt map).
pub fn decode_connect(
    bytes: &[u8],
    clock: &BootClock,
    identities: &mut Identities,
) -> Result<Connection, DecodeError> {
    if bytes.len() != CONNECT_EVENT_SIZE {
        return Err(DecodeError::Length { got: bytes.len() });
    }
    let event = bytes.as_ptr().cast::<ConnectEvent>();
    if event.is_aligned() {
        // SAFETY: the length is checked, the pointer aligned, ConnectEvent is plain old
        // data for which every bit pattern is valid, and `bytes` is borrowed for as long
        // as the reference lives. Ring records are 8-byte aligned: decoded where they
        // lie, not copied out first.
        connect_event(unsafe { &*event }, clock, identities)
    } else {
        // SAFETY: as above; read_unaligned does not require alignment.
        connect_event(
            &unsafe { std::ptr::read_unaligned(event) },
            clock,
            identities,
        )
    }
}

/// [`decode_connect`], from the event in place.
fn connect_event(
    raw: &ConnectEvent,
    clock: &BootClock,
    identities: &mut Identities,
) -> Result<Connection, DecodeError> {
    let kind = EventKind::from_raw(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
    if matches!(kind, EventKind::TcpClose | EventKind::Identity) {
        return Err(DecodeError::Kind(raw.kind));
    }
    let transport = match raw.protocol {
        IPPROTO_TCP => Transport::Tcp,
        IPPROTO_UDP => Transport::Udp,
        other => return Err(DecodeError::Protocol(other)),
    };
    if raw.family != AF_INET && raw.family != AF_INET6 {
        return Err(DecodeError::Family(raw.family));
    }
    let outcome = match (transport, raw.state) {
        (Transport::Udp, _) => None,
        _ if kind == EventKind::DnsAnswer => None,
        // Read from the pending map: SYN_SENT still.
        (Transport::Tcp, 0) => Some(Outcome {
            state: ConnectionState::Pending,
            error_type: None,
            handshake_ns: 0,
            syn_retransmits: 0,
            sock_id: raw.sock_id,
            connect_boot_ns: raw.boot_time_ns,
        }),
        (Transport::Tcp, state) => {
            let state = ConnState::from_raw(state).ok_or(DecodeError::State(state))?;
            Some(Outcome {
                state: match state {
                    ConnState::Established => ConnectionState::Established,
                    ConnState::Failed => ConnectionState::Failed,
                    ConnState::Unseen => ConnectionState::Unknown,
                },
                error_type: match state {
                    ConnState::Established | ConnState::Unseen => None,
                    ConnState::Failed => Some(error_type(raw.sk_err, raw.src_port)),
                },
                handshake_ns: raw.handshake_ns,
                syn_retransmits: raw.syn_retransmits,
                sock_id: raw.sock_id,
                connect_boot_ns: raw.boot_time_ns,
            })
        }
    };
    // Unknown (counted by `identities`): the record keeps what it carries itself.
    let identity = identities
        .get(raw.tgid, raw.identity_ns)
        .unwrap_or_default();
    let mut namespaces = identity.namespaces;
    if raw.flow_netns != 0 {
        // The namespace the kernel keyed the UDP flow by (the same, unless the process
        // moved between its identity's read and the send).
        namespaces.net = raw.flow_netns;
    }
    Ok(Connection {
        time_unix_nano: clock.to_unix_nanos(raw.boot_time_ns),
        kind,
        transport,
        source: address(raw.family, &raw.src_addr, raw.src_port),
        destination: address(raw.family, &raw.dst_addr, raw.dst_port),
        process: Process {
            pid: raw.tgid,
            tid: raw.tid,
            parent_pid: identity.parent_pid,
            vpid: identity.vpid,
            uid: raw.uid,
            gid: raw.gid,
            name: identity.name,
            thread_name: (identities.names()).get_field(name_field::THREAD, &raw.thread_comm),
        },
        namespaces,
        nodename: identity.nodename,
        cgroup: Cgroup {
            id: raw.cgroup_id,
            leaf_id: identity.cgroup_leaf_id,
            leaf_name: identity.cgroup_leaf_name,
            parent_name: identity.cgroup_parent_name,
        },
        rate_limited_before: raw.rate_limited_before,
        count: 1,
        aggregate: (raw.aggregate_window != 0).then(|| AggregateKey::of(raw, raw.aggregate_window)),
        outcome,
        close: None,
        delivery: Delivery::Both,
        server: None,
        dns: None,
        dns_sock: if kind == EventKind::DnsAnswer {
            raw.sock_id
        } else {
            0
        },
        // The kernel carries them in the field TCP uses for the handshake.
        udp_bytes: matches!(kind, EventKind::UdpSend | EventKind::UdpConnect)
            .then_some(raw.handshake_ns),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) fn sample() -> ConnectEvent {
        let mut ev = ConnectEvent::zeroed();
        ev.boot_time_ns = 5_000;
        ev.kind = EventKind::TcpConnect as u8;
        ev.protocol = IPPROTO_TCP;
        ev.family = AF_INET;
        ev.src_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.dst_addr[..4].copy_from_slice(&[93, 184, 216, 34]);
        ev.src_port = 40000;
        ev.dst_port = 443;
        ev.tgid = 42;
        ev.tid = 43;
        ev.identity_ns = 4_000;
        ev.uid = 1000;
        ev.thread_comm[..6].copy_from_slice(b"worker");
        ev.cgroup_id = 99;
        ev.rate_limited_before = 3;
        ev
    }

    /// The identity [`sample`] refers to.
    pub(super) fn sample_identity() -> IdentityEvent {
        let mut id = IdentityEvent::zeroed();
        id.filled_ns = 4_000;
        id.tgid = 42;
        id.cgroup_id = 99;
        id.cgroup_leaf_id = 98;
        id.parent_tgid = 1;
        id.ns_tgid = 7;
        id.ns_inums = [11, 12, 13, 14, 15, 16];
        id.process_comm[..4].copy_from_slice(b"curl");
        id.nodename[..6].copy_from_slice(b"pod-1\0");
        id.cgroup_name[..5].copy_from_slice(b"abcde");
        id.cgroup_parent_name[..6].copy_from_slice(b"pod123");
        id
    }

    /// Identities that know [`sample_identity`], learned as the reader learns it.
    pub(super) fn known() -> Identities {
        let mut identities = Identities::default();
        let learned = decode(
            sample_identity().as_bytes(),
            &BootClock::with_offset(0),
            &mut identities,
        );
        assert_eq!(learned, Ok(Decoded::Identity));
        identities
    }

    #[test]
    fn round_trip_of_a_tcp_v4_event() {
        let clock = BootClock::with_offset(1_000_000);
        let c = decode_connect(sample().as_bytes(), &clock, &mut known()).expect("valid event");
        assert_eq!(c.time_unix_nano, 1_005_000);
        assert_eq!(c.kind, EventKind::TcpConnect);
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.source, "10.0.0.2:40000".parse().expect("addr"));
        assert_eq!(c.destination, "93.184.216.34:443".parse().expect("addr"));
        assert_eq!(c.process.pid, 42);
        assert_eq!(c.process.tid, 43);
        assert_eq!(c.process.vpid, 7);
        assert_eq!(c.process.name, "curl");
        assert_eq!(c.process.thread_name, "worker");
        assert_eq!(c.namespaces.net, 11);
        assert_eq!(c.namespaces.cgroup, 16);
        assert_eq!(c.nodename, "pod-1");
        assert_eq!(c.cgroup.leaf_name, "abcde");
        assert_eq!(c.cgroup.parent_name, "pod123");
        assert_eq!((c.cgroup.id, c.cgroup.leaf_id), (99, 98));
        assert_eq!(c.rate_limited_before, 3);
        assert_eq!(c.network_type(), "ipv4");
    }

    #[test]
    fn a_record_whose_identity_is_unknown_keeps_its_own_fields_and_is_counted() {
        let clock = BootClock::with_offset(0);
        let mut identities = known();
        let mut ev = sample();
        // A read of this process the ring did not carry (lost when it was full).
        ev.identity_ns = 4_001;
        let c = decode_connect(ev.as_bytes(), &clock, &mut identities).expect("valid event");
        assert_eq!((c.process.pid, c.process.tid, c.cgroup.id), (42, 43, 99));
        assert_eq!(c.process.thread_name, "worker");
        assert_eq!(c.process.name, "");
        assert_eq!((c.cgroup.leaf_name.as_str(), c.nodename.as_str()), ("", ""));
        assert_eq!(identities.take_unknown(), 1);
        // Another process's record is not joined with this one's identity either.
        let mut other = sample();
        other.tgid = 7;
        decode_connect(other.as_bytes(), &clock, &mut identities).expect("valid event");
        assert_eq!(identities.take_unknown(), 1);
        decode_connect(sample().as_bytes(), &clock, &mut identities).expect("valid event");
        assert_eq!(identities.take_unknown(), 0);
    }

    #[test]
    fn a_udp_record_keeps_the_network_namespace_its_flow_was_keyed_by() {
        let mut ev = sample();
        ev.protocol = IPPROTO_UDP;
        ev.kind = EventKind::UdpSend as u8;
        let clock = BootClock::with_offset(0);
        let c = decode_connect(ev.as_bytes(), &clock, &mut known()).expect("valid event");
        assert_eq!(c.namespaces.net, 11);
        ev.flow_netns = 21;
        let c = decode_connect(ev.as_bytes(), &clock, &mut known()).expect("valid event");
        assert_eq!((c.namespaces.net, c.namespaces.uts), (21, 12));
    }

    #[test]
    fn ipv6_addresses_use_all_sixteen_bytes() {
        let mut ev = sample();
        ev.family = AF_INET6;
        ev.protocol = IPPROTO_UDP;
        ev.kind = EventKind::UdpSend as u8;
        ev.dst_addr = Ipv6Addr::LOCALHOST.octets();
        let c = decode_connect(ev.as_bytes(), &BootClock::with_offset(0), &mut known())
            .expect("valid event");
        assert_eq!(c.destination, "[::1]:443".parse().expect("addr"));
        assert_eq!(c.network_type(), "ipv6");
        assert_eq!(c.kind_str(), "udp_send");
    }

    #[test]
    fn rejects_bad_records() {
        let clock = BootClock::with_offset(0);
        let bytes = sample().as_bytes().to_vec();
        assert_eq!(
            decode(&bytes[..100], &clock, &mut known()),
            Err(DecodeError::Length { got: 100 })
        );
        let mut ev = sample();
        ev.kind = 200;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(200))
        );
        let mut ev = sample();
        ev.kind = EventKind::TcpClose as u8;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(4))
        );
        let mut ev = sample();
        ev.family = 1;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Family(1))
        );
        let mut ev = sample();
        ev.protocol = 1;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Protocol(1))
        );
        let mut ev = sample();
        ev.state = 9;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::State(9))
        );
        let mut id = sample_identity();
        id.kind = EventKind::TcpConnect as u8;
        assert_eq!(
            decode(id.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(1))
        );
        let mut ev = sample();
        ev.kind = EventKind::Identity as u8;
        assert_eq!(
            decode(ev.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(6))
        );
        let mut close = TcpCloseEvent::zeroed();
        close.kind = 1;
        assert_eq!(
            decode(close.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(1))
        );
    }

    #[test]
    fn udp_records_carry_their_flow_bytes_and_tcp_ones_none() {
        let clock = BootClock::with_offset(0);
        let mut ev = sample();
        ev.state = egress_shared::ConnState::Established as u8;
        ev.handshake_ns = 77;
        let tcp = decode_connect(ev.as_bytes(), &clock, &mut known()).expect("valid");
        assert_eq!(tcp.udp_bytes, None);
        ev.protocol = IPPROTO_UDP;
        ev.kind = EventKind::UdpSend as u8;
        ev.state = 0;
        let udp = decode_connect(ev.as_bytes(), &clock, &mut known()).expect("valid");
        assert_eq!(udp.udp_bytes, Some(77));
        assert_eq!(udp.outcome, None);
    }

    #[test]
    fn a_failed_attempt_carries_its_error_type() {
        let mut ev = sample();
        ev.state = ConnState::Failed as u8;
        ev.sk_err = 111;
        ev.handshake_ns = 7;
        ev.syn_retransmits = 2;
        let Ok(Decoded::Connection(c)) =
            decode(ev.as_bytes(), &BootClock::with_offset(0), &mut known())
        else {
            panic!("a connection")
        };
        let outcome = c.outcome.expect("TCP has an outcome");
        assert_eq!(outcome.state, ConnectionState::Failed);
        assert_eq!(outcome.error_type, Some("refused"));
        assert_eq!((outcome.handshake_ns, outcome.syn_retransmits), (7, 2));
        ev.state = ConnState::Established as u8;
        let c =
            decode_connect(ev.as_bytes(), &BootClock::with_offset(0), &mut known()).expect("valid");
        assert_eq!(c.outcome.expect("outcome").error_type, None);
    }

    #[test]
    fn an_unseen_completion_is_unknown_without_an_error() {
        let mut ev = sample();
        ev.state = ConnState::Unseen as u8;
        let c =
            decode_connect(ev.as_bytes(), &BootClock::with_offset(0), &mut known()).expect("valid");
        let outcome = c.outcome.expect("TCP has an outcome");
        assert_eq!(outcome.state, ConnectionState::Unknown);
        assert_eq!(outcome.error_type, None);
        assert!(!outcome.state.completion_seen());
        ev.state = 4;
        assert!(decode_connect(ev.as_bytes(), &BootClock::with_offset(0), &mut known()).is_err());
    }

    #[test]
    fn a_dns_record_round_trips_and_bad_lengths_are_refused() {
        let clock = BootClock::with_offset(0);
        let mut dns = egress_shared::DnsEvent::zeroed();
        dns.head = sample();
        dns.head.kind = EventKind::DnsAnswer as u8;
        dns.head.protocol = IPPROTO_UDP;
        dns.payload_len = 3;
        dns.payload[..3].copy_from_slice(b"abc");
        dns.flags = egress_shared::DnsFlags::TRUNCATED;
        dns.latency_ns = 9;
        let Ok(Decoded::Dns(raw)) = decode(dns.as_bytes(), &clock, &mut known()) else {
            panic!("a DNS record")
        };
        assert_eq!(raw.payload, b"abc");
        assert!(raw.truncated && !raw.tcp);
        assert_eq!(raw.latency_ns, 9);
        assert_eq!(raw.head.kind_str(), "dns");
        dns.payload_len = DNS_PAYLOAD_MAX as u16 + 1;
        assert_eq!(
            decode(dns.as_bytes(), &clock, &mut known()),
            Err(DecodeError::DnsLength(DNS_PAYLOAD_MAX as u16 + 1))
        );
        // A connection-sized record cannot claim to be DNS.
        assert_eq!(
            decode(dns.head.as_bytes(), &clock, &mut known()),
            Err(DecodeError::Kind(EventKind::DnsAnswer as u8))
        );
    }

    #[test]
    fn a_close_record_round_trips() {
        let mut close = TcpCloseEvent::zeroed();
        close.bytes_acked = 10;
        let decoded = decode(close.as_bytes(), &BootClock::with_offset(0), &mut known());
        assert_eq!(decoded, Ok(Decoded::Close(close)));
    }

    #[test]
    fn unterminated_and_invalid_utf8_strings_are_kept_lossily() {
        let mut id = sample_identity();
        id.process_comm = [0xff; 16];
        id.cgroup_name = [b'a'; 128];
        let clock = BootClock::with_offset(0);
        let mut identities = Identities::default();
        assert_eq!(
            decode(id.as_bytes(), &clock, &mut identities),
            Ok(Decoded::Identity)
        );
        let c = decode_connect(sample().as_bytes(), &clock, &mut identities).expect("valid event");
        assert_eq!(c.process.name.chars().count(), 16);
        assert_eq!(c.cgroup.leaf_name.len(), 128);
    }
}

#[cfg(test)]
mod fuzz {
    use super::{
        BootClock, Identities, decode,
        tests::{sample, sample_identity},
    };
    use crate::mutate::mutations;
    use egress_shared::TcpCloseEvent;

    #[test]
    fn decoding_never_panics() {
        let clock = BootClock::with_offset(i128::from(u64::MAX));
        let mut names = Identities::default();
        for input in mutations(sample_identity().as_bytes(), 20_000) {
            let _ = decode(&input, &clock, &mut names);
        }
        for input in mutations(sample().as_bytes(), 50_000) {
            let _ = decode(&input, &clock, &mut names);
        }
        for input in mutations(TcpCloseEvent::zeroed().as_bytes(), 20_000) {
            let _ = decode(&input, &clock, &mut names);
        }
        let mut dns = egress_shared::DnsEvent::zeroed();
        dns.head = sample();
        dns.head.kind = egress_shared::EventKind::DnsAnswer as u8;
        dns.payload_len = 40;
        for input in mutations(dns.as_bytes(), 5_000) {
            let _ = decode(&input, &clock, &mut names);
        }
    }
}
