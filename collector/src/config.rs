//! Command line (and environment) into validated settings. The doc comments on the
//! arguments are the reference (`egress-collector run --help`).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use egress_shared::{MAX_CGROUP_BURST, MAX_CGROUP_RATE};

use crate::{
    export::attributes::AttributeSet,
    export::otlp::settings::{
        Layers, OtlpSettings, RawSignal, SettingError, Signal, Source, SourceValues, parse_headers,
        resource_attributes,
    },
    pipeline::PipelineSettings,
    probe::{Cidr, ProbeChoice, ProbeSettings},
};

/// The sections of `run --help`, and of docs/configuration.md (a unit test keeps them in
/// step): every `run` flag belongs to one.
pub mod heading {
    pub const CAPTURE: &str = "Capture";
    pub const ATTRIBUTION: &str = "Attribution";
    pub const FILTERS: &str = "Filters";
    pub const OTLP: &str = "OTLP";
    pub const EXPORT: &str = "Export";
    pub const RUNTIME: &str = "Runtime";
    pub const ALL: [&str; 6] = [CAPTURE, ATTRIBUTION, FILTERS, OTLP, EXPORT, RUNTIME];
}

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
            outcomes: crate::events::OutcomeSettings {
                pending_report: self.pending_report,
                close_records: self.close_records,
                spans: self.connection_spans,
                metrics: false,
            },
            attributes: self.attributes.unwrap_or_default(),
            dns: crate::events::names::DnsSettings {
                enabled: self.probe.dns,
                keep_flows: self.dns_keep_flows,
                window: self.probe.udp_flow_window,
                cache: crate::dns::cache::CacheLimits {
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

/// `90`, `90s`, `1500ms`, `5m`, `1h`; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 60s, 500ms, 5m)"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    if duration.is_zero() {
        return Err("a duration must be greater than zero".into());
    }
    Ok(duration)
}

/// A duration of at least 1s, or `off` (zero). Windows are numbered in 32 bits of
/// boot time: a second's windows last 136 years of uptime.
fn parse_aggregate_window(text: &str) -> Result<Duration, String> {
    if text.trim() == "off" {
        return Ok(Duration::ZERO);
    }
    let window = parse_duration(text)?;
    if window < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is too short: the aggregation window is at least 1s"
        ));
    }
    Ok(window)
}

fn parse_ring_buffer_bytes(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} must be a power of two and at least 4096"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn ring_buffer_sizes() {
        assert_eq!(parse_ring_buffer_bytes("4096"), Ok(4096));
        assert!(parse_ring_buffer_bytes("5000").is_err());
        assert!(parse_ring_buffer_bytes("2048").is_err());
        assert!(parse_ring_buffer_bytes("lots").is_err());
    }

    #[test]
    fn the_config_file_sets_traces_and_self_telemetry_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("egress-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("egress.toml");
        std::fs::write(
            &path,
            "[otlp]\nendpoint = \"http://file:4318\"\nprotocol = \"http/protobuf\"\n\
             [otlp.traces]\nendpoint = \"http://jaeger:4318/v1/traces\"\n\
             [export]\nself_telemetry = true\nbatch_size = 64\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from([
            "egress-collector",
            "--config",
            path.to_str().expect("utf-8"),
            "--batch-size",
            "128",
        ])
        .expect("valid");
        let settings = cli
            .run
            .otlp
            .settings(
                &|_| None,
                cli.run.read_config_file().expect("file").as_ref(),
            )
            .expect("valid")
            .expect("on");
        assert!(settings.self_telemetry);
        assert_eq!(settings.batch_size, 128);
        assert_eq!(settings.logs.url, "http://file:4318/v1/logs");
        assert_eq!(settings.traces.url, "http://jaeger:4318/v1/traces");
        std::fs::write(&path, "[otlp.spans]\nendpoint = \"http://x\"\n").expect("write");
        let error = cli.run.read_config_file().expect_err("unknown table");
        assert!(error.to_string().contains("spans"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reads the file once and applies its `[capture]` and `[log]` tables, as main does.
    fn apply_capture(run: &mut RunArgs) -> Result<(), ConfigError> {
        let file = run.read_config_file()?;
        run.apply_capture_file(file.as_ref())
    }

    #[test]
    fn the_config_file_sets_capture_filters_unless_a_flag_does() {
        let dir = std::env::temp_dir().join(format!("egress-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("egress.toml");
        std::fs::write(
            &path,
            "[capture]\nexclude_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\nexclude_loopback = true\n\
             exclude_namespaces = [\"kube-system\"]\naggregate_window = \"2s\"\n",
        )
        .expect("write");
        let config = path.to_str().expect("utf-8");
        let mut cli = Cli::try_parse_from(["egress-collector", "--config", config]).expect("valid");
        apply_capture(&mut cli.run).expect("valid file");
        let settings = cli.run.probe.settings();
        assert_eq!(
            settings.excluded_destinations.len(),
            4,
            "2 prefixes + loopback"
        );
        assert!(settings.exclude_cgroups);
        assert_eq!(settings.aggregate_window, Some(Duration::from_secs(2)));
        let mut cli = Cli::try_parse_from([
            "egress-collector",
            "--config",
            config,
            "--exclude-cidr",
            "192.0.2.0/24",
            "--aggregate-window",
            "3s",
        ])
        .expect("valid");
        apply_capture(&mut cli.run).expect("valid file");
        assert_eq!(
            cli.run.probe.exclude_cidrs,
            vec!["192.0.2.0/24".parse().expect("cidr")]
        );
        assert_eq!(cli.run.probe.aggregate_window, Some(Duration::from_secs(3)));
        let mut cli = Cli::try_parse_from([
            "egress-collector",
            "--config",
            config,
            "--exclude-loopback=false",
            "--aggregate-window",
            "off",
        ])
        .expect("valid");
        apply_capture(&mut cli.run).expect("valid file");
        let settings = cli.run.probe.settings();
        assert_eq!(
            settings.excluded_destinations.len(),
            2,
            "loopback turned off by the flag"
        );
        assert_eq!(settings.aggregate_window, None, "off beats the file");
        assert!(
            Cli::try_parse_from(["egress-collector", "--aggregate-window", "500ms"]).is_err(),
            "windows under a second are refused"
        );
        let error_for = |file: &str| {
            std::fs::write(&path, file).expect("write");
            let mut cli =
                Cli::try_parse_from(["egress-collector", "--config", config]).expect("valid");
            apply_capture(&mut cli.run)
                .expect_err("a bad file")
                .to_string()
        };
        let error = error_for("[capture]\nexclude_cidrs = [\"10.0.0.0/40\"]\n");
        assert!(
            error.contains("[capture] exclude_cidrs") && error.contains("0 to 32"),
            "{error}"
        );
        let error = error_for("[capture]\nexclude_cidr = [\"10.0.0.0/8\"]\n");
        assert!(error.contains("exclude_cidr"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limit_settings_have_bounds_and_the_error_names_the_setting() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["egress-collector"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
        };
        let cli = parse(&[
            "--cgroup-rate-limit",
            "1000000",
            "--cgroup-burst",
            "1000000",
        ])
        .expect("the maxima are accepted");
        assert_eq!(cli.run.probe.cgroup_rate_limit, MAX_CGROUP_RATE);
        assert_eq!(cli.run.probe.cgroup_burst, MAX_CGROUP_BURST);
        assert!(
            parse(&["--cgroup-rate-limit", "0"]).is_ok(),
            "0 turns it off"
        );
        for (args, setting) in [
            (["--cgroup-burst", "1000001"], "--cgroup-burst"),
            (["--cgroup-burst", "4294967295"], "--cgroup-burst"),
            (["--cgroup-burst", "0"], "--cgroup-burst"),
            (["--cgroup-rate-limit", "1000001"], "--cgroup-rate-limit"),
        ] {
            let error = parse(&args).expect_err("out of range").to_string();
            let first = error.lines().next().unwrap_or_default();
            assert!(first.contains(setting), "{args:?}: {error}");
        }
    }

    #[test]
    fn the_attribute_set_comes_from_the_flag_then_the_file_then_the_default() {
        let dir = std::env::temp_dir().join(format!("egress-attributes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("egress.toml");
        let config = path.to_str().expect("utf-8");
        let set = |file: &str, flags: &[&str]| {
            std::fs::write(&path, file).expect("write");
            let mut args = vec!["egress-collector", "--config", config];
            args.extend(flags);
            let mut cli = Cli::try_parse_from(args).expect("valid");
            let file = cli.run.read_config_file().map_err(|e| e.to_string())?;
            cli.run
                .apply_capture_file(file.as_ref())
                .map(|()| cli.run.pipeline().attributes)
                .map_err(|e| e.to_string())
        };
        assert_eq!(set("", &[]), Ok(AttributeSet::Default));
        assert_eq!(
            set("[export]\nattributes = \"full\"\n", &[]),
            Ok(AttributeSet::Full)
        );
        assert_eq!(
            set(
                "[export]\nattributes = \"full\"\n",
                &["--attributes", "minimal"]
            ),
            Ok(AttributeSet::Minimal)
        );
        let error = set("[export]\nattributes = \"most\"\n", &[]).expect_err("bad set");
        assert!(
            error.contains("[export] attributes") && error.contains("minimal, default or full"),
            "{error}"
        );
        assert!(Cli::try_parse_from(["egress-collector", "--attributes", "most"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// docs/configuration.md lists every `run` flag once, in the section of its help
    /// heading, with its environment variable; and nothing else.
    #[test]
    fn the_configuration_reference_lists_every_flag_under_its_heading() {
        use clap::CommandFactory;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let doc = std::fs::read_to_string(path).expect("docs/configuration.md");
        // flag -> (section, row)
        let mut documented: std::collections::BTreeMap<String, (String, String)> =
            Default::default();
        let mut section = String::new();
        for line in doc.lines() {
            if let Some(title) = line.strip_prefix("## ") {
                section = title.trim().to_owned();
                continue;
            }
            let Some(first_cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
                continue;
            };
            for part in first_cell.split("`--").skip(1) {
                let flag: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let previous = documented.insert(flag.clone(), (section.clone(), line.to_owned()));
                assert!(previous.is_none(), "--{flag} is documented twice");
            }
        }
        let mut command = Cli::command();
        command.build();
        let run = command.find_subcommand("run").expect("run subcommand");
        let mut problems = Vec::new();
        let mut flags = std::collections::BTreeSet::new();
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            flags.insert(long.to_owned());
            let heading = arg.get_help_heading();
            if !heading.is_some_and(|h| heading::ALL.contains(&h)) {
                problems.push(format!(
                    "--{long} has help heading {heading:?}, not one of {:?}",
                    heading::ALL
                ));
            }
            match documented.get(long) {
                None => problems.push(format!("--{long} is missing from docs/configuration.md")),
                Some((section, row)) => {
                    if heading.is_some_and(|h| h != section) {
                        problems.push(format!(
                            "--{long} is documented under {section:?}, its help heading is {heading:?}"
                        ));
                    }
                    if let Some(env) = arg.get_env().and_then(|e| e.to_str())
                        && !row.contains(env)
                    {
                        problems.push(format!("--{long}: its row does not name {env}"));
                    }
                }
            }
        }
        for flag in documented.keys().filter(|f| !flags.contains(*f)) {
            problems.push(format!(
                "docs/configuration.md documents --{flag}, which run does not take"
            ));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn run_is_the_default_command() {
        let cli = Cli::try_parse_from(["egress-collector", "--stdout", "--probe", "tracepoint"])
            .expect("valid");
        assert!(cli.command.is_none());
        assert!(cli.run.stdout);
        let cli =
            Cli::try_parse_from(["egress-collector", "check", "--probe", "kprobe"]).expect("valid");
        assert!(matches!(cli.command, Some(Command::Check(_))));
        assert!(Cli::try_parse_from(["egress-collector", "--probe", "magic"]).is_err());
    }
}

/// A problem with the configuration: one line naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// How the collector's own logs are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human lines; ANSI colours only when stderr is a terminal (and NO_COLOR is unset).
    #[default]
    Text,
    /// One JSON object per line, the event's fields as keys.
    Json,
}

/// `[log]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<LogFormat>,
}

/// `[export]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    interval: Option<String>,
    batch_size: Option<usize>,
    batch_timeout: Option<String>,
    queue_records: Option<usize>,
    metrics_destination_address: Option<bool>,
    self_telemetry: Option<bool>,
    attributes: Option<String>,
}

/// `[capture]`: the in-kernel filters and aggregation (README, "Filters and aggregation").
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCapture {
    exclude_cidrs: Option<Vec<String>>,
    exclude_loopback: Option<bool>,
    exclude_namespaces: Option<Vec<String>>,
    aggregate_window: Option<String>,
}

/// The config file, read and parsed once ([`RunArgs::read_config_file`]) and handed to
/// each part of the configuration that takes values from it.
#[derive(Debug)]
pub struct ConfigFile {
    otlp: SourceValues,
    export: FileExport,
    capture: FileCapture,
    log: FileLog,
    enrich: FileEnrich,
}

fn read_config_file(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
    let take = |table: &mut toml::Table, key: &str| -> Result<toml::Table, ConfigError> {
        match table.remove(key) {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(t)) => Ok(t),
            Some(_) => Err(file_error(format!("{key} must be a table"))),
        }
    };
    let mut otlp = take(&mut table, "otlp")?;
    let export = take(&mut table, "export")?;
    let capture = take(&mut table, "capture")?;
    let log = take(&mut table, "log")?;
    let enrich = take(&mut table, "enrich")?;
    if let Some(key) = table.keys().next() {
        return Err(file_error(format!(
            "unknown table or key {key:?} (expected otlp, export, capture, log, enrich)"
        )));
    }
    let logs = take(&mut otlp, "logs")?;
    let metrics = take(&mut otlp, "metrics")?;
    let traces = take(&mut otlp, "traces")?;
    let signal = |t: toml::Table, name: &str| -> Result<RawSignal, ConfigError> {
        t.try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[{name}] {}", e.message())))
    };
    Ok(ConfigFile {
        otlp: SourceValues {
            general: signal(otlp, "otlp")?,
            logs: signal(logs, "otlp.logs")?,
            metrics: signal(metrics, "otlp.metrics")?,
            traces: signal(traces, "otlp.traces")?,
        },
        export: export
            .try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[export] {}", e.message())))?,
        capture: capture
            .try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[capture] {}", e.message())))?,
        log: log
            .try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[log] {}", e.message())))?,
        enrich: enrich
            .try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[enrich] {}", e.message())))?,
    })
}

impl RunArgs {
    /// Reads and parses `--config` (when given): once, for every part that uses it.
    pub fn read_config_file(&self) -> Result<Option<ConfigFile>, ConfigError> {
        self.otlp
            .config
            .as_deref()
            .map(read_config_file)
            .transpose()
    }

    /// Fills the capture settings that no flag or variable set from the file's
    /// `[capture]` table, the attribute set from `[export] attributes` and the log format
    /// from `[log]`.
    pub fn apply_capture_file(&mut self, file: Option<&ConfigFile>) -> Result<(), ConfigError> {
        let (Some(path), Some(file)) = (self.otlp.config.clone(), file) else {
            return Ok(());
        };
        if self.attributes.is_none()
            && let Some(set) = &file.export.attributes
        {
            self.attributes = Some(set.parse().map_err(|reason| ConfigError::File {
                path: path.clone(),
                reason: format!("[export] attributes: {reason}"),
            })?);
        }
        if self.log_format.is_none() {
            self.log_format = file.log.format;
        }
        let capture = &file.capture;
        let invalid = |key: &str, reason: String| ConfigError::File {
            path: path.clone(),
            reason: format!("[capture] {key}: {reason}"),
        };
        let probe = &mut self.probe;
        if probe.exclude_cidrs.is_empty() {
            for cidr in capture.exclude_cidrs.iter().flatten() {
                probe
                    .exclude_cidrs
                    .push(cidr.parse().map_err(|e| invalid("exclude_cidrs", e))?);
            }
        }
        if probe.exclude_loopback.is_none() {
            probe.exclude_loopback = capture.exclude_loopback;
        }
        if probe.exclude_namespaces.is_empty() {
            probe.exclude_namespaces = capture.exclude_namespaces.clone().unwrap_or_default();
        }
        if probe.aggregate_window.is_none()
            && let Some(window) = &capture.aggregate_window
        {
            probe.aggregate_window =
                Some(parse_aggregate_window(window).map_err(|e| invalid("aggregate_window", e))?);
        }
        Ok(())
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
        layers.push(
            Source::Flags,
            SourceValues {
                general: flags,
                ..SourceValues::default()
            },
        );
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
    pub runtimes: crate::enrich::runtime::RuntimeLocations,
}

impl EnrichArgs {
    pub fn cache(&self) -> crate::enrich::cache::CacheSettings {
        let mut cache = crate::enrich::cache::CacheSettings::default();
        if let Some(size) = self.container_cache_size {
            cache.capacity = size as usize;
        }
        cache
    }
}

/// `[enrich]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEnrich {
    container_cache_size: Option<u32>,
    docker_data_root: Option<PathBuf>,
    containerd_state_dirs: Option<Vec<PathBuf>>,
    containerd_namespaces: Option<Vec<String>>,
    crio_run_root: Option<PathBuf>,
}

impl RunArgs {
    /// The container cache size (unless a flag or variable set it) and the runtimes'
    /// locations from the file's `[enrich]` table.
    pub fn apply_enrich_file(&mut self, file: Option<&ConfigFile>) -> Result<(), ConfigError> {
        let (Some(path), Some(file)) = (self.otlp.config.clone(), file) else {
            return Ok(());
        };
        let file = &file.enrich;
        let invalid = |key: &str, reason: &str| ConfigError::File {
            path: path.clone(),
            reason: format!("[enrich] {key}: {reason}"),
        };
        let host_path = |key: &str, p: &PathBuf| {
            if p.is_absolute() {
                Ok(p.clone())
            } else {
                Err(invalid(
                    key,
                    &format!("{} is not an absolute host path", p.display()),
                ))
            }
        };
        if self.enrich.container_cache_size.is_none() {
            if file.container_cache_size == Some(0) {
                return Err(invalid("container_cache_size", "must be at least 1"));
            }
            self.enrich.container_cache_size = file.container_cache_size;
        }
        let runtimes = &mut self.enrich.runtimes;
        if let Some(p) = &file.docker_data_root {
            runtimes.docker_data_root = Some(host_path("docker_data_root", p)?);
        }
        for p in file.containerd_state_dirs.iter().flatten() {
            let p = host_path("containerd_state_dirs", p)?;
            runtimes.containerd_state_dirs.push(p);
        }
        for ns in file.containerd_namespaces.iter().flatten() {
            if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
                return Err(invalid(
                    "containerd_namespaces",
                    &format!("{ns:?} is not a namespace name"),
                ));
            }
            runtimes.containerd_namespaces.push(ns.clone());
        }
        if let Some(p) = &file.crio_run_root {
            runtimes.crio_run_root = Some(host_path("crio_run_root", p)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod enrich_tests {
    use super::*;

    fn with_file(text: &str, args: &[&str]) -> Result<RunArgs, ConfigError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("egress-enrich-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("egress.toml");
        std::fs::write(&path, text).expect("write");
        let mut all = vec![
            "egress-collector",
            "--config",
            path.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(args);
        let mut run = Cli::try_parse_from(all).expect("valid flags").run;
        let result = run
            .read_config_file()
            .and_then(|file| run.apply_enrich_file(file.as_ref()))
            .map(|()| run);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn the_enrich_table_sets_runtime_locations_and_the_cache_size() {
        let run = with_file(
            "[enrich]\ncontainer_cache_size = 100\ndocker_data_root = \"/srv/docker\"\n\
             containerd_state_dirs = [\"/run/k0s/containerd\"]\n\
             containerd_namespaces = [\"k8s.io\", \"tenant\"]\n\
             crio_run_root = \"/var/run/crio-storage\"\n",
            &[],
        )
        .expect("valid");
        let pipeline = run.pipeline();
        assert_eq!(pipeline.cache.capacity, 100);
        let r = &pipeline.runtimes;
        assert_eq!(r.docker_data_root, Some(PathBuf::from("/srv/docker")));
        assert_eq!(
            r.containerd_state_dirs,
            vec![PathBuf::from("/run/k0s/containerd")]
        );
        assert_eq!(r.containerd_namespaces, vec!["k8s.io", "tenant"]);
        assert_eq!(
            r.crio_run_root,
            Some(PathBuf::from("/var/run/crio-storage"))
        );
        // The flag beats the file.
        let run = with_file(
            "[enrich]\ncontainer_cache_size = 100\n",
            &["--container-cache-size", "7"],
        )
        .expect("valid");
        assert_eq!(run.pipeline().cache.capacity, 7);
        // Neither: today's default.
        let run = Cli::try_parse_from(["egress-collector"])
            .expect("valid")
            .run;
        assert_eq!(run.pipeline().cache.capacity, 8192);
        assert!(Cli::try_parse_from(["egress-collector", "--container-cache-size", "0"]).is_err());
    }

    #[test]
    fn bad_enrich_settings_are_one_line_errors() {
        let error = |text: &str| {
            with_file(text, &[])
                .map(|_| ())
                .expect_err("a bad file")
                .to_string()
        };
        let e = error("[enrich]\ndocker_data_root = \"var/lib/docker\"\n");
        assert!(
            e.contains("[enrich] docker_data_root") && e.contains("absolute"),
            "{e}"
        );
        let e = error("[enrich]\ncontainerd_namespaces = [\"../x\"]\n");
        assert!(e.contains("containerd_namespaces"), "{e}");
        let e = error("[enrich]\ncontainer_cache_size = 0\n");
        assert!(e.contains("container_cache_size"), "{e}");
        let e = error("[enrich]\ncrio_runroot = \"/x\"\n");
        assert!(e.contains("crio_runroot"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
