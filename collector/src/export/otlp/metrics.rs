//! The OTLP metrics sink: cumulative metrics per workload ([`ConnectionCounts`]: the
//! connection counts, how TCP connections went, DNS answers) plus the collector's own
//! health, exported each interval, one export at a time. The series of containers gone
//! (told by enrichment) end once exports that succeeded carried their last counts. On
//! shutdown the last totals go out after the other OTLP sinks have finished, so the
//! health metrics they carry count every record the logs flush delivered.

use std::{sync::Arc, time::Duration};

use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
use tokio::{sync::mpsc, time::Instant};

use super::{Finished, SnapshotSource, mapping, mapping::ConnectionCounts, unix_nanos_now};
use crate::{
    config::otlp::OtlpSettings,
    export::{Feed, Records, Running, Sink},
    otlp_client::transport::{Client, TransportError},
    telemetry::{
        Snapshot,
        export::{ExportEvent, ExportTelemetry},
    },
};

pub struct MetricsSink {
    client: Arc<Client>,
    export_interval: Duration,
    destination_address: bool,
    server_address: Option<usize>,
    telemetry: ExportTelemetry,
    snapshot: SnapshotSource,
    /// The collector's own resource (service.name, host.name, OTEL_RESOURCE_ATTRIBUTES).
    self_resource: Vec<(String, String)>,
    /// The logs flush's share of the shutdown deadline; the last export gets an eighth more.
    flush_deadline: Duration,
    /// Ids of containers that are gone (from enrichment), whose series then end.
    departures: mpsc::UnboundedReceiver<String>,
    /// Completes when the other OTLP sinks have finished.
    others: Finished,
}

impl MetricsSink {
    pub(super) fn new(
        settings: &OtlpSettings,
        self_resource: Vec<(String, String)>,
        telemetry: ExportTelemetry,
        snapshot: SnapshotSource,
        flush_deadline: Duration,
        departures: mpsc::UnboundedReceiver<String>,
        others: Finished,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            client: Arc::new(Client::new(&settings.metrics)?),
            export_interval: settings.export_interval,
            destination_address: settings.metrics_destination_address,
            server_address: settings.metrics_server_address,
            telemetry,
            snapshot,
            self_resource,
            flush_deadline,
            departures,
            others,
        })
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
        let client = Arc::clone(&self.client);
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            // Cumulative sums: a lost export is made good by the next one.
            match client.export_metrics(&request).await {
                Ok(_) => true,
                Err(error) => {
                    telemetry.emit(ExportEvent::MetricExportFailed { error: &error });
                    false
                }
            }
        })
    }

    fn health_metrics(&self, start: u64, now: u64) -> ResourceMetrics {
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

    /// Counts until `input` closes and the other OTLP sinks have finished (or the
    /// shutdown deadline passes), then sends the last totals within the deadline.
    pub async fn run(mut self, mut input: mpsc::Receiver<Records>) {
        let start = unix_nanos_now();
        let mut counts = ConnectionCounts::new(start, self.destination_address)
            .with_server_address(self.server_address);
        let mut departures_open = true;
        let mut input_open = true;
        // The last export's deadline, from the close of the input: the logs flush has
        // 80 % of the shutdown deadline, this a tenth more (the client's own timeout may
        // be longer).
        let mut until: Option<Instant> = None;
        // One metric export at a time: a gone workload's series ends only after exports
        // that succeeded carried its last counts.
        let mut metrics_export: Option<tokio::task::JoinHandle<bool>> = None;
        let mut ticker = tokio::time::interval(self.export_interval);
        ticker.tick().await;
        let far = || Instant::now() + Duration::from_secs(86_400);

        loop {
            tokio::select! {
                received = input.recv(), if input_open => match received {
                    Some(records) => counts.record_counted(&records),
                    None => {
                        input_open = false;
                        until = Some(Instant::now() + self.flush_deadline + self.flush_deadline / 8);
                    }
                },
                () = self.others.wait(), if !input_open => break,
                _ = tokio::time::sleep_until(until.unwrap_or_else(far)), if until.is_some() => break,
                _ = ticker.tick() => {
                    counts.interval_passed();
                    // Still sending the last one (a slow endpoint): the next tick carries
                    // the totals.
                    if metrics_export.is_none() {
                        metrics_export = Some(self.export_metrics(&counts, start));
                    }
                    self.telemetry.set_metric_workloads(counts.workloads());
                }
                done = async { metrics_export.as_mut().expect("guarded").await }, if metrics_export.is_some() => {
                    metrics_export = None;
                    if matches!(done, Ok(true)) {
                        let ended = counts.exported(unix_nanos_now());
                        self.telemetry.set_metric_workloads(counts.workloads());
                        if ended > 0 {
                            self.telemetry.emit(ExportEvent::SeriesEnded { ended, workloads: counts.workloads() });
                        }
                    }
                }
                departed = self.departures.recv(), if departures_open => {
                    match departed {
                        Some(id) => {
                            let series = counts.container_gone(&id);
                            if series > 0 {
                                self.telemetry.emit(ExportEvent::SeriesDroppedUnexported { series });
                            }
                        }
                        None => departures_open = false,
                    }
                }
            }
        }
        if let Some(in_flight) = metrics_export.take() {
            in_flight.abort();
        }
        let until = until.unwrap_or_else(Instant::now);
        if tokio::time::timeout_at(until, self.export_metrics(&counts, start))
            .await
            .is_err()
        {
            self.telemetry.emit(ExportEvent::LastMetricsLate);
        }
    }
}

impl Sink for MetricsSink {
    fn name(&self) -> &'static str {
        "OTLP metrics"
    }

    fn feed(&self) -> Feed {
        Feed::Every
    }

    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running {
        Box::pin(MetricsSink::run(*self, input))
    }
}
