//! One JSON object per connection on stdout:
//! `{"time_unix_nano": …, "body": "…", "resource": {…}, "attributes": {…}}`, the body
//! being the same one-line summary as an OTLP log record's.

use std::io::Write;

use super::{
    ExportError, Exporter,
    attributes::{self, AttributeSet},
};
use crate::enrich::Record;

pub struct StdoutExporter<W: Write + Send> {
    out: W,
    buffer: Vec<u8>,
    attributes: AttributeSet,
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
            attributes: AttributeSet::default(),
        }
    }

    /// Records carry the attributes of `set`.
    pub fn with_attributes(mut self, set: AttributeSet) -> Self {
        self.attributes = set;
        self
    }
}

/// Appends one record as a JSON line. Written field by field into a reused buffer: no
/// intermediate `serde_json::Value`, so no map building or per-key allocation per event.
pub fn write_line(out: &mut Vec<u8>, record: &Record, set: AttributeSet) -> serde_json::Result<()> {
    let (attributes, body) = attributes::select(record, set);
    out.extend_from_slice(b"{\"time_unix_nano\":");
    serde_json::to_writer(&mut *out, &record.connection.time_unix_nano)?;
    out.extend_from_slice(b",\"body\":");
    serde_json::to_writer(&mut *out, &body)?;
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
    for (i, (key, value)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        match value {
            attributes::Value::Str(s) => serde_json::to_writer(&mut *out, s)?,
            attributes::Value::Int(n) => serde_json::to_writer(&mut *out, n)?,
            attributes::Value::Bool(b) => serde_json::to_writer(&mut *out, b)?,
        }
    }
    out.extend_from_slice(b"}}\n");
    Ok(())
}

impl<W: Write + Send> Exporter for StdoutExporter<W> {
    fn export(&mut self, batch: &[Record]) -> Result<(), ExportError> {
        self.buffer.clear();
        for record in batch {
            write_line(&mut self.buffer, record, self.attributes).map_err(std::io::Error::from)?;
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
        write_line(&mut out, &r, AttributeSet::Full).expect("write");
        write_line(&mut out, &r, AttributeSet::Minimal).expect("write");
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
        assert_eq!(
            json["body"],
            "shop a\"b\n\u{1}c[42] → 93.184.216.34:443 tcp"
        );
        let minimal: serde_json::Value = serde_json::from_str(lines[1]).expect("valid JSON");
        assert_eq!(
            minimal["body"], json["body"],
            "the body does not depend on the set"
        );
        assert!(minimal["attributes"]["thread.name"].is_null());
        assert_eq!(minimal["attributes"]["destination.port"], 443);
    }
}
