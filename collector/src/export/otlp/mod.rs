//! OTLP export: three sinks behind [`crate::export::Sink`], fed by the one fan-out, each
//! with its own client from [`crate::otlp_client`]:
//! - [`logs::LogsSink`]: log records (connections, closes, DNS answers), batched by size
//!   and time into a bounded queue that drops the oldest batches when the endpoint
//!   cannot keep up, retried with backoff and jitter, flushed within a deadline;
//! - [`metrics::MetricsSink`]: cumulative metrics per workload plus the collector's own
//!   health, each export interval; its last export waits for the other two to finish;
//! - [`spans::SpansSink`] (`--connection-spans`): one span per TCP connection.
//!
//! Public items: [`OtlpSinks`] (what the sinks are built from), [`SnapshotSource`],
//! [`unix_nanos_now`]; the rest is the mapping ([`mapping`], [`lifecycle`], [`encode`]).

pub mod encode;
pub mod lifecycle;
pub mod logs;
pub mod mapping;
pub mod metrics;
pub mod queue;
#[cfg(test)]
mod record_size;
pub mod spans;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::mpsc;

use self::{logs::LogsSink, metrics::MetricsSink, spans::SpansSink};
use crate::{
    config::otlp::OtlpSettings,
    export::{Sink, attributes::AttributeSet},
    otlp_client::transport::TransportError,
    telemetry::{Snapshot, export::ExportTelemetry},
};

pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads every counter (user space and kernel) for the health metrics.
pub type SnapshotSource = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// What the OTLP sinks are built from.
pub struct OtlpSinks {
    pub settings: OtlpSettings,
    /// The collector's own resource (service.name, host.name, OTEL_RESOURCE_ATTRIBUTES).
    pub self_resource: Vec<(String, String)>,
    pub telemetry: ExportTelemetry,
    pub snapshot: SnapshotSource,
    /// How long shutdown may spend flushing the logs queue.
    pub flush_deadline: Duration,
    /// The attributes each log record carries.
    pub attributes: AttributeSet,
    /// Ids of containers that are gone (from enrichment), whose series then end.
    pub departures: mpsc::UnboundedReceiver<String>,
    /// `--connection-spans`: a span per TCP connection to the traces endpoint.
    pub connection_spans: bool,
}

impl OtlpSinks {
    /// The sinks, each with its client: bad TLS material fails here, before anything runs.
    pub fn build(self) -> Result<Vec<Box<dyn Sink>>, TransportError> {
        let (finishing, finished) = finishing();
        let logs = LogsSink::new(
            &self.settings,
            self.attributes,
            self.telemetry.clone(),
            self.flush_deadline,
            finishing.clone(),
        )?;
        let metrics = MetricsSink::new(
            &self.settings,
            self.self_resource,
            self.telemetry.clone(),
            self.snapshot,
            self.flush_deadline,
            self.departures,
            finished,
        )?;
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(logs), Box::new(metrics)];
        if self.connection_spans {
            sinks.push(Box::new(SpansSink::new(
                &self.settings,
                self.telemetry,
                self.flush_deadline,
                finishing,
            )?));
        }
        Ok(sinks)
    }
}

/// Held by a sink until it has finished; see [`Finished`].
#[derive(Clone)]
pub(crate) struct Finishing {
    _held: mpsc::Sender<()>,
}

/// Completes once every [`Finishing`] is dropped: the metrics sink's last export waits
/// for the logs flush (and the last spans) so the counters it carries are final.
pub(crate) struct Finished(mpsc::Receiver<()>);

impl Finished {
    pub(crate) async fn wait(&mut self) {
        // Nothing is ever sent: this returns when every sender is gone.
        while self.0.recv().await.is_some() {}
    }
}

fn finishing() -> (Finishing, Finished) {
    let (tx, rx) = mpsc::channel(1);
    (Finishing { _held: tx }, Finished(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_waits_for_every_sink_still_finishing() {
        let (logs, mut finished) = finishing();
        let spans = logs.clone();
        drop(logs);
        let early = tokio::time::timeout(Duration::from_millis(50), finished.wait()).await;
        assert!(early.is_err(), "the spans sink has not finished");
        drop(spans);
        tokio::time::timeout(Duration::from_secs(5), finished.wait())
            .await
            .expect("done once every sink has finished");
    }
}
