//! The attributes of a connection record, shared by every exporter, the attribute sets
//! that choose among them (`--attributes`), and the one-line body built from them.
//!
//! OpenTelemetry semantic-convention keys where a convention exists; the rest under the
//! documented `egress.` prefix (see README, "Output").

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, sync::Arc};

use opentelemetry_semantic_conventions::attribute as semconv;

pub use crate::config::settings::AttributeSet;
use crate::enrich::{Record, Resource};

/// A list of keys and its membership test: a `match` (a length switch and a comparison
/// or two) rather than a search, since it runs for every attribute of every record.
macro_rules! key_list {
    ($(#[$doc:meta])* $list:ident, $test:ident: $($key:path),* $(,)?) => {
        $(#[$doc])*
        pub const $list: &[&str] = &[$($key),*];

        /// Whether `key` is in the list of the same name. Inlined: with a constant key
        /// (every call [`visit`] makes) the compiler decides it, no comparison runs.
        #[inline(always)]
        fn $test(key: &str) -> bool {
            matches!(key, $($key)|*)
        }
    };
}

key_list! {
    /// Left out of `default` (and `minimal`): for deep forensics, not every record.
    FORENSIC, forensic:
    semconv::PROCESS_VPID,
    keys::PROCESS_GROUP_ID,
    semconv::THREAD_ID,
    semconv::THREAD_NAME,
    keys::NAMESPACE_NET,
    keys::NAMESPACE_UTS,
    keys::NAMESPACE_MNT,
    keys::NAMESPACE_PID,
    keys::NAMESPACE_IPC,
    keys::NAMESPACE_CGROUP,
    keys::UTS_NODENAME,
    keys::CGROUP_ID,
    keys::CGROUP_LEAF_ID,
    keys::CGROUP_LEAF_NAME,
    keys::CGROUP_PARENT_NAME,
    keys::CGROUP_PATH,
}

key_list! {
    /// Also left out of `minimal`.
    DETAIL, detail:
    semconv::PROCESS_PARENT_PID,
    semconv::PROCESS_USER_ID,
    semconv::NETWORK_TYPE,
    semconv::SOURCE_ADDRESS,
    semconv::SOURCE_PORT,
    keys::HOST_NETWORK,
    // The name (server.address) answers the audit; these repeat destination.* or say
    // how the name was found.
    semconv::SERVER_PORT,
    semconv::NETWORK_PEER_ADDRESS,
    semconv::NETWORK_PEER_PORT,
    keys::DNS_MATCH,
}

impl AttributeSet {
    pub fn as_str(self) -> &'static str {
        match self {
            AttributeSet::Minimal => "minimal",
            AttributeSet::Default => "default",
            AttributeSet::Full => "full",
        }
    }

    /// Whether records of this set carry `key`.
    #[inline(always)]
    pub fn keeps(self, key: &str) -> bool {
        match self {
            AttributeSet::Full => true,
            AttributeSet::Default => !forensic(key),
            AttributeSet::Minimal => !forensic(key) && !detail(key),
        }
    }
}

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
    /// UDP flow records: payload bytes the flow sent since its previous record, this
    /// record's datagram included.
    pub const UDP_BYTES_SENT: &str = "egress.udp.bytes.sent";
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

/// An owned attribute value (metrics, spans, tests); records are written from [`Attr`].
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
        impl From<$t> for Attr<'_> {
            fn from(v: $t) -> Self {
                Attr::Int(v as i64)
            }
        }
    )*};
}
int_value!(u16, u32, u64);

/// Short text held in place (an address, a number as a name): no allocation.
#[derive(Clone, Copy)]
pub struct InlineText {
    bytes: [u8; 47],
    len: u8,
}

impl InlineText {
    /// `value` as text; what does not fit (never an address) is cut at a character.
    pub fn of(value: impl std::fmt::Display) -> Self {
        let mut text = InlineText {
            bytes: [0; 47],
            len: 0,
        };
        let _ = write!(text, "{value}");
        text
    }

    /// `ip` as text, what its `Display` writes; an IPv4 address (nearly every record's,
    /// twice) without the formatting machinery.
    pub fn ip(ip: IpAddr) -> Self {
        let IpAddr::V4(v4) = ip else {
            return Self::of(ip);
        };
        let mut text = InlineText {
            bytes: [0; 47],
            len: 0,
        };
        let mut at = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                text.bytes[at] = b'.';
                at += 1;
            }
            if octet >= 100 {
                text.bytes[at] = b'0' + octet / 100;
                at += 1;
            }
            if octet >= 10 {
                text.bytes[at] = b'0' + octet / 10 % 10;
                at += 1;
            }
            text.bytes[at] = b'0' + octet % 10;
            at += 1;
        }
        text.len = at as u8;
        text
    }

    pub fn as_str(&self) -> &str {
        let bytes = &self.bytes[..usize::from(self.len)];
        // SAFETY: `bytes` is only ever written whole `&str`s at a time (`write_str`, which
        // refuses a piece that does not fit) or ASCII digits and dots (`ip`): UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::fmt::Write for InlineText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let at = usize::from(self.len);
        let end = at + s.len();
        if end > self.bytes.len() {
            return Err(std::fmt::Error);
        }
        self.bytes[at..end].copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl std::fmt::Debug for InlineText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl PartialEq for InlineText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// An attribute value borrowed from the record it describes: collecting a record's
/// attributes allocates nothing, and the writers (JSON, protobuf) write from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attr<'a> {
    Str(&'a str),
    /// Text made on the spot (an address), written as a string.
    Inline(InlineText),
    Int(i64),
    Bool(bool),
    Double(f64),
    StrArray(&'a [String]),
    /// A DNS answer's addresses (their TTLs left out), written as an array of strings.
    IpArray(&'a [(IpAddr, u32)]),
}

impl<'a> From<&'a str> for Attr<'a> {
    fn from(s: &'a str) -> Self {
        Attr::Str(s)
    }
}

impl From<IpAddr> for Attr<'_> {
    fn from(ip: IpAddr) -> Self {
        Attr::Inline(InlineText::ip(ip))
    }
}

impl Attr<'_> {
    /// The value as text, when it is one.
    pub fn text(&self) -> Option<&str> {
        match self {
            Attr::Str(s) => Some(s),
            Attr::Inline(t) => Some(t.as_str()),
            _ => None,
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            Attr::Str(s) => Value::Str((*s).to_owned()),
            Attr::Inline(t) => Value::Str(t.as_str().to_owned()),
            Attr::Int(n) => Value::Int(*n),
            Attr::Bool(b) => Value::Bool(*b),
            Attr::Double(d) => Value::Double(*d),
            Attr::StrArray(items) => Value::StrArray(items.to_vec()),
            Attr::IpArray(ips) => {
                Value::StrArray(ips.iter().map(|(ip, _)| ip.to_string()).collect())
            }
        }
    }
}

/// A record's attributes, borrowed from it.
pub type Attrs<'a> = Vec<(&'static str, Attr<'a>)>;

/// Buffers reused from record to record: the attribute list and the body line.
#[derive(Default)]
pub struct Scratch {
    attributes: Attrs<'static>,
    pub body: String,
    /// The body's start for the last resource (records come in runs of one workload).
    workload: Option<(Arc<Resource>, String)>,
}

impl Scratch {
    /// The attributes of `set` of `record` (in `out`, its allocation reused), and its body
    /// line (in `self.body`) built from all of them.
    pub fn select<'a>(&mut self, record: &'a Record, set: AttributeSet) -> Attrs<'a> {
        let mut attributes = reuse(std::mem::take(&mut self.attributes));
        attributes.reserve(48);
        let shown = visit(record, set, &mut attributes);
        self.write_body(record, &shown);
        attributes
    }

    /// The record's body line (in `self.body`), from the attributes it shows.
    pub(crate) fn write_body(&mut self, record: &Record, shown: &ShownValues) {
        self.body.clear();
        match &self.workload {
            Some((resource, workload)) if Arc::ptr_eq(resource, &record.resource) => {
                self.body.push_str(workload);
            }
            _ => {
                write_workload(&mut self.body, &record.resource.attributes);
                self.workload = Some((Arc::clone(&record.resource), self.body.clone()));
            }
        }
        write_connection(&mut self.body, &shown.shown());
    }

    /// Gives back the list [`Self::select`] lent, for the next record.
    pub fn give_back(&mut self, attributes: Attrs<'_>) {
        self.attributes = reuse(attributes);
    }
}

/// An empty list with `list`'s allocation, for values of another lifetime (the standard
/// library collects in place when the element layout is the same).
fn reuse<'b>(mut list: Attrs<'_>) -> Attrs<'b> {
    list.clear();
    list.into_iter().map(|_| unreachable!("empty")).collect()
}

/// The attributes of `set`, and the record's body line built from all of them.
pub fn select(record: &Record, set: AttributeSet) -> (Vec<(&'static str, Value)>, String) {
    let mut scratch = Scratch::default();
    let attributes = scratch.select(record, set);
    let owned = attributes.iter().map(|(k, v)| (*k, v.to_value())).collect();
    (owned, scratch.body)
}

/// The record as one short human line, what log views (Loki, Grafana) show:
/// `payments/api-7c9d (api) python3[4242] → 52.94.233.129:443 tcp`, then the outcome and
/// the destination's name when records carry them. Built only from the resource and the
/// attributes, so an attribute added later shows up by its key.
pub fn body(resource: &BTreeMap<&'static str, String>, attributes: &[(&str, Attr)]) -> String {
    let mut line = String::with_capacity(96);
    write_body(&mut line, resource, attributes);
    line
}

/// [`body`], appended to `line`.
pub fn write_body(
    line: &mut String,
    resource: &BTreeMap<&'static str, String>,
    attributes: &[(&str, Attr)],
) {
    write_workload(line, resource);
    let mut shown = ShownValues::default();
    for (key, value) in attributes {
        shown.note(key, value);
    }
    write_connection(line, &shown.shown());
}

/// The body's first part, which only the resource decides: who.
fn write_workload(line: &mut String, resource: &BTreeMap<&'static str, String>) {
    let resource = |key: &str| {
        resource
            .get(key)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    };
    match (
        resource(semconv::K8S_NAMESPACE_NAME),
        resource(semconv::K8S_POD_NAME),
    ) {
        (Some(namespace), Some(pod)) => {
            line.push_str(namespace);
            line.push('/');
            line.push_str(pod);
        }
        (None, Some(pod)) => line.push_str(pod),
        _ => match (
            resource(semconv::CONTAINER_NAME),
            resource(semconv::CONTAINER_ID),
        ) {
            (Some(name), _) => line.push_str(name),
            (None, Some(id)) => line.push_str(id.get(..12).unwrap_or(id)),
            (None, None) => line.push_str(resource(semconv::HOST_NAME).unwrap_or("host")),
        },
    }
    if let Some(container) = resource(semconv::K8S_CONTAINER_NAME) {
        line.push_str(" (");
        line.push_str(container);
        line.push(')');
    }
}

/// The attributes the body shows, each the first of its key (one pass over them).
#[derive(Default)]
struct Shown<'r, 'a> {
    executable: Option<&'r Attr<'a>>,
    pid: Option<&'r Attr<'a>>,
    address: Option<&'r Attr<'a>>,
    port: Option<&'r Attr<'a>>,
    /// Attributes that may carry the destination's name (from DNS, never reverse
    /// lookups), the first present shown when it differs from the address:
    /// `server.address`, `dns.question.name`.
    names: [Option<&'r Attr<'a>>; 2],
    transport: Option<&'r Attr<'a>>,
    /// Attributes whose value is the connection's outcome, the first present shown: a
    /// failure's type (`error.type`), else the connection's state (the key issue 13's
    /// records use; no semantic convention exists for it).
    outcomes: [Option<&'r Attr<'a>>; 2],
    count: Option<&'r Attr<'a>>,
}

/// Which field of [`Shown`] an attribute's key fills, if any. Inlined: with a constant
/// key (every call [`visit`] makes) the compiler decides it, no comparison runs.
#[inline(always)]
fn shown_slot(key: &str) -> Option<usize> {
    Some(match key {
        semconv::PROCESS_EXECUTABLE_NAME => 0,
        semconv::PROCESS_PID => 1,
        semconv::DESTINATION_ADDRESS => 2,
        semconv::DESTINATION_PORT => 3,
        semconv::SERVER_ADDRESS => 4,
        semconv::DNS_QUESTION_NAME => 5,
        semconv::NETWORK_TRANSPORT => 6,
        semconv::ERROR_TYPE => 7,
        keys::CONNECTION_STATE => 8,
        keys::CONNECTION_COUNT => 9,
        _ => return None,
    })
}

/// Keys the body shows (see [`shown_slot`]); every attribute set keeps them (a test
/// checks), so [`visit`] finds them among the attributes it keeps.
const SHOWN_KEYS: usize = 10;

/// The attributes the body shows (the first of each key), copied as the record's
/// attributes are collected.
#[derive(Default)]
pub(crate) struct ShownValues<'a>([Option<Attr<'a>>; SHOWN_KEYS]);

impl<'a> ShownValues<'a> {
    #[inline(always)]
    fn note(&mut self, key: &str, value: &Attr<'a>) {
        if let Some(slot) = shown_slot(key) {
            self.0[slot].get_or_insert(*value);
        }
    }

    fn shown(&self) -> Shown<'_, 'a> {
        let get = |slot: usize| self.0[slot].as_ref();
        Shown {
            executable: get(0),
            pid: get(1),
            address: get(2),
            port: get(3),
            names: [get(4), get(5)],
            transport: get(6),
            outcomes: [get(7), get(8)],
            count: get(9),
        }
    }
}

/// Text of an attribute, when it is non-empty text.
fn shown_text<'r>(value: Option<&'r Attr>) -> Option<&'r str> {
    value.and_then(Attr::text).filter(|s| !s.is_empty())
}

/// The body's second part, from the attributes: what, where to, how it went.
fn write_connection(line: &mut String, shown: &Shown) {
    let mut digits = itoa::Buffer::new();
    line.push(' ');
    line.push_str(shown_text(shown.executable).unwrap_or("?"));
    if let Some(Attr::Int(pid)) = shown.pid {
        line.push('[');
        line.push_str(digits.format(*pid));
        line.push(']');
    }
    let address = shown_text(shown.address).unwrap_or("?");
    let port = match shown.port {
        Some(Attr::Int(port)) => *port,
        _ => 0,
    };
    if address.contains(':') {
        line.push_str(" → [");
        line.push_str(address);
        line.push(']');
    } else {
        line.push_str(" → ");
        line.push_str(address);
    }
    line.push(':');
    line.push_str(digits.format(port));
    if let Some(name) = (shown.names.iter())
        .find_map(|value| shown_text(*value))
        .filter(|name| *name != address)
    {
        line.push_str(" (");
        line.push_str(name);
        line.push(')');
    }
    if let Some(transport) = shown_text(shown.transport) {
        line.push(' ');
        line.push_str(transport);
    }
    if let Some(outcome) = shown.outcomes.iter().find_map(|value| shown_text(*value)) {
        line.push(' ');
        line.push_str(outcome);
    }
    if let Some(Attr::Int(n)) = shown.count.filter(|v| **v != Attr::Int(1)) {
        line.push_str(" ×");
        line.push_str(digits.format(*n));
    }
}

/// Every attribute of the record (the `full` set), owned.
pub fn of(record: &Record) -> Vec<(&'static str, Value)> {
    let mut attributes = Vec::new();
    collect(record, &mut attributes);
    attributes.iter().map(|(k, v)| (*k, v.to_value())).collect()
}

/// Every attribute of the record (the `full` set), borrowed from it, appended to `out`.
pub fn collect<'a>(record: &'a Record, out: &mut Attrs<'a>) {
    visit(record, AttributeSet::Full, out);
}

/// Where [`visit`] hands a record's attributes, in order: a list, or a writer that
/// writes each as it comes (no list in between).
pub(crate) trait AttrSink<'a> {
    fn attr(&mut self, key: &'static str, value: Attr<'a>);
}

impl<'a> AttrSink<'a> for Attrs<'a> {
    #[inline(always)]
    fn attr(&mut self, key: &'static str, value: Attr<'a>) {
        self.push((key, value));
    }
}

/// Hands on the attributes its set keeps, and copies the ones the body shows.
struct Kept<'a, 'o, S> {
    set: AttributeSet,
    sink: &'o mut S,
    shown: ShownValues<'a>,
}

impl<'a, S: AttrSink<'a>> Kept<'a, '_, S> {
    /// Inlined at every call, whose key is a constant: whether the set keeps it, and
    /// whether the body shows it, are decided by the compiler, and a sink that writes
    /// (inlined too) writes the key as a constant.
    #[inline(always)]
    fn push(&mut self, key: &'static str, value: Attr<'a>) {
        if self.set.keeps(key) {
            self.shown.note(key, &value);
            self.sink.attr(key, value);
        }
    }
}

/// Hands the attributes of `set` of the record, borrowed from it, to `sink` in order
/// (one pass, nothing to filter after); returns the ones the body shows.
pub(crate) fn visit<'a, S: AttrSink<'a>>(
    record: &'a Record,
    set: AttributeSet,
    sink: &mut S,
) -> ShownValues<'a> {
    let mut out = Kept {
        set,
        sink,
        shown: ShownValues::default(),
    };
    let c = &record.connection;
    let p = &c.process;
    let ns = &c.namespaces;
    let destination: Attr = c.destination.ip().into();
    out.push(keys::EVENT, c.kind_str().into());
    out.push(semconv::PROCESS_PID, p.pid.into());
    out.push(semconv::PROCESS_PARENT_PID, p.parent_pid.into());
    out.push(semconv::PROCESS_VPID, p.vpid.into());
    out.push(semconv::PROCESS_EXECUTABLE_NAME, p.name.as_str().into());
    out.push(semconv::PROCESS_USER_ID, p.uid.into());
    out.push(keys::PROCESS_GROUP_ID, p.gid.into());
    out.push(semconv::THREAD_ID, p.tid.into());
    out.push(semconv::THREAD_NAME, p.thread_name.as_str().into());
    out.push(semconv::NETWORK_TRANSPORT, c.transport.as_str().into());
    out.push(semconv::NETWORK_TYPE, c.network_type().into());
    out.push(semconv::SOURCE_ADDRESS, c.source.ip().into());
    out.push(semconv::SOURCE_PORT, c.source.port().into());
    out.push(semconv::DESTINATION_ADDRESS, destination);
    out.push(semconv::DESTINATION_PORT, c.destination.port().into());
    out.push(keys::NAMESPACE_NET, ns.net.into());
    out.push(keys::NAMESPACE_UTS, ns.uts.into());
    out.push(keys::NAMESPACE_MNT, ns.mnt.into());
    out.push(keys::NAMESPACE_PID, ns.pid.into());
    out.push(keys::NAMESPACE_IPC, ns.ipc.into());
    out.push(keys::NAMESPACE_CGROUP, ns.cgroup.into());
    out.push(keys::UTS_NODENAME, c.nodename.as_str().into());
    out.push(keys::CGROUP_ID, c.cgroup.id.into());
    out.push(keys::CGROUP_LEAF_ID, c.cgroup.leaf_id.into());
    out.push(keys::CGROUP_LEAF_NAME, c.cgroup.leaf_name.as_str().into());
    out.push(
        keys::CGROUP_PARENT_NAME,
        c.cgroup.parent_name.as_str().into(),
    );
    out.push(keys::HOST_NETWORK, Attr::Bool(record.host_network));
    if let Some(lookup) = &c.dns {
        let a = &lookup.answer;
        out.push(semconv::DNS_QUESTION_NAME, a.name.as_str().into());
        out.push(
            keys::DNS_QUESTION_TYPE,
            match crate::dns::known_type_name(a.qtype) {
                Some(name) => Attr::Str(name),
                None => Attr::Inline(InlineText::of(a.qtype)),
            },
        );
        if lookup.unanswered {
            out.push(semconv::ERROR_TYPE, "timeout".into());
        } else {
            out.push(
                keys::DNS_RESPONSE_CODE,
                crate::dns::rcode_name(a.rcode).into(),
            );
        }
        out.push(semconv::DNS_ANSWERS, Attr::IpArray(&a.addresses));
        if !a.cname_chain.is_empty() {
            out.push(keys::DNS_CNAME_CHAIN, Attr::StrArray(&a.cname_chain));
        }
        out.push(
            keys::DNS_LOOKUP_DURATION,
            Attr::Double(seconds(lookup.latency_ns)),
        );
    } else if c.kind != egress_shared::EventKind::DnsAnswer {
        // The name the workload resolved, else the IP (semantic conventions); the
        // peer is always the IP and port.
        match &c.server {
            Some(server) => {
                out.push(semconv::SERVER_ADDRESS, (&*server.name).into());
                out.push(keys::DNS_MATCH, server.matched.as_str().into());
                if !server.cname_chain.is_empty() {
                    out.push(keys::DNS_CNAME_CHAIN, Attr::StrArray(&server.cname_chain));
                }
            }
            None => {
                out.push(semconv::SERVER_ADDRESS, destination);
                out.push(keys::DNS_MATCH, "none".into());
            }
        }
        out.push(semconv::SERVER_PORT, c.destination.port().into());
        out.push(semconv::NETWORK_PEER_ADDRESS, destination);
        out.push(semconv::NETWORK_PEER_PORT, c.destination.port().into());
    }
    if let Some(path) = &record.cgroup_path {
        out.push(keys::CGROUP_PATH, path.as_str().into());
    }
    if c.rate_limited_before > 0 {
        out.push(keys::RATE_LIMITED_BEFORE, c.rate_limited_before.into());
    }
    if c.aggregate.is_some() {
        out.push(keys::CONNECTION_COUNT, c.count.into());
    }
    if let Some(bytes) = c.udp_bytes {
        out.push(keys::UDP_BYTES_SENT, bytes.into());
    }
    if let Some(close) = &c.close {
        out.push(keys::CONNECTION_START, close.connect_unix_nano.into());
        out.push(
            keys::CONNECTION_DURATION,
            Attr::Double(seconds(close.duration_ns())),
        );
        if close.still_open {
            out.push(keys::OPEN_AT_SHUTDOWN, Attr::Bool(true));
        } else {
            out.push(keys::BYTES_SENT, close.bytes_sent.into());
            out.push(keys::BYTES_RECEIVED, close.bytes_received.into());
            if let Some(wire) = close.bytes_transmitted {
                out.push(keys::BYTES_TRANSMITTED, wire.into());
            }
            out.push(keys::RETRANSMITS, close.retransmits.into());
            out.push(keys::RTT, Attr::Double(f64::from(close.rtt_us) / 1e6));
        }
        if let Some(by) = close.reset {
            out.push(keys::RESET, by.into());
        }
        if let Some(error) = close.error_type {
            out.push(semconv::ERROR_TYPE, error.into());
        }
    } else if let Some(outcome) = &c.outcome {
        out.push(keys::CONNECTION_STATE, outcome.state.as_str().into());
        if let Some(error) = outcome.error_type {
            out.push(semconv::ERROR_TYPE, error.into());
        }
        if outcome.state.completion_seen() {
            out.push(
                keys::HANDSHAKE_DURATION,
                Attr::Double(seconds(outcome.handshake_ns)),
            );
            out.push(keys::SYN_RETRANSMITS, outcome.syn_retransmits.into());
        }
    }
    out.shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp::mapping::tests::{record, resource};

    fn borrowed(r: &Record) -> Attrs<'_> {
        let mut attributes = Vec::new();
        collect(r, &mut attributes);
        attributes
    }

    fn pod_resource() -> BTreeMap<&'static str, String> {
        let mut r = BTreeMap::new();
        r.insert(semconv::K8S_NAMESPACE_NAME, "payments".to_owned());
        r.insert(semconv::K8S_POD_NAME, "api-7c9d".to_owned());
        r.insert(semconv::K8S_CONTAINER_NAME, "api".to_owned());
        r.insert(semconv::CONTAINER_ID, "0123456789abcdef0123".to_owned());
        r
    }

    #[test]
    fn the_body_names_who_what_and_where_from_the_attributes() {
        let mut r = record(&resource("x"), 443);
        r.resource = std::sync::Arc::new(crate::enrich::Resource {
            attributes: pod_resource(),
        });
        r.connection.process.name = "python3".into();
        r.connection.process.pid = 4242;
        r.connection.destination = "52.94.233.129:443".parse().expect("addr");
        let (_, line) = select(&r, AttributeSet::Minimal);
        assert_eq!(
            line,
            "payments/api-7c9d (api) python3[4242] → 52.94.233.129:443 tcp"
        );

        // Outcome and name slot in by key: the name as the DNS join sets it.
        r.connection.server = Some(crate::dns::cache::ServerName {
            name: "api.stripe.com".into(),
            cname_chain: Arc::from([]),
            matched: crate::dns::cache::Match::Container,
        });
        let mut attributes = Vec::new();
        collect(&r, &mut attributes);
        attributes.push((semconv::ERROR_TYPE, "refused".into()));
        assert_eq!(
            body(&pod_resource(), &attributes),
            "payments/api-7c9d (api) python3[4242] → 52.94.233.129:443 (api.stripe.com) tcp refused"
        );
    }

    #[test]
    fn the_body_falls_back_to_container_then_host_and_brackets_ipv6() {
        let mut r = record(&resource("x"), 53);
        r.connection.destination = "[2001:db8::1]:53".parse().expect("addr");
        r.connection.transport = crate::events::Transport::Udp;
        let mut only_id = BTreeMap::new();
        only_id.insert(semconv::CONTAINER_ID, "0123456789abcdef0123".to_owned());
        assert_eq!(
            body(&only_id, &borrowed(&r)),
            "0123456789ab curl[42] → [2001:db8::1]:53 udp"
        );
        let mut host = BTreeMap::new();
        host.insert(semconv::HOST_NAME, "node-1".to_owned());
        r.connection.count = 7;
        r.connection.aggregate = Some(egress_shared::AggregateKey {
            tgid: 42,
            window: 1,
            family: 10,
            dst_port: 53,
            protocol: 17,
            kind: 0,
            _pad: [0; 2],
            dst_addr: [0; 16],
        });
        assert_eq!(
            body(&host, &borrowed(&r)),
            "node-1 curl[42] → [2001:db8::1]:53 udp ×7"
        );
    }

    #[test]
    fn each_set_is_a_subset_of_the_next_and_full_is_everything() {
        let r = record(&resource("x"), 443);
        let keys = |set| {
            select(&r, set)
                .0
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        let (minimal, default, full) = (
            keys(AttributeSet::Minimal),
            keys(AttributeSet::Default),
            keys(AttributeSet::Full),
        );
        assert_eq!(full.len(), of(&r).len());
        assert!(minimal.iter().all(|k| default.contains(k)));
        assert!(default.iter().all(|k| full.contains(k)));
        assert!(minimal.len() < default.len() && default.len() < full.len());
        for audit in [
            keys::EVENT,
            semconv::PROCESS_PID,
            semconv::PROCESS_EXECUTABLE_NAME,
            semconv::DESTINATION_ADDRESS,
            semconv::DESTINATION_PORT,
            semconv::NETWORK_TRANSPORT,
        ] {
            assert!(minimal.contains(&audit), "{audit} answers the audit");
        }
        for forensic in FORENSIC {
            assert!(!default.contains(forensic), "{forensic}");
        }
        assert_eq!("FULL".parse(), Ok(AttributeSet::Full));
        assert!("most".parse::<AttributeSet>().is_err());
    }
}
