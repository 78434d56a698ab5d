//! The command line: `run` (the default) and `check`, each flag with its variable, and
//! the typed settings they become.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use egress_shared::{MAX_CGROUP_BURST, MAX_CGROUP_RATE};

use super::{
    ConfigError, ConfigFile, LogFormat,
    duration::{parse_aggregate_window, parse_duration, parse_ring_buffer_bytes},
    file::FileExport,
    heading,
    otlp::{
        Layers, OtlpSettings, RawSignal, SettingError, Signal, Source, SourceValues, parse_headers,
        resource_attributes,
    },
    settings::{
        AttributeSet, CacheLimits, CacheSettings, Cidr, DnsSettings, OutcomeSettings,
        PipelineSettings, ProbeChoice, ProbeSettings, RuntimeLocations,
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "egress-collector",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `run` options, also accepted without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture connections and export them (the default).
    Run(Box<RunArgs>),
    /// Report what this kernel supports, attaching nothing long-lived; exits non-zero when
    /// no hook family can run.
    Check(ProbeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Hook family: auto (kprobe, then fentry, then tracepoint), kprobe, fentry or tracepoint.
    #[arg(long, default_value = "auto", env = "EGRESS_PROBE", help_heading = heading::CAPTURE)]
    pub probe: ProbeChoice,
    /// Kernel BTF to read struct offsets from [default: /sys/kernel/btf/vmlinux].
    #[arg(long, env = "EGRESS_BTF", help_heading = heading::CAPTURE)]
    pub btf: Option<PathBuf>,
    /// Where the host's filesystem is mounted (a DaemonSet mounts it at /host).
    #[arg(long, default_value = "/", env = "EGRESS_HOST_ROOT", help_heading = heading::ATTRIBUTION)]
    pub host_root: PathBuf,
    /// A UDP flow (5-tuple per network namespace) is reported at most once per window.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "EGRESS_UDP_FLOW_WINDOW", help_heading = heading::CAPTURE)]
    pub udp_flow_window: Duration,
    /// Size of the kernel ring buffer: a power of two, at least one page.
    #[arg(long, default_value_t = 4 << 20, value_parser = parse_ring_buffer_bytes, env = "EGRESS_RING_BUFFER_BYTES", help_heading = heading::CAPTURE)]
    pub ring_buffer_bytes: u32,
    /// Connection events per second each cgroup (container) may report; beyond it the
    /// kernel drops and counts them, and the cgroup's next record carries how many
    /// (`egress.rate_limited.before`). 0 turns the limit off; at most 1000000.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(0..=MAX_CGROUP_RATE as i64), env = "EGRESS_CGROUP_RATE_LIMIT", help_heading = heading::CAPTURE)]
    pub cgroup_rate_limit: u32,
    /// Events a cgroup may report at once above its rate: 1 to 1000000.
    #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..=MAX_CGROUP_BURST as i64), env = "EGRESS_CGROUP_BURST", help_heading = heading::CAPTURE)]
    pub cgroup_burst: u32,
    /// Drop connections to this destination prefix in the kernel, e.g. 10.96.0.0/12 or
    /// fd00::/8 (repeatable; the variable takes a comma-separated list). Counted as
    /// filtered, not lost.
    #[arg(
        long = "exclude-cidr",
        value_name = "CIDR",
        value_delimiter = ',',
        env = "EGRESS_EXCLUDE_CIDRS",
        help_heading = heading::FILTERS,
    )]
    pub exclude_cidrs: Vec<Cidr>,
    /// Drop connections to loopback addresses (127.0.0.0/8, ::1) in the kernel
    /// (`--exclude-loopback=false` overrides the config file).
    #[arg(
        long,
        env = "EGRESS_EXCLUDE_LOOPBACK",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        help_heading = heading::FILTERS,
    )]
    pub exclude_loopback: Option<bool>,
    /// Drop connections of pods in this Kubernetes namespace (repeatable; the variable
    /// takes a comma-separated list). The first connection of each container is dropped
    /// by the collector, which then has the kernel drop its cgroup's.
    #[arg(
        long = "exclude-namespace",
        value_name = "NAMESPACE",
        value_delimiter = ',',
        env = "EGRESS_EXCLUDE_NAMESPACES",
        help_heading = heading::FILTERS,
    )]
    pub exclude_namespaces: Vec<String>,
    /// Report identical connections (same process, protocol, destination address and
    /// port) within this window once, with their count (`egress.connection.count`):
    /// one record when the window opens, one with the repeats when it closes. Off by
    /// default: every connection is a record.
    /// At least 1s; `off` overrides the config file.
    #[arg(long, value_parser = parse_aggregate_window, env = "EGRESS_AGGREGATE_WINDOW", help_heading = heading::FILTERS)]
    pub aggregate_window: Option<Duration>,
    /// Capture the DNS answers workloads receive (sockets that sent to port 53), report
    /// them as `egress.dns` records and name connections from them (`server.address`).
    /// `--dns=false` turns it off. See docs/dns.md.
    #[arg(
        long,
        env = "EGRESS_DNS",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        help_heading = heading::CAPTURE
    )]
    pub dns: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
    /// Write records as JSON lines to stdout (the default while no OTLP endpoint is set;
    /// with one, stdout gets a copy).
    #[arg(long, help_heading = heading::EXPORT)]
    pub stdout: bool,
    /// Capacity of each queue between pipeline stages, in records.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..), env = "EGRESS_QUEUE_CAPACITY", help_heading = heading::RUNTIME)]
    pub queue_capacity: u32,
    /// How often the collector logs its own statistics.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "EGRESS_STATS_INTERVAL", help_heading = heading::RUNTIME)]
    pub stats_interval: Duration,
    /// Log level of the collector's own logs (RUST_LOG overrides).
    #[arg(long, default_value = "info", env = "EGRESS_LOG", help_heading = heading::RUNTIME)]
    pub log_level: String,
    /// Format of the collector's own logs on stderr: text (coloured only on a terminal)
    /// or json (one object per line, the fields as keys) [default: text; config file:
    /// `[log] format`].
    #[arg(long, value_enum, env = "EGRESS_LOG_FORMAT", help_heading = heading::RUNTIME)]
    pub log_format: Option<LogFormat>,
    /// How long shutdown may take: the stages drain within it, then what is still queued
    /// is counted lost and the collector exits with status 3.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "EGRESS_SHUTDOWN_DEADLINE", help_heading = heading::RUNTIME)]
    pub shutdown_deadline: Duration,
    /// Serve `GET /healthz` (liveness), `/readyz` (probes attached) and `/metrics`
    /// (the collector's own metrics, Prometheus text format) here, e.g. 0.0.0.0:8686 for
    /// kubelet probes and Prometheus scrapes [default: not served].
    #[arg(long, env = "EGRESS_HEALTH_ADDRESS", help_heading = heading::RUNTIME)]
    pub health_address: Option<std::net::SocketAddr>,
    /// A TCP attempt still in SYN_SENT this long is reported anyway, marked
    /// `egress.connection.state=pending`; its final outcome still reaches the metrics.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "EGRESS_PENDING_REPORT", help_heading = heading::CAPTURE)]
    pub pending_report: Duration,
    /// Also write a record (`egress.connection.close`) when each reported TCP connection
    /// closes: duration, payload bytes each way, retransmits, RTT, reset.
    #[arg(long, env = "EGRESS_CLOSE_RECORDS", help_heading = heading::EXPORT)]
    pub close_records: bool,
    /// Send one OTLP span per TCP connection (kind CLIENT, connect to close or failure,
    /// named `connect <address>:<port>`) to the traces endpoint. Needs an OTLP endpoint.
    #[arg(long, env = "EGRESS_CONNECTION_SPANS", help_heading = heading::OTLP)]
    pub connection_spans: bool,
    /// Attributes each record carries (docs/ecosystem.md, "Attribute sets")
    /// [default: default].
    #[arg(long, env = "EGRESS_ATTRIBUTES", help_heading = heading::EXPORT)]
    pub attributes: Option<AttributeSet>,
    /// Keep the `udp_send`/`udp_connect` records of DNS lookups (port 53) besides the
    /// `egress.dns` records (by default a lookup is one DNS record).
    #[arg(long, env = "EGRESS_DNS_KEEP_FLOWS", help_heading = heading::EXPORT)]
    pub dns_keep_flows: bool,
    /// A resolved name is used for connections at least this long after its answer,
    /// whatever its TTL (and as long as a connection to the address is open).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "EGRESS_DNS_TTL_FLOOR", help_heading = heading::ATTRIBUTION)]
    pub dns_ttl_floor: Duration,
    /// Addresses the name cache holds per container (and per pod); beyond it answers
    /// are counted (`egress_collector.dns{what=cache_full}`) and not cached.
    #[arg(long, default_value_t = 4096, env = "EGRESS_DNS_CACHE_PER_CONTAINER", help_heading = heading::ATTRIBUTION)]
    pub dns_cache_per_container: usize,
    /// Addresses the name cache holds in all.
    #[arg(long, default_value_t = 262_144, env = "EGRESS_DNS_CACHE_TOTAL", help_heading = heading::ATTRIBUTION)]
    pub dns_cache_total: usize,
    #[command(flatten)]
    pub enrich: EnrichArgs,
}

/// OTLP export. Each flag overrides the matching `OTEL_EXPORTER_OTLP_*` variable, which
/// overrides the config file.
#[derive(Debug, Clone, Args)]
pub struct OtlpArgs {
    /// OTLP endpoint (base URL); setting one anywhere turns OTLP export on.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_endpoint: Option<String>,
    /// grpc or http/protobuf.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_protocol: Option<String>,
    /// Request header `name=value` (repeatable), e.g. `Authorization=Basic …`.
    #[arg(long = "otlp-header", value_name = "NAME=VALUE", help_heading = heading::OTLP)]
    pub otlp_headers: Vec<String>,
    /// gzip or none.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_compression: Option<String>,
    /// Per-request deadline, e.g. 10s.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_timeout: Option<String>,
    /// CA bundle (PEM) to trust instead of the system roots.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_certificate: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_client_certificate: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, help_heading = heading::OTLP)]
    pub otlp_client_key: Option<PathBuf>,
    /// How often metrics are exported [default: 60s; env OTEL_METRIC_EXPORT_INTERVAL in ms].
    #[arg(long, value_parser = parse_duration, help_heading = heading::EXPORT)]
    pub export_interval: Option<Duration>,
    /// Log records per request [default: 512].
    #[arg(long, help_heading = heading::EXPORT)]
    pub batch_size: Option<usize>,
    /// A partial batch is sent after this long [default: 1s].
    #[arg(long, value_parser = parse_duration, help_heading = heading::EXPORT)]
    pub batch_timeout: Option<Duration>,
    /// Records held while the endpoint is slow or down; beyond it the oldest are dropped
    /// and counted [default: 100000].
    #[arg(long, help_heading = heading::EXPORT)]
    pub queue_records: Option<usize>,
    /// Count `egress.connections` per destination address too (high cardinality).
    #[arg(long, help_heading = heading::EXPORT)]
    pub metrics_destination_address: bool,
    /// Count `egress.connections` per `server.address` too (the name the workload
    /// resolved, else the IP), at most `--metrics-server-address-cap` names per workload
    /// (the rest as `~other`).
    #[arg(long, help_heading = heading::EXPORT)]
    pub metrics_server_address: bool,
    /// Distinct `server.address` values per workload in the metrics.
    #[arg(long, default_value_t = 100, help_heading = heading::EXPORT)]
    pub metrics_server_address_cap: usize,
    /// Send the collector's own logs and spans to the OTLP endpoint too (service.name
    /// egress-collector), besides stderr.
    #[arg(long, help_heading = heading::EXPORT)]
    pub self_telemetry: bool,
    /// TOML config file with `[otlp]`, `[otlp.logs]`, `[otlp.metrics]`,
    /// `[otlp.traces]`, `[export]`, `[capture]` and `[log]` tables (docs/configuration.md).
    #[arg(long, env = "EGRESS_CONFIG", help_heading = heading::RUNTIME)]
    pub config: Option<PathBuf>,
}

impl ProbeArgs {
    pub fn settings(&self) -> ProbeSettings {
        ProbeSettings {
            choice: self.probe,
            btf_path: self.btf.clone(),
            udp_flow_window: self.udp_flow_window,
            ring_buffer_bytes: self.ring_buffer_bytes,
            host_root: self.host_root.clone(),
            cgroup_rate: self.cgroup_rate_limit,
            cgroup_burst: self.cgroup_burst,
            excluded_destinations: self.excluded_destinations(),
            exclude_cgroups: !self.exclude_namespaces.is_empty(),
            // Zero is `off`.
            aggregate_window: self.aggregate_window.filter(|w| !w.is_zero()),
            dns: self.dns,
            // Set by main once the OTLP settings are known.
            track_closes: false,
        }
    }

    fn excluded_destinations(&self) -> Vec<Cidr> {
        let mut cidrs = self.exclude_cidrs.clone();
        if self.exclude_loopback == Some(true) {
            cidrs.extend(Cidr::LOOPBACK);
        }
        cidrs
    }
}

impl RunArgs {
    pub fn pipeline(&self) -> PipelineSettings {
        PipelineSettings {
            queue_capacity: self.queue_capacity as usize,
            stats_interval: self.stats_interval,
            drain_deadline: self.shutdown_deadline,
            host_root: self.probe.host_root.clone(),
            cache: self.enrich.cache(),
            runtimes: self.enrich.runtimes.clone(),
            stdout: self.stdout,
            otlp: None,
            exclude_namespaces: self.probe.exclude_namespaces.clone(),
            outcomes: OutcomeSettings {
                pending_report: self.pending_report,
                close_records: self.close_records,
                spans: self.connection_spans,
                metrics: false,
            },
            attributes: self.attributes.unwrap_or_default(),
            dns: DnsSettings {
                enabled: self.probe.dns,
                keep_flows: self.dns_keep_flows,
                window: self.probe.udp_flow_window,
                cache: CacheLimits {
                    floor: self.dns_ttl_floor,
                    per_scope: self.dns_cache_per_container.max(1),
                    total: self.dns_cache_total.max(1),
                },
                // Set by main with track_closes.
                hold_open: false,
            },
        }
    }
}

impl OtlpArgs {
    /// OTLP settings from flags, environment and `file` (read from `--config`); `None`
    /// when no endpoint is set.
    pub fn settings(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&ConfigFile>,
    ) -> Result<Option<OtlpSettings>, ConfigError> {
        let mut headers = std::collections::HashMap::new();
        for header in &self.otlp_headers {
            let parsed = parse_headers(header).map_err(|reason| SettingError {
                setting: "--otlp-header".into(),
                value: header.clone(),
                reason,
            })?;
            headers.extend(parsed);
        }
        let flags = RawSignal {
            endpoint: self.otlp_endpoint.clone(),
            protocol: self.otlp_protocol.clone(),
            headers: (!headers.is_empty()).then_some(headers),
            compression: self.otlp_compression.clone(),
            timeout: self.otlp_timeout.clone(),
            certificate: self.otlp_certificate.clone(),
            client_certificate: self.otlp_client_certificate.clone(),
            client_key: self.otlp_client_key.clone(),
        };
        let mut layers = Layers::default();
        layers.push(Source::Flags, SourceValues::general(flags));
        layers.push(Source::Env, SourceValues::from_env(env)?);
        let no_file = FileExport::default();
        let export = match file {
            Some(file) => {
                let path = self.config.clone().unwrap_or_default();
                layers.push(Source::File(path), file.otlp.clone());
                &file.export
            }
            None => &no_file,
        };
        if !layers.any_endpoint() {
            return Ok(None);
        }
        let file_duration =
            |value: &Option<String>, key: &str| -> Result<Option<Duration>, ConfigError> {
                value
                    .as_deref()
                    .map(|v| {
                        parse_duration(v).map_err(|reason| SettingError {
                            setting: format!("[export] {key}"),
                            value: v.to_owned(),
                            reason,
                        })
                    })
                    .transpose()
                    .map_err(ConfigError::from)
            };
        let env_interval = match env("OTEL_METRIC_EXPORT_INTERVAL").filter(|v| !v.is_empty()) {
            Some(ms) => Some(
                ms.parse::<u64>()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| SettingError {
                        setting: "OTEL_METRIC_EXPORT_INTERVAL".into(),
                        value: ms.clone(),
                        reason: "expected milliseconds greater than zero".into(),
                    })?,
            ),
            None => None,
        };
        let positive =
            |value: Option<usize>, setting: &str| -> Result<Option<usize>, SettingError> {
                match value {
                    Some(0) => Err(SettingError {
                        setting: setting.into(),
                        value: "0".into(),
                        reason: "must be at least 1".into(),
                    }),
                    other => Ok(other),
                }
            };
        Ok(Some(OtlpSettings {
            logs: layers.resolve(Signal::Logs)?,
            metrics: layers.resolve(Signal::Metrics)?,
            traces: layers.resolve(Signal::Traces)?,
            self_telemetry: self.self_telemetry || export.self_telemetry.unwrap_or(false),
            export_interval: self
                .export_interval
                .or(env_interval)
                .or(file_duration(&export.interval, "interval")?)
                .unwrap_or(Duration::from_secs(60)),
            batch_size: positive(self.batch_size, "--batch-size")?
                .or(positive(export.batch_size, "[export] batch_size")?)
                .unwrap_or(512),
            batch_timeout: self
                .batch_timeout
                .or(file_duration(&export.batch_timeout, "batch_timeout")?)
                .unwrap_or(Duration::from_secs(1)),
            queue_records: positive(self.queue_records, "--queue-records")?
                .or(positive(export.queue_records, "[export] queue_records")?)
                .unwrap_or(100_000),
            metrics_destination_address: self.metrics_destination_address
                || export.metrics_destination_address.unwrap_or(false),
            metrics_server_address: self
                .metrics_server_address
                .then_some(self.metrics_server_address_cap.max(1)),
            self_resource: resource_attributes(env)?,
        }))
    }
}

// ---- Enrichment: the container cache and the runtimes' file locations (`[enrich]`).

/// How connections are attributed to containers (docs/attribution.md).
#[derive(Debug, Clone, Args)]
pub struct EnrichArgs {
    /// Containers whose identity is kept in memory; beyond it the least recently used is
    /// evicted (counted) and read again from the runtime's files when it next connects
    /// [default: 8192].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), env = "EGRESS_CONTAINER_CACHE_SIZE", help_heading = heading::ATTRIBUTION)]
    pub container_cache_size: Option<u32>,
    /// From the config file's `[enrich]` table only.
    #[arg(skip)]
    pub runtimes: RuntimeLocations,
}

impl EnrichArgs {
    pub fn cache(&self) -> CacheSettings {
        let mut cache = CacheSettings::default();
        if let Some(size) = self.container_cache_size {
            cache.capacity = size as usize;
        }
        cache
    }
}
