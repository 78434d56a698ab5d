//! The collector under test exporting to a real OTLP receiver on loopback, which keeps
//! every request: what the tests reading records, spans or metrics over OTLP share.

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::runtime::Runtime;

use crate::{
    collector::RunningCollector,
    receiver::{self, Received, Receiver, Shared, Store},
};

/// The OTLP protocol the receiver serves (the collector's `--otlp-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// The value of `--otlp-protocol`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }

    /// A receiver of this protocol on `addr`.
    pub async fn serve(self, addr: SocketAddr, store: impl Store) -> Receiver {
        match self {
            Self::Grpc => receiver::grpc(addr, store).await,
            Self::HttpProtobuf => receiver::http(addr, store).await,
        }
    }
}

/// A receiver on loopback and the collector exporting to it. Dropped (a failed test),
/// the collector is killed before the receiver stops.
pub struct OtlpRun {
    collector: RunningCollector,
    receiver: Receiver,
    received: Shared,
    _runtime: Runtime,
}

/// What a run left once stopped.
pub struct Finished {
    /// Every request the receiver took.
    pub received: Received,
    pub stdout: String,
    pub stderr: Vec<String>,
}

impl OtlpRun {
    /// A gRPC receiver, then `collector run --otlp-endpoint http://<receiver> <args>`,
    /// exporting soon: metrics each second, a batch of records within 200 ms.
    pub fn start(collector: &Path, args: &[&str]) -> Self {
        Self::start_serving(Protocol::Grpc, collector, args)
    }

    /// As [`Self::start`] with a receiver of `protocol` (`args` say `--otlp-protocol`).
    pub fn start_serving(protocol: Protocol, collector: &Path, args: &[&str]) -> Self {
        Self::start_wrapped(protocol, &[], collector, args)
    }

    /// As [`Self::start_serving`], the collector started as `<wrapper...> collector run`
    /// (e.g. `env NAME=value` for a test hook).
    pub fn start_wrapped(
        protocol: Protocol,
        wrapper: &[&str],
        collector: &Path,
        args: &[&str],
    ) -> Self {
        let runtime = receiver::runtime();
        let received = Shared::default();
        let receiver = runtime.block_on(protocol.serve(
            "127.0.0.1:0".parse().expect("addr"),
            Shared::clone(&received),
        ));
        let endpoint = format!("http://{}", receiver.addr);
        let mut all = vec![
            "--otlp-endpoint",
            endpoint.as_str(),
            "--export-interval",
            "1s",
            "--batch-timeout",
            "200ms",
        ];
        all.extend_from_slice(args);
        let collector =
            RunningCollector::start_wrapped(wrapper, collector, &all, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}"));
        Self {
            collector,
            receiver,
            received,
            _runtime: runtime,
        }
    }

    pub fn collector(&self) -> &RunningCollector {
        &self.collector
    }

    /// `read` on what the receiver has taken so far, while the collector runs.
    pub fn peek<R>(&self, read: impl FnOnce(&Received) -> R) -> R {
        read(&self.received.lock().expect("lock"))
    }

    /// Stops the collector (SIGINT) and fails the test unless it stopped cleanly; then
    /// the receiver: nothing is in flight any more.
    pub fn stop(self) -> Finished {
        let (clean, stdout, stderr) = self
            .collector
            .stop(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(clean, "collector failed:\n{}", stderr.join("\n"));
        drop(self.receiver);
        let received = std::mem::take(&mut *self.received.lock().expect("lock"));
        Finished {
            received,
            stdout,
            stderr,
        }
    }
}
