//! The collector's own logs and counters. One place counts each kind of trouble; logs
//! summarise periodically, never one line per event.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use aya::maps::{MapData, PerCpuArray};
use egress_shared::{COUNTER_COUNT, Counter};

use crate::events::DecodeError;

pub mod otel;

/// Logs to stderr (stdout carries records), and over OTLP too with `self_telemetry`.
/// `RUST_LOG` overrides `level`.
pub fn init_tracing(level: &str, self_telemetry: Option<&otel::SelfTelemetry>) {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
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
    repeats_lost: AtomicU64,
    filtered: AtomicU64,
    stdout_copy_dropped: AtomicU64,
    spans_failed: AtomicU64,
    decode_failed: Mutex<BTreeMap<&'static str, u64>>,
    enrichment_failed: Mutex<BTreeMap<&'static str, u64>>,
    dns: Mutex<BTreeMap<&'static str, u64>>,
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
    /// Repeats counted by an in-kernel aggregate that no record carries (its opening
    /// record, or its closing one, was lost).
    pub repeats_lost: u64,
    /// Records dropped by user space for a user filter (an excluded Kubernetes namespace).
    pub filtered: u64,
    /// With OTLP and `--stdout`: copies not written to stdout because its queue was
    /// full (the OTLP copy went on, so these are not lost).
    pub stdout_copy_dropped: u64,
    /// Connection spans the traces endpoint did not take (`--connection-spans`).
    pub spans_failed: u64,
    pub decode_failed: BTreeMap<&'static str, u64>,
    /// Lookups of container metadata that failed, by reason (the events still went out).
    pub enrichment_failed: BTreeMap<&'static str, u64>,
    /// DNS capture: answers, unparsed messages by reason, de-duplicated records, cache
    /// misses for room, folded port-53 flows (see docs/dns.md).
    pub dns: BTreeMap<&'static str, u64>,
    pub kernel: [u64; COUNTER_COUNT as usize],
}

impl Snapshot {
    pub fn kernel(&self, counter: Counter) -> u64 {
        self.kernel[counter as usize]
    }

    /// Events lost anywhere between the kernel and the exporter.
    pub fn lost(&self) -> u64 {
        self.kernel(Counter::RingBufferFull)
            + self.kernel(Counter::StateMapFull)
            + self.kernel(Counter::RateLimited)
            + self.queue_full
            + self.export_failed
            + self.export_dropped
            + self.rejected
            + self.repeats_lost
            + self.decode_failed.values().sum::<u64>()
    }
}

impl Stats {
    pub fn record_captured(&self, n: usize) {
        self.captured.fetch_add(n as u64, Relaxed);
    }

    pub fn record_queue_full(&self, n: usize) {
        self.queue_full.fetch_add(n as u64, Relaxed);
    }

    pub fn record_exported(&self, n: usize) {
        self.exported.fetch_add(n as u64, Relaxed);
    }

    pub fn record_export_failed(&self, n: usize) {
        self.export_failed.fetch_add(n as u64, Relaxed);
    }

    pub fn record_export_dropped(&self, n: usize) {
        self.export_dropped.fetch_add(n as u64, Relaxed);
    }

    pub fn record_rejected(&self, n: u64) {
        self.rejected.fetch_add(n, Relaxed);
    }

    pub fn record_repeats_lost(&self, n: u64) {
        self.repeats_lost.fetch_add(n, Relaxed);
    }

    pub fn record_stdout_copy_dropped(&self, n: usize) {
        self.stdout_copy_dropped.fetch_add(n as u64, Relaxed);
    }

    pub fn record_spans_failed(&self, n: usize) {
        self.spans_failed.fetch_add(n as u64, Relaxed);
    }

    pub fn record_filtered(&self, n: usize) {
        self.filtered.fetch_add(n as u64, Relaxed);
    }

    pub fn set_queue_length(&self, n: usize) {
        self.queue_length.store(n as u64, Relaxed);
    }

    pub fn record_decode_failed(&self, error: &DecodeError) {
        if let Ok(mut map) = self.decode_failed.lock() {
            *map.entry(error.reason()).or_default() += 1;
        }
    }

    pub fn record_enrichment_failed(&self, reason: &'static str) {
        if let Ok(mut map) = self.enrichment_failed.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }

    pub fn record_dns(&self, what: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut map) = self.dns.lock() {
            *map.entry(what).or_default() += n;
        }
    }

    pub fn enrichment_failures(&self) -> BTreeMap<&'static str, u64> {
        self.enrichment_failed
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn snapshot(&self, kernel: &KernelCounters) -> Snapshot {
        Snapshot {
            captured: self.captured.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            exported: self.exported.load(Relaxed),
            export_failed: self.export_failed.load(Relaxed),
            export_dropped: self.export_dropped.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            queue_length: self.queue_length.load(Relaxed),
            repeats_lost: self.repeats_lost.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            stdout_copy_dropped: self.stdout_copy_dropped.load(Relaxed),
            spans_failed: self.spans_failed.load(Relaxed),
            decode_failed: self
                .decode_failed
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            enrichment_failed: self
                .enrichment_failed
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            dns: self.dns.lock().map(|m| m.clone()).unwrap_or_default(),
            kernel: kernel.read(),
        }
    }
}

/// The programs' per-CPU counters, summed over CPUs.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self { map }
    }

    pub fn read(&self) -> [u64; COUNTER_COUNT as usize] {
        let mut totals = [0; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            if let Ok(values) = self.map.get(&(counter as u32), 0) {
                totals[counter as usize] = values.iter().sum();
            }
        }
        totals
    }
}

/// Logs what changed since `previous`: a warning when events were lost.
pub fn report(previous: &Snapshot, now: &Snapshot) {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    let lost = delta(previous.lost(), now.lost());
    let kernel: Vec<String> = Counter::ALL
        .iter()
        .map(|&c| format!("{}={}", c.name(), delta(previous.kernel(c), now.kernel(c))))
        .collect();
    if lost > 0 {
        tracing::warn!(
            lost,
            captured = delta(previous.captured, now.captured),
            queue_full = delta(previous.queue_full, now.queue_full),
            export_failed = delta(previous.export_failed, now.export_failed),
            export_dropped = delta(previous.export_dropped, now.export_dropped),
            rejected = delta(previous.rejected, now.rejected),
            repeats_lost = delta(previous.repeats_lost, now.repeats_lost),
            decode_failed = ?now.decode_failed,
            kernel = %kernel.join(" "),
            "Events were lost since the last report."
        );
    } else {
        tracing::info!(
            captured = delta(previous.captured, now.captured),
            exported = delta(previous.exported, now.exported),
            queue_length = now.queue_length,
            filtered_by_namespace = delta(previous.filtered, now.filtered),
            stdout_copy_dropped = delta(previous.stdout_copy_dropped, now.stdout_copy_dropped),
            enrichment_failed = ?now.enrichment_failed,
            dns = ?now.dns,
            kernel = %kernel.join(" "),
            "Collector statistics."
        );
    }
}
