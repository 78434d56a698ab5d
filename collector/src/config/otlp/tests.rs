//! Precedence, the OTLP specification's endpoint rules, and one-line errors.

use std::collections::HashMap;

use super::*;

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn layers(flags: RawSignal, vars: &[(&str, &str)], file: Option<RawSignal>) -> Layers {
    let env = env(vars);
    let mut layers = Layers::default();
    layers.push(Source::Flags, SourceValues::general(flags));
    layers.push(Source::Env, SourceValues::from_env(&env).expect("env"));
    if let Some(file) = file {
        layers.push(
            Source::File("egress.toml".into()),
            SourceValues {
                general: file,
                ..SourceValues::default()
            },
        );
    }
    layers
}

#[test]
fn http_appends_the_signal_path_to_a_general_endpoint_only() {
    let l = layers(
        RawSignal::default(),
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://otlp.example:4318/base/",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "https://metrics.example/custom",
            ),
        ],
        None,
    );
    assert_eq!(
        l.resolve(Signal::Logs).expect("valid").url,
        "https://otlp.example:4318/base/v1/logs"
    );
    assert_eq!(
        l.resolve(Signal::Metrics).expect("valid").url,
        "https://metrics.example/custom"
    );
    assert_eq!(
        l.resolve(Signal::Traces).expect("valid").url,
        "https://otlp.example:4318/base/v1/traces"
    );
}

#[test]
fn defaults_are_grpc_on_localhost() {
    let s = layers(RawSignal::default(), &[], None)
        .resolve(Signal::Logs)
        .expect("valid");
    assert_eq!(s.url, "http://localhost:4317");
    assert_eq!(s.protocol, Protocol::Grpc);
    assert_eq!(s.compression, Compression::None);
    assert_eq!(s.timeout, Duration::from_secs(10));
}

#[test]
fn flags_beat_environment_beats_file_and_signal_beats_general() {
    let flags = RawSignal {
        compression: Some("gzip".into()),
        ..Default::default()
    };
    let file = RawSignal {
        endpoint: Some("http://file:4317".into()),
        compression: Some("none".into()),
        timeout: Some("3s".into()),
        ..Default::default()
    };
    let l = layers(
        flags,
        &[
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "700"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Basic%20abc%3D,x-scope=tenant-1",
            ),
        ],
        Some(file),
    );
    let logs = l.resolve(Signal::Logs).expect("valid");
    let metrics = l.resolve(Signal::Metrics).expect("valid");
    assert_eq!(logs.url, "http://file:4317");
    assert_eq!(logs.compression, Compression::Gzip);
    assert_eq!(logs.timeout, Duration::from_millis(700));
    assert_eq!(metrics.timeout, Duration::from_millis(2500));
    assert_eq!(
        logs.headers,
        vec![
            ("Authorization".into(), "Basic abc=".into()),
            ("x-scope".into(), "tenant-1".into())
        ]
    );
}

#[test]
fn bad_values_name_their_setting() {
    let err = |vars: &[(&str, &str)]| {
        layers(RawSignal::default(), vars, None)
            .resolve(Signal::Logs)
            .expect_err("invalid")
    };
    let e = err(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")]);
    assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_PROTOCOL");
    let e = err(&[("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "brotli")]);
    assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION");
    let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317")]);
    assert!(
        e.to_string()
            .starts_with("invalid OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{e}"
    );
    let e = err(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")]);
    assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_TIMEOUT");
    let e = err(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")]);
    assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    let headers = RawSignal::from_env(&env(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]), None)
        .expect_err("invalid");
    assert_eq!(headers.setting, "OTEL_EXPORTER_OTLP_HEADERS");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn headers_and_resource_attributes_decode_percent_escapes() {
    let h = parse_headers("a=1, b = two%2Cthree ,c=%E2%9C%93").expect("valid");
    assert_eq!(h.get("b").map(String::as_str), Some("two,three"));
    assert_eq!(h.get("c").map(String::as_str), Some("✓"));
    assert!(parse_headers("a=%zz").is_err());
    assert!(parse_headers("a=%4").is_err());
    let r = resource_attributes(&env(&[(
        "OTEL_RESOURCE_ATTRIBUTES",
        "deployment.environment=prod,team=sre",
    )]))
    .expect("valid");
    assert_eq!(
        r,
        vec![
            ("deployment.environment".into(), "prod".into()),
            ("team".into(), "sre".into())
        ]
    );
    assert!(resource_attributes(&env(&[("OTEL_RESOURCE_ATTRIBUTES", "x")])).is_err());
}
