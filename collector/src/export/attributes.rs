//! The attributes of a connection record, shared by every exporter.
//!
//! OpenTelemetry semantic-convention keys where a convention exists; the rest under the
//! documented `egress.` prefix (see README, "Output").

use opentelemetry_semantic_conventions::attribute as semconv;

use crate::{enrich::Record, events::outcome::ConnectionState};

/// Keys with no semantic convention.
pub mod keys {
    pub const EVENT: &str = "egress.event";
    pub const PROCESS_GROUP_ID: &str = "egress.process.group.id";
    pub const NAMESPACE_NET: &str = "egress.namespace.net";
    pub const NAMESPACE_UTS: &str = "egress.namespace.uts";
    pub const NAMESPACE_MNT: &str = "egress.namespace.mnt";
    pub const NAMESPACE_PID: &str = "egress.namespace.pid";
    pub const NAMESPACE_IPC: &str = "egress.namespace.ipc";
    pub const NAMESPACE_CGROUP: &str = "egress.namespace.cgroup";
    pub const UTS_NODENAME: &str = "egress.uts.nodename";
    pub const CGROUP_ID: &str = "egress.cgroup.id";
    pub const CGROUP_LEAF_ID: &str = "egress.cgroup.leaf.id";
    pub const CGROUP_LEAF_NAME: &str = "egress.cgroup.leaf.name";
    pub const CGROUP_PARENT_NAME: &str = "egress.cgroup.parent.name";
    /// Path of the task's cgroup in the hierarchy the probes read (`/kubepods/...`); on a
    /// hybrid host attributed through the unified hierarchy, its path there.
    pub const CGROUP_PATH: &str = "egress.cgroup.path";
    /// A container connecting from the host's network namespace (`hostNetwork: true`).
    pub const HOST_NETWORK: &str = "egress.network.host";
    /// Connections of the same cgroup dropped by its rate limit just before this one.
    pub const RATE_LIMITED_BEFORE: &str = "egress.rate_limited.before";
    /// Connections the record stands for, when aggregation is on: 1 for the record that
    /// opened a window, the repeats for the record that closes it.
    pub const CONNECTION_COUNT: &str = "egress.connection.count";
    /// TCP: `established`, `failed` or `pending` (still in SYN_SENT after
    /// `--pending-report`).
    pub const CONNECTION_STATE: &str = "egress.connection.state";
    /// TCP: SYN_SENT to ESTABLISHED (or to the failure), in seconds.
    pub const HANDSHAKE_DURATION: &str = "egress.tcp.handshake.duration";
    /// TCP: SYNs retransmitted before the attempt completed.
    pub const SYN_RETRANSMITS: &str = "egress.tcp.syn.retransmits";
    /// Close records: when the attempt began (Unix nanoseconds); the record's time is
    /// the close.
    pub const CONNECTION_START: &str = "egress.connection.start_time_unix_nano";
    /// Close records: ESTABLISHED to CLOSE, in seconds.
    pub const CONNECTION_DURATION: &str = "egress.tcp.connection.duration";
    /// Close records: payload bytes the peer acknowledged (SYN and FIN taken out).
    pub const BYTES_SENT: &str = "egress.tcp.bytes.sent";
    /// Close records: payload bytes received (the peer's FIN taken out).
    pub const BYTES_RECEIVED: &str = "egress.tcp.bytes.received";
    /// Close records: bytes put on the wire, retransmissions included (4.19+).
    pub const BYTES_TRANSMITTED: &str = "egress.tcp.bytes.transmitted";
    /// Close records: segments retransmitted over the connection's life.
    pub const RETRANSMITS: &str = "egress.tcp.retransmits";
    /// Close records: smoothed round-trip time at the close, in seconds.
    pub const RTT: &str = "egress.tcp.rtt";
    /// Close records: who sent the RST that ended it (`peer` or `local`).
    pub const RESET: &str = "egress.tcp.reset";
    /// Close records: the connection was still open when the collector stopped (no
    /// byte counts: the kernel gives them at the close).
    pub const OPEN_AT_SHUTDOWN: &str = "egress.connection.open_at_shutdown";
    /// Which name cache named `server.address`: `container`, `pod` or `none`.
    pub const DNS_MATCH: &str = "egress.dns.match";
    /// CNAME targets between the name asked and the address (string array).
    pub const DNS_CNAME_CHAIN: &str = "egress.dns.cname_chain";
    /// DNS records: the question's type (`A`, `AAAA`, ... or its number).
    pub const DNS_QUESTION_TYPE: &str = "dns.question.type";
    /// DNS records: the response code (`NOERROR`, `NXDOMAIN`, ...).
    pub const DNS_RESPONSE_CODE: &str = "dns.response_code";
    /// DNS records: from the query (or the socket's connect) to the answer's read, s.
    pub const DNS_LOOKUP_DURATION: &str = "dns.lookup.duration";
}

/// Nanoseconds as seconds.
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    StrArray(Vec<String>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(v as i64)
            }
        }
    )*};
}
int_value!(u16, u32, u64);

pub fn of(record: &Record) -> Vec<(&'static str, Value)> {
    let c = &record.connection;
    let p = &c.process;
    let ns = &c.namespaces;
    let mut attributes = vec![
        (keys::EVENT, c.kind_str().into()),
        (semconv::PROCESS_PID, p.pid.into()),
        (semconv::PROCESS_PARENT_PID, p.parent_pid.into()),
        (semconv::PROCESS_VPID, p.vpid.into()),
        (semconv::PROCESS_EXECUTABLE_NAME, p.name.clone().into()),
        (semconv::PROCESS_USER_ID, p.uid.into()),
        (keys::PROCESS_GROUP_ID, p.gid.into()),
        (semconv::THREAD_ID, p.tid.into()),
        (semconv::THREAD_NAME, p.thread_name.clone().into()),
        (semconv::NETWORK_TRANSPORT, c.transport.as_str().into()),
        (semconv::NETWORK_TYPE, c.network_type().into()),
        (semconv::SOURCE_ADDRESS, c.source.ip().to_string().into()),
        (semconv::SOURCE_PORT, c.source.port().into()),
        (
            semconv::DESTINATION_ADDRESS,
            c.destination.ip().to_string().into(),
        ),
        (semconv::DESTINATION_PORT, c.destination.port().into()),
        (keys::NAMESPACE_NET, ns.net.into()),
        (keys::NAMESPACE_UTS, ns.uts.into()),
        (keys::NAMESPACE_MNT, ns.mnt.into()),
        (keys::NAMESPACE_PID, ns.pid.into()),
        (keys::NAMESPACE_IPC, ns.ipc.into()),
        (keys::NAMESPACE_CGROUP, ns.cgroup.into()),
        (keys::UTS_NODENAME, c.nodename.clone().into()),
        (keys::CGROUP_ID, c.cgroup.id.into()),
        (keys::CGROUP_LEAF_ID, c.cgroup.leaf_id.into()),
        (keys::CGROUP_LEAF_NAME, c.cgroup.leaf_name.clone().into()),
        (
            keys::CGROUP_PARENT_NAME,
            c.cgroup.parent_name.clone().into(),
        ),
        (keys::HOST_NETWORK, Value::Bool(record.host_network)),
    ];
    if let Some(lookup) = &c.dns {
        let a = &lookup.answer;
        attributes.push((semconv::DNS_QUESTION_NAME, a.name.clone().into()));
        attributes.push((
            keys::DNS_QUESTION_TYPE,
            crate::dns::type_name(a.qtype).into(),
        ));
        if lookup.unanswered {
            attributes.push((semconv::ERROR_TYPE, "timeout".into()));
        } else {
            attributes.push((
                keys::DNS_RESPONSE_CODE,
                crate::dns::rcode_name(a.rcode).into(),
            ));
        }
        attributes.push((
            semconv::DNS_ANSWERS,
            Value::StrArray(a.addresses.iter().map(|(ip, _)| ip.to_string()).collect()),
        ));
        if !a.cname_chain.is_empty() {
            attributes.push((
                keys::DNS_CNAME_CHAIN,
                Value::StrArray(a.cname_chain.clone()),
            ));
        }
        attributes.push((
            keys::DNS_LOOKUP_DURATION,
            Value::Double(seconds(lookup.latency_ns)),
        ));
    } else if c.kind != egress_shared::EventKind::DnsAnswer {
        // The name the workload resolved, else the IP (semantic conventions); the
        // peer is always the IP and port.
        match &c.server {
            Some(server) => {
                attributes.push((semconv::SERVER_ADDRESS, server.name.clone().into()));
                attributes.push((keys::DNS_MATCH, server.matched.as_str().into()));
                if !server.cname_chain.is_empty() {
                    attributes.push((
                        keys::DNS_CNAME_CHAIN,
                        Value::StrArray(server.cname_chain.clone()),
                    ));
                }
            }
            None => {
                attributes.push((
                    semconv::SERVER_ADDRESS,
                    c.destination.ip().to_string().into(),
                ));
                attributes.push((keys::DNS_MATCH, "none".into()));
            }
        }
        attributes.push((semconv::SERVER_PORT, c.destination.port().into()));
        attributes.push((
            semconv::NETWORK_PEER_ADDRESS,
            c.destination.ip().to_string().into(),
        ));
        attributes.push((semconv::NETWORK_PEER_PORT, c.destination.port().into()));
    }
    if let Some(path) = &record.cgroup_path {
        attributes.push((keys::CGROUP_PATH, path.clone().into()));
    }
    if c.rate_limited_before > 0 {
        attributes.push((keys::RATE_LIMITED_BEFORE, c.rate_limited_before.into()));
    }
    if c.aggregate.is_some() {
        attributes.push((keys::CONNECTION_COUNT, c.count.into()));
    }
    if let Some(close) = &c.close {
        attributes.push((keys::CONNECTION_START, close.connect_unix_nano.into()));
        attributes.push((
            keys::CONNECTION_DURATION,
            Value::Double(seconds(close.duration_ns())),
        ));
        if close.still_open {
            attributes.push((keys::OPEN_AT_SHUTDOWN, Value::Bool(true)));
        } else {
            attributes.push((keys::BYTES_SENT, close.bytes_sent.into()));
            attributes.push((keys::BYTES_RECEIVED, close.bytes_received.into()));
            if let Some(wire) = close.bytes_transmitted {
                attributes.push((keys::BYTES_TRANSMITTED, wire.into()));
            }
            attributes.push((keys::RETRANSMITS, close.retransmits.into()));
            attributes.push((keys::RTT, Value::Double(f64::from(close.rtt_us) / 1e6)));
        }
        if let Some(by) = close.reset {
            attributes.push((keys::RESET, by.into()));
        }
        if let Some(error) = close.error_type {
            attributes.push((semconv::ERROR_TYPE, error.into()));
        }
    } else if let Some(outcome) = &c.outcome {
        attributes.push((keys::CONNECTION_STATE, outcome.state.as_str().into()));
        if let Some(error) = outcome.error_type {
            attributes.push((semconv::ERROR_TYPE, error.into()));
        }
        if outcome.state != ConnectionState::Pending {
            attributes.push((
                keys::HANDSHAKE_DURATION,
                Value::Double(seconds(outcome.handshake_ns)),
            ));
            attributes.push((keys::SYN_RETRANSMITS, outcome.syn_retransmits.into()));
        }
    }
    attributes
}
