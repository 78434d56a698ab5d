//! DNS in the reader: answers become `egress.dns` records and fill the name cache; each
//! connection is named from the cache of its container (or pod) as it is read, so an
//! answer always precedes the connections that use it (one ring buffer, in order).

use std::{collections::HashMap, net::IpAddr, time::Duration};

use egress_shared::EventKind;

use super::{
    clock,
    decode::{Connection, DnsLookup, RawDns},
    outcome::ConnectionState,
    text::Text,
};
use crate::config::settings::DnsSettings;
use crate::{
    cgroup_names::is_pod_component,
    dns::{
        self,
        cache::{Match, NameCache},
    },
    telemetry::events::{ReaderEvent, ReaderTelemetry},
};

type DedupKey = (u64, String, u16, u8);

/// A query waiting for its answer, by (socket, message id).
type QueryKey = (u64, u16);

/// A query with no answer this long is reported as unanswered.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Queries waiting at once; beyond it new ones are not followed (counted).
const MAX_PENDING_QUERIES: usize = 65_536;

/// An open connection named from the cache, by (socket, connect time).
type OpenKey = (u64, u64);

pub struct Names {
    settings: DnsSettings,
    cache: NameCache,
    reported: HashMap<DedupKey, u64>,
    open: HashMap<OpenKey, (u64, Option<Text>, IpAddr, Match)>,
    cache_full_seen: u64,
    /// Queries sent, until their answer (or the timeout): (record, sent at boot ns).
    queries: HashMap<QueryKey, (Connection, u64)>,
}

fn pod_of(connection: &Connection) -> Option<&str> {
    let parent = connection.cgroup.parent_name.as_str();
    is_pod_component(parent).then_some(parent)
}

impl Names {
    pub fn new(settings: DnsSettings) -> Self {
        Self {
            cache: NameCache::new(settings.cache),
            settings,
            reported: HashMap::new(),
            open: HashMap::new(),
            cache_full_seen: 0,
            queries: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// A DNS message read by a workload: its record (metrics only for a repeat of the
    /// same container/name/type/rcode in its window), or `None` for a message that does
    /// not parse (counted).
    pub fn answer(&mut self, raw: RawDns, telemetry: &ReaderTelemetry) -> Option<Connection> {
        if raw.truncated {
            telemetry.emit(ReaderEvent::DnsTruncated);
        }
        if raw.query {
            self.query(raw, telemetry);
            return None;
        }
        let answer = match dns::parse(&raw.payload, raw.tcp) {
            Ok(answer) => answer,
            Err(e) => {
                telemetry.emit(ReaderEvent::DnsAnswerUnparsed { reason: e.reason() });
                return None;
            }
        };
        telemetry.emit(ReaderEvent::DnsAnswer);
        let now = clock::boot_now_ns();
        let mut record = raw.head;
        self.queries.remove(&(record.outcome_sock(), answer.id));
        let pod = pod_of(&record);
        // No cgroup known (the reader's identity unknown, or its walk failed): the answer
        // names nothing, or it would name every such record's connections.
        if record.cgroup.leaf_id != 0 {
            self.cache.insert(record.cgroup.leaf_id, pod, &answer, now);
        }
        if self.cache.full > self.cache_full_seen {
            telemetry.emit(ReaderEvent::DnsCacheFull {
                names: self.cache.full - self.cache_full_seen,
            });
            self.cache_full_seen = self.cache.full;
        }
        let key = (
            record.cgroup.leaf_id,
            answer.name.clone(),
            answer.qtype,
            answer.rcode,
        );
        let window = self.settings.window.as_nanos() as u64;
        record.kind = EventKind::DnsAnswer;
        if let Some(last) = self.reported.get(&key)
            && now.saturating_sub(*last) < window
        {
            // A repeat in its window: counted in the metrics, not logged again.
            telemetry.emit(ReaderEvent::DnsDeduplicated);
            record.delivery = super::Delivery::MetricsOnly;
        } else {
            self.reported.insert(key, now);
        }
        record.dns = Some(Box::new(DnsLookup {
            answer,
            latency_ns: raw.latency_ns,
            unanswered: false,
        }));
        Some(record)
    }

    /// A query sent: followed until its answer, reported if none comes.
    fn query(&mut self, raw: RawDns, telemetry: &ReaderTelemetry) {
        let question = match dns::parse_query(&raw.payload, raw.tcp) {
            Ok(q) => q,
            Err(_) => {
                telemetry.emit(ReaderEvent::DnsQueryUnparsed);
                return;
            }
        };
        telemetry.emit(ReaderEvent::DnsQuery);
        if self.queries.len() >= MAX_PENDING_QUERIES {
            telemetry.emit(ReaderEvent::DnsQueryNotFollowed);
            return;
        }
        let mut record = raw.head;
        let key = (record.outcome_sock(), question.id);
        record.kind = EventKind::DnsAnswer;
        record.dns = Some(Box::new(DnsLookup {
            answer: question,
            latency_ns: 0,
            unanswered: true,
        }));
        self.queries.insert(key, (record, clock::boot_now_ns()));
    }

    /// Queries still waiting (at shutdown: neither answered nor timed out).
    pub fn pending_queries(&self) -> usize {
        self.queries.len()
    }

    /// Queries older than [`QUERY_TIMEOUT`] with no answer: their records.
    pub fn unanswered(&mut self) -> Vec<Connection> {
        let now = clock::boot_now_ns();
        let limit = QUERY_TIMEOUT.as_nanos() as u64;
        let expired: Vec<QueryKey> = self
            .queries
            .iter()
            .filter(|(_, (_, sent))| now.saturating_sub(*sent) >= limit)
            .map(|(k, _)| *k)
            .collect();
        let mut records = Vec::new();
        for key in expired {
            if let Some((mut record, sent)) = self.queries.remove(&key) {
                if let Some(lookup) = &mut record.dns {
                    lookup.latency_ns = now.saturating_sub(sent);
                }
                records.push(record);
            }
        }
        records
    }

    /// Names a connection (or folds a lookup's own flow): false drops the record. `now`
    /// (boot ns) is read once per batch by the caller, not per connection.
    pub fn connection(
        &mut self,
        connection: &mut Connection,
        now: u64,
        telemetry: &ReaderTelemetry,
    ) -> bool {
        if !self.settings.enabled {
            return true;
        }
        if matches!(connection.kind, EventKind::UdpSend | EventKind::UdpConnect)
            && connection.destination.port() == 53
            && !self.settings.keep_flows
        {
            telemetry.emit(ReaderEvent::DnsFlowFolded);
            return false;
        }
        if connection.cgroup.leaf_id == 0 {
            // No cgroup known: no answer is this workload's (see `answer`).
            return true;
        }
        let pod = pod_of(connection);
        let address = connection.destination.ip();
        let Some(server) = self
            .cache
            .lookup(connection.cgroup.leaf_id, pod, &address, now)
        else {
            return true;
        };
        if let Some(outcome) = &connection.outcome
            && outcome.state == ConnectionState::Established
            && self.settings.hold_open
        {
            let key = (outcome.sock_id, outcome.connect_boot_ns);
            self.cache.hold(
                connection.cgroup.leaf_id,
                pod,
                &address,
                server.matched,
                true,
            );
            let pod = pod.map(|_| connection.cgroup.parent_name.clone());
            self.open.insert(
                key,
                (connection.cgroup.leaf_id, pod, address, server.matched),
            );
        }
        connection.server = Some(server);
        true
    }

    /// A close: the connection no longer keeps its name alive.
    pub fn closed(&mut self, sock_id: u64, connect_ns: u64) {
        if let Some((container, pod, address, matched)) = self.open.remove(&(sock_id, connect_ns)) {
            self.cache.hold(
                container,
                pod.as_ref().map(Text::as_str),
                &address,
                matched,
                false,
            );
        }
    }

    /// Drops expired names and de-duplication entries (call now and then).
    pub fn expire(&mut self) {
        let now = clock::boot_now_ns();
        self.cache.expire(now);
        let window = self.settings.window.as_nanos() as u64;
        self.reported
            .retain(|_, last| now.saturating_sub(*last) < window);
    }
}
