//! What the export stage reports, as typed internal events (after Vector's
//! `internal_events`): each kind of outcome or trouble is counted, and logged where an
//! operator should see it, here and nowhere else. The stage holds an [`ExportTelemetry`],
//! which reports these events and nothing else: no sink can count a decode failure or a
//! captured event, and no sink words its own log line about lost records.
//!
//! A sink decides *when* (a run of failures is one event at its start, one at its end);
//! this module decides *what it means*: which counter, which level, which words.

use std::{fmt::Display, sync::Arc, time::Duration};

use super::Stats;

/// What happened in a sink.
pub enum ExportEvent<'a> {
    /// Records a sink delivered: written to stdout, or taken by the OTLP endpoint.
    Delivered { records: usize },
    /// The OTLP endpoint took a batch but rejected part of it (partial success).
    PartlyRejected { rejected: u64, message: &'a str },
    /// The OTLP endpoint refused a batch for good: its records are lost.
    Refused { records: usize, reason: &'a str },
    /// The shutdown flush deadline passed with records still queued: they are lost.
    FlushDeadlinePassed { records: usize, deadline: Duration },
    /// The full queue made room by dropping its oldest records.
    QueueOverflow { records: usize },
    /// An export failed in a way worth retrying; said once per run of failures.
    EndpointFailing {
        reason: &'a str,
        retry_in: Duration,
        queued: usize,
    },
    /// The endpoint takes records again after [`ExportEvent::EndpointFailing`].
    EndpointRecovered { queued: usize },
    /// A metric export failed; the next one carries the totals (cumulative sums).
    MetricExportFailed { error: &'a dyn Display },
    /// Series of workloads gone were ended after exports carried their last counts.
    SeriesEnded { ended: usize, workloads: usize },
    /// Series of workloads gone were dropped before an export carried them (the bound
    /// on gone workloads was reached during an outage).
    SeriesDroppedUnexported { series: usize },
    /// The last metric export did not finish before the shutdown deadline.
    LastMetricsLate,
    /// Connection spans the traces endpoint did not take; `error` when nothing was taken.
    SpansFailed {
        spans: usize,
        error: Option<&'a dyn Display>,
    },
    /// The last connection spans were not sent before the shutdown deadline.
    LastSpansLate,
    /// Records stdout could not write (it failed, or its reader went away): lost.
    WriteFailed { records: usize },
    /// Writing to stdout failed; said once per run of failures.
    StdoutFailing {
        error: &'a dyn Display,
        records: usize,
    },
    /// Writing to stdout works again after [`ExportEvent::StdoutFailing`].
    StdoutRecovered,
    /// stdout, a copy beside OTLP, was closed by its reader: the copy ends.
    StdoutCopyClosed,
    /// Records not copied to stdout because its queue was full (OTLP had them).
    StdoutCopySkipped { records: usize },
}

/// The export stage's handle on the collector's counters: it reports [`ExportEvent`]s
/// and sets the two gauges export owns.
#[derive(Clone)]
pub struct ExportTelemetry {
    stats: Arc<Stats>,
}

impl ExportTelemetry {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self { stats }
    }

    /// Counts `event`, and logs it where an operator should see it.
    pub fn emit(&self, event: ExportEvent<'_>) {
        let stats = &self.stats;
        match event {
            ExportEvent::Delivered { records } => stats.record_exported(records),
            ExportEvent::PartlyRejected { rejected, message } => {
                stats.record_rejected(rejected);
                tracing::warn!(rejected, message = %message, "The OTLP endpoint rejected part of a batch.");
            }
            ExportEvent::Refused { records, reason } => {
                stats.record_export_failed(records);
                tracing::error!(%reason, records, "The OTLP endpoint refused a batch; it is dropped.");
            }
            ExportEvent::FlushDeadlinePassed { records, deadline } => {
                stats.record_export_failed(records);
                tracing::error!(records, deadline = ?deadline, "Shutdown flush deadline passed; queued records are lost.");
            }
            ExportEvent::QueueOverflow { records } => stats.record_export_dropped(records),
            ExportEvent::EndpointFailing {
                reason,
                retry_in,
                queued,
            } => {
                tracing::warn!(%reason, retry_in = ?retry_in, queued, "OTLP export failed; records are queued and retried.");
            }
            ExportEvent::EndpointRecovered { queued } => {
                tracing::info!(queued, "The OTLP endpoint accepts records again.");
            }
            ExportEvent::MetricExportFailed { error } => {
                tracing::warn!(error = %error, "Metric export failed; the next export carries the totals.");
            }
            ExportEvent::SeriesEnded { ended, workloads } => {
                tracing::debug!(
                    ended,
                    workloads,
                    "Metric series of containers gone have ended."
                );
            }
            ExportEvent::SeriesDroppedUnexported { series } => {
                for _ in 0..series {
                    stats.record_enrichment_event("metric_series_dropped_unexported");
                }
                // Logged at debug only (one per departure at most).
                tracing::debug!(
                    dropped = series,
                    "Gone workloads' series dropped before an export succeeded (bound reached)."
                );
            }
            ExportEvent::LastMetricsLate => {
                tracing::warn!(
                    "The last metric export did not finish before the shutdown deadline."
                );
            }
            ExportEvent::SpansFailed { spans, error } => {
                stats.record_spans_failed(spans);
                if let Some(error) = error {
                    tracing::warn!(error = %error, spans, "Connection spans were not exported.");
                }
            }
            ExportEvent::LastSpansLate => {
                tracing::warn!(
                    "The last connection spans were not sent before the shutdown deadline."
                );
            }
            ExportEvent::WriteFailed { records } => stats.record_export_failed(records),
            ExportEvent::StdoutFailing { error, records } => {
                tracing::error!(error = %error, records, "Writing to stdout failed; the records are lost (counted export_failed until it works again).");
            }
            ExportEvent::StdoutRecovered => tracing::info!("Writing to stdout works again."),
            ExportEvent::StdoutCopyClosed => {
                tracing::warn!("stdout was closed by its reader; records go on to OTLP only.");
            }
            ExportEvent::StdoutCopySkipped { records } => {
                stats.record_stdout_copy_dropped(records);
            }
        }
    }

    /// Records waiting in the OTLP logs queue (and the batch being filled).
    pub fn set_queue_length(&self, records: usize) {
        self.stats.set_queue_length(records);
    }

    /// Workloads with a metric series held.
    pub fn set_metric_workloads(&self, workloads: usize) {
        self.stats.set_metric_workloads(workloads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_own_counter_and_no_other() {
        let stats = Arc::new(Stats::default());
        let export = ExportTelemetry::new(Arc::clone(&stats));
        export.emit(ExportEvent::Delivered { records: 7 });
        export.emit(ExportEvent::PartlyRejected {
            rejected: 2,
            message: "too big",
        });
        export.emit(ExportEvent::Refused {
            records: 3,
            reason: "400",
        });
        export.emit(ExportEvent::FlushDeadlinePassed {
            records: 4,
            deadline: Duration::from_secs(8),
        });
        export.emit(ExportEvent::WriteFailed { records: 1 });
        export.emit(ExportEvent::QueueOverflow { records: 5 });
        export.emit(ExportEvent::SpansFailed {
            spans: 6,
            error: None,
        });
        export.emit(ExportEvent::StdoutCopySkipped { records: 9 });
        export.emit(ExportEvent::SeriesDroppedUnexported { series: 2 });
        export.emit(ExportEvent::EndpointFailing {
            reason: "unavailable",
            retry_in: Duration::from_secs(1),
            queued: 10,
        });
        export.set_queue_length(11);
        export.set_metric_workloads(12);
        let s = stats.snapshot_user();
        assert_eq!(s.exported, 7);
        assert_eq!(s.rejected, 2);
        assert_eq!(s.export_failed, 3 + 4 + 1);
        assert_eq!(s.export_dropped, 5);
        assert_eq!(s.spans_failed, 6);
        assert_eq!(s.stdout_copy_dropped, 9);
        assert_eq!(
            s.enrichment_events.get("metric_series_dropped_unexported"),
            Some(&2)
        );
        assert_eq!((s.queue_length, s.metric_workloads), (11, 12));
        assert_eq!(s.captured, 0, "export counts nothing of another stage");
    }
}
