//! The typed settings each stage takes, produced by the command line and the config file
//! ([`super::RunArgs`]). Plain values: the stages read them, nothing here reaches a stage.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use super::otlp::OtlpSettings;

// ---- Probes (`probe`)

/// A family of hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookMode {
    Kprobe,
    Fentry,
    Tracepoint,
}

impl HookMode {
    /// The order `auto` tries them in.
    pub const PREFERENCE: [HookMode; 3] =
        [HookMode::Kprobe, HookMode::Fentry, HookMode::Tracepoint];

    pub fn as_str(self) -> &'static str {
        match self {
            HookMode::Kprobe => "kprobe",
            HookMode::Fentry => "fentry",
            HookMode::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--probe`: a family, or the first that works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeChoice {
    Auto,
    Only(HookMode),
}

impl ProbeChoice {
    pub fn candidates(self) -> Vec<HookMode> {
        match self {
            ProbeChoice::Auto => HookMode::PREFERENCE.to_vec(),
            ProbeChoice::Only(mode) => vec![mode],
        }
    }
}

impl FromStr for ProbeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ProbeChoice::Auto),
            "kprobe" => Ok(ProbeChoice::Only(HookMode::Kprobe)),
            "fentry" => Ok(ProbeChoice::Only(HookMode::Fentry)),
            "tracepoint" => Ok(ProbeChoice::Only(HookMode::Tracepoint)),
            other => Err(format!(
                "unknown probe mode {other:?}: expected auto, kprobe, fentry or tracepoint"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub choice: ProbeChoice,
    /// Kernel BTF; `None` reads `/sys/kernel/btf/vmlinux`.
    pub btf_path: Option<PathBuf>,
    pub udp_flow_window: Duration,
    pub ring_buffer_bytes: u32,
    pub host_root: PathBuf,
    /// Events per second per cgroup (0: unlimited) and the burst allowed above it.
    pub cgroup_rate: u32,
    pub cgroup_burst: u32,
    /// Destinations dropped in the kernel.
    pub excluded_destinations: Vec<Cidr>,
    /// User space will list cgroups to drop (it excludes Kubernetes namespaces).
    pub exclude_cgroups: bool,
    /// Identical connections within a window are reported once with a count; `None`
    /// reports every connection.
    pub aggregate_window: Option<Duration>,
    /// Capture DNS answers (docs/dns.md).
    pub dns: bool,
    /// Follow TCP connections to their close (close records, metrics, spans need it).
    pub track_closes: bool,
}

/// An address prefix, `10.0.0.0/8` or `fd00::/8`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// What `--exclude-loopback` adds.
    pub const LOOPBACK: [Cidr; 2] = [
        Cidr {
            address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix_len: 8,
        },
        Cidr {
            address: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix_len: 128,
        },
    ];
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| {
            format!("{text:?} is not an address prefix (e.g. 10.0.0.0/8, fd00::/8)")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        // The programs match IPv4-mapped destinations against the IPv4 prefixes.
        if let IpAddr::V6(v6) = address
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix_len >= 96
        {
            return Ok(Self {
                address: IpAddr::V4(v4),
                prefix_len: prefix_len - 96,
            });
        }
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

// ---- Reading and naming events (`events`, `dns`)

/// What the reader does with TCP outcomes and closes.
#[derive(Debug, Clone)]
pub struct OutcomeSettings {
    /// An attempt still in SYN_SENT this long is reported, marked pending.
    pub pending_report: Duration,
    /// Close records become log records (`--close-records`).
    pub close_records: bool,
    /// One span per TCP connection (`--connection-spans`).
    pub spans: bool,
    /// Something consumes metrics-only records (OTLP metrics or spans).
    pub metrics: bool,
}

impl Default for OutcomeSettings {
    fn default() -> Self {
        Self {
            pending_report: Duration::from_secs(5),
            close_records: false,
            spans: false,
            metrics: false,
        }
    }
}

impl OutcomeSettings {
    /// Whether close records go anywhere (log records, the metrics, spans); if not, an
    /// established connection is not kept for its close (a copy per connection).
    pub fn closes_used(&self) -> bool {
        self.close_records || self.metrics || self.spans
    }
}

/// DNS settings of the reader (`--dns*` flags).
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub enabled: bool,
    /// Keep the `udp_send`/`udp_connect` records of lookups (port 53) besides the DNS
    /// records.
    pub keep_flows: bool,
    /// The same container/name/type/rcode is reported once per window.
    pub window: Duration,
    pub cache: CacheLimits,
    /// Connections named from the cache keep its entry alive until they close; only
    /// where the kernel follows closes (`track_closes`), else entries live by TTL.
    pub hold_open: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            keep_flows: false,
            window: Duration::from_secs(60),
            cache: CacheLimits::default(),
            hold_open: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Answers are kept at least this long, whatever their TTL.
    pub floor: Duration,
    /// Addresses per container (and per pod).
    pub per_scope: usize,
    /// Addresses in all.
    pub total: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            floor: Duration::from_secs(30),
            per_scope: 4096,
            total: 262_144,
        }
    }
}

// ---- Attribution (`enrich`)

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub capacity: usize,
    /// How long a failed lookup is trusted before the files are read again.
    pub retry_after: Duration,
    /// How long a removed container's identity stays, for events still in flight.
    pub removal_grace: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 8192,
            retry_after: Duration::from_secs(30),
            removal_grace: Duration::from_secs(60),
        }
    }
}

/// Where the runtimes keep their files when a distribution moved them (config file
/// `[enrich]`; docs/attribution.md). Host paths; empty or `None` means the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeLocations {
    /// docker's data-root, instead of what `/etc/docker/daemon.json` says.
    pub docker_data_root: Option<PathBuf>,
    /// containerd state directories (each holding `io.containerd.runtime.v2.task`),
    /// instead of `/run/containerd` and `/run/k3s/containerd`.
    pub containerd_state_dirs: Vec<PathBuf>,
    /// containerd namespaces searched first, instead of
    /// `k8s.io` and `moby`; the others are still searched after them.
    pub containerd_namespaces: Vec<String>,
    /// CRI-O's storage run root, instead of `/run/containers/storage`.
    pub crio_run_root: Option<PathBuf>,
}

// ---- Export (`export`)

/// Which attributes a record carries (`--attributes`). The sets are defined by what they
/// leave out, so an attribute added later is in every set until listed here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributeSet {
    /// Who (through the resource), process name and pid, event, destination and port,
    /// transport, outcome and counts: the audit's questions and little else.
    Minimal,
    /// `minimal` plus source address and port, parent pid, user id, network type and
    /// host-network flag: everything but the deep-forensics fields.
    #[default]
    Default,
    /// Every attribute: `default` plus namespace inodes, cgroup ids and names, thread id
    /// and name, in-container pid, gid and UTS nodename.
    Full,
}

impl std::str::FromStr for AttributeSet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(text.trim(), true)
            .map_err(|_| format!("{text:?} is not an attribute set (minimal, default or full)"))
    }
}

// ---- The whole pipeline (`pipeline`)

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Capacity of each queue between stages.
    pub queue_capacity: usize,
    pub stats_interval: Duration,
    /// How long shutdown may take to drain (`--shutdown-deadline`).
    pub drain_deadline: Duration,
    /// Where the host's filesystem is mounted (runtime files are read under it).
    pub host_root: PathBuf,
    pub cache: CacheSettings,
    /// Runtime file locations that differ from the defaults.
    pub runtimes: RuntimeLocations,
    /// JSON lines on stdout (always, when no OTLP endpoint is configured).
    pub stdout: bool,
    pub otlp: Option<OtlpSettings>,
    /// Kubernetes namespaces whose connections are dropped.
    pub exclude_namespaces: Vec<String>,
    /// Pending attempts and close records (`metrics` is set here from `otlp`).
    pub outcomes: OutcomeSettings,
    /// The attributes each record carries.
    pub attributes: AttributeSet,
    /// DNS answers and the names of connections.
    pub dns: DnsSettings,
}
