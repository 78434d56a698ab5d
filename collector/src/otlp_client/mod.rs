//! The one OTLP client, used by the OTLP sinks (`export::otlp`) and by the collector's own
//! telemetry (`telemetry::otel`). Depends on `config` only.
//!
//! Public items: [`transport`] ([`transport::Client`] sends requests over gRPC or
//! HTTP/protobuf with TLS, headers and compression; its settings are
//! [`crate::config::otlp::SignalSettings`]), [`retry`] ([`retry::Backoff`] spaces the
//! retries), [`collector_resource`] (the collector's own identity, built once and handed
//! to each user as a value) and [`SERVICE_NAME`].

pub mod retry;
pub mod transport;

/// `service.name` of the collector's own telemetry and metrics.
pub const SERVICE_NAME: &str = "egress-collector";

/// The collector's own identity: `service.*`, `host.name`, then `OTEL_RESOURCE_ATTRIBUTES`.
pub fn collector_resource(host_name: &str, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut attributes = vec![
        ("service.name".to_owned(), SERVICE_NAME.to_owned()),
        (
            "service.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        ("host.name".to_owned(), host_name.to_owned()),
    ];
    for (key, value) in extra {
        attributes.retain(|(k, _)| k != key);
        attributes.push((key.clone(), value.clone()));
    }
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_resource_names_the_service_and_lets_the_environment_add_or_override() {
        let resource = collector_resource(
            "node-1",
            &[
                ("deployment.environment.name".into(), "prod".into()),
                ("host.name".into(), "renamed".into()),
            ],
        );
        let get = |key: &str| {
            resource
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("service.name"), Some("egress-collector"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(get("host.name"), Some("renamed"));
        assert_eq!(get("deployment.environment.name"), Some("prod"));
        assert_eq!(resource.len(), 4);
    }
}
