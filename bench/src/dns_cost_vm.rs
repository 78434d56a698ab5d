//! What DNS capture costs in the kprobe and fentry families (`egress-bench dns-cost-vm`),
//! on a Debian kernel booted under qemu (this host allows neither). The guest runs this
//! bench's own `dns-cost-guest` (static build): a loopback bulk transfer of its own
//! (bench/src/bulk.rs: a TCP stream, then 1400-byte UDP datagrams) without the collector,
//! with it (DNS on, then `--dns=false`) and with empty programs on the collector's DNS
//! hooks (the floor), and prints one line per transfer; the host reads them off the
//! serial console. Emulation inflates every time: the figures are ratios within the VM.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use egress_testkit::vm::{self, Boot, GUEST_BPF_MOUNTS, GUEST_MOUNTS, Scratch, after_marker};

use crate::kernel_cost_vm::{Tree, revision};

const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";
const DONE_MARKER: &str = "EGRESS-VM-DNS-COST ";
const ROW_MARKER: &str = "EGRESS-DNS-COST ";
/// The collector's warnings, echoed by the host.
pub(crate) const LOG_MARKER: &str = "EGRESS-DNS-COST-LOG ";
const GUEST_BENCH: &str = "/egress-bench";
const GUEST_COLLECTOR: &str = "/collectors/egress-collector";

#[derive(clap::Args)]
pub struct Args {
    /// Debian kernel series (scripts/vm-kernel.sh): 6.1, 6.12 or 6.12-rt.
    #[arg(long, default_value = "6.12")]
    pub series: String,
    /// Hook families measured in the one boot.
    #[arg(long, value_delimiter = ',', default_value = "kprobe,fentry")]
    pub probes: Vec<String>,
    /// A collector binary (static, or dynamic: its libraries are copied in). By default
    /// the workspace's own, built static for the guest.
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// Rounds; the observers' order alternates from one round to the next.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Seconds per bulk transfer.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Past this the guest is stuck and is killed.
    #[arg(long, default_value_t = 1500)]
    pub timeout_seconds: u64,
    /// The workspace: scripts/vm-kernel.sh and the static build.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// Report to update (its `dns-cost-vm-<series>` section).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub report: PathBuf,
    /// A sentence about this run's conditions for the report.
    #[arg(long)]
    pub note: Option<String>,
}

/// Who watches the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observer {
    None,
    Dns,
    NoDns,
    Empty,
}

impl Observer {
    pub(crate) const ALL: [Observer; 4] = [
        Observer::None,
        Observer::Dns,
        Observer::NoDns,
        Observer::Empty,
    ];

    fn key(self) -> &'static str {
        match self {
            Observer::None => "none",
            Observer::Dns => "dns",
            Observer::NoDns => "nodns",
            Observer::Empty => "empty",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.key() == key)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Observer::None => "no collector",
            Observer::Dns => "collector",
            Observer::NoDns => "collector `--dns=false`",
            Observer::Empty => "empty programs on the same hooks (floor)",
        }
    }
}

/// One transfer as the guest measured it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) probe: String,
    pub(crate) round: u32,
    pub(crate) udp: bool,
    pub(crate) observer: Observer,
    pub(crate) gbps: f64,
    /// Segments (TCP) or datagrams (UDP) the kernel received (/proc/net/snmp).
    pub(crate) received: u64,
    pub(crate) dns_ns: u64,
    pub(crate) dns_runs: u64,
    pub(crate) all_ns: u64,
    /// The DNS programs that ran, by name.
    pub(crate) programs: String,
}

impl Row {
    pub(crate) fn line(&self) -> String {
        format!(
            "{ROW_MARKER}probe={} round={} load={} observer={} gbps={:.4} received={} dns_ns={} dns_runs={} all_ns={} programs={}",
            self.probe,
            self.round,
            if self.udp { "udp" } else { "tcp" },
            self.observer.key(),
            self.gbps,
            self.received,
            self.dns_ns,
            self.dns_runs,
            self.all_ns,
            if self.programs.is_empty() {
                "-"
            } else {
                &self.programs
            },
        )
    }

    fn parse(line: &str) -> Option<Row> {
        let rest = after_marker(line, ROW_MARKER)?;
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let number = |name: &str| field(name)?.parse::<u64>().ok();
        Some(Row {
            probe: field("probe")?.to_owned(),
            round: field("round")?.parse().ok()?,
            udp: field("load")? == "udp",
            observer: Observer::from_key(field("observer")?)?,
            gbps: field("gbps")?.parse().ok()?,
            received: number("received")?,
            dns_ns: number("dns_ns")?,
            dns_runs: number("dns_runs")?,
            all_ns: number("all_ns")?,
            programs: field("programs")?.trim_matches('-').to_owned(),
        })
    }

    fn per_received(&self) -> f64 {
        self.dns_ns as f64 / self.received.max(1) as f64
    }

    fn per_run(&self) -> f64 {
        self.dns_ns as f64 / self.dns_runs.max(1) as f64
    }
}

/// The host's half: builds, boots, reads the rows, writes the report section.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let built = egress_testkit::static_build::build_bench(&args.workspace, &cargo)
        .map_err(anyhow::Error::msg)?;
    let (collector, collector_name) = match &args.collector {
        Some(path) => (path.clone(), path.display().to_string()),
        None => (
            built.join("egress-collector"),
            format!("egress-collector {}", revision(&args.workspace)),
        ),
    };
    let kernel = vm::debian_kernel(&args.workspace, &args.series).map_err(anyhow::Error::msg)?;
    let scratch = Scratch::new(&format!("{}-dns-cost", args.series)).map_err(anyhow::Error::msg)?;
    let initrd = scratch.0.join("initramfs.cpio");
    let mut tree = Tree::new()?;
    tree.add(GUEST_BENCH, &built.join("egress-bench"))?;
    tree.add_with_libraries(GUEST_COLLECTOR, &collector)?;
    tree.cpio.file("init", 0o755, init_script(args).as_bytes());
    std::fs::write(&initrd, tree.cpio.finish())
        .with_context(|| format!("writing {}", initrd.display()))?;
    eprintln!(
        "booting {} under qemu (TCG): {} x {} rounds x 4 observers x 2 loads x {} s",
        kernel.display(),
        args.probes.join("+"),
        args.rounds,
        args.seconds
    );
    let console = vm::boot(&Boot {
        label: &args.series,
        kernel: &kernel,
        initrd: &initrd,
        timeout: Duration::from_secs(args.timeout_seconds),
        echo: &[KERNEL_MARKER, DONE_MARKER, ROW_MARKER, LOG_MARKER],
    })
    .map_err(anyhow::Error::msg)?;
    let release = console
        .lines()
        .find_map(|l| after_marker(l, KERNEL_MARKER))
        .context("the guest never printed its kernel release")?
        .to_owned();
    let verdict = console.lines().find_map(|l| after_marker(l, DONE_MARKER));
    if verdict != Some("PASS") {
        bail!("the guest's dns-cost failed ({verdict:?}); console:\n{console}");
    }
    let rows: Vec<Row> = console.lines().filter_map(Row::parse).collect();
    let tables = tables(&rows, &args.probes, args.rounds)?;
    println!("{tables}");
    let command: Vec<String> = std::env::args().collect();
    crate::report::put_section(
        &args.report,
        &format!("dns-cost-vm-{}", args.series),
        &section(&command.join(" "), args, &collector_name, &release, &tables),
    )
}

/// The guest's /init: mounts, then the bench's `dns-cost-guest`.
fn init_script(args: &Args) -> String {
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}{GUEST_BPF_MOUNTS}echo "{KERNEL_MARKER}$(uname -r) $(uname -v)"
if {GUEST_BENCH} dns-cost-guest --collector {GUEST_COLLECTOR} --probes {probes} \
    --rounds {rounds} --seconds {seconds}; then
    verdict=PASS
else
    verdict=FAIL
fi
echo "{DONE_MARKER}$verdict"
poweroff -f
"#,
        probes = args.probes.join(","),
        rounds = args.rounds,
        seconds = args.seconds,
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn lowest(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(f64::INFINITY, f64::min)
}

/// The summary per family and load, then every transfer.
fn tables(rows: &[Row], probes: &[String], rounds: u32) -> anyhow::Result<String> {
    let expected = probes.len() * rounds as usize * Observer::ALL.len() * 2;
    if rows.len() != expected {
        bail!(
            "{} of {expected} transfers in the guest's output",
            rows.len()
        );
    }
    let mut out = String::from(
        "| family | load | observer | DNS programs that ran | throughput vs no collector (mean over the rounds) | vs `--dns=false` | DNS programs per segment/datagram, lowest (emulated ns) | per run | runs per segment/datagram | ours / floor per segment/datagram |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for probe in probes {
        for udp in [false, true] {
            let of = |o: Observer| -> Vec<&Row> {
                rows.iter()
                    .filter(|r| &r.probe == probe && r.udp == udp && r.observer == o)
                    .collect()
            };
            // Emulated throughput swings by 2x between transfers of one observer: the
            // ratio of the means over the rounds (each observer in every round, the
            // order alternated), not a median of two or three per-round ratios.
            let mean = |o: Observer| {
                let mine = of(o);
                mine.iter().map(|r| r.gbps).sum::<f64>() / mine.len().max(1) as f64
            };
            let ratio_to = |o: Observer, base: Observer| mean(o) / mean(base);
            let floor = lowest(of(Observer::Empty).iter().map(|r| r.per_received()));
            for observer in [Observer::Dns, Observer::NoDns, Observer::Empty] {
                let mine = of(observer);
                let per_received = lowest(mine.iter().map(|r| r.per_received()));
                let per_run = lowest(mine.iter().map(|r| r.per_run()));
                let runs = median(
                    mine.iter()
                        .map(|r| r.dns_runs as f64 / r.received.max(1) as f64)
                        .collect(),
                );
                let versus_off = if observer == Observer::Dns {
                    format!("{:.2}", ratio_to(Observer::Dns, Observer::NoDns))
                } else {
                    "–".to_owned()
                };
                let programs = mine
                    .iter()
                    .map(|r| r.programs.as_str())
                    .find(|p| !p.is_empty())
                    .unwrap_or("none");
                out.push_str(&format!(
                    "| {probe} | {} | {} | {programs} | {:.2} | {versus_off} | {per_received:.0} | {per_run:.0} | {runs:.2} | {:.2} |\n",
                    load(udp),
                    observer.label(),
                    ratio_to(observer, Observer::None),
                    per_received / floor,
                ));
            }
        }
    }
    out.push_str(
        "\nEvery transfer (emulated figures):\n\n\
         | family | round | load | observer | Gbit/s | received | DNS programs ns | runs | every program of the observer, ns per segment/datagram |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {} | {} | {} | {:.0} |\n",
            r.probe,
            r.round,
            load(r.udp),
            r.observer.label(),
            r.gbps,
            r.received,
            r.dns_ns,
            r.dns_runs,
            r.all_ns as f64 / r.received.max(1) as f64,
        ));
    }
    Ok(out)
}

fn load(udp: bool) -> &'static str {
    if udp { "UDP 1400 B" } else { "TCP" }
}

fn section(command: &str, args: &Args, collector: &str, release: &str, tables: &str) -> String {
    let note = args
        .note
        .as_deref()
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    format!(
        "## DNS capture in the kprobe and fentry families: Debian {series} under qemu, as ratios\n\n\
         Generated by `egress-bench dns-cost-vm` on {date}. Command: `{command}`. Guest kernel:\n\
         {release}. Collector: {collector}. {rounds} rounds of {seconds} s per transfer.\n\n\
         The bench's own static build runs in the guest: a loopback bulk transfer inside\n\
         one process (a TCP stream in 64 KiB writes, then 1400-byte UDP datagrams at full\n\
         rate, each read with one recv()) without the collector, with it in each family\n\
         (DNS on, then `--dns=false`), and with empty programs (`r0 = 0; exit`, loaded by\n\
         the bench) where the family's DNS hooks are: a kretprobe and a kprobe on\n\
         `udp_recvmsg`, `udpv6_recvmsg`, `tcp_recvmsg`, or an fexit on each (the floor:\n\
         dispatch and bpf_stats' clock reads; bpftrace, the floor on the host, would need\n\
         LLVM in the guest), in alternating order over the rounds. `DNS programs` is the\n\
         run time of the collector's receive hooks (`kprobe_dns_*`, `kretprobe_dns_*`,\n\
         `fexit_dns_*`; the floor's all) divided by the segments or datagrams the guest\n\
         received (/proc/net/snmp), and per program run (a run is one receive on the\n\
         node, by a process that never marked a DNS socket here). The throughput ratios\n\
         are of the mean over the rounds against no collector, and, for DNS on, against\n\
         `--dns=false`: the collector's UDP send hooks run on the sender too, so that\n\
         second ratio is DNS's own; bpf_stats leaves out dispatch (the kretprobe\n\
         trampoline above all), the ratio does not, but emulated throughput swings by up\n\
         to 2x between transfers of one observer. **Emulation (TCG) inflates every time, and not\n\
         uniformly**: read the ratios; the nanoseconds are raw figures of this run.\n\
         The host's 2 cores were shared with other work, so single rounds are noisy.{note}\n\n\
         {tables}",
        series = args.series,
        date = crate::report::today(),
        rounds = args.rounds,
        seconds = args.seconds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(probe: &str, round: u32, udp: bool, observer: Observer, gbps: f64, ns: u64) -> Row {
        Row {
            probe: probe.to_owned(),
            round,
            udp,
            observer,
            gbps,
            received: 100,
            dns_ns: ns,
            dns_runs: 100,
            all_ns: ns * 2,
            programs: if ns > 0 {
                "fexit_dns_udp_r".into()
            } else {
                "".into()
            },
        }
    }

    #[test]
    fn a_line_reads_back_as_its_row() {
        let r = row("fentry", 2, true, Observer::Dns, 0.5, 1234);
        assert_eq!(Row::parse(&format!("junk{}", r.line())), Some(r));
        let none = row("kprobe", 1, false, Observer::None, 1.0, 0);
        assert_eq!(Row::parse(&none.line()), Some(none));
        assert_eq!(Row::parse("EGRESS-DNS-COST probe=kprobe"), None);
    }

    #[test]
    fn ratios_are_of_the_means_and_every_transfer_is_needed() {
        let mut rows = Vec::new();
        for udp in [false, true] {
            rows.push(row("fentry", 1, udp, Observer::None, 2.0, 0));
            rows.push(row("fentry", 1, udp, Observer::Dns, 1.5, 300));
            rows.push(row("fentry", 1, udp, Observer::NoDns, 1.8, 0));
            rows.push(row("fentry", 1, udp, Observer::Empty, 1.9, 200));
        }
        let out = tables(&rows, &["fentry".to_owned()], 1).expect("tables");
        // 1.5 / 2.0 against none, 1.5 / 1.8 against --dns=false, 3 ns / 2 ns the floor.
        assert!(
            out.contains(
                "| fentry | TCP | collector | fexit_dns_udp_r | 0.75 | 0.83 | 3 | 3 | 1.00 | 1.50 |"
            ),
            "{out}"
        );
        assert!(tables(&rows[1..], &["fentry".to_owned()], 1).is_err());
    }
}
