//! One JSON object per connection on stdout:
//! `{"time_unix_nano": …, "resource": {…}, "attributes": {…}}`.

use std::io::Write;

use serde_json::{Map, Value as Json};

use super::{ExportError, Exporter, attributes};
use crate::enrich::Record;

pub struct StdoutExporter<W: Write + Send> {
    out: W,
}

impl StdoutExporter<std::io::Stdout> {
    pub fn new() -> Self {
        Self {
            out: std::io::stdout(),
        }
    }
}

impl Default for StdoutExporter<std::io::Stdout> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Write + Send> StdoutExporter<W> {
    pub fn with_writer(out: W) -> Self {
        Self { out }
    }
}

pub fn to_json(record: &Record) -> Json {
    let resource: Map<String, Json> = record
        .resource
        .attributes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Json::String(v.clone())))
        .collect();
    let attributes: Map<String, Json> = attributes::of(record)
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                attributes::Value::Str(s) => Json::String(s),
                attributes::Value::Int(i) => Json::from(i),
                attributes::Value::Bool(b) => Json::Bool(b),
            };
            (k.to_owned(), v)
        })
        .collect();
    let mut object = Map::new();
    object.insert(
        "time_unix_nano".into(),
        Json::from(record.connection.time_unix_nano),
    );
    object.insert("resource".into(), Json::Object(resource));
    object.insert("attributes".into(), Json::Object(attributes));
    Json::Object(object)
}

impl<W: Write + Send> Exporter for StdoutExporter<W> {
    fn export(&mut self, batch: &[Record]) -> Result<(), ExportError> {
        let mut lock = std::io::BufWriter::new(&mut self.out);
        for record in batch {
            serde_json::to_writer(&mut lock, &to_json(record)).map_err(std::io::Error::from)?;
            lock.write_all(b"\n")?;
        }
        lock.flush()?;
        Ok(())
    }
}
