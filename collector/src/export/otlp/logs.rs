//! The OTLP logs sink: log records (connections, closes, DNS answers) batched by size and
//! time into a bounded queue that drops the oldest batches when the endpoint cannot keep
//! up, sent one at a time with retries (backoff and jitter), and flushed on shutdown
//! within its deadline. Counts `exported`, `rejected`, `export_failed`, `export_dropped`
//! and the queue's length.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use super::{
    Finishing,
    encode::LogsEncoder,
    queue::{Batch, BatchQueue},
    unix_nanos_now,
};
use crate::{
    config::otlp::OtlpSettings,
    export::{Feed, Records, Running, Sink, attributes::AttributeSet},
    otlp_client::{
        retry::Backoff,
        transport::{Accepted, Client, SendError, TransportError},
    },
    telemetry::export::{ExportEvent, ExportTelemetry},
};

type Sending = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + Send>>;

pub struct LogsSink {
    client: Arc<Client>,
    batch_size: usize,
    batch_timeout: Duration,
    queue_records: usize,
    /// The attributes each log record carries.
    attributes: AttributeSet,
    telemetry: ExportTelemetry,
    /// How long shutdown may spend flushing the queue.
    flush_deadline: Duration,
    /// Held until the flush is over (the metrics sink's last export waits for it).
    _finishing: Finishing,
}

impl LogsSink {
    pub(super) fn new(
        settings: &OtlpSettings,
        attributes: AttributeSet,
        telemetry: ExportTelemetry,
        flush_deadline: Duration,
        finishing: Finishing,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            client: Arc::new(Client::new(&settings.logs)?),
            batch_size: settings.batch_size,
            batch_timeout: settings.batch_timeout,
            queue_records: settings.queue_records,
            attributes,
            telemetry,
            flush_deadline,
            _finishing: finishing,
        })
    }

    fn send(&self, batch: &Batch) -> Sending {
        let client = Arc::clone(&self.client);
        let encoded = batch.encoded.clone();
        Box::pin(async move { client.export_encoded_logs(encoded).await })
    }

    /// Exports until `input` closes, then flushes within the deadline.
    pub async fn run(self, mut input: mpsc::Receiver<Records>) {
        let mut queue = BatchQueue::new(self.queue_records);
        // Log records encoded as they come; the request is put together at the seal.
        let mut pending = LogsEncoder::new(self.attributes);
        let mut batch_due: Option<Instant> = None;
        let mut sending: Option<Sending> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new();
        let mut failing = false;
        let mut input_open = true;
        let mut give_up_at: Option<Instant> = None;
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
                            if !record.connection.logged() {
                                continue;
                            }
                            pending.push(record);
                            if pending.len() >= self.batch_size {
                                self.seal(&mut pending, &mut queue);
                                batch_due = None;
                            }
                        }
                        if !pending.is_empty() {
                            batch_due.get_or_insert_with(|| Instant::now() + self.batch_timeout);
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
                                self.telemetry.emit(ExportEvent::EndpointRecovered { queued: queue.records() });
                                failing = false;
                            }
                            self.telemetry.emit(ExportEvent::Delivered {
                                records: records.saturating_sub(accepted.rejected as usize),
                            });
                            if accepted.rejected > 0 {
                                self.telemetry.emit(ExportEvent::PartlyRejected {
                                    rejected: accepted.rejected,
                                    message: &accepted.message,
                                });
                            }
                        }
                        Err(SendError::Retryable { reason, retry_after }) => {
                            queue.release_front();
                            let delay = backoff.next_delay(retry_after);
                            if !failing {
                                self.telemetry.emit(ExportEvent::EndpointFailing {
                                    reason: &reason,
                                    retry_in: delay,
                                    queued: queue.records(),
                                });
                                failing = true;
                            }
                            retry_at = Some(Instant::now() + delay);
                        }
                        Err(SendError::Permanent { reason }) => {
                            let records = queue.finish_front();
                            self.telemetry.emit(ExportEvent::Refused { records, reason: &reason });
                        }
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(far)), if retry_at.is_some() => {
                    retry_at = None;
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(far)), if give_up_at.is_some() => {
                    self.telemetry.emit(ExportEvent::FlushDeadlinePassed {
                        records: queue.clear() + pending.len(),
                        deadline: self.flush_deadline,
                    });
                    break;
                }
            }
            self.telemetry
                .set_queue_length(queue.records() + pending.len());
        }
        self.telemetry.set_queue_length(0);
    }

    fn seal(&self, pending: &mut LogsEncoder, queue: &mut BatchQueue) {
        if pending.is_empty() {
            return;
        }
        let records = pending.len();
        let dropped = queue.push(Batch {
            encoded: pending.finish(unix_nanos_now()),
            records,
        });
        if dropped > 0 {
            self.telemetry
                .emit(ExportEvent::QueueOverflow { records: dropped });
        }
    }
}

impl Sink for LogsSink {
    fn name(&self) -> &'static str {
        "OTLP logs"
    }

    fn feed(&self) -> Feed {
        Feed::Every
    }

    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running {
        Box::pin(LogsSink::run(*self, input))
    }
}
