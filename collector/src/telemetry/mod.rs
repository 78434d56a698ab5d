//! The collector's own logs and counters. One place counts each kind of trouble; logs
//! summarise periodically, never one line per event. Depends on no stage.
//!
//! Each stage reports through typed internal events (after Vector's `internal_events`)
//! and a narrow handle that is all the stage gets: [`events`] for the ring buffer reader
//! ([`events::ReaderEvent`], [`events::ReaderTelemetry`]), [`enrich`] for enrichment
//! ([`enrich::EnrichEvent`], [`enrich::EnrichTelemetry`]) and [`export`] for the sinks
//! ([`export::ExportEvent`], [`export::ExportTelemetry`]). An event carries static
//! reasons (`&'static str`), never a stage's types; each event's counter, level and log
//! wording live in its stage's file here, and [`Stats`]' counters move only through
//! them. `probe` reads the kernel's counters into plain [`KernelFigures`].
//!
//! Public items: [`Stats`] (the counters, owned by the pipeline, which reads them and
//! counts what the shutdown deadline abandoned), [`Snapshot`] (one reading, for the
//! periodic log, `/metrics` and the OTLP self-metrics), [`KernelFigures`], [`report`],
//! [`init_tracing`], the stages' events and handles ([`events`], [`enrich`],
//! [`export`]), [`metrics`] (names and labels of the self-metrics) and [`otel`] (the
//! collector's own logs and spans over OTLP).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use egress_shared::{COUNTER_COUNT, Counter};

use crate::config::LogFormat;

pub mod enrich;
pub mod events;
pub mod export;
pub mod metrics;
pub mod otel;

/// Logs to stderr (stdout carries records), and over OTLP too with `self_telemetry`.
/// `RUST_LOG` overrides `level`. Text is coloured only when stderr is a terminal and
/// `NO_COLOR` is unset: container logs and log shippers get plain lines.
pub fn init_tracing(level: &str, format: LogFormat, self_telemetry: Option<&otel::SelfTelemetry>) {
    use std::io::IsTerminal;
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level))
    };
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let colour = std::io::stderr().is_terminal() && !no_color;
    let stderr: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(colour)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(self_telemetry.map(|t| t.layers().with_filter(filter())))
        .with(stderr.with_filter(filter()))
        .try_init();
}

/// User-space counters, shared by the pipeline stages.
#[derive(Debug, Default)]
pub struct Stats {
    captured: AtomicU64,
    queue_full: AtomicU64,
    exported: AtomicU64,
    export_failed: AtomicU64,
    export_dropped: AtomicU64,
    rejected: AtomicU64,
    queue_length: AtomicU64,
    metric_workloads: AtomicU64,
    repeats_lost: AtomicU64,
    udp_bytes_unattributed: AtomicU64,
    udp_sweeps_failed: AtomicU64,
    identities_unknown: AtomicU64,
    filtered: AtomicU64,
    stdout_copy_dropped: AtomicU64,
    spans_failed: AtomicU64,
    abandoned: AtomicU64,
    decode_failed: ByReason,
    enrichment_failed: ByReason,
    dns: ByReason,
    enrichment_events: ByReason,
}

/// A point-in-time copy of every counter, user space and kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub captured: u64,
    pub queue_full: u64,
    pub exported: u64,
    pub export_failed: u64,
    /// Records dropped from a full export queue (oldest first).
    pub export_dropped: u64,
    /// Records the endpoint refused (OTLP partial success).
    pub rejected: u64,
    /// Records waiting to be exported.
    pub queue_length: u64,
    /// Workloads with an `egress.connections` series held and exported (OTLP only).
    pub metric_workloads: u64,
    /// Repeats counted by an in-kernel aggregate that no record carries (its opening
    /// record, or its closing one, was lost).
    pub repeats_lost: u64,
    /// UDP payload bytes sent after a flow's last record that the sweep found but could
    /// not attribute (the flow's record never reached user space): not in the metrics.
    pub udp_bytes_unattributed: u64,
    /// Sweeps of `UDP_FLOWS` that stopped at an error (the flows not swept wait for the
    /// next sweep; the kernel's LRU forgets them, and their bytes, if none succeeds).
    pub udp_sweeps_failed: u64,
    /// Records whose process identity (names, namespaces, cgroup) was not known in user
    /// space: its identity record was lost (the ring was full) or forgotten. The record
    /// goes out with its process and cgroup ids only.
    pub identities_unknown: u64,
    /// Records dropped by user space for a user filter (an excluded Kubernetes namespace).
    pub filtered: u64,
    /// With OTLP and `--stdout`: copies not written to stdout because its queue was
    /// full (the OTLP copy went on, so these are not lost).
    pub stdout_copy_dropped: u64,
    /// Connection spans the traces endpoint did not take (`--connection-spans`).
    pub spans_failed: u64,
    /// Records still between stages when the shutdown deadline passed.
    pub abandoned: u64,
    pub decode_failed: BTreeMap<&'static str, u64>,
    /// Lookups of container metadata that failed, by reason (the events still went out).
    pub enrichment_failed: BTreeMap<&'static str, u64>,
    /// DNS capture: answers, unparsed messages by reason, de-duplicated records, cache
    /// misses for room, folded port-53 flows (see docs/dns.md).
    pub dns: BTreeMap<&'static str, u64>,
    /// What enrichment did besides lookups, by kind: `container_cache_evicted` (the cache
    /// was full), `cgroup_looked_up` (a cgroup found by its names before the watcher
    /// reported it), `cgroup_unresolved` (no path: attributed from the kernel's two names),
    /// `cgroup_index_full`, `hybrid_unified` (attributed by the other hierarchy).
    pub enrichment_events: BTreeMap<&'static str, u64>,
    pub kernel: [u64; COUNTER_COUNT as usize],
    /// Runs of the programs the kernel skipped because another was running on that CPU
    /// (`bpf_prog_info.recursion_misses`, kernel 5.12+): possible loss, not certain loss
    /// (see `probe::programs`).
    pub recursion_misses: u64,
    /// Entries of `CALLS` the LRU evicted before their call's exit took them: each call
    /// may have been a lost event (see `probe::state_maps`).
    pub calls_evicted: u64,
    /// Processes whose cached identity the kernel's cache forgot (evicted from
    /// `IDENTITIES`, or its `IDENTITY_SLOTS` slot taken: read again at their next
    /// connection, a cost, not a loss).
    pub identities_evicted: u64,
}

impl Snapshot {
    /// Events that may have been lost without being counted as lost: program runs the
    /// kernel skipped, and calls whose state was evicted.
    pub fn possibly_lost(&self) -> u64 {
        self.recursion_misses + self.calls_evicted
    }

    pub fn kernel(&self, counter: Counter) -> u64 {
        self.kernel[counter as usize]
    }

    /// Events lost anywhere between the kernel and the exporter.
    pub fn lost(&self) -> u64 {
        self.kernel(Counter::RingBufferFull)
            + self.kernel(Counter::StateMapFull)
            + self.kernel(Counter::RateLimited)
            + self.repeats_lost
            + self.decode_failed.values().sum::<u64>()
            + self.dropped()
    }

    /// Captured records lost on their way out: `captured = exported + filtered + dropped`
    /// once every stage has finished (or the shutdown deadline turned the rest into
    /// `abandoned`).
    pub fn dropped(&self) -> u64 {
        self.queue_full + self.export_failed + self.export_dropped + self.rejected + self.abandoned
    }

    /// Captured records not yet exported, filtered or dropped: still in a queue or being
    /// written.
    pub fn in_flight(&self) -> u64 {
        self.captured
            .saturating_sub(self.exported + self.filtered + self.dropped())
    }
}

impl Stats {
    fn record_captured(&self, n: usize) {
        self.captured.fetch_add(n as u64, Relaxed);
    }

    fn record_queue_full(&self, n: usize) {
        self.queue_full.fetch_add(n as u64, Relaxed);
    }

    fn record_exported(&self, n: usize) {
        self.exported.fetch_add(n as u64, Relaxed);
    }

    fn record_export_failed(&self, n: usize) {
        self.export_failed.fetch_add(n as u64, Relaxed);
    }

    fn record_export_dropped(&self, n: usize) {
        self.export_dropped.fetch_add(n as u64, Relaxed);
    }

    fn record_rejected(&self, n: u64) {
        self.rejected.fetch_add(n, Relaxed);
    }

    fn record_repeats_lost(&self, n: u64) {
        self.repeats_lost.fetch_add(n, Relaxed);
    }

    fn record_udp_bytes_unattributed(&self, n: u64) {
        self.udp_bytes_unattributed.fetch_add(n, Relaxed);
    }

    fn record_identities_unknown(&self, n: u64) {
        self.identities_unknown.fetch_add(n, Relaxed);
    }

    fn record_udp_sweep_failed(&self) {
        self.udp_sweeps_failed.fetch_add(1, Relaxed);
    }

    fn record_stdout_copy_dropped(&self, n: usize) {
        self.stdout_copy_dropped.fetch_add(n as u64, Relaxed);
    }

    fn record_spans_failed(&self, n: usize) {
        self.spans_failed.fetch_add(n as u64, Relaxed);
    }

    /// Counts what is still between stages in `last` as `abandoned` (the shutdown
    /// deadline passed); returns `last` with it, so the final counters add up even while
    /// a stage past its deadline still counts.
    pub fn abandon_in_flight(&self, mut last: Snapshot) -> Snapshot {
        let in_flight = last.in_flight();
        self.abandoned.fetch_add(in_flight, Relaxed);
        last.abandoned += in_flight;
        last
    }

    fn record_filtered(&self, n: usize) {
        self.filtered.fetch_add(n as u64, Relaxed);
    }

    fn set_metric_workloads(&self, n: usize) {
        self.metric_workloads.store(n as u64, Relaxed);
    }

    fn set_queue_length(&self, n: usize) {
        self.queue_length.store(n as u64, Relaxed);
    }

    /// A record the reader could not decode, by the decoder's static reason.
    fn record_decode_failed(&self, reason: &'static str) {
        add(&self.decode_failed, reason, 1);
    }

    fn record_enrichment_failed(&self, reason: &'static str) {
        add(&self.enrichment_failed, reason, 1);
    }

    fn record_dns(&self, what: &'static str, n: u64) {
        add(&self.dns, what, n);
    }

    fn record_enrichment_event(&self, kind: &'static str) {
        add(&self.enrichment_events, kind, 1);
    }

    /// The user-space counters with the kernel's (read by `probe::counters`).
    pub fn snapshot(&self, kernel: KernelFigures) -> Snapshot {
        Snapshot {
            kernel: kernel.counters,
            recursion_misses: kernel.recursion_misses,
            calls_evicted: kernel.calls_evicted,
            identities_evicted: kernel.identities_evicted,
            ..self.snapshot_user()
        }
    }

    /// The user-space counters (kernel counters zero).
    pub fn snapshot_user(&self) -> Snapshot {
        Snapshot {
            captured: self.captured.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            exported: self.exported.load(Relaxed),
            export_failed: self.export_failed.load(Relaxed),
            export_dropped: self.export_dropped.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            queue_length: self.queue_length.load(Relaxed),
            metric_workloads: self.metric_workloads.load(Relaxed),
            repeats_lost: self.repeats_lost.load(Relaxed),
            udp_bytes_unattributed: self.udp_bytes_unattributed.load(Relaxed),
            udp_sweeps_failed: self.udp_sweeps_failed.load(Relaxed),
            identities_unknown: self.identities_unknown.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            stdout_copy_dropped: self.stdout_copy_dropped.load(Relaxed),
            spans_failed: self.spans_failed.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            decode_failed: read(&self.decode_failed),
            enrichment_failed: read(&self.enrichment_failed),
            dns: read(&self.dns),
            enrichment_events: read(&self.enrichment_events),
            kernel: [0; COUNTER_COUNT as usize],
            recursion_misses: 0,
            calls_evicted: 0,
            identities_evicted: 0,
        }
    }
}

/// Counters by static reason. A zero count adds no reason (it would show as `reason=0`).
type ByReason = Mutex<BTreeMap<&'static str, u64>>;

fn add(counters: &ByReason, reason: &'static str, n: u64) {
    if n == 0 {
        return;
    }
    if let Ok(mut map) = counters.lock() {
        *map.entry(reason).or_default() += n;
    }
}

fn read(counters: &ByReason) -> BTreeMap<&'static str, u64> {
    counters.lock().map(|m| m.clone()).unwrap_or_default()
}

/// What the kernel counted, read at one moment (by `probe::counters`).
#[derive(Debug, Clone, Copy)]
pub struct KernelFigures {
    /// The programs' per-CPU counters, summed over CPUs, by [`Counter`].
    pub counters: [u64; COUNTER_COUNT as usize],
    /// Program runs the kernel skipped (`bpf_prog_info.recursion_misses`).
    pub recursion_misses: u64,
    /// `CALLS` entries evicted before their exit took them.
    pub calls_evicted: u64,
    /// Cached identities forgotten (see [`Snapshot::identities_evicted`]).
    pub identities_evicted: u64,
}

/// Logs what changed since `previous`: a warning when events were lost.
pub fn report(previous: &Snapshot, now: &Snapshot) {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    let lost = delta(previous.lost(), now.lost());
    let possibly_lost = delta(previous.possibly_lost(), now.possibly_lost());
    let kernel: Vec<String> = Counter::ALL
        .iter()
        .map(|&c| format!("{}={}", c.name(), delta(previous.kernel(c), now.kernel(c))))
        .chain([
            format!(
                "recursion_misses={}",
                delta(previous.recursion_misses, now.recursion_misses)
            ),
            format!(
                "calls_evicted={}",
                delta(previous.calls_evicted, now.calls_evicted)
            ),
            format!(
                "identities_evicted={}",
                delta(previous.identities_evicted, now.identities_evicted)
            ),
        ])
        .collect();
    if lost > 0 || possibly_lost > 0 {
        tracing::warn!(
            lost,
            possibly_lost,
            captured = delta(previous.captured, now.captured),
            queue_full = delta(previous.queue_full, now.queue_full),
            export_failed = delta(previous.export_failed, now.export_failed),
            export_dropped = delta(previous.export_dropped, now.export_dropped),
            rejected = delta(previous.rejected, now.rejected),
            repeats_lost = delta(previous.repeats_lost, now.repeats_lost),
            decode_failed = ?now.decode_failed,
            exported = delta(previous.exported, now.exported),
            filtered_by_namespace = delta(previous.filtered, now.filtered),
            kernel = %kernel.join(" "),
            "Events were lost since the last report."
        );
    } else {
        tracing::info!(
            captured = delta(previous.captured, now.captured),
            exported = delta(previous.exported, now.exported),
            queue_length = now.queue_length,
            metric_workloads = now.metric_workloads,
            filtered_by_namespace = delta(previous.filtered, now.filtered),
            stdout_copy_dropped = delta(previous.stdout_copy_dropped, now.stdout_copy_dropped),
            enrichment_failed = ?now.enrichment_failed,
            dns = ?now.dns,
            enrichment = ?now.enrichment_events,
            kernel = %kernel.join(" "),
            "Collector statistics."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_is_exported_plus_filtered_plus_dropped_plus_what_is_in_flight() {
        let stats = Stats::default();
        stats.record_captured(100);
        stats.record_exported(60);
        stats.record_filtered(5);
        stats.record_queue_full(4);
        stats.record_export_failed(3);
        stats.record_export_dropped(2);
        stats.record_rejected(1);
        let s = stats.snapshot_user();
        assert_eq!(s.dropped(), 10);
        assert_eq!(s.in_flight(), 25);
        let last = stats.abandon_in_flight(s);
        assert_eq!(last, stats.snapshot_user());
        let s = stats.snapshot_user();
        assert_eq!((s.in_flight(), s.dropped(), s.lost()), (0, 35, 35));
        assert_eq!(s.captured, s.exported + s.filtered + s.dropped());
    }
}
