//! OTLP export: batches by size and time, a bounded queue that drops the oldest batches
//! when the endpoint cannot keep up, retries with backoff and jitter, cumulative metrics
//! per workload plus the collector's own health, and a bounded flush on shutdown.

pub mod lifecycle;
pub mod mapping;
pub mod queue;
pub mod settings;
pub mod spans;
pub mod transport;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::mpsc, time::Instant};

use self::{
    mapping::ConnectionCounts,
    queue::{Backoff, Batch, BatchQueue},
    settings::OtlpSettings,
    spans::SpanBatch,
    transport::{Accepted, Client, SendError, TransportError},
};
use crate::{
    enrich::Record,
    telemetry::{Snapshot, Stats, otel::collector_resource},
};
use egress_shared::Counter;

pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads every counter (user space and kernel) for the health metrics.
pub type SnapshotSource = Arc<dyn Fn() -> Snapshot + Send + Sync>;

pub struct OtlpExporter {
    settings: OtlpSettings,
    logs: Arc<Client>,
    metrics: Arc<Client>,
    /// `--connection-spans`: where connection spans go.
    traces: Option<Arc<Client>>,
    stats: Arc<Stats>,
    snapshot: SnapshotSource,
    /// The collector's own resource (service.name, host.name, OTEL_RESOURCE_ATTRIBUTES).
    self_resource: Vec<(String, String)>,
    /// How long shutdown may spend flushing the queue.
    flush_deadline: Duration,
    /// Ids of containers that are gone (from enrichment), whose series then end.
    departures: Option<mpsc::UnboundedReceiver<String>>,
}

type Sending = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + Send>>;

impl OtlpExporter {
    pub fn new(
        settings: OtlpSettings,
        host_name: &str,
        stats: Arc<Stats>,
        snapshot: SnapshotSource,
        flush_deadline: Duration,
    ) -> Result<Self, TransportError> {
        let logs = Arc::new(Client::new(&settings.logs)?);
        let metrics = Arc::new(Client::new(&settings.metrics)?);
        let self_resource = collector_resource(host_name, &settings.self_resource);
        Ok(Self {
            settings,
            logs,
            metrics,
            traces: None,
            stats,
            snapshot,
            self_resource,
            flush_deadline,
            departures: None,
        })
    }

    /// Sends one span per TCP connection to the traces endpoint.
    pub fn with_connection_spans(mut self, on: bool) -> Result<Self, TransportError> {
        if on {
            self.traces = Some(Arc::new(Client::new(&self.settings.traces)?));
        }
        Ok(self)
    }

    /// Sends the spans held, in the background; spans the endpoint does not take are
    /// counted (`spans_failed`).
    fn send_spans(&self, spans: &mut SpanBatch) -> Option<tokio::task::JoinHandle<()>> {
        let client = Arc::clone(self.traces.as_ref()?);
        let (request, n) = spans.take_request()?;
        let stats = Arc::clone(&self.stats);
        Some(tokio::spawn(async move {
            match client.export_traces(&request).await {
                Ok(accepted) if accepted.rejected > 0 => {
                    stats.record_spans_failed(accepted.rejected as usize)
                }
                Ok(_) => {}
                Err(e) => {
                    stats.record_spans_failed(n);
                    tracing::warn!(error = %e, spans = n, "Connection spans were not exported.");
                }
            }
        }))
    }

    /// Ends the metric series of the containers named on `departures` once their last
    /// counts were exported (see [`ConnectionCounts::container_gone`]).
    pub fn with_departures(mut self, departures: mpsc::UnboundedReceiver<String>) -> Self {
        self.departures = Some(departures);
        self
    }

    fn send(&self, batch: &Batch) -> Sending {
        let client = Arc::clone(&self.logs);
        let encoded = batch.encoded.clone();
        Box::pin(async move { client.export_encoded_logs(encoded).await })
    }

    fn export_metrics(&self, counts: &ConnectionCounts, start: u64) -> tokio::task::JoinHandle<()> {
        let now = unix_nanos_now();
        let mut resource_metrics = counts.resource_metrics(now);
        resource_metrics.push(self.health_metrics(start, now));
        let request = mapping::metrics_request(resource_metrics);
        let client = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            // Cumulative sums: a lost export is made good by the next one.
            if let Err(e) = client.export_metrics(&request).await {
                tracing::warn!(error = %e, "Metric export failed; the next export carries the totals.");
            }
        })
    }

    fn health_metrics(
        &self,
        start: u64,
        now: u64,
    ) -> opentelemetry_proto::tonic::metrics::v1::ResourceMetrics {
        use mapping::{cumulative_sum, gauge, int_point};
        let s: Snapshot = (self.snapshot)();
        let lost = [
            ("kernel_ring_buffer_full", s.kernel(Counter::RingBufferFull)),
            ("kernel_state_map_full", s.kernel(Counter::StateMapFull)),
            ("cgroup_rate_limited", s.kernel(Counter::RateLimited)),
            ("pipeline_queue_full", s.queue_full),
            ("export_queue_full", s.export_dropped),
            ("export_failed", s.export_failed),
            ("rejected_by_endpoint", s.rejected),
            ("aggregate_repeats", s.repeats_lost),
            ("spans_export_failed", s.spans_failed),
        ];
        let mut lost_points: Vec<_> = lost
            .iter()
            .map(|(r, v)| int_point(&[("reason", r)], start, now, *v))
            .collect();
        for (reason, n) in &s.decode_failed {
            lost_points.push(int_point(
                &[("reason", &format!("decode_{reason}"))],
                start,
                now,
                *n,
            ));
        }
        let enrichment: Vec<_> = s
            .enrichment_failed
            .iter()
            .map(|(r, n)| int_point(&[("reason", r)], start, now, *n))
            .collect();
        let dns: Vec<_> = s
            .dns
            .iter()
            .map(|(w, n)| int_point(&[("what", w)], start, now, *n))
            .collect();
        let metrics = vec![
            cumulative_sum(
                "egress_collector.dns",
                "DNS capture: answers read, messages that did not parse (unparsed_<reason>), records de-duplicated, addresses the name cache had no room for (cache_full), port-53 flows folded into DNS records.",
                "{message}",
                dns,
            ),
            cumulative_sum(
                "egress_collector.events.captured",
                "Connection events read from the kernel.",
                "{event}",
                vec![int_point(&[], start, now, s.captured)],
            ),
            cumulative_sum(
                "egress_collector.events.lost",
                "Connection events lost, by where.",
                "{event}",
                lost_points,
            ),
            cumulative_sum(
                "egress_collector.events.possibly_lost",
                "Program runs the kernel skipped because another program was running on that CPU (bpf_prog_info.recursion_misses): each may be a lost connection.",
                "{run}",
                vec![int_point(
                    &[("reason", "program_recursion_miss")],
                    start,
                    now,
                    s.recursion_misses,
                )],
            ),
            cumulative_sum(
                "egress_collector.udp.suppressed",
                "UDP datagrams of flows already reported in the window.",
                "{datagram}",
                vec![int_point(
                    &[],
                    start,
                    now,
                    s.kernel(Counter::UdpFlowSuppressed),
                )],
            ),
            cumulative_sum(
                "egress_collector.events.filtered",
                "Connections dropped by a user filter (excluded destination or namespace).",
                "{event}",
                vec![int_point(
                    &[],
                    start,
                    now,
                    s.kernel(Counter::Filtered) + s.filtered,
                )],
            ),
            cumulative_sum(
                "egress_collector.events.aggregated",
                "Repeated connections counted in an aggregation window instead of reported one by one.",
                "{event}",
                vec![int_point(&[], start, now, s.kernel(Counter::Aggregated))],
            ),
            cumulative_sum(
                "egress_collector.kernel.read_failures",
                "Kernel reads that failed (the event went out with fields zeroed).",
                "{read}",
                vec![int_point(
                    &[],
                    start,
                    now,
                    s.kernel(Counter::KernelReadFailed),
                )],
            ),
            cumulative_sum(
                "egress_collector.enrichment.failures",
                "Container metadata lookups that failed (the event went out with the container id only).",
                "{lookup}",
                enrichment,
            ),
            cumulative_sum(
                "egress_collector.enrichment.events",
                "Enrichment's own work, by kind (container_cache_evicted, cgroup_looked_up, cgroup_unresolved, hybrid_unified, ...).",
                "{event}",
                s.enrichment_events
                    .iter()
                    .map(|(k, n)| int_point(&[("kind", k)], start, now, *n))
                    .collect(),
            ),
            cumulative_sum(
                "egress_collector.records.exported",
                "Log records the endpoint accepted.",
                "{record}",
                vec![int_point(&[], start, now, s.exported)],
            ),
            gauge(
                "egress_collector.queue.length",
                "Log records waiting to be exported.",
                "{record}",
                vec![int_point(&[], start, now, s.queue_length)],
            ),
        ];
        mapping::self_metrics(&self.self_resource, metrics)
    }

    /// Exports until `input` closes, then flushes within the deadline.
    pub async fn run(mut self, mut input: mpsc::Receiver<Vec<Record>>) {
        let mut departures = self.departures.take();
        let start = unix_nanos_now();
        let mut counts = ConnectionCounts::new(start, self.settings.metrics_destination_address)
            .with_server_address(self.settings.metrics_server_address);
        let mut queue = BatchQueue::new(self.settings.queue_records);
        let mut spans = SpanBatch::default();
        let mut pending: Vec<Record> = Vec::with_capacity(self.settings.batch_size);
        let mut batch_due: Option<Instant> = None;
        let mut sending: Option<Sending> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new();
        let mut failing = false;
        let mut input_open = true;
        let mut give_up_at: Option<Instant> = None;
        let mut ticker = tokio::time::interval(self.settings.export_interval);
        ticker.tick().await;
        let far = || Instant::now() + Duration::from_secs(86_400);

        loop {
            if sending.is_none()
                && retry_at.is_none()
                && let Some(batch) = queue.start_front()
            {
                sending = Some(self.send(batch));
            }
            if !input_open && pending.is_empty() && queue.is_empty() && sending.is_none() {
                break;
            }
            tokio::select! {
                received = input.recv(), if input_open => match received {
                    Some(records) => {
                        for record in records {
                            if record.connection.counted() {
                                counts.record(&record);
                                if self.traces.is_some() {
                                    spans.push(&record);
                                }
                            }
                            if !record.connection.logged() {
                                continue;
                            }
                            pending.push(record);
                            if pending.len() >= self.settings.batch_size {
                                self.seal(&mut pending, &mut queue);
                                batch_due = None;
                            }
                        }
                        if spans.len >= self.settings.batch_size {
                            self.send_spans(&mut spans);
                        }
                        if !pending.is_empty() || spans.len > 0 {
                            batch_due.get_or_insert_with(|| Instant::now() + self.settings.batch_timeout);
                        }
                    }
                    None => {
                        input_open = false;
                        self.seal(&mut pending, &mut queue);
                        batch_due = None;
                        give_up_at = Some(Instant::now() + self.flush_deadline);
                    }
                },
                _ = tokio::time::sleep_until(batch_due.unwrap_or_else(far)), if batch_due.is_some() => {
                    self.seal(&mut pending, &mut queue);
                    self.send_spans(&mut spans);
                    batch_due = None;
                }
                result = async { sending.as_mut().expect("guarded").await }, if sending.is_some() => {
                    sending = None;
                    match result {
                        Ok(accepted) => {
                            let records = queue.finish_front();
                            backoff.reset();
                            if failing {
                                tracing::info!(queued = queue.records(), "The OTLP endpoint accepts records again.");
                                failing = false;
                            }
                            self.stats.record_exported(records.saturating_sub(accepted.rejected as usize));
                            if accepted.rejected > 0 {
                                self.stats.record_rejected(accepted.rejected);
                                tracing::warn!(rejected = accepted.rejected, message = %accepted.message, "The OTLP endpoint rejected part of a batch.");
                            }
                        }
                        Err(SendError::Retryable { reason, retry_after }) => {
                            queue.release_front();
                            let delay = backoff.next_delay(retry_after);
                            if !failing {
                                tracing::warn!(%reason, retry_in = ?delay, queued = queue.records(), "OTLP export failed; records are queued and retried.");
                                failing = true;
                            }
                            retry_at = Some(Instant::now() + delay);
                        }
                        Err(SendError::Permanent { reason }) => {
                            let records = queue.finish_front();
                            self.stats.record_export_failed(records);
                            tracing::error!(%reason, records, "The OTLP endpoint refused a batch; it is dropped.");
                        }
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(far)), if retry_at.is_some() => {
                    retry_at = None;
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(far)), if give_up_at.is_some() => {
                    let lost = queue.clear() + pending.len();
                    self.stats.record_export_failed(lost);
                    tracing::error!(records = lost, deadline = ?self.flush_deadline, "Shutdown flush deadline passed; queued records are lost.");
                    break;
                }
                _ = ticker.tick() => {
                    self.export_metrics(&counts, start);
                    let ended = counts.exported(unix_nanos_now());
                    self.stats.set_metric_workloads(counts.workloads());
                    if ended > 0 {
                        tracing::debug!(ended, workloads = counts.workloads(), "Metric series of containers gone have ended.");
                    }
                }
                departed = async { departures.as_mut().expect("guarded").recv().await }, if departures.is_some() => {
                    match departed {
                        Some(id) => counts.container_gone(&id),
                        None => departures = None,
                    }
                }
            }
            self.stats.set_queue_length(queue.records() + pending.len());
        }
        self.stats.set_queue_length(0);
        // Spans and the last totals, within the shutdown deadline: the flush had 80 % of
        // it, these get a tenth more (the client's own timeout may be longer).
        let until = give_up_at.unwrap_or_else(Instant::now) + self.flush_deadline / 8;
        if let Some(last) = self.send_spans(&mut spans)
            && tokio::time::timeout_at(until, last).await.is_err()
        {
            tracing::warn!("The last connection spans were not sent before the shutdown deadline.");
        }
        if tokio::time::timeout_at(until, self.export_metrics(&counts, start))
            .await
            .is_err()
        {
            tracing::warn!("The last metric export did not finish before the shutdown deadline.");
        }
    }

    fn seal(&self, pending: &mut Vec<Record>, queue: &mut BatchQueue) {
        if pending.is_empty() {
            return;
        }
        let request = mapping::logs_request(pending, unix_nanos_now());
        let dropped = queue.push(Batch {
            encoded: prost::Message::encode_to_vec(&request).into(),
            records: pending.len(),
        });
        if dropped > 0 {
            self.stats.record_export_dropped(dropped);
        }
        pending.clear();
    }
}
