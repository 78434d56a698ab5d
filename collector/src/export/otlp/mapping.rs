//! Records to OTLP: one log record per connection, grouped into one `ResourceLogs` per
//! workload; `egress.connections` cumulative sums per workload; the collector's own health.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric, number_data_point,
    },
    resource::v1::Resource as ProtoResource,
};
use opentelemetry_semantic_conventions::attribute as semconv;

use super::lifecycle::Lifecycle;
use crate::{
    enrich::{Record, Resource},
    export::attributes::{self, AttributeSet, Value},
    fast_hash::FastHash,
};

pub const EVENT_NAME: &str = "egress.connection";
/// Close records (`--close-records`).
pub const CLOSE_EVENT_NAME: &str = "egress.connection.close";
/// A DNS answer a workload received (docs/dns.md).
pub const DNS_EVENT_NAME: &str = "egress.dns";
pub const CONNECTIONS_METRIC: &str = "egress.connections";
pub(crate) const SCOPE_NAME: &str = "egress-collector";
pub(crate) const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Series beyond this many per workload go to one overflow series (OpenTelemetry's
/// cardinality limit convention), so a port scan cannot exhaust memory.
pub const MAX_SERIES_PER_RESOURCE: usize = 2000;
const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

fn any(value: Value) -> AnyValue {
    AnyValue {
        value: Some(match value {
            Value::Str(s) => any_value::Value::StringValue(s),
            Value::Int(i) => any_value::Value::IntValue(i),
            Value::Bool(b) => any_value::Value::BoolValue(b),
            Value::Double(d) => any_value::Value::DoubleValue(d),
            Value::StrArray(items) => {
                any_value::Value::ArrayValue(opentelemetry_proto::tonic::common::v1::ArrayValue {
                    values: items.into_iter().map(|s| any(Value::Str(s))).collect(),
                })
            }
        }),
    }
}

pub fn key_value(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(any(value)),
        ..Default::default()
    }
}

pub fn proto_resource(attributes: &BTreeMap<&'static str, String>) -> ProtoResource {
    ProtoResource {
        attributes: attributes
            .iter()
            .map(|(k, v)| key_value(k, Value::Str(v.clone())))
            .collect(),
        ..Default::default()
    }
}

pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.into(),
        version: SCOPE_VERSION.into(),
        ..Default::default()
    }
}

/// One log record: the attributes of `set`, and a one-line body built from all of them
/// (what log views such as Loki show as the line).
pub fn log_record(record: &Record, observed_unix_nano: u64, set: AttributeSet) -> LogRecord {
    let (attributes, body) = attributes::select(record, set);
    LogRecord {
        time_unix_nano: record.connection.time_unix_nano,
        observed_time_unix_nano: observed_unix_nano,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        event_name: if record.connection.dns.is_some() {
            DNS_EVENT_NAME.into()
        } else if record.connection.close.is_some() {
            CLOSE_EVENT_NAME.into()
        } else {
            EVENT_NAME.into()
        },
        body: Some(any(Value::Str(body))),
        attributes: attributes
            .into_iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        ..Default::default()
    }
}

/// One request for a batch: records of one workload share one `ResourceLogs`. The
/// exporter writes the same bytes without building it ([`super::encode::LogsEncoder`]);
/// this is the reference that encoder is checked against.
pub fn logs_request(
    batch: &[Record],
    observed_unix_nano: u64,
    set: AttributeSet,
) -> ExportLogsServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<LogRecord>)> = Vec::new();
    let mut index: HashMap<*const Resource, usize> = HashMap::new();
    for record in batch {
        let slot = *index
            .entry(Arc::as_ptr(&record.resource))
            .or_insert_with(|| {
                // Different Arcs can hold equal resources (a cache entry reloaded): merge them.
                groups
                    .iter()
                    .position(|(r, _)| r == &record.resource)
                    .unwrap_or_else(|| {
                        groups.push((Arc::clone(&record.resource), Vec::new()));
                        groups.len() - 1
                    })
            });
        groups[slot]
            .1
            .push(log_record(record, observed_unix_nano, set));
    }
    ExportLogsServiceRequest {
        resource_logs: groups
            .into_iter()
            .map(|(resource, log_records)| ResourceLogs {
                resource: Some(proto_resource(&resource.attributes)),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// The attributes a connection counts under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    transport: &'static str,
    network_type: &'static str,
    port: u16,
    address: Option<IpAddr>,
    /// `server.address` (with `--metrics-server-address`): the resolved name, the IP,
    /// or `~other` beyond the cap of names per workload.
    server: Option<String>,
    /// TCP attempts that failed; absent on success and for UDP.
    error_type: Option<&'static str>,
}

struct Series {
    counts: HashMap<SeriesKey, u64, FastHash>,
    overflow: u64,
    /// Distinct `server.address` values so far (capped).
    names: std::collections::HashSet<String, FastHash>,
    /// When these counts began (a workload's series started again after an eviction
    /// begins later than the one that ended).
    start_unix_nano: u64,
    departure: Departure,
    /// When the container went, in departure order (to drop the oldest first when too
    /// many gone series wait for an export that succeeds).
    gone_order: u64,
}

/// The value beyond the cap of distinct names per workload.
pub const OTHER_SERVER: &str = "~other";

/// Where a workload's series is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    /// The container is there (or not known to be gone).
    Present,
    /// The container is gone; the series must be exported once more (a record arriving
    /// now puts it back here).
    Gone,
    /// Gone, and exported successfully since with no record after: the next successful
    /// export is its last.
    Final,
}

/// Cumulative connection counts per workload since the collector started (or since the
/// workload's series last ended: see [`ConnectionCounts::container_gone`]), and the
/// metrics of how TCP connections went ([`Lifecycle`]), which end with them.
pub struct ConnectionCounts {
    /// The start time of series created from now on.
    start_unix_nano: u64,
    include_address: bool,
    series: HashMap<Arc<Resource>, Series>,
    lifecycle: HashMap<Arc<Resource>, Lifecycle>,
    dns: HashMap<Arc<Resource>, super::lifecycle::DnsMetrics>,
    /// Cap of distinct `server.address` values per workload; `None` leaves it out.
    server_names: Option<usize>,
    /// Containers gone lately, with the exports left before they are forgotten: a record
    /// still in the pipeline when its container went starts a series that ends too.
    recently_gone: HashMap<String, u8>,
    /// Departures so far (orders gone series).
    departures: u64,
    /// At most this many gone workloads are kept waiting for a successful export.
    max_gone: usize,
}

/// How many exports a departure is remembered for records still in flight.
const REMEMBER_GONE_EXPORTS: u8 = 3;
/// Gone workloads kept during an endpoint outage, waiting to export their last counts:
/// beyond this the oldest are dropped (counted), so an outage cannot grow memory for good.
pub const MAX_GONE_WORKLOADS: usize = 4096;

impl ConnectionCounts {
    pub fn new(start_unix_nano: u64, include_address: bool) -> Self {
        Self {
            start_unix_nano,
            include_address,
            series: HashMap::new(),
            lifecycle: HashMap::new(),
            dns: HashMap::new(),
            server_names: None,
            recently_gone: HashMap::new(),
            departures: 0,
            max_gone: MAX_GONE_WORKLOADS,
        }
    }

    /// Keeps at most `max_gone` gone workloads waiting for a successful export.
    pub fn with_max_gone(mut self, max_gone: usize) -> Self {
        self.max_gone = max_gone;
        self
    }

    /// How many workloads have a series.
    pub fn workloads(&self) -> usize {
        self.series.len()
    }

    /// The container `id` is gone: its series is exported by the next two exports that
    /// succeed (its last counts, once more to let records still in the pipeline arrive),
    /// then ends. Returns how many gone workloads were dropped unexported to stay within
    /// the bound (an outage that outlasts [`MAX_GONE_WORKLOADS`] departures).
    pub fn container_gone(&mut self, id: &str) -> usize {
        self.recently_gone
            .insert(id.to_owned(), REMEMBER_GONE_EXPORTS);
        self.departures += 1;
        let order = self.departures;
        for (resource, series) in &mut self.series {
            if resource
                .attributes
                .get(semconv::CONTAINER_ID)
                .map(String::as_str)
                == Some(id)
                && series.departure == Departure::Present
            {
                series.departure = Departure::Gone;
                series.gone_order = order;
            }
        }
        self.bound_gone()
    }

    /// Drops the oldest gone series beyond `max_gone`; returns how many.
    fn bound_gone(&mut self) -> usize {
        let gone = self
            .series
            .values()
            .filter(|s| s.departure != Departure::Present)
            .count();
        if gone <= self.max_gone {
            return 0;
        }
        let mut orders: Vec<u64> = (self.series.values())
            .filter(|s| s.departure != Departure::Present)
            .map(|s| s.gone_order)
            .collect();
        orders.sort_unstable();
        let excess = gone - self.max_gone;
        let cut = orders[excess - 1];
        let before = self.series.len();
        let mut left = excess;
        self.series.retain(|_, s| {
            if left > 0 && s.departure != Departure::Present && s.gone_order <= cut {
                left -= 1;
                false
            } else {
                true
            }
        });
        before - self.series.len()
    }

    /// Call at each export interval, whether the export succeeded or not: departures are
    /// remembered for records still in flight for a few intervals.
    pub fn interval_passed(&mut self) {
        self.recently_gone.retain(|_, left| {
            *left -= 1;
            *left > 0
        });
    }

    /// Call after an export of [`Self::resource_metrics`] that the endpoint accepted, and
    /// only then (with no other export taken in between): ends the series of containers
    /// gone that two successful exports carried with no record in between; returns how
    /// many. A record for the workload after that starts a new series, with a later start
    /// time.
    pub fn exported(&mut self, now: u64) -> usize {
        let before = self.series.len();
        self.series
            .retain(|_, series| series.departure != Departure::Final);
        let ended = before - self.series.len();
        let series = &self.series;
        self.lifecycle
            .retain(|resource, _| series.contains_key(resource));
        // A gone container's DNS counts end after an export that succeeded carried them
        // (this one), as its connection series do.
        let recently_gone = &self.recently_gone;
        self.dns.retain(|resource, _| {
            series.contains_key(resource)
                || !resource
                    .attributes
                    .get(semconv::CONTAINER_ID)
                    .is_some_and(|id| recently_gone.contains_key(id))
        });
        for series in self.series.values_mut() {
            if series.departure == Departure::Gone {
                series.departure = Departure::Final;
            }
        }
        if ended > 0 {
            self.start_unix_nano = now;
        }
        ended
    }

    /// Counts `egress.connections` per `server.address` too, at most `cap` names per
    /// workload (the rest as `~other`).
    pub fn with_server_address(mut self, cap: Option<usize>) -> Self {
        self.server_names = cap;
        self
    }

    pub fn record(&mut self, record: &Record) {
        self.record_run(&record.resource, [record]);
    }

    /// Every record of `records` that counts in the metrics ([`Connection::counted`]).
    /// Each run of records of one workload looks its series up once, not once per record.
    ///
    /// [`Connection::counted`]: crate::events::Connection::counted
    pub fn record_counted(&mut self, records: &[Record]) {
        for run in records.chunk_by(|a, b| Arc::ptr_eq(&a.resource, &b.resource)) {
            let counted = run.iter().filter(|r| r.connection.counted());
            self.record_run(&run[0].resource, counted);
        }
    }

    /// Records whose resource is `resource`.
    fn record_run<'r>(
        &mut self,
        resource: &Arc<Resource>,
        records: impl IntoIterator<Item = &'r Record>,
    ) {
        // Each entry looked up at the run's first record that needs it.
        let (mut run_dns, mut run_lifecycle, mut run_series) = (None, None, None);
        for record in records {
            let c = &record.connection;
            if let Some(lookup) = &c.dns {
                // A DNS answer is not a connection.
                if run_dns.is_none() {
                    run_dns = Some(self.dns.entry(Arc::clone(resource)).or_default());
                }
                if let Some(dns) = &mut run_dns {
                    dns.record(lookup);
                }
                continue;
            }
            if c.outcome.is_some() || c.close.is_some() || c.udp_bytes.is_some() {
                if run_lifecycle.is_none() {
                    run_lifecycle = Some(self.lifecycle.entry(Arc::clone(resource)).or_default());
                }
                if let Some(lifecycle) = &mut run_lifecycle {
                    lifecycle.record(record, self.include_address);
                }
            }
            if c.close.is_some() {
                // A close is not a connection attempt.
                continue;
            }
            if run_series.is_none() {
                let (start_unix_nano, recently_gone) = (self.start_unix_nano, &self.recently_gone);
                let order = self.departures;
                let series = self.series.entry(Arc::clone(resource)).or_insert_with(|| {
                    let gone = (resource.attributes.get(semconv::CONTAINER_ID))
                        .is_some_and(|id| recently_gone.contains_key(id));
                    Series {
                        counts: HashMap::default(),
                        overflow: 0,
                        names: std::collections::HashSet::default(),
                        start_unix_nano,
                        departure: if gone {
                            Departure::Gone
                        } else {
                            Departure::Present
                        },
                        gone_order: order,
                    }
                });
                run_series = Some(series);
            }
            let Some(series) = run_series.as_deref_mut() else {
                continue;
            };
            if series.departure == Departure::Final {
                series.departure = Departure::Gone;
            }
            let server = self.server_names.map(|cap| {
                let name = c
                    .server
                    .as_ref()
                    .map_or_else(|| c.destination.ip().to_string(), |s| s.name.to_string());
                if series.names.contains(&name) {
                    name
                } else if series.names.len() < cap {
                    series.names.insert(name.clone());
                    name
                } else {
                    OTHER_SERVER.to_owned()
                }
            });
            let key = SeriesKey {
                transport: c.transport.as_str(),
                network_type: c.network_type(),
                port: c.destination.port(),
                address: self.include_address.then(|| c.destination.ip()),
                server,
                error_type: c.outcome.and_then(|o| o.error_type),
            };
            if let Some(count) = series.counts.get_mut(&key) {
                *count += c.count;
            } else if series.counts.len() < MAX_SERIES_PER_RESOURCE {
                series.counts.insert(key, c.count);
            } else {
                series.overflow += c.count;
            }
        }
    }

    fn points(&self, series: &Series, now: u64) -> Vec<NumberDataPoint> {
        let point = |attributes: Vec<KeyValue>, count: u64| NumberDataPoint {
            attributes,
            start_time_unix_nano: series.start_unix_nano,
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsInt(count as i64)),
            ..Default::default()
        };
        let mut points: Vec<NumberDataPoint> = series
            .counts
            .iter()
            .map(|(key, &count)| {
                let mut attributes = vec![
                    key_value(semconv::NETWORK_TRANSPORT, key.transport.into()),
                    key_value(semconv::NETWORK_TYPE, key.network_type.into()),
                    key_value(semconv::DESTINATION_PORT, key.port.into()),
                ];
                if let Some(address) = key.address {
                    attributes.push(key_value(
                        semconv::DESTINATION_ADDRESS,
                        address.to_string().into(),
                    ));
                }
                if let Some(server) = &key.server {
                    attributes.push(key_value(semconv::SERVER_ADDRESS, server.clone().into()));
                }
                if let Some(error) = key.error_type {
                    attributes.push(key_value(semconv::ERROR_TYPE, error.into()));
                }
                point(attributes, count)
            })
            .collect();
        if series.overflow > 0 {
            points.push(point(
                vec![key_value(OVERFLOW_ATTRIBUTE, Value::Bool(true))],
                series.overflow,
            ));
        }
        points
    }

    pub fn resource_metrics(&self, now: u64) -> Vec<ResourceMetrics> {
        let mut resources: Vec<&Arc<Resource>> = self.series.keys().collect();
        for r in self.lifecycle.keys().chain(self.dns.keys()) {
            if !resources.contains(&r) {
                resources.push(r);
            }
        }
        resources
            .into_iter()
            .map(|resource| {
                let mut metrics = Vec::new();
                if let Some(series) = self.series.get(resource) {
                    metrics.push(cumulative_sum(
                        CONNECTIONS_METRIC,
                        "Outbound connection attempts (TCP) and flows (UDP) made by the workload.",
                        "{connection}",
                        self.points(series, now),
                    ));
                }
                if let Some(lifecycle) = self.lifecycle.get(resource) {
                    let start = (self.series.get(resource))
                        .map_or(self.start_unix_nano, |s| s.start_unix_nano);
                    metrics.extend(lifecycle.metrics(start, now));
                }
                if let Some(dns) = self.dns.get(resource) {
                    metrics.extend(dns.metrics(self.start_unix_nano, now));
                }
                ResourceMetrics {
                    resource: Some(proto_resource(&resource.attributes)),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(scope()),
                        metrics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect()
    }
}

pub fn cumulative_sum(
    name: &str,
    description: &str,
    unit: &str,
    data_points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

pub fn gauge(
    name: &str,
    description: &str,
    unit: &str,
    data_points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Some(metric::Data::Gauge(Gauge { data_points })),
        ..Default::default()
    }
}

/// A data point with string attributes.
pub fn int_point(attributes: &[(&str, &str)], start: u64, now: u64, value: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes
            .iter()
            .map(|(k, v)| key_value(k, Value::Str((*v).to_owned())))
            .collect(),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsInt(value as i64)),
        ..Default::default()
    }
}

pub fn metrics_request(resource_metrics: Vec<ResourceMetrics>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest { resource_metrics }
}

/// The collector's own resource metrics, under its own resource.
pub fn self_metrics(resource: &[(String, String)], metrics: Vec<Metric>) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(ProtoResource {
            attributes: resource
                .iter()
                .map(|(k, v)| key_value(k, Value::Str(v.clone())))
                .collect(),
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(scope()),
            metrics,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests;
