//! Where records go: JSON lines on stdout (the embedded default while no endpoint is set)
//! and OTLP (`otlp`), with the attributes both share.

pub mod attributes;
pub mod otlp;
pub mod stdout;

use tokio::sync::mpsc;

use crate::{enrich::Record, telemetry::Stats};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing records failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A sink for batches of records.
pub trait Exporter: Send {
    fn export(&mut self, batch: &[Record]) -> Result<(), ExportError>;
}

/// Exports until the input closes; every record is counted as exported or failed.
pub async fn run(
    mut exporter: Box<dyn Exporter>,
    mut input: mpsc::Receiver<Vec<Record>>,
    stats: std::sync::Arc<Stats>,
) {
    while let Some(batch) = input.recv().await {
        // Records for the metrics only have nothing to write here.
        let records = batch.iter().filter(|r| r.connection.logged()).count();
        match exporter.export(&batch) {
            Ok(()) => stats.record_exported(records),
            Err(e) => {
                stats.record_export_failed(records);
                tracing::error!(error = %e, records, "Export failed; the records are lost.");
            }
        }
    }
}
