//! A counting OTLP/gRPC receiver on loopback (testkit's receiver with a counting store):
//! log records per destination port, and when the last one arrived (for records per
//! second delivered).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use egress_testkit::receiver::{self, Store};
use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest, common::v1::any_value::Value,
};

use crate::tool::Seen;

/// Counts log records by `destination.port`; metrics are accepted and ignored.
#[derive(Clone)]
struct Counting {
    seen: Seen,
    last: Arc<Mutex<Option<Instant>>>,
}

impl Store for Counting {
    fn logs(&self, request: ExportLogsServiceRequest) {
        let mut seen = self.seen.lock().expect("lock");
        for record in request
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
    }
}

pub struct Receiver {
    pub address: SocketAddr,
    pub seen: Seen,
    pub last: Arc<Mutex<Option<Instant>>>,
    /// Serves while held.
    _server: receiver::Receiver,
}

/// Serves on a free loopback port until dropped.
pub async fn start() -> anyhow::Result<Receiver> {
    start_on("127.0.0.1:0".parse()?).await
}

/// Serves on `address` (an endpoint that comes back where it was).
pub async fn start_on(address: SocketAddr) -> anyhow::Result<Receiver> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let store = Counting {
        seen: Seen::default(),
        last: Arc::default(),
    };
    let (seen, last) = (Arc::clone(&store.seen), Arc::clone(&store.last));
    let server = receiver::grpc_on(listener, store).await;
    Ok(Receiver {
        address,
        seen,
        last,
        _server: server,
    })
}
