//! A counting OTLP/gRPC receiver on loopback: log records per destination port, and when
//! the last one arrived (for records per second delivered).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
    },
    common::v1::any_value::Value,
};

use crate::tool::Seen;

#[derive(Clone)]
struct Counting {
    seen: Seen,
    last: Arc<Mutex<Option<Instant>>>,
}

#[tonic::async_trait]
impl LogsService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut seen = self.seen.lock().expect("lock");
        for record in request
            .get_ref()
            .resource_logs
            .iter()
            .flat_map(|rl| &rl.scope_logs)
            .flat_map(|sl| &sl.log_records)
        {
            let port = record
                .attributes
                .iter()
                .find(|kv| kv.key == "destination.port")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::IntValue(p) => u16::try_from(*p).ok(),
                    _ => None,
                });
            if let Some(port) = port {
                *seen.entry(port).or_default() += 1;
            }
        }
        *self.last.lock().expect("lock") = Some(Instant::now());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// Metrics are accepted and ignored: the benchmark counts log records.
#[tonic::async_trait]
impl MetricsService for Counting {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

pub struct Receiver {
    pub address: SocketAddr,
    pub seen: Seen,
    pub last: Arc<Mutex<Option<Instant>>>,
}

/// Serves on a free loopback port until the runtime stops.
pub async fn start() -> anyhow::Result<Receiver> {
    start_on("127.0.0.1:0".parse()?).await
}

/// Serves on `address` (an endpoint that comes back where it was).
pub async fn start_on(address: SocketAddr) -> anyhow::Result<Receiver> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let service = Counting {
        seen: Seen::default(),
        last: Arc::default(),
    };
    let (seen, last) = (Arc::clone(&service.seen), Arc::clone(&service.last));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                LogsServiceServer::new(service.clone()).max_decoding_message_size(64 << 20),
            )
            .add_service(MetricsServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(Receiver {
        address,
        seen,
        last,
    })
}
