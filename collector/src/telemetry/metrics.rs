//! The collector's own metrics, defined once: exported over OTLP (`egress_collector.*`
//! under the collector's resource) and served in Prometheus text format at `/metrics`
//! on the health address (dots become underscores, counters end in `_total`).

use std::fmt::Write as _;

use egress_shared::Counter;

use super::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic, cumulative since the collector started.
    Counter,
    Gauge,
}

/// One value of a metric, with its labels (`reason` where a metric has several causes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

impl Point {
    fn plain(value: u64) -> Self {
        Self {
            labels: Vec::new(),
            value,
        }
    }

    fn reason(reason: impl Into<String>, value: u64) -> Self {
        Self {
            labels: vec![("reason", reason.into())],
            value,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfMetric {
    /// The OTLP name, e.g. `egress_collector.events.captured`.
    pub name: &'static str,
    pub description: &'static str,
    /// UCUM unit or `{annotation}`.
    pub unit: &'static str,
    pub kind: Kind,
    pub points: Vec<Point>,
}

impl SelfMetric {
    /// The Prometheus name: `egress_collector_events_captured_total`.
    pub fn prometheus_name(&self) -> String {
        let mut name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

/// Every self-metric with its current values.
pub fn self_metrics(s: &Snapshot) -> Vec<SelfMetric> {
    let counter = |name, description, unit, points| SelfMetric {
        name,
        description,
        unit,
        kind: Kind::Counter,
        points,
    };
    let mut lost: Vec<Point> = [
        ("kernel_ring_buffer_full", s.kernel(Counter::RingBufferFull)),
        ("kernel_state_map_full", s.kernel(Counter::StateMapFull)),
        ("cgroup_rate_limited", s.kernel(Counter::RateLimited)),
        ("pipeline_queue_full", s.queue_full),
        ("export_queue_full", s.export_dropped),
        ("export_failed", s.export_failed),
        ("rejected_by_endpoint", s.rejected),
        ("aggregate_repeats", s.repeats_lost),
        ("spans_export_failed", s.spans_failed),
    ]
    .into_iter()
    .map(|(reason, n)| Point::reason(reason, n))
    .collect();
    lost.extend(
        s.decode_failed
            .iter()
            .map(|(reason, n)| Point::reason(format!("decode_{reason}"), *n)),
    );
    let enrichment = s
        .enrichment_failed
        .iter()
        .map(|(reason, n)| Point::reason(*reason, *n))
        .collect();
    let dns = s
        .dns
        .iter()
        .map(|(what, n)| Point {
            labels: vec![("what", (*what).to_owned())],
            value: *n,
        })
        .collect();
    vec![
        counter(
            "egress_collector.dns",
            "DNS capture: answers read, messages that did not parse (unparsed_<reason>), records de-duplicated, addresses the name cache had no room for (cache_full), port-53 flows folded into DNS records.",
            "{message}",
            dns,
        ),
        counter(
            "egress_collector.events.captured",
            "Connection events read from the kernel.",
            "{event}",
            vec![Point::plain(s.captured)],
        ),
        counter(
            "egress_collector.events.lost",
            "Connection events lost, by where.",
            "{event}",
            lost,
        ),
        counter(
            "egress_collector.events.possibly_lost",
            "Events that may have been lost uncounted: program runs the kernel skipped because another program was running on that CPU (bpf_prog_info.recursion_misses), and calls whose entry state was evicted before their exit.",
            "{event}",
            vec![
                Point::reason("program_recursion_miss", s.recursion_misses),
                Point::reason("call_state_evicted", s.calls_evicted),
            ],
        ),
        counter(
            "egress_collector.udp.suppressed",
            "UDP datagrams of flows already reported in the window.",
            "{datagram}",
            vec![Point::plain(s.kernel(Counter::UdpFlowSuppressed))],
        ),
        counter(
            "egress_collector.udp.bytes_unattributed",
            "UDP payload bytes sent after a flow's last record whose flow had no record in user space to attribute them to (not in egress.network.io).",
            "By",
            vec![Point::plain(s.udp_bytes_unattributed)],
        ),
        counter(
            "egress_collector.events.identities_unknown",
            "Records whose process identity (names, namespaces, cgroup) was not known: its identity record was lost to a full ring buffer or forgotten; the record carries its process and cgroup ids only.",
            "{record}",
            vec![Point::plain(s.identities_unknown)],
        ),
        counter(
            "egress_collector.udp.sweeps_failed",
            "Sweeps of the kernel's UDP flows that stopped at an error (bytes sent after a flow's last record wait for a sweep that succeeds).",
            "{sweep}",
            vec![Point::plain(s.udp_sweeps_failed)],
        ),
        counter(
            "egress_collector.events.filtered",
            "Connections dropped by a user filter (excluded destination or namespace).",
            "{event}",
            vec![Point::plain(s.kernel(Counter::Filtered) + s.filtered)],
        ),
        counter(
            "egress_collector.events.aggregated",
            "Repeated connections counted in an aggregation window instead of reported one by one.",
            "{event}",
            vec![Point::plain(s.kernel(Counter::Aggregated))],
        ),
        counter(
            "egress_collector.kernel.read_failures",
            "Kernel reads that failed (the event went out with fields zeroed).",
            "{read}",
            vec![Point::plain(s.kernel(Counter::KernelReadFailed))],
        ),
        counter(
            "egress_collector.enrichment.failures",
            "Container metadata lookups that failed (the event went out with the container id only).",
            "{lookup}",
            enrichment,
        ),
        counter(
            "egress_collector.enrichment.events",
            "Enrichment's own work, by kind (container_cache_evicted, cgroup_looked_up, cgroup_unresolved, hybrid_unified, ...).",
            "{event}",
            s.enrichment_events
                .iter()
                .map(|(kind, n)| Point {
                    labels: vec![("kind", (*kind).to_owned())],
                    value: *n,
                })
                .collect(),
        ),
        counter(
            "egress_collector.records.exported",
            "Log records the endpoint accepted.",
            "{record}",
            vec![Point::plain(s.exported)],
        ),
        SelfMetric {
            name: "egress_collector.queue.length",
            description: "Log records waiting to be exported.",
            unit: "{record}",
            kind: Kind::Gauge,
            points: vec![Point::plain(s.queue_length)],
        },
    ]
}

/// The Prometheus text exposition format (version 0.0.4) of `metrics`.
pub fn prometheus_text(metrics: &[SelfMetric]) -> String {
    let mut out = String::new();
    for metric in metrics {
        let name = metric.prometheus_name();
        let help = metric
            .description
            .replace('\\', "\\\\")
            .replace('\n', "\\n");
        let kind = match metric.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for point in &metric.points {
            out.push_str(&name);
            if !point.labels.is_empty() {
                out.push('{');
                for (i, (key, value)) in point.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let value = value
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(out, "{key}=\"{value}\"");
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", point.value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_end_in_total_and_reasons_are_labels() {
        let mut s = Snapshot {
            captured: 12,
            export_dropped: 3,
            queue_length: 5,
            ..Snapshot::default()
        };
        s.decode_failed.insert("short", 2);
        s.enrichment_failed.insert("odd \"reason\"\n", 1);
        let text = prometheus_text(&self_metrics(&s));
        for line in [
            "# TYPE egress_collector_events_captured_total counter",
            "egress_collector_events_captured_total 12",
            "egress_collector_events_lost_total{reason=\"export_queue_full\"} 3",
            "egress_collector_events_lost_total{reason=\"decode_short\"} 2",
            "egress_collector_enrichment_failures_total{reason=\"odd \\\"reason\\\"\\n\"} 1",
            "# TYPE egress_collector_queue_length gauge",
            "egress_collector_queue_length 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        // Every sample line is `name{labels} value`, every family has HELP and TYPE.
        let families = self_metrics(&s).len();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# HELP ")).count(),
            families
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# TYPE ")).count(),
            families
        );
    }
}
