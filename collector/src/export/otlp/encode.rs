//! OTLP logs requests written as protobuf straight from the records: no message structs,
//! no owned strings per attribute. Each workload's `Resource` is encoded once and reused
//! while its records come. The bytes are what `prost` encodes for the same request built
//! from [`super::mapping::logs_request`] (fields in the same order, defaults left out),
//! which the unit tests check record kind by record kind.

use std::{collections::HashMap, sync::Arc};

use super::mapping::{CLOSE_EVENT_NAME, DNS_EVENT_NAME, EVENT_NAME, SCOPE_NAME, SCOPE_VERSION};
use crate::{
    enrich::{Record, Resource},
    export::attributes::{Attr, AttrSink, AttributeSet, InlineText, Scratch, visit},
    otlp_client::transport::Encoded,
};

const LEN: u8 = 2;
const FIXED64: u8 = 1;
const VARINT: u8 = 0;

/// `SeverityNumber::Info`.
const SEVERITY_INFO: u64 = 9;
/// Resources encoded and kept beyond this many are dropped when no record holds them.
const KEEP_RESOURCES: usize = 1024;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3) | u64::from(wire));
}

/// A length-delimited field's size on the wire (single-byte tag).
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

#[inline(always)]
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The size of an `ArrayValue`'s content for an array attribute (0 for the others).
fn array_len(value: &Attr) -> usize {
    match value {
        Attr::StrArray(items) => items.iter().map(|s| len_field(len_field(s.len()))).sum(),
        Attr::IpArray(ips) => ips
            .iter()
            .map(|(ip, _)| len_field(len_field(InlineText::of(ip).as_str().len())))
            .sum(),
        _ => 0,
    }
}

/// The size of an `AnyValue`'s content holding `value`. Inlined, as [`any`] is, at each
/// of [`visit`]'s calls (through [`key_value`]), where the value's kind is known: only
/// its own arm is left.
#[inline(always)]
fn any_len(value: &Attr) -> usize {
    match value {
        Attr::Str(s) => len_field(s.len()),
        Attr::Inline(t) => len_field(t.as_str().len()),
        Attr::Int(n) => 1 + varint_len(*n as u64),
        Attr::Bool(_) => 2,
        Attr::Double(_) => 9,
        Attr::StrArray(_) | Attr::IpArray(_) => len_field(array_len(value)),
    }
}

/// An `AnyValue`'s content.
#[inline(always)]
fn any(out: &mut Vec<u8>, value: &Attr) {
    match value {
        Attr::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Attr::Inline(t) => bytes_field(out, 1, t.as_str().as_bytes()),
        Attr::Bool(b) => {
            key(out, 2, VARINT);
            out.push(u8::from(*b));
        }
        Attr::Int(n) => {
            key(out, 3, VARINT);
            varint(out, *n as u64);
        }
        Attr::Double(d) => {
            key(out, 4, FIXED64);
            out.extend_from_slice(&d.to_le_bytes());
        }
        Attr::StrArray(_) | Attr::IpArray(_) => {
            // ArrayValue { repeated AnyValue values = 1 }.
            key(out, 5, LEN);
            varint(out, array_len(value) as u64);
            let string = |out: &mut Vec<u8>, s: &str| {
                key(out, 1, LEN);
                varint(out, len_field(s.len()) as u64);
                bytes_field(out, 1, s.as_bytes());
            };
            match value {
                Attr::StrArray(items) => items.iter().for_each(|s| string(out, s)),
                Attr::IpArray(ips) => ips
                    .iter()
                    .for_each(|(ip, _)| string(out, InlineText::of(ip).as_str())),
                _ => {}
            }
        }
    }
}

/// Encodes each attribute as it is collected, a log record's `attributes` (field 6).
/// Inlined at each of [`visit`]'s calls, where the key and the value's kind are known.
struct KeyValues<'o> {
    out: &'o mut Vec<u8>,
}

impl<'a> AttrSink<'a> for KeyValues<'_> {
    #[inline(always)]
    fn attr(&mut self, key: &'static str, value: Attr<'a>) {
        key_value(self.out, 6, key, &value);
    }
}

/// A `KeyValue { key = 1, value = 2 }` as field `field` of its parent.
#[inline(always)]
fn key_value(out: &mut Vec<u8>, field: u32, name: &str, value: &Attr) {
    let value_len = any_len(value);
    key(out, field, LEN);
    varint(out, (len_field(name.len()) + len_field(value_len)) as u64);
    bytes_field(out, 1, name.as_bytes());
    key(out, 2, LEN);
    varint(out, value_len as u64);
    any(out, value);
}

/// A `Resource { repeated KeyValue attributes = 1 }`'s content.
pub fn encode_resource(attributes: &std::collections::BTreeMap<&'static str, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in attributes {
        key_value(&mut out, 1, name, &Attr::Str(value));
    }
    out
}

/// The `InstrumentationScope { name = 1, version = 2 }`'s content.
fn scope() -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, SCOPE_NAME.as_bytes());
    bytes_field(&mut out, 2, SCOPE_VERSION.as_bytes());
    out
}

/// The log records of one workload in the request being built.
struct Group {
    resource: Arc<Resource>,
    encoded_resource: Arc<[u8]>,
    /// `log_records` fields (key, length, `LogRecord`), one after the other.
    records: Vec<u8>,
    /// Where each record's `observed_time_unix_nano` value is in `records`.
    observed_at: Vec<usize>,
}

/// Builds one `ExportLogsServiceRequest` record by record: each record is encoded as it
/// comes (and can be dropped), the request is put together by [`LogsEncoder::finish`].
pub struct LogsEncoder {
    set: AttributeSet,
    groups: Vec<Group>,
    /// Groups of this request by resource address (different addresses can hold equal
    /// resources, a cache entry reloaded: they share a group).
    index: HashMap<usize, usize>,
    last: Option<(usize, usize)>,
    /// Encoded resources, kept across requests while records hold them.
    resources: HashMap<usize, (Arc<Resource>, Arc<[u8]>)>,
    scope: Vec<u8>,
    scratch: Scratch,
    /// The record's attributes, encoded.
    members: Vec<u8>,
    /// Groups' buffers kept for the next request.
    spare: Vec<(Vec<u8>, Vec<usize>)>,
    len: usize,
}

impl LogsEncoder {
    pub fn new(set: AttributeSet) -> Self {
        Self {
            set,
            groups: Vec::new(),
            index: HashMap::new(),
            last: None,
            resources: HashMap::new(),
            scope: scope(),
            scratch: Scratch::default(),
            members: Vec::new(),
            spare: Vec::new(),
            len: 0,
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn group(&mut self, resource: &Arc<Resource>) -> usize {
        let address = Arc::as_ptr(resource).addr();
        if let Some((last, slot)) = self.last
            && last == address
        {
            return slot;
        }
        let slot = match self.index.get(&address) {
            Some(&slot) => slot,
            None => {
                let slot = match self.groups.iter().position(|g| g.resource == *resource) {
                    Some(slot) => slot,
                    None => {
                        let encoded = match self.resources.get(&address) {
                            Some((_, encoded)) => Arc::clone(encoded),
                            None => {
                                let encoded: Arc<[u8]> =
                                    encode_resource(&resource.attributes).into();
                                self.resources
                                    .insert(address, (Arc::clone(resource), Arc::clone(&encoded)));
                                encoded
                            }
                        };
                        let (records, observed_at) = self.spare.pop().unwrap_or_default();
                        self.groups.push(Group {
                            resource: Arc::clone(resource),
                            encoded_resource: encoded,
                            records,
                            observed_at,
                        });
                        self.groups.len() - 1
                    }
                };
                self.index.insert(address, slot);
                slot
            }
        };
        self.last = Some((address, slot));
        slot
    }

    /// Encodes one log record (its attributes of the set, its body line), straight into
    /// its group: every part is known (or sized) before the first byte, so the record's
    /// length is written first and the record is not copied from a buffer of its own.
    pub fn push(&mut self, record: &Record) {
        let slot = self.group(&record.resource);
        // The attributes first (the body is made from them), written after it.
        self.members.clear();
        let shown = visit(
            record,
            self.set,
            &mut KeyValues {
                out: &mut self.members,
            },
        );
        self.scratch.write_body(record, &shown);
        let time = record.connection.time_unix_nano;
        let body = Attr::Str(&self.scratch.body);
        let body_len = any_len(&body);
        let event_name = if record.connection.dns.is_some() {
            DNS_EVENT_NAME
        } else if record.connection.close.is_some() {
            CLOSE_EVENT_NAME
        } else {
            EVENT_NAME
        };
        // Each field's tag is one byte.
        let len = if time != 0 { 9 } else { 0 }
            + 2
            + len_field(b"INFO".len())
            + len_field(body_len)
            + self.members.len()
            + 9
            + len_field(event_name.len());
        let group = &mut self.groups[slot];
        let out = &mut group.records;
        key(out, 2, LEN);
        varint(out, len as u64);
        let start = out.len();
        if time != 0 {
            key(out, 1, FIXED64);
            out.extend_from_slice(&time.to_le_bytes());
        }
        key(out, 2, VARINT);
        varint(out, SEVERITY_INFO);
        bytes_field(out, 3, b"INFO");
        key(out, 5, LEN);
        varint(out, body_len as u64);
        any(out, &body);
        out.extend_from_slice(&self.members);
        // observed_time_unix_nano: set when the request is finished. (prost writes the
        // fields in tag order.)
        key(out, 11, FIXED64);
        group.observed_at.push(out.len());
        out.extend_from_slice(&[0; 8]);
        bytes_field(out, 12, event_name.as_bytes());
        debug_assert_eq!(out.len() - start, len, "the record's length as computed");
        self.len += 1;
    }

    /// The request for the records pushed since the last call, observed at
    /// `observed_unix_nano`; the encoder is empty after. Its parts are each group's
    /// header (resource, scope) and the group's records as they were encoded: handed
    /// over, not copied into one buffer.
    pub fn finish(&mut self, observed_unix_nano: u64) -> Encoded {
        let mut parts = Vec::with_capacity(2 * self.groups.len());
        for mut group in self.groups.drain(..) {
            for &at in &group.observed_at {
                group.records[at..at + 8].copy_from_slice(&observed_unix_nano.to_le_bytes());
            }
            let scope_logs_len = len_field(self.scope.len()) + group.records.len();
            let resource_logs_len =
                len_field(group.encoded_resource.len()) + len_field(scope_logs_len);
            let mut head = Vec::with_capacity(
                resource_logs_len - group.records.len() + 2 * varint_len(u64::MAX),
            );
            key(&mut head, 1, LEN);
            varint(&mut head, resource_logs_len as u64);
            bytes_field(&mut head, 1, &group.encoded_resource);
            key(&mut head, 2, LEN);
            varint(&mut head, scope_logs_len as u64);
            bytes_field(&mut head, 1, &self.scope);
            parts.push(head.into());
            // The next request's buffer as large at once: growing it by doubling would
            // copy its records again.
            let grown = group.records.len();
            let records = std::mem::replace(&mut group.records, Vec::with_capacity(grown));
            parts.push(records.into());
            group.observed_at.clear();
            self.spare.push((group.records, group.observed_at));
        }
        self.index.clear();
        self.last = None;
        self.len = 0;
        if self.resources.len() > KEEP_RESOURCES {
            // Only the cache holds those: their workloads have no records in flight.
            self.resources
                .retain(|_, (resource, _)| Arc::strong_count(resource) > 1);
        }
        Encoded::from_parts(parts)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use prost::Message;

    use super::*;
    use crate::export::otlp::mapping::{
        logs_request,
        tests::{record, resource},
    };

    /// One record of every kind and shape the exporter writes.
    pub(crate) fn every_kind() -> Vec<Record> {
        use crate::{
            dns::{
                Answer,
                cache::{Match, ServerName},
            },
            events::{
                Transport,
                decode::DnsLookup,
                outcome::{Close, ConnectionState, Outcome},
            },
        };
        let (shop, cart) = (resource("shop"), resource("cart"));
        // Equal to `shop`, another allocation (a cache entry reloaded): the same group.
        let shop_again = Arc::new(Resource {
            attributes: shop.attributes.clone(),
        });
        let mut records = Vec::new();
        let plain = record(&shop, 443);
        records.push(plain.clone());
        let mut r = record(&cart, 80);
        r.connection.outcome = Some(Outcome {
            state: ConnectionState::Failed,
            error_type: Some("refused"),
            handshake_ns: 1_500_000,
            syn_retransmits: 2,
            sock_id: 1,
            connect_boot_ns: 2,
        });
        r.connection.server = Some(ServerName {
            name: "api.example.com".into(),
            cname_chain: ["edge.example.net".to_owned(), "x.cdn.example".to_owned()].into(),
            matched: Match::Pod,
        });
        r.cgroup_path = Some("/kubepods/pod\"x\"/abc".into());
        r.connection.rate_limited_before = 300;
        records.push(r);
        let mut r = record(&shop_again, 53);
        r.connection.transport = Transport::Udp;
        r.connection.destination = "[2001:db8::1]:53".parse().expect("addr");
        r.connection.source = "[::ffff:10.0.0.1]:5353".parse().expect("addr");
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
        r.connection.time_unix_nano = 0;
        r.host_network = true;
        records.push(r);
        let mut r = record(&cart, 8443);
        r.connection.kind = egress_shared::EventKind::TcpClose;
        r.connection.close = Some(Box::new(Close {
            connect_unix_nano: 1_699_999_999_000_000_000,
            established_unix_nano: 1_699_999_999_100_000_000,
            close_unix_nano: 1_700_000_000_000_000_000,
            bytes_sent: 1 << 40,
            bytes_received: 0,
            bytes_transmitted: Some(12_345),
            retransmits: 3,
            rtt_us: 250,
            reset: Some("peer"),
            error_type: Some("reset"),
            still_open: false,
        }));
        records.push(r.clone());
        if let Some(close) = &mut r.connection.close {
            close.still_open = true;
            close.bytes_transmitted = None;
        }
        r.connection.process.name = "ünïcode\u{1}\n".into();
        r.connection.nodename = Default::default();
        records.push(r);
        for (qtype, unanswered, addresses) in [
            (
                1,
                false,
                vec![
                    ("1.2.3.4".parse().expect("ip"), 30),
                    ("5.6.7.8".parse().expect("ip"), 60),
                ],
            ),
            (999, true, Vec::new()),
            (28, false, vec![("2001:db8::5".parse().expect("ip"), 300)]),
        ] {
            let mut r = record(&shop, 53);
            r.connection.kind = egress_shared::EventKind::DnsAnswer;
            r.connection.transport = Transport::Udp;
            r.connection.dns = Some(Box::new(DnsLookup {
                answer: Answer {
                    id: 7,
                    name: "example.com".into(),
                    qtype,
                    rcode: 3,
                    addresses,
                    cname_chain: if unanswered {
                        Vec::new()
                    } else {
                        vec!["a.example".into()]
                    },
                },
                latency_ns: 2_000_000,
                unanswered,
            }));
            records.push(r);
        }
        let mut r = plain;
        r.connection.outcome = Some(Outcome {
            state: ConnectionState::Pending,
            error_type: None,
            handshake_ns: 0,
            syn_retransmits: 0,
            sock_id: 1,
            connect_boot_ns: 2,
        });
        r.resource = Arc::new(Resource {
            attributes: Default::default(),
        });
        records.push(r);
        records
    }

    /// Equal, or where they part (not the whole request).
    fn same(ours: &[u8], theirs: &[u8], set: AttributeSet) {
        if let Some(at) = (0..ours.len().min(theirs.len())).find(|&i| ours[i] != theirs[i]) {
            let around = |b: &[u8]| b[at.saturating_sub(16)..(at + 16).min(b.len())].to_vec();
            panic!(
                "{set:?}: byte {at} differs: ours {:?}, prost's {:?}",
                around(ours),
                around(theirs)
            );
        }
        assert_eq!(ours.len(), theirs.len(), "{set:?}: lengths");
    }

    #[test]
    fn the_request_is_byte_for_byte_what_prost_encodes() {
        let records = every_kind();
        for set in [
            AttributeSet::Minimal,
            AttributeSet::Default,
            AttributeSet::Full,
        ] {
            let mut encoder = LogsEncoder::new(set);
            // Twice: the second request reuses every buffer and the kept resources.
            for observed in [1_700_000_000_500_000_000, 1_700_000_001_000_000_000] {
                for r in &records {
                    encoder.push(r);
                }
                assert_eq!(encoder.len(), records.len());
                let ours = encoder.finish(observed).contiguous();
                let theirs = logs_request(&records, observed, set).encode_to_vec();
                same(&ours, &theirs, set);
                assert!(encoder.is_empty());
            }
            // One record at a time, each its own request.
            for r in &records {
                encoder.push(r);
                let one = std::slice::from_ref(r);
                same(
                    &encoder.finish(5).contiguous(),
                    &logs_request(one, 5, set).encode_to_vec(),
                    set,
                );
            }
        }
    }

    #[test]
    fn encoding_a_record_allocates_nothing_once_the_buffers_have_grown() {
        let shop = resource("shop");
        let r = record(&shop, 443);
        let mut encoder = LogsEncoder::new(AttributeSet::Full);
        // Two requests grow the buffers (the first keeps its group's for the second).
        for _ in 0..2 {
            for _ in 0..100 {
                encoder.push(&r);
            }
            encoder.finish(1);
        }
        let before = crate::alloc_counting::allocations();
        for _ in 0..100 {
            encoder.push(&r);
        }
        // Putting the request together allocates it (once per request, not per record).
        assert_eq!(crate::alloc_counting::allocations() - before, 0);
        encoder.finish(1);
    }

    #[test]
    fn an_empty_request_has_no_resource_logs() {
        let mut encoder = LogsEncoder::new(AttributeSet::Default);
        assert!(encoder.finish(1).is_empty());
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
