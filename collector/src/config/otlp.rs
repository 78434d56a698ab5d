//! OTLP exporter settings from the standard `OTEL_EXPORTER_OTLP_*` environment variables,
//! a config file (`[otlp]`, `[otlp.logs]`, `[otlp.metrics]`, `[otlp.traces]`, `[export]`)
//! and flags.
//! Precedence: flags, then environment, then file; a per-signal value beats a general one
//! of the same source. A bad value is a one-line error naming the setting.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Logs,
    Metrics,
    /// Only the collector's own spans (`--self-telemetry`).
    Traces,
}

impl Signal {
    fn env_infix(self) -> &'static str {
        match self {
            Signal::Logs => "LOGS_",
            Signal::Metrics => "METRICS_",
            Signal::Traces => "TRACES_",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Logs => "v1/logs",
            Signal::Metrics => "v1/metrics",
            Signal::Traces => "v1/traces",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {setting} {value:?}: {reason}")]
pub struct SettingError {
    pub setting: String,
    pub value: String,
    pub reason: String,
}

fn invalid(setting: &str, value: &str, reason: impl Into<String>) -> SettingError {
    SettingError {
        setting: setting.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// One source's values for one signal scope (general or per-signal), all optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawSignal {
    /// Base URL (general) or full URL (per signal) of the OTLP endpoint.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub protocol: Option<String>,
    /// Extra request headers, e.g. `Authorization` for Grafana Cloud.
    pub headers: Option<HashMap<String, String>>,
    /// `gzip` or `none`.
    pub compression: Option<String>,
    /// Per-request deadline, e.g. `10s`.
    pub timeout: Option<String>,
    /// CA bundle (PEM) to trust instead of the system roots.
    pub certificate: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_certificate: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub client_key: Option<PathBuf>,
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
struct Named<T> {
    value: T,
    setting: String,
}

impl RawSignal {
    /// From `OTEL_EXPORTER_OTLP_*` (general) or `OTEL_EXPORTER_OTLP_<SIGNAL>_*`.
    pub fn from_env(
        env: &dyn Fn(&str) -> Option<String>,
        signal: Option<Signal>,
    ) -> Result<Self, SettingError> {
        let infix = signal.map_or("", Signal::env_infix);
        let var = |name: &str| {
            env(&format!("OTEL_EXPORTER_OTLP_{infix}{name}")).filter(|v| !v.is_empty())
        };
        let headers = match var("HEADERS") {
            Some(text) => Some(parse_headers(&text).map_err(|reason| {
                invalid(&format!("OTEL_EXPORTER_OTLP_{infix}HEADERS"), &text, reason)
            })?),
            None => None,
        };
        Ok(Self {
            endpoint: var("ENDPOINT"),
            protocol: var("PROTOCOL"),
            headers,
            compression: var("COMPRESSION"),
            // The variable is in milliseconds.
            timeout: var("TIMEOUT").map(|ms| {
                if ms.chars().all(|c| c.is_ascii_digit()) {
                    format!("{ms}ms")
                } else {
                    ms
                }
            }),
            certificate: var("CERTIFICATE").map(PathBuf::from),
            client_certificate: var("CLIENT_CERTIFICATE").map(PathBuf::from),
            client_key: var("CLIENT_KEY").map(PathBuf::from),
        })
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTLP exporter specification's format).
pub fn parse_headers(text: &str) -> Result<HashMap<String, String>, String> {
    let mut headers = HashMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!("{key:?} is not a header name"));
        }
        headers.insert(key.to_owned(), percent_decode(value.trim())?);
    }
    Ok(headers)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or("a % escape is cut short")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("%{hex} is not an escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the decoded value is not UTF-8".to_owned())
}

/// Where a layer of values comes from; names settings in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flags,
    Env,
    File(PathBuf),
}

impl Source {
    fn setting(&self, signal: Option<Signal>, field: &str) -> String {
        match self {
            Source::Flags => format!("--otlp-{}", field.replace('_', "-")),
            Source::Env => {
                let infix = signal.map_or("", Signal::env_infix);
                format!("OTEL_EXPORTER_OTLP_{infix}{}", field.to_uppercase())
            }
            Source::File(path) => {
                let table = match signal {
                    None => "otlp",
                    Some(Signal::Logs) => "otlp.logs",
                    Some(Signal::Metrics) => "otlp.metrics",
                    Some(Signal::Traces) => "otlp.traces",
                };
                format!("{} [{table}] {field}", path.display())
            }
        }
    }
}

struct Layer {
    source: Source,
    general: RawSignal,
    logs: RawSignal,
    metrics: RawSignal,
    traces: RawSignal,
}

impl Layer {
    fn specific(&self, signal: Signal) -> &RawSignal {
        match signal {
            Signal::Logs => &self.logs,
            Signal::Metrics => &self.metrics,
            Signal::Traces => &self.traces,
        }
    }
}

/// One source's general and per-signal values.
#[derive(Debug, Clone, Default)]
pub struct SourceValues {
    pub general: RawSignal,
    pub logs: RawSignal,
    pub metrics: RawSignal,
    pub traces: RawSignal,
}

impl SourceValues {
    /// General values only (the flags have no per-signal ones).
    pub fn general(general: RawSignal) -> Self {
        Self {
            general,
            ..Self::default()
        }
    }

    /// From `OTEL_EXPORTER_OTLP_*` and the per-signal variables.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        Ok(Self {
            general: RawSignal::from_env(env, None)?,
            logs: RawSignal::from_env(env, Some(Signal::Logs))?,
            metrics: RawSignal::from_env(env, Some(Signal::Metrics))?,
            traces: RawSignal::from_env(env, Some(Signal::Traces))?,
        })
    }
}

/// Values by source, most important first.
#[derive(Default)]
pub struct Layers {
    layers: Vec<Layer>,
}

impl Layers {
    pub fn push(&mut self, source: Source, values: SourceValues) {
        self.layers.push(Layer {
            source,
            general: values.general,
            logs: values.logs,
            metrics: values.metrics,
            traces: values.traces,
        });
    }

    pub fn any_endpoint(&self) -> bool {
        self.layers.iter().any(|l| {
            l.general.endpoint.is_some()
                || l.logs.endpoint.is_some()
                || l.metrics.endpoint.is_some()
        })
    }

    /// The first value of `field`, per-signal before general within each source.
    fn pick<T>(
        &self,
        signal: Signal,
        field: &str,
        get: impl Fn(&RawSignal) -> Option<T>,
    ) -> Option<Named<T>> {
        self.layers.iter().find_map(|layer| {
            if let Some(value) = get(layer.specific(signal)) {
                return Some(Named {
                    value,
                    setting: layer.source.setting(Some(signal), field),
                });
            }
            get(&layer.general).map(|value| Named {
                value,
                setting: layer.source.setting(None, field),
            })
        })
    }

    fn specific_endpoint(&self, signal: Signal) -> Option<bool> {
        self.layers.iter().find_map(|layer| {
            if layer.specific(signal).endpoint.is_some() {
                Some(true)
            } else if layer.general.endpoint.is_some() {
                Some(false)
            } else {
                None
            }
        })
    }

    pub fn resolve(&self, signal: Signal) -> Result<SignalSettings, SettingError> {
        let protocol = match self.pick(signal, "protocol", |r| r.protocol.clone()) {
            None => Protocol::Grpc,
            Some(n) => match n.value.as_str() {
                "grpc" => Protocol::Grpc,
                "http/protobuf" => Protocol::HttpProtobuf,
                "http/json" => {
                    return Err(invalid(
                        &n.setting,
                        &n.value,
                        "http/json is not supported; use http/protobuf",
                    ));
                }
                _ => {
                    return Err(invalid(
                        &n.setting,
                        &n.value,
                        "expected grpc or http/protobuf",
                    ));
                }
            },
        };
        let default_endpoint = match protocol {
            Protocol::Grpc => "http://localhost:4317",
            Protocol::HttpProtobuf => "http://localhost:4318",
        };
        let endpoint = self.pick(signal, "endpoint", |r| r.endpoint.clone());
        let (base, setting) = match &endpoint {
            Some(n) => (n.value.clone(), n.setting.clone()),
            None => (default_endpoint.to_owned(), "default endpoint".to_owned()),
        };
        let uri: hyper::Uri = base
            .parse()
            .map_err(|e| invalid(&setting, &base, format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(invalid(
                    &setting,
                    &base,
                    "expected an http:// or https:// URL",
                ));
            }
        }
        if uri.host().is_none() {
            return Err(invalid(&setting, &base, "the URL has no host"));
        }
        // A general endpoint is a base URL to which HTTP appends the signal's path; a
        // per-signal endpoint is used as it is.
        let url =
            if protocol == Protocol::HttpProtobuf && self.specific_endpoint(signal) != Some(true) {
                format!("{}/{}", base.trim_end_matches('/'), signal.http_path())
            } else {
                base
            };
        let compression = match self.pick(signal, "compression", |r| r.compression.clone()) {
            None => Compression::None,
            Some(n) => match n.value.as_str() {
                "gzip" => Compression::Gzip,
                "none" => Compression::None,
                _ => return Err(invalid(&n.setting, &n.value, "expected gzip or none")),
            },
        };
        let timeout = match self.pick(signal, "timeout", |r| r.timeout.clone()) {
            None => Duration::from_secs(10),
            Some(n) => {
                parse_duration(&n.value).map_err(|reason| invalid(&n.setting, &n.value, reason))?
            }
        };
        let headers = self
            .pick(signal, "headers", |r| r.headers.clone())
            .map(|n| n.value)
            .unwrap_or_default();
        let mut headers: Vec<(String, String)> = headers.into_iter().collect();
        headers.sort();
        let file = |field: &str,
                    get: fn(&RawSignal) -> Option<PathBuf>|
         -> Result<Option<PathBuf>, SettingError> {
            match self.pick(signal, field, get) {
                None => Ok(None),
                Some(n) if n.value.is_file() => Ok(Some(n.value)),
                Some(n) => Err(invalid(
                    &n.setting,
                    &n.value.display().to_string(),
                    "no such file",
                )),
            }
        };
        let tls = TlsSettings {
            ca_file: file("certificate", |r| r.certificate.clone())?,
            client_certificate: file("client_certificate", |r| r.client_certificate.clone())?,
            client_key: file("client_key", |r| r.client_key.clone())?,
        };
        if tls.client_certificate.is_some() != tls.client_key.is_some() {
            return Err(invalid(
                "client_certificate/client_key",
                "",
                "set both or neither",
            ));
        }
        Ok(SignalSettings {
            url,
            protocol,
            headers,
            compression,
            timeout,
            tls,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSettings {
    /// Full URL for HTTP; the server's base URL for gRPC.
    pub url: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub compression: Compression,
    pub timeout: Duration,
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    pub logs: SignalSettings,
    pub metrics: SignalSettings,
    /// Where the collector's own spans go, with its own logs going to `logs`.
    pub traces: SignalSettings,
    /// Send the collector's own logs and spans over OTLP too.
    pub self_telemetry: bool,
    /// How often metrics are exported.
    pub export_interval: Duration,
    /// Records per log request.
    pub batch_size: usize,
    /// A partial batch goes out after this long.
    pub batch_timeout: Duration,
    /// Records held while the endpoint is slow or down; beyond it the oldest batches go.
    pub queue_records: usize,
    /// Count connections per destination address too (high cardinality; off by default).
    pub metrics_destination_address: bool,
    /// Count connections per `server.address` too, at most this many names per
    /// workload (`~other` beyond); `None` (the default) leaves it out.
    pub metrics_server_address: Option<usize>,
    /// `OTEL_RESOURCE_ATTRIBUTES`, for the collector's own telemetry.
    pub self_resource: Vec<(String, String)>,
}

/// `OTEL_RESOURCE_ATTRIBUTES`: `k=v,k2=v2`, percent-encoded values.
pub fn resource_attributes(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, SettingError> {
    let Some(text) = env("OTEL_RESOURCE_ATTRIBUTES").filter(|t| !t.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut attributes: Vec<(String, String)> = parse_headers(&text)
        .map_err(|reason| invalid("OTEL_RESOURCE_ATTRIBUTES", &text, reason))?
        .into_iter()
        .collect();
    attributes.sort();
    Ok(attributes)
}

#[cfg(test)]
mod tests;
