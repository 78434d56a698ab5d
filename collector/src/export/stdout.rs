//! One JSON object per connection on stdout:
//! `{"time_unix_nano": …, "resource": {…}, "attributes": {…}}`.

use std::io::Write;

use super::{ExportError, Exporter, attributes};
use crate::enrich::Record;

pub struct StdoutExporter<W: Write + Send> {
    out: W,
    buffer: Vec<u8>,
}

impl StdoutExporter<std::io::Stdout> {
    pub fn new() -> Self {
        Self::with_writer(std::io::stdout())
    }
}

impl Default for StdoutExporter<std::io::Stdout> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Write + Send> StdoutExporter<W> {
    pub fn with_writer(out: W) -> Self {
        Self {
            out,
            buffer: Vec::new(),
        }
    }
}

/// Appends one record as a JSON line. Written field by field into a reused buffer: no
/// intermediate `serde_json::Value`, so no map building or per-key allocation per event.
pub fn write_line(out: &mut Vec<u8>, record: &Record) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"time_unix_nano\":");
    serde_json::to_writer(&mut *out, &record.connection.time_unix_nano)?;
    out.extend_from_slice(b",\"resource\":{");
    for (i, (key, value)) in record.resource.attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        serde_json::to_writer(&mut *out, value)?;
    }
    out.extend_from_slice(b"},\"attributes\":{");
    for (i, (key, value)) in attributes::of(record).iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        match value {
            attributes::Value::Str(s) => serde_json::to_writer(&mut *out, s)?,
            attributes::Value::Int(n) => serde_json::to_writer(&mut *out, n)?,
            attributes::Value::Bool(b) => serde_json::to_writer(&mut *out, b)?,
            attributes::Value::Double(d) => serde_json::to_writer(&mut *out, d)?,
            attributes::Value::StrArray(items) => serde_json::to_writer(&mut *out, items)?,
        }
    }
    out.extend_from_slice(b"}}\n");
    Ok(())
}

impl<W: Write + Send> Exporter for StdoutExporter<W> {
    fn export(&mut self, batch: &[Record]) -> Result<(), ExportError> {
        self.buffer.clear();
        for record in batch.iter().filter(|r| r.connection.logged()) {
            write_line(&mut self.buffer, record).map_err(std::io::Error::from)?;
        }
        self.out.write_all(&self.buffer)?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp::mapping::tests::{record, resource};

    #[test]
    fn a_record_is_one_json_line_with_every_attribute_and_hostile_strings_escaped() {
        let mut r = record(&resource("shop"), 443);
        r.connection.process.name = "a\"b\n\u{1}c".into();
        let mut out = Vec::new();
        write_line(&mut out, &r).expect("write");
        write_line(&mut out, &r).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "one line per record: {text}");
        let json: serde_json::Value = serde_json::from_str(lines[0]).expect("valid JSON");
        assert_eq!(json["time_unix_nano"], 1_700_000_000_000_000_000u64);
        assert_eq!(json["resource"]["k8s.pod.name"], "shop");
        assert_eq!(json["attributes"]["destination.port"], 443);
        assert_eq!(json["attributes"]["egress.network.host"], false);
        assert_eq!(
            json["attributes"]["process.executable.name"],
            "a\"b\n\u{1}c"
        );
        assert_eq!(
            json["attributes"].as_object().expect("object").len(),
            attributes::of(&r).len()
        );
    }
}
