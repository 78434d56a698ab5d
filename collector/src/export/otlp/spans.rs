//! `--connection-spans`: one OTLP span per TCP connection, kind CLIENT, from the connect
//! to the close (or to the failure), under the workload's resource. Kernel spans start
//! their own traces: nothing joins them to the application's.

use std::{collections::HashMap, sync::Arc};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use opentelemetry_semantic_conventions::attribute as semconv;

use super::mapping::{key_value, proto_resource, scope};
use crate::{
    enrich::{Record, Resource},
    events::outcome::ConnectionState,
    export::attributes,
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
        open.connection.close = Some(Close {
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
        });
        let span = span_of(&open).expect("a span");
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (100, 900)
        );
        assert_eq!(span.status.expect("status").code, StatusCode::Unset as i32);
    }
}
