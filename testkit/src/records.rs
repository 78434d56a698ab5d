//! The collector's JSON records (its stdout), as the end-to-end tests read them.

use std::net::SocketAddr;

use serde_json::Value;

/// Every line of `stdout` as JSON; a line that is not JSON fails the test.
pub fn parse(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Attribute `key` of a record (`Null` when it has none).
pub fn attr<'a>(record: &'a Value, key: &str) -> &'a Value {
    &record["attributes"][key]
}

/// The records of this process to `dest` of one `egress.event`.
pub fn records_to<'a>(records: &'a [Value], dest: SocketAddr, event: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            attr(r, "process.pid") == std::process::id()
                && attr(r, "egress.event") == event
                && attr(r, "destination.address") == dest.ip().to_string().as_str()
                && attr(r, "destination.port") == dest.port()
        })
        .collect()
}
