//! egress-collector: every outbound connection a container makes, attributed to its pod.
//!
//! One pipeline, one direction: [`probe`] (hook selection, BTF offsets, load/attach) ->
//! [`events`] (ring buffer, checked decoding) -> [`enrich`] -> [`export`].
//! [`config`] (flags, environment, file -> typed settings) depends on nothing else;
//! [`telemetry`] (the collector's own counters and logs) on no stage; [`otlp_client`] is
//! the one OTLP client, shared by the exporter and the collector's own telemetry;
//! [`cgroup_names`] (container and pod from cgroup names) is pure and shared by
//! `events` and `enrich`.

pub mod cgroup_names;
pub mod check;
pub mod config;
pub mod dns;
pub mod enrich;
pub mod events;
pub mod export;
pub mod fast_hash;
pub mod health;
pub mod otlp_client;
pub mod pipeline;
pub mod probe;
pub mod telemetry;
pub mod testhook;

#[cfg(test)]
mod alloc_counting;
#[cfg(test)]
mod mutate;

/// An error and its causes on one line, for logs and exit messages.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = inner.source();
    }
    line
}
