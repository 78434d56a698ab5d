//! `--connection-spans`: one OTLP span per TCP connection, kind CLIENT, from the connect
//! to the close (or to the failure), under the workload's resource. Kernel spans start
//! their own traces: nothing joins them to the application's.
//!
//! [`SpansSink`] batches them by size and time and sends each batch in the background;
//! spans the endpoint does not take are counted (`spans_failed`), not retried.

use std::{collections::HashMap, sync::Arc, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use opentelemetry_semantic_conventions::attribute as semconv;

use tokio::{sync::mpsc, time::Instant};

use super::{
    Finishing,
    mapping::{key_value, proto_resource, scope},
};
use crate::{
    config::otlp::OtlpSettings,
    enrich::{Record, Resource},
    events::outcome::ConnectionState,
    export::{Feed, Records, Running, Sink, attributes},
    otlp_client::transport::{Client, TransportError},
    telemetry::export::{ExportEvent, ExportTelemetry},
};

/// splitmix64: ids from what names a connection, so they are unique per connection
/// without a random source.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)).max(1)
}

/// The span of a record that ends a connection's story: a close, or a failed attempt.
/// Other records (an established attempt, a pending one, UDP) make none.
pub fn span_of(record: &Record) -> Option<Span> {
    let c = &record.connection;
    let outcome = c.outcome?;
    let (start, end, error) = match &c.close {
        Some(close) => (
            close.connect_unix_nano,
            close.close_unix_nano,
            close.error_type,
        ),
        None if outcome.state == ConnectionState::Failed => (
            c.time_unix_nano,
            c.time_unix_nano.saturating_add(outcome.handshake_ns),
            outcome.error_type,
        ),
        None => return None,
    };
    let seed = mix(outcome.sock_id ^ mix(outcome.connect_boot_ns ^ u64::from(c.process.pid)));
    let mut trace_id = Vec::with_capacity(16);
    trace_id.extend_from_slice(&seed.to_be_bytes());
    trace_id.extend_from_slice(&mix(seed).to_be_bytes());
    let mut attributes: Vec<_> = attributes::of(record)
        .into_iter()
        .filter(|(k, _)| *k != semconv::ERROR_TYPE)
        .map(|(k, v)| key_value(k, v))
        .collect();
    let status = match error {
        Some(error) => {
            attributes.push(key_value(semconv::ERROR_TYPE, error.into()));
            Status {
                code: StatusCode::Error as i32,
                message: error.into(),
            }
        }
        None => Status::default(),
    };
    Some(Span {
        trace_id,
        span_id: mix(seed ^ 0x5a5a).to_be_bytes().to_vec(),
        name: format!("connect {}:{}", c.destination.ip(), c.destination.port()),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end.max(start),
        attributes,
        status: Some(status),
        ..Default::default()
    })
}

/// Spans waiting to be sent, grouped by workload.
#[derive(Default)]
pub struct SpanBatch {
    groups: HashMap<Arc<Resource>, Vec<Span>>,
    pub len: usize,
}

impl SpanBatch {
    pub fn push(&mut self, record: &Record) {
        if let Some(span) = span_of(record) {
            self.groups
                .entry(Arc::clone(&record.resource))
                .or_default()
                .push(span);
            self.len += 1;
        }
    }

    /// The request for every span held, leaving the batch empty.
    pub fn take_request(&mut self) -> Option<(ExportTraceServiceRequest, usize)> {
        if self.len == 0 {
            return None;
        }
        let len = std::mem::take(&mut self.len);
        let resource_spans = self
            .groups
            .drain()
            .map(|(resource, spans)| ResourceSpans {
                resource: Some(proto_resource(&resource.attributes)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        Some((ExportTraceServiceRequest { resource_spans }, len))
    }
}

/// `--connection-spans`: sends the spans of the records it is fed to the traces endpoint.
pub struct SpansSink {
    client: Arc<Client>,
    batch_size: usize,
    batch_timeout: Duration,
    telemetry: ExportTelemetry,
    /// The logs flush's share of the shutdown deadline; the last spans get an eighth more.
    flush_deadline: Duration,
    /// Held until the last spans are sent (the metrics sink's last export waits for it).
    _finishing: Finishing,
}

impl SpansSink {
    pub(super) fn new(
        settings: &OtlpSettings,
        telemetry: ExportTelemetry,
        flush_deadline: Duration,
        finishing: Finishing,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            client: Arc::new(Client::new(&settings.traces)?),
            batch_size: settings.batch_size,
            batch_timeout: settings.batch_timeout,
            telemetry,
            flush_deadline,
            _finishing: finishing,
        })
    }

    /// Sends the spans held, in the background; spans the endpoint does not take are
    /// counted (`spans_failed`).
    fn send(&self, spans: &mut SpanBatch) -> Option<tokio::task::JoinHandle<()>> {
        let client = Arc::clone(&self.client);
        let (request, n) = spans.take_request()?;
        let telemetry = self.telemetry.clone();
        Some(tokio::spawn(async move {
            match client.export_traces(&request).await {
                Ok(accepted) if accepted.rejected > 0 => telemetry.emit(ExportEvent::SpansFailed {
                    spans: accepted.rejected as usize,
                    error: None,
                }),
                Ok(_) => {}
                Err(error) => telemetry.emit(ExportEvent::SpansFailed {
                    spans: n,
                    error: Some(&error),
                }),
            }
        }))
    }

    /// Sends spans until `input` closes, then the last ones within the shutdown deadline.
    pub async fn run(self, mut input: mpsc::Receiver<Records>) {
        let mut spans = SpanBatch::default();
        let mut due: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            tokio::select! {
                received = input.recv() => match received {
                    Some(records) => {
                        for record in records.iter() {
                            if record.connection.counted() {
                                spans.push(record);
                            }
                        }
                        if spans.len >= self.batch_size {
                            self.send(&mut spans);
                            due = None;
                        }
                        if spans.len > 0 {
                            due.get_or_insert_with(|| Instant::now() + self.batch_timeout);
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(far)), if due.is_some() => {
                    self.send(&mut spans);
                    due = None;
                }
            }
        }
        // The same deadline as the metrics sink's last export: the logs flush has 80 %
        // of the shutdown deadline, this a tenth more.
        let until = Instant::now() + self.flush_deadline + self.flush_deadline / 8;
        if let Some(last) = self.send(&mut spans)
            && tokio::time::timeout_at(until, last).await.is_err()
        {
            self.telemetry.emit(ExportEvent::LastSpansLate);
        }
    }
}

impl Sink for SpansSink {
    fn name(&self) -> &'static str {
        "OTLP spans"
    }

    fn feed(&self) -> Feed {
        Feed::Every
    }

    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running {
        Box::pin(SpansSink::run(*self, input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::outcome::{Close, Outcome};
    use crate::export::otlp::mapping::tests::{record, resource};

    fn outcome(state: ConnectionState, error_type: Option<&'static str>) -> Outcome {
        Outcome {
            state,
            error_type,
            handshake_ns: 5,
            syn_retransmits: 0,
            sock_id: 7,
            connect_boot_ns: 9,
        }
    }

    #[test]
    fn a_failed_attempt_is_an_error_span_and_an_established_one_waits_for_its_close() {
        let shop = resource("shop");
        let mut failed = record(&shop, 443);
        failed.connection.outcome = Some(outcome(ConnectionState::Failed, Some("refused")));
        let span = span_of(&failed).expect("a span");
        assert_eq!(span.name, "connect 93.184.216.34:443");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 5);
        let status = span.status.expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "refused");
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.span_id.len(), 8);

        let mut open = record(&shop, 443);
        open.connection.outcome = Some(outcome(ConnectionState::Established, None));
        assert!(span_of(&open).is_none());
        open.connection.close = Some(Box::new(Close {
            connect_unix_nano: 100,
            established_unix_nano: 150,
            close_unix_nano: 900,
            bytes_sent: 1,
            bytes_received: 2,
            bytes_transmitted: None,
            retransmits: 0,
            rtt_us: 1,
            reset: None,
            error_type: None,
            still_open: false,
        }));
        let span = span_of(&open).expect("a span");
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (100, 900)
        );
        assert_eq!(span.status.expect("status").code, StatusCode::Unset as i32);
    }
}
