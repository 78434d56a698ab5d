//! The health endpoint kubelet probes (`--health-address`): `GET /healthz` answers 200
//! while every pipeline stage runs, `GET /readyz` 200 once the probes are attached and
//! until shutdown begins. Both bodies are one JSON object with the hook mode and counters.
//! `GET /metrics` serves the collector's own metrics in Prometheus text format, for
//! scrapers (the same metrics as its OTLP self-metrics).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use tokio::net::TcpListener;

use crate::telemetry::{Snapshot, metrics};

const JSON: &str = "application/json";
/// Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the pipeline tells the endpoint.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// The hook family, and the program that follows the TCP state changes.
    mode: Mutex<Option<(String, String)>>,
    failure: Mutex<Option<String>>,
}

impl Health {
    /// The probes are attached in `mode`, TCP state changes followed by `tcp_state`
    /// (`attach::StateHook`), and events flow.
    pub fn set_ready(&self, mode: &str, tcp_state: &str) {
        if let Ok(mut m) = self.mode.lock() {
            *m = Some((mode.to_owned(), tcp_state.to_owned()));
        }
        self.ready.store(true, Relaxed);
    }

    /// Shutdown began: stop taking traffic, stay alive while draining.
    pub fn set_not_ready(&self) {
        self.ready.store(false, Relaxed);
    }

    /// A stage stopped on its own: the collector is broken and should be restarted.
    pub fn set_failed(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
    }

    /// Status, content type and body for `GET path`.
    fn answer(&self, path: &str, counters: &Snapshot) -> (StatusCode, &'static str, String) {
        if path == "/metrics" {
            let text = metrics::prometheus_text(&metrics::self_metrics(counters));
            return (StatusCode::OK, PROMETHEUS_TEXT, text);
        }
        let failure = self.failure.lock().ok().and_then(|f| f.clone());
        let ready = self.ready.load(Relaxed);
        let (mode, tcp_state) = self
            .mode
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .map_or((None, None), |(mode, tcp_state)| {
                (Some(mode), Some(tcp_state))
            });
        let status = match path {
            "/healthz" if failure.is_none() => StatusCode::OK,
            "/readyz" if failure.is_none() && ready => StatusCode::OK,
            "/healthz" | "/readyz" => StatusCode::SERVICE_UNAVAILABLE,
            _ => {
                return (
                    StatusCode::NOT_FOUND,
                    JSON,
                    "{\"error\":\"not found\"}\n".into(),
                );
            }
        };
        let body = serde_json::json!({
            "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
            "ready": ready,
            "failure": failure,
            "probe": mode,
            "tcp_state": tcp_state,
            "events_captured": counters.captured,
            "events_lost": counters.lost(),
            "records_exported": counters.exported,
            "queue_length": counters.queue_length,
        });
        (status, JSON, format!("{body}\n"))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for health checks on {address}: {source}")]
pub struct HealthError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds before anything is attached, so a taken port fails the start cleanly.
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, HealthError> {
    let error = |source| HealthError { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok(listener)
}

/// Serves on `listener` until the runtime stops.
pub fn serve(
    listener: std::net::TcpListener,
    health: Arc<Health>,
    counters: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) -> Result<SocketAddr, HealthError> {
    let address = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let listener =
        TcpListener::from_std(listener).map_err(|source| HealthError { address, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (health, counters) = (Arc::clone(&health), Arc::clone(&counters));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (status, content_type, body) =
                        health.answer(request.uri().path(), &counters());
                    async move {
                        Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, content_type)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_pipeline_and_a_failure_fails_both() {
        let health = Health::default();
        let counters = Snapshot::default();
        assert_eq!(health.answer("/healthz", &counters).0, StatusCode::OK);
        assert_eq!(
            health.answer("/readyz", &counters).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready("tracepoint", "tp_btf");
        let (status, _, body) = health.answer("/readyz", &counters);
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"probe\":\"tracepoint\""), "{body}");
        assert!(body.contains("\"tcp_state\":\"tp_btf\""), "{body}");
        health.set_not_ready();
        assert_eq!(
            health.answer("/readyz", &counters).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(health.answer("/healthz", &counters).0, StatusCode::OK);
        health.set_ready("tracepoint", "tp_btf");
        health.set_failed("the event reader stopped".into());
        let (status, _, body) = health.answer("/healthz", &counters);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("the event reader stopped"), "{body}");
        assert_eq!(
            health.answer("/readyz", &counters).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(health.answer("/", &counters).0, StatusCode::NOT_FOUND);
        let (status, content_type, body) = health.answer("/metrics", &counters);
        assert_eq!(
            status,
            StatusCode::OK,
            "metrics are served even when unhealthy"
        );
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        assert!(
            body.contains("egress_collector_events_captured_total 0\n"),
            "{body}"
        );
    }
}
