//! Metrics of how TCP connections went, per workload: handshake and connection
//! durations (histograms, seconds) and payload bytes each way (`egress.network.io`).

use std::{collections::HashMap, net::IpAddr};

use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, metric,
    number_data_point,
};
use opentelemetry_semantic_conventions::attribute as semconv;

use super::mapping::{MAX_SERIES_PER_RESOURCE, cumulative_sum, key_value};
use crate::{
    enrich::Record,
    export::attributes::{Value, seconds},
    fast_hash::FastHash,
};

pub const HANDSHAKE_METRIC: &str = "egress.tcp.handshake.duration";
pub const DURATION_METRIC: &str = "egress.tcp.connection.duration";
pub const IO_METRIC: &str = "egress.network.io";

/// Bucket bounds (s): a handshake is sub-millisecond on a LAN, one RTO (1 s) or more
/// when a SYN is lost, ~127 s when the kernel gives up.
const HANDSHAKE_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];
/// Bucket bounds (s): from a request/response to a long-lived stream.
const DURATION_BOUNDS: [f64; 12] = [
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
];

#[derive(Debug, Clone)]
pub(crate) struct Buckets {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Buckets {
    pub(crate) fn new(bounds: &[f64]) -> Self {
        Self {
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    pub(crate) fn record(&mut self, bounds: &[f64], value: f64) {
        let slot = bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(bounds.len());
        self.counts[slot] += 1;
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HandshakeKey {
    port: u16,
    address: Option<IpAddr>,
    error_type: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PortKey {
    port: u16,
    address: Option<IpAddr>,
}

/// One workload's series.
#[derive(Default)]
pub struct Lifecycle {
    handshakes: HashMap<HandshakeKey, Buckets, FastHash>,
    durations: HashMap<PortKey, Buckets, FastHash>,
    /// (transmit, receive) payload bytes.
    io: HashMap<PortKey, (u64, u64), FastHash>,
    /// UDP payload bytes sent, carried by flow records.
    udp_sent: HashMap<PortKey, u64, FastHash>,
    /// Observations beyond the series limit (counted, not kept).
    pub overflow: u64,
}

impl Lifecycle {
    fn full(&self) -> bool {
        self.handshakes.len() + self.durations.len() + self.io.len() + self.udp_sent.len()
            >= MAX_SERIES_PER_RESOURCE
    }

    /// A TCP attempt's completion, a close, or a UDP flow record's bytes.
    pub fn record(&mut self, record: &Record, include_address: bool) {
        let c = &record.connection;
        let port = c.destination.port();
        let address = include_address.then(|| c.destination.ip());
        if let Some(bytes) = c.udp_bytes {
            let key = PortKey { port, address };
            if !self.udp_sent.contains_key(&key) && self.full() {
                self.overflow += 1;
                return;
            }
            *self.udp_sent.entry(key).or_default() += bytes;
        } else if let Some(close) = &c.close {
            if close.still_open {
                return;
            }
            let key = PortKey { port, address };
            if !self.durations.contains_key(&key) && self.full() {
                self.overflow += 1;
                return;
            }
            self.durations
                .entry(key.clone())
                .or_insert_with(|| Buckets::new(&DURATION_BOUNDS))
                .record(&DURATION_BOUNDS, seconds(close.duration_ns()));
            let io = self.io.entry(key).or_default();
            io.0 += close.bytes_sent;
            io.1 += close.bytes_received;
        } else if let Some(outcome) = &c.outcome {
            // A pending attempt's or an unseen completion's handshake is not known.
            if !outcome.state.completion_seen() {
                return;
            }
            let key = HandshakeKey {
                port,
                address,
                error_type: outcome.error_type,
            };
            let seconds = seconds(outcome.handshake_ns);
            // One lookup for a series already kept (nearly every record).
            if let Some(buckets) = self.handshakes.get_mut(&key) {
                buckets.record(&HANDSHAKE_BOUNDS, seconds);
            } else if self.full() {
                self.overflow += 1;
            } else {
                let mut buckets = Buckets::new(&HANDSHAKE_BOUNDS);
                buckets.record(&HANDSHAKE_BOUNDS, seconds);
                self.handshakes.insert(key, buckets);
            }
        }
    }

    pub fn metrics(&self, start: u64, now: u64) -> Vec<Metric> {
        let transport_attributes = |transport: &'static str, port: u16, address: Option<IpAddr>| {
            let mut attributes = vec![
                key_value(semconv::NETWORK_TRANSPORT, transport.into()),
                key_value(semconv::DESTINATION_PORT, port.into()),
            ];
            if let Some(address) = address {
                attributes.push(key_value(
                    semconv::DESTINATION_ADDRESS,
                    address.to_string().into(),
                ));
            }
            attributes
        };
        let port_attributes =
            |port: u16, address: Option<IpAddr>| transport_attributes("tcp", port, address);
        let mut metrics = Vec::new();
        if !self.handshakes.is_empty() {
            let points = self
                .handshakes
                .iter()
                .map(|(key, buckets)| {
                    let mut attributes = port_attributes(key.port, key.address);
                    if let Some(error) = key.error_type {
                        attributes.push(key_value(semconv::ERROR_TYPE, error.into()));
                    }
                    histogram_point(attributes, buckets, &HANDSHAKE_BOUNDS, start, now)
                })
                .collect();
            metrics.push(histogram(
                HANDSHAKE_METRIC,
                "TCP handshakes: SYN_SENT to ESTABLISHED, or to the failure.",
                points,
            ));
        }
        if !self.durations.is_empty() {
            let points = self
                .durations
                .iter()
                .map(|(key, buckets)| {
                    histogram_point(
                        port_attributes(key.port, key.address),
                        buckets,
                        &DURATION_BOUNDS,
                        start,
                        now,
                    )
                })
                .collect();
            metrics.push(histogram(
                DURATION_METRIC,
                "TCP connections: ESTABLISHED to CLOSE.",
                points,
            ));
        }
        if !self.io.is_empty() || !self.udp_sent.is_empty() {
            let mut points = Vec::new();
            for (key, sent) in &self.udp_sent {
                let mut attributes = transport_attributes("udp", key.port, key.address);
                attributes.push(key_value(
                    semconv::NETWORK_IO_DIRECTION,
                    Value::Str("transmit".into()),
                ));
                points.push(NumberDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsInt(*sent as i64)),
                    ..Default::default()
                });
            }
            for (key, (sent, received)) in &self.io {
                for (direction, bytes) in [("transmit", sent), ("receive", received)] {
                    let mut attributes = port_attributes(key.port, key.address);
                    attributes.push(key_value(
                        semconv::NETWORK_IO_DIRECTION,
                        Value::Str(direction.into()),
                    ));
                    points.push(NumberDataPoint {
                        attributes,
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsInt(*bytes as i64)),
                        ..Default::default()
                    });
                }
            }
            metrics.push(cumulative_sum(
                IO_METRIC,
                "Payload bytes: TCP each way at each close, UDP sent as flow records carry it.",
                "By",
                points,
            ));
        }
        metrics
    }
}

pub(crate) fn histogram_point(
    attributes: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
    buckets: &Buckets,
    bounds: &[f64],
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: buckets.count,
        sum: Some(buckets.sum),
        bucket_counts: buckets.counts.clone(),
        explicit_bounds: bounds.to_vec(),
        min: Some(buckets.min),
        max: Some(buckets.max),
        ..Default::default()
    }
}

pub(crate) fn histogram(
    name: &str,
    description: &str,
    data_points: Vec<HistogramDataPoint>,
) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: "s".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    }
}

pub const DNS_QUERIES_METRIC: &str = "egress.dns.queries";
pub const DNS_DURATION_METRIC: &str = "dns.lookup.duration";
/// Bucket bounds (s): a node-local cache answers in well under a millisecond, a
/// resolver across the network in milliseconds, a retried query in seconds.
const DNS_BOUNDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// One workload's DNS answers: counted by response code, and their latency.
#[derive(Default)]
pub struct DnsMetrics {
    by_rcode: HashMap<&'static str, (u64, Buckets)>,
}

impl DnsMetrics {
    pub fn record(&mut self, lookup: &crate::events::decode::DnsLookup) {
        let rcode = if lookup.unanswered {
            "TIMEOUT"
        } else {
            crate::dns::rcode_name(lookup.answer.rcode)
        };
        let entry = self
            .by_rcode
            .entry(rcode)
            .or_insert_with(|| (0, Buckets::new(&DNS_BOUNDS)));
        entry.0 += 1;
        entry.1.record(&DNS_BOUNDS, seconds(lookup.latency_ns));
    }

    pub fn metrics(&self, start: u64, now: u64) -> Vec<Metric> {
        if self.by_rcode.is_empty() {
            return Vec::new();
        }
        let attributes = |rcode: &str| {
            vec![key_value(
                super::super::attributes::keys::DNS_RESPONSE_CODE,
                rcode.into(),
            )]
        };
        let counts = self
            .by_rcode
            .iter()
            .map(|(rcode, (n, _))| NumberDataPoint {
                attributes: attributes(rcode),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(*n as i64)),
                ..Default::default()
            })
            .collect();
        let durations = self
            .by_rcode
            .iter()
            .map(|(rcode, (_, buckets))| {
                histogram_point(attributes(rcode), buckets, &DNS_BOUNDS, start, now)
            })
            .collect();
        vec![
            cumulative_sum(
                DNS_QUERIES_METRIC,
                "DNS answers the workload received, by response code (repeats that were not logged again included).",
                "{answer}",
                counts,
            ),
            histogram(
                DNS_DURATION_METRIC,
                "From the query (or the socket's connect) to the answer's read.",
                durations,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::outcome::{Close, ConnectionState, Outcome};
    use crate::export::otlp::mapping::tests::{record, resource};

    #[test]
    fn handshakes_durations_and_bytes_per_port() {
        let shop = resource("shop");
        let mut lifecycle = Lifecycle::default();
        let mut attempt = record(&shop, 443);
        attempt.connection.outcome = Some(Outcome {
            state: ConnectionState::Failed,
            error_type: Some("refused"),
            handshake_ns: 2_000_000,
            syn_retransmits: 0,
            sock_id: 1,
            connect_boot_ns: 1,
        });
        lifecycle.record(&attempt, false);
        let mut close = record(&shop, 443);
        close.connection.close = Some(Box::new(Close {
            connect_unix_nano: 0,
            established_unix_nano: 1_000_000_000,
            close_unix_nano: 3_000_000_000,
            bytes_sent: 100,
            bytes_received: 7,
            bytes_transmitted: None,
            retransmits: 0,
            rtt_us: 10,
            reset: None,
            error_type: None,
            still_open: false,
        }));
        lifecycle.record(&close, false);
        lifecycle.record(&close, false);
        let metrics = lifecycle.metrics(0, 1);
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, [HANDSHAKE_METRIC, DURATION_METRIC, IO_METRIC]);
        let Some(metric::Data::Histogram(h)) = &metrics[0].data else {
            panic!("histogram")
        };
        assert_eq!(h.data_points[0].count, 1);
        assert_eq!(h.data_points[0].sum, Some(0.002));
        let Some(metric::Data::Histogram(d)) = &metrics[1].data else {
            panic!("histogram")
        };
        assert_eq!(
            (d.data_points[0].count, d.data_points[0].sum),
            (2, Some(4.0))
        );
        let Some(metric::Data::Sum(io)) = &metrics[2].data else {
            panic!("sum")
        };
        let mut values: Vec<i64> = io
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => v,
                _ => -1,
            })
            .collect();
        values.sort();
        assert_eq!(values, [14, 200]);
    }

    #[test]
    fn udp_flow_records_add_their_bytes_to_udp_transmit() {
        let shop = resource("shop");
        let mut lifecycle = Lifecycle::default();
        let mut flow = record(&shop, 53);
        flow.connection.udp_bytes = Some(40);
        lifecycle.record(&flow, false);
        flow.connection.udp_bytes = Some(2);
        lifecycle.record(&flow, false);
        let metrics = lifecycle.metrics(0, 1);
        assert_eq!(metrics.len(), 1);
        let Some(metric::Data::Sum(io)) = &metrics[0].data else {
            panic!("sum")
        };
        let [point] = io.data_points.as_slice() else {
            panic!("one point: {:?}", io.data_points)
        };
        assert_eq!(point.value, Some(number_data_point::Value::AsInt(42)));
        let text = |key: &str| {
            point
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| format!("{:?}", kv.value))
        };
        assert!(text("network.transport").is_some_and(|v| v.contains("\"udp\"")));
        assert!(text("network.io.direction").is_some_and(|v| v.contains("\"transmit\"")));
    }
}
