//! The collector's own logs and spans as OTLP (`--self-telemetry`).
//!
//! `tracing` events reach the OpenTelemetry SDK through opentelemetry-appender-tracing,
//! spans through tracing-opentelemetry; the SDK batches them on its own threads and hands
//! each batch to an exporter here, which sends it with the same transport (endpoint, TLS,
//! headers, gzip) as the workload records. The resource is the collector's own
//! (`service.name=egress-collector`), never a workload's.

use std::{fmt, sync::Arc, time::Duration};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_proto::{
    tonic::collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    transform::{
        common::tonic::ResourceAttributesWithSchema, logs::tonic::group_logs_by_resource_and_scope,
        trace::tonic::group_spans_by_resource_and_scope,
    },
};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    logs::{LogBatch, LogExporter, SdkLoggerProvider},
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tokio::runtime::Handle;
use tracing::Subscriber;
use tracing_subscriber::{Layer, filter::filter_fn, registry::LookupSpan};

use crate::{
    config::otlp::OtlpSettings,
    otlp_client::{
        SERVICE_NAME,
        transport::{Accepted, Client, SendError, TransportError},
    },
};

/// The SDK providers behind the two `tracing` layers; shut down to flush.
pub struct SelfTelemetry {
    tracer_provider: SdkTracerProvider,
    logger_provider: SdkLoggerProvider,
}

impl SelfTelemetry {
    /// Builds the exporters; `resource` is the collector's own
    /// ([`crate::otlp_client::collector_resource`]), `runtime` where requests are sent from.
    pub fn new(
        settings: &OtlpSettings,
        resource: Vec<(String, String)>,
        runtime: Handle,
    ) -> Result<Self, TransportError> {
        let resource = Resource::builder_empty()
            .with_attributes(resource.into_iter().map(|(k, v)| KeyValue::new(k, v)))
            .build();
        // A gRPC channel starts its worker on the runtime it is built in.
        let _entered = runtime.enter();
        let spans = Sender::new(Client::new(&settings.traces)?, runtime.clone());
        let logs = Sender::new(Client::new(&settings.logs)?, runtime.clone());
        Ok(Self {
            tracer_provider: SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_batch_exporter(spans)
                .build(),
            logger_provider: SdkLoggerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(logs)
                .build(),
        })
    }

    /// Layers that turn the collector's own events and spans into OTLP. Only its own
    /// targets pass: the libraries' (hyper, tonic, h2) would report on the export itself.
    pub fn layers<S>(&self) -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let own = || filter_fn(|meta| meta.target().starts_with("egress_collector"));
        let spans = tracing_opentelemetry::layer()
            .with_tracer(self.tracer_provider.tracer(SERVICE_NAME))
            .with_filter(own());
        let logs = opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(
            &self.logger_provider,
        )
        .with_filter(own());
        spans.and_then(logs)
    }

    /// Sends what is buffered; called once, after the pipeline has stopped.
    pub fn shutdown(self, deadline: Duration) {
        for (what, result) in [
            (
                "spans",
                self.tracer_provider.shutdown_with_timeout(deadline),
            ),
            ("logs", self.logger_provider.shutdown_with_timeout(deadline)),
        ] {
            if let Err(e) = result {
                // The subscriber may already be gone: stderr is the last resort.
                eprintln!("egress-collector: flushing its own {what} failed: {e}");
            }
        }
    }
}

/// Sends one signal's batches on the tokio runtime: the SDK's batch threads have none.
struct Sender {
    client: Arc<Client>,
    runtime: Handle,
    resource: ResourceAttributesWithSchema,
}

impl Sender {
    fn new(client: Client, runtime: Handle) -> Self {
        Self {
            client: Arc::new(client),
            runtime,
            resource: ResourceAttributesWithSchema::default(),
        }
    }

    async fn send<F, Fut>(&self, export: F) -> OTelSdkResult
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<Accepted, SendError>> + Send + 'static,
    {
        match self.runtime.spawn(export(Arc::clone(&self.client))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(OTelSdkError::InternalFailure(e.to_string())),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("egress_collector::telemetry::otel::Sender")
    }
}

impl SpanExporter for Sender {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        self.send(|client| async move { client.export_traces(&request).await })
            .await
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}

impl LogExporter for Sender {
    fn export(&self, batch: LogBatch<'_>) -> impl Future<Output = OTelSdkResult> + Send {
        // The batch borrows the SDK's buffer: convert before the first await.
        let request = ExportLogsServiceRequest {
            resource_logs: group_logs_by_resource_and_scope(&batch, &self.resource),
        };
        self.send(|client| async move { client.export_logs(&request).await })
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}
