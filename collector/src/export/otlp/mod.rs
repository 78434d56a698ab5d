//! OTLP export: batches by size and time, a bounded queue that drops the oldest batches
//! when the endpoint cannot keep up, retries with backoff and jitter, cumulative metrics
//! per workload plus the collector's own health, and a bounded flush on shutdown.

pub mod mapping;
pub mod queue;
#[cfg(test)]
mod record_size;
pub mod settings;
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
    transport::{Accepted, Client, SendError, TransportError},
};
use crate::{
    enrich::Record,
    export::attributes::AttributeSet,
    telemetry::{Snapshot, Stats, otel::collector_resource},
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
            stats,
            snapshot,
            self_resource,
            flush_deadline,
            attributes: AttributeSet::default(),
            departures: None,
        })
    }

    /// Records carry the attributes of `set`.
    pub fn with_attributes(mut self, set: AttributeSet) -> Self {
        self.attributes = set;
        self
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
    pub async fn run(mut self, mut input: mpsc::Receiver<Vec<Record>>) {
        let mut departures = self.departures.take();
        let start = unix_nanos_now();
        let mut counts = ConnectionCounts::new(start, self.settings.metrics_destination_address);
        let mut queue = BatchQueue::new(self.settings.queue_records);
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
                            counts.record(&record);
                            pending.push(record);
                            if pending.len() >= self.settings.batch_size {
                                self.seal(&mut pending, &mut queue);
                                batch_due = None;
                            }
                        }
                        if !pending.is_empty() {
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
        // Last totals, within the shutdown deadline: the flush had 80 % of it, this gets
        // a tenth more (the client's own timeout may be longer).
        let until = give_up_at.unwrap_or_else(Instant::now) + self.flush_deadline / 8;
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
        let request = mapping::logs_request(pending, unix_nanos_now(), self.attributes);
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
