//! Where records go: JSON lines on stdout (the embedded default while no endpoint is set)
//! and OTLP (`otlp`), with the attributes both share.

pub mod attributes;
pub mod otlp;
pub mod stdout;

use crate::enrich::Record;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing records failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A sink for batches of records.
pub trait Exporter: Send {
    fn export(&mut self, batch: &[Record]) -> Result<(), ExportError>;
}
