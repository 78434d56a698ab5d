//! A real OTLP receiver on loopback: the generated tonic services for gRPC, and a hyper
//! server for HTTP/protobuf (gzip decoded), both handing what arrives, and the headers,
//! to a [`Store`]: [`Shared`] keeps every request (the end-to-end tests), the benchmark's
//! counts records as they come.

use std::{
    io::Read,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::{
    logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value},
    logs::v1::LogRecord,
    metrics::v1::{HistogramDataPoint, Metric, NumberDataPoint, metric::Data, number_data_point},
    resource::v1::Resource,
    trace::v1::Span,
};
use prost::Message;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Received {
    pub logs: Vec<ExportLogsServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    pub traces: Vec<ExportTraceServiceRequest>,
    /// (header name, value) of every request, lower-case names.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// Every log record received, whatever its resource.
    pub fn log_records(&self) -> impl Iterator<Item = &LogRecord> {
        self.logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|rl| &rl.scope_logs)
            .flat_map(|sl| &sl.log_records)
    }

    /// Every span received, whatever its resource.
    pub fn spans(&self) -> impl Iterator<Item = &Span> {
        self.traces
            .iter()
            .flat_map(|t| &t.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
    }

    /// Every metric received, whatever its resource, in the order they arrived.
    pub fn all_metrics(&self) -> impl Iterator<Item = &Metric> {
        self.metrics
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
    }

    /// The points of every sum named `name`, in the order they arrived.
    pub fn sum_points<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a NumberDataPoint> {
        self.all_metrics()
            .filter(move |m| m.name == name)
            .filter_map(|m| match &m.data {
                Some(Data::Sum(sum)) => Some(&sum.data_points),
                _ => None,
            })
            .flatten()
    }

    /// The points of every histogram named `name`, in the order they arrived.
    pub fn histogram_points<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a HistogramDataPoint> {
        self.all_metrics()
            .filter(move |m| m.name == name)
            .filter_map(|m| match &m.data {
                Some(Data::Histogram(h)) => Some(&h.data_points),
                _ => None,
            })
            .flatten()
    }
}

/// The integer value of a point, if it has one.
pub fn int_value(point: &NumberDataPoint) -> Option<i64> {
    match point.value {
        Some(number_data_point::Value::AsInt(v)) => Some(v),
        _ => None,
    }
}

/// The integer value of attribute `key`, if it has one.
pub fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    })
}

/// The string value of attribute `key`, if it has one.
pub fn str_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// The attributes of a request's resource (none when it has no resource).
pub fn resource_attributes(resource: &Option<Resource>) -> &[KeyValue] {
    resource.as_ref().map_or(&[], |r| &r.attributes)
}

pub type Shared = Arc<Mutex<Received>>;

/// What a receiver does with each request: called on the server's tasks.
pub trait Store: Clone + Send + Sync + 'static {
    /// The request's headers, lower-case names, before its body.
    fn headers(&self, _headers: Vec<(String, String)>) {}
    fn logs(&self, request: ExportLogsServiceRequest);
    fn metrics(&self, _request: ExportMetricsServiceRequest) {}
    fn traces(&self, _request: ExportTraceServiceRequest) {}
}

/// Keeps everything.
impl Store for Shared {
    fn headers(&self, headers: Vec<(String, String)>) {
        self.lock().expect("lock").headers.extend(headers);
    }

    fn logs(&self, request: ExportLogsServiceRequest) {
        self.lock().expect("lock").logs.push(request);
    }

    fn metrics(&self, request: ExportMetricsServiceRequest) {
        self.lock().expect("lock").metrics.push(request);
    }

    fn traces(&self, request: ExportTraceServiceRequest) {
        self.lock().expect("lock").traces.push(request);
    }
}

#[derive(Clone)]
struct Grpc<S>(S);

fn remember_metadata(store: &impl Store, metadata: &tonic::metadata::MetadataMap) {
    let mut headers = Vec::new();
    for kv in metadata.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
            headers.push((
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    store.headers(headers);
}

#[tonic::async_trait]
impl<S: Store> LogsService for Grpc<S> {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        remember_metadata(&self.0, request.metadata());
        self.0.logs(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl<S: Store> MetricsService for Grpc<S> {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        remember_metadata(&self.0, request.metadata());
        self.0.metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl<S: Store> TraceService for Grpc<S> {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        remember_metadata(&self.0, request.metadata());
        self.0.traces(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The runtime the receivers are served on (the collector under test is a process).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn listener(addr: SocketAddr) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the receiver")
}

pub async fn grpc(addr: SocketAddr, store: impl Store) -> Receiver {
    grpc_with(listener(addr).await, store, None).await
}

/// gRPC over TLS with `tls` (server identity, and a client CA for mutual TLS).
pub async fn grpc_tls(
    addr: SocketAddr,
    store: impl Store,
    tls: tonic::transport::ServerTlsConfig,
) -> Receiver {
    grpc_with(listener(addr).await, store, Some(tls)).await
}

/// gRPC on a listener already bound (the caller handles a port that is taken).
pub async fn grpc_on(listener: tokio::net::TcpListener, store: impl Store) -> Receiver {
    grpc_with(listener, store, None).await
}

async fn grpc_with(
    listener: tokio::net::TcpListener,
    store: impl Store,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Receiver {
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel();
    let service = Grpc(store);
    let task = tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("server TLS");
        }
        let _ = builder
            .add_service(
                LogsServiceServer::new(service.clone())
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                    .max_decoding_message_size(64 << 20),
            )
            .add_service(
                MetricsServiceServer::new(service.clone())
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .add_service(
                TraceServiceServer::new(service)
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    Receiver {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

async fn handle_http(
    store: impl Store,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let path = request.uri().path().to_owned();
    store.headers(
        request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    );
    let gzip = request
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = if gzip {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return Ok(hyper::Response::builder()
                .status(400)
                .body(Full::new(Bytes::new()))
                .expect("response"));
        }
        out
    } else {
        body.to_vec()
    };
    let response = match path.as_str() {
        "/v1/logs" => ExportLogsServiceRequest::decode(&body[..]).map(|req| {
            store.logs(req);
            ExportLogsServiceResponse::default().encode_to_vec()
        }),
        "/v1/metrics" => ExportMetricsServiceRequest::decode(&body[..]).map(|req| {
            store.metrics(req);
            ExportMetricsServiceResponse::default().encode_to_vec()
        }),
        "/v1/traces" => ExportTraceServiceRequest::decode(&body[..]).map(|req| {
            store.traces(req);
            ExportTraceServiceResponse::default().encode_to_vec()
        }),
        _ => {
            return Ok(hyper::Response::builder()
                .status(404)
                .body(Full::new(Bytes::new()))
                .expect("response"));
        }
    };
    Ok(match response {
        Ok(bytes) => hyper::Response::builder()
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(bytes)))
            .expect("response"),
        Err(_) => hyper::Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()))
            .expect("response"),
    })
}

pub async fn http(addr: SocketAddr, store: impl Store) -> Receiver {
    http_with(addr, store, None).await
}

/// HTTP/protobuf over TLS with `tls` (which may require a client certificate).
pub async fn https(
    addr: SocketAddr,
    store: impl Store,
    tls: Arc<rustls::ServerConfig>,
) -> Receiver {
    http_with(addr, store, Some(tokio_rustls::TlsAcceptor::from(tls))).await
}

async fn http_with(
    addr: SocketAddr,
    store: impl Store,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Receiver {
    let listener = listener(addr).await;
    let addr = listener.local_addr().expect("addr");
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let store = store.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| handle_http(store.clone(), req));
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                            }
                            Some(tls) => {
                                // A refused handshake (no client certificate) ends here.
                                let Ok(stream) = tls.accept(stream).await else { return };
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                            }
                        }
                    });
                }
            }
        }
    });
    Receiver {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}
