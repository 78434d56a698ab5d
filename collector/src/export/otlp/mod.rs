//! OTLP export: batches by size and time, a bounded queue that drops the oldest batches
//! when the endpoint cannot keep up, retries with backoff and jitter, cumulative metrics
//! per workload plus the collector's own health, and a bounded flush on shutdown.

pub mod encode;
pub mod lifecycle;
pub mod mapping;
pub mod queue;
#[cfg(test)]
mod record_size;
pub mod spans;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::mpsc, time::Instant};

use self::{
    encode::LogsEncoder,
    mapping::ConnectionCounts,
    queue::{Batch, BatchQueue},
    spans::SpanBatch,
};
use crate::{
    config::otlp::OtlpSettings,
    export::{Feed, Records, Running, Sink, attributes::AttributeSet},
    otlp_client::{
        retry::Backoff,
        transport::{Accepted, Client, SendError, TransportError},
    },
    telemetry::{Snapshot, Stats},
};

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
    /// The attributes each log record carries.
    attributes: AttributeSet,
    /// Ids of containers that are gone (from enrichment), whose series then end.
    departures: Option<mpsc::UnboundedReceiver<String>>,
}

type Sending = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + Send>>;

impl OtlpExporter {
    pub fn new(
        settings: OtlpSettings,
        self_resource: Vec<(String, String)>,
        stats: Arc<Stats>,
        snapshot: SnapshotSource,
        flush_deadline: Duration,
    ) -> Result<Self, TransportError> {
        let logs = Arc::new(Client::new(&settings.logs)?);
        let metrics = Arc::new(Client::new(&settings.metrics)?);
        Ok(Self {
            settings,
            logs,
            metrics,
            traces: None,
            stats,
            snapshot,
            self_resource,
            flush_deadline,
            attributes: AttributeSet::default(),
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

    /// Records carry the attributes of `set`.
    pub fn with_attributes(mut self, set: AttributeSet) -> Self {
        self.attributes = set;
        self
    }

    /// Ends the metric series of the containers named on `departures` once exports that
    /// succeeded carried their last counts (see [`ConnectionCounts::container_gone`]).
    pub fn with_departures(mut self, departures: mpsc::UnboundedReceiver<String>) -> Self {
        self.departures = Some(departures);
        self
    }

    fn send(&self, batch: &Batch) -> Sending {
        let client = Arc::clone(&self.logs);
        let encoded = batch.encoded.clone();
        Box::pin(async move { client.export_encoded_logs(encoded).await })
    }

    /// Sends the counts as they are now; the handle says whether the endpoint took them.
    fn export_metrics(
        &self,
        counts: &ConnectionCounts,
        start: u64,
    ) -> tokio::task::JoinHandle<bool> {
        let now = unix_nanos_now();
        let mut resource_metrics = counts.resource_metrics(now);
        resource_metrics.push(self.health_metrics(start, now));
        let request = mapping::metrics_request(resource_metrics);
        let client = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            // Cumulative sums: a lost export is made good by the next one.
            match client.export_metrics(&request).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "Metric export failed; the next export carries the totals.");
                    false
                }
            }
        })
    }

    fn health_metrics(
        &self,
        start: u64,
        now: u64,
    ) -> opentelemetry_proto::tonic::metrics::v1::ResourceMetrics {
        use crate::telemetry::metrics::{Kind, self_metrics};
        let s: Snapshot = (self.snapshot)();
        let metrics = self_metrics(&s)
            .into_iter()
            .map(|metric| {
                let points = metric
                    .points
                    .iter()
                    .map(|p| {
                        let labels: Vec<(&str, &str)> =
                            p.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                        mapping::int_point(&labels, start, now, p.value)
                    })
                    .collect();
                match metric.kind {
                    Kind::Counter => mapping::cumulative_sum(
                        metric.name,
                        metric.description,
                        metric.unit,
                        points,
                    ),
                    Kind::Gauge => {
                        mapping::gauge(metric.name, metric.description, metric.unit, points)
                    }
                }
            })
            .collect();
        mapping::self_metrics(&self.self_resource, metrics)
    }

    /// Exports until `input` closes, then flushes within the deadline.
    pub async fn run(mut self, mut input: mpsc::Receiver<Records>) {
        let mut departures = self.departures.take();
        let start = unix_nanos_now();
        let mut counts = ConnectionCounts::new(start, self.settings.metrics_destination_address)
            .with_server_address(self.settings.metrics_server_address);
        let mut queue = BatchQueue::new(self.settings.queue_records);
        let mut spans = SpanBatch::default();
        // Log records encoded as they come; the request is put together at the seal.
        let mut pending = LogsEncoder::new(self.attributes);
        let mut batch_due: Option<Instant> = None;
        let mut sending: Option<Sending> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new();
        let mut failing = false;
        let mut input_open = true;
        let mut give_up_at: Option<Instant> = None;
        // One metric export at a time: a gone workload's series ends only after exports
        // that succeeded carried its last counts.
        let mut metrics_export: Option<tokio::task::JoinHandle<bool>> = None;
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
                        for record in records.iter() {
                            if record.connection.counted() {
                                counts.record(record);
                                if self.traces.is_some() {
                                    spans.push(record);
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
                    counts.interval_passed();
                    // Still sending the last one (a slow endpoint): the next tick carries
                    // the totals.
                    if metrics_export.is_none() {
                        metrics_export = Some(self.export_metrics(&counts, start));
                    }
                    self.stats.set_metric_workloads(counts.workloads());
                }
                done = async { metrics_export.as_mut().expect("guarded").await }, if metrics_export.is_some() => {
                    metrics_export = None;
                    if matches!(done, Ok(true)) {
                        let ended = counts.exported(unix_nanos_now());
                        self.stats.set_metric_workloads(counts.workloads());
                        if ended > 0 {
                            tracing::debug!(ended, workloads = counts.workloads(), "Metric series of containers gone have ended.");
                        }
                    }
                }
                departed = async { departures.as_mut().expect("guarded").recv().await }, if departures.is_some() => {
                    match departed {
                        Some(id) => {
                            let dropped = counts.container_gone(&id);
                            if dropped > 0 {
                                // Counted; logged at debug only (one per departure at most).
                                for _ in 0..dropped {
                                    self.stats.record_enrichment_event("metric_series_dropped_unexported");
                                }
                                tracing::debug!(dropped, "Gone workloads' series dropped before an export succeeded (bound reached).");
                            }
                        }
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
        if let Some(in_flight) = metrics_export.take() {
            in_flight.abort();
        }
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

    fn seal(&self, pending: &mut LogsEncoder, queue: &mut BatchQueue) {
        if pending.is_empty() {
            return;
        }
        let records = pending.len();
        let dropped = queue.push(Batch {
            encoded: pending.finish(unix_nanos_now()).into(),
            records,
        });
        if dropped > 0 {
            self.stats.record_export_dropped(dropped);
        }
    }
}

impl Sink for OtlpExporter {
    fn name(&self) -> &'static str {
        "OTLP"
    }

    fn feed(&self) -> Feed {
        Feed::Every
    }

    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running {
        Box::pin(OtlpExporter::run(*self, input))
    }
}
