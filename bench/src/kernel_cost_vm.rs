//! Kernel program time per TCP connection in kprobe mode, on a Debian cloud kernel booted
//! under qemu (this host allows no kprobes). The guest runs this bench's own
//! `kernel-cost` (static build) with the collector in `--probe kprobe` and libbpf-tools
//! `tcpconnect` (Debian's, dynamically linked: copied with its libraries) one after the
//! other on the same connect loop, and the host reads the rounds off the serial console.
//! qemu emulates the CPU (TCG), which inflates every time: the figure is the ratio of
//! ours to tcpconnect's in the same VM, the raw nanoseconds only beside it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use egress_testkit::vm::{self, Boot, Cpio, GUEST_BPF_MOUNTS, GUEST_MOUNTS, Scratch, after_marker};

const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";
const DONE_MARKER: &str = "EGRESS-VM-KERNEL-COST ";
const CLOCK_MARKER: &str = "EGRESS-VM-CLOCKSOURCE ";
/// Where the guest finds its observers and their libraries (the host's paths, so the
/// dynamic loader finds the libraries where ldd said they are).
const GUEST_BENCH: &str = "/egress-bench";

#[derive(clap::Args)]
pub struct Args {
    /// Debian kernel series (scripts/vm-kernel.sh): 6.1, 6.12 or 6.12-rt.
    #[arg(long, default_value = "6.12")]
    pub series: String,
    /// Collector binaries to measure (static or dynamic: their libraries are copied in).
    /// By default the workspace's own, built static for the guest.
    #[arg(long, value_delimiter = ',')]
    pub collectors: Vec<PathBuf>,
    /// The collectors' hook family in the guest.
    #[arg(long, default_value = "kprobe")]
    pub probe: String,
    /// Peers in the guest: `tcpconnect` (the reference of the ratio) and optionally
    /// `tcplife`.
    #[arg(long, value_delimiter = ',', default_value = "tcpconnect,tcplife")]
    pub peers: Vec<String>,
    #[arg(long, default_value = "/usr/sbin/tcpconnect")]
    pub tcpconnect: PathBuf,
    #[arg(long, default_value = "/usr/sbin/tcplife")]
    pub tcplife: PathBuf,
    /// Connections per observer and round (each a few hundred µs when emulated).
    #[arg(long, default_value_t = 2000)]
    pub connections: u64,
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Past this the guest is stuck and is killed.
    #[arg(long, default_value_t = 1200)]
    pub timeout_seconds: u64,
    /// The workspace: scripts/vm-kernel.sh and the static build.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// Report to update (its `kernel-cost-vm` section).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub report: PathBuf,
    /// A sentence about this run's conditions for the report.
    #[arg(long)]
    pub note: Option<String>,
}

/// One observer's round as the guest's `kernel-cost` printed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub observer: String,
    pub round: usize,
    pub programs: usize,
    pub runs: u64,
    pub ns_per_connection: f64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    for peer in &args.peers {
        if !["tcpconnect", "tcplife"].contains(&peer.as_str()) {
            bail!("unknown VM peer {peer:?} (tcpconnect or tcplife)");
        }
    }
    if !args.peers.iter().any(|p| p == "tcpconnect") {
        bail!("the VM figure is a ratio to tcpconnect: keep it in --peers");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let built = egress_testkit::static_build::build_bench(&args.workspace, &cargo)
        .map_err(anyhow::Error::msg)?;
    let collectors: Vec<PathBuf> = if args.collectors.is_empty() {
        vec![built.join("egress-collector")]
    } else {
        args.collectors.clone()
    };
    // The names in the table: the workspace's own build by its commit, others by path.
    let names: Vec<String> = if args.collectors.is_empty() {
        vec![format!("egress-collector {}", revision(&args.workspace))]
    } else {
        collectors.iter().map(|c| c.display().to_string()).collect()
    };
    let kernel = vm::debian_kernel(&args.workspace, &args.series).map_err(anyhow::Error::msg)?;
    let version = std::fs::read_to_string(
        kernel
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("VERSION"))
            .unwrap_or_default(),
    )
    .map(|v| v.trim().to_owned())
    .unwrap_or_default();
    let scratch =
        Scratch::new(&format!("{}-kernel-cost", args.series)).map_err(anyhow::Error::msg)?;
    let initrd = scratch.0.join("initramfs.cpio");
    let guest_collectors =
        write_initramfs(&initrd, args, &built.join("egress-bench"), &collectors)?;

    eprintln!(
        "booting {} under qemu (TCG) for {} connections x {} rounds per observer",
        kernel.display(),
        args.connections,
        args.repeat
    );
    let console = vm::boot(&Boot {
        label: &args.series,
        kernel: &kernel,
        initrd: &initrd,
        timeout: Duration::from_secs(args.timeout_seconds),
        echo: &[KERNEL_MARKER, DONE_MARKER, "| "],
    })
    .map_err(anyhow::Error::msg)?;
    let release = console
        .lines()
        .find_map(|l| after_marker(l, KERNEL_MARKER))
        .context("the guest never printed its kernel release")?
        .to_owned();
    let verdict = console.lines().find_map(|l| after_marker(l, DONE_MARKER));
    if verdict != Some("PASS") {
        bail!("the guest's kernel-cost failed ({verdict:?}); console:\n{console}");
    }
    let clock = console
        .lines()
        .find_map(|l| after_marker(l, CLOCK_MARKER))
        .unwrap_or("unknown")
        .to_owned();
    let rounds = parse_rounds(&console);
    // Guest paths back to the names of this host.
    let rounds: Vec<Round> = rounds
        .into_iter()
        .map(|mut r| {
            if let Some(i) = guest_collectors.iter().position(|g| *g == r.observer) {
                r.observer = names[i].clone();
            }
            r
        })
        .collect();
    let table = summary(&rounds, &names, args.repeat)?;
    println!("{table}");
    let command: Vec<String> = std::env::args().collect();
    crate::report::put_section(
        &args.report,
        "kernel-cost-vm",
        &section(&command.join(" "), args, &release, &version, &clock, &table),
    )
}

/// `git describe`-like: the short commit, `-dirty` with uncommitted changes to the sources.
pub(crate) fn revision(workspace: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "(no git commit)".to_owned();
    };
    // Reports (BENCHMARKS.md, rewritten by each run) do not change what is built.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!*.md",
    ])
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// The guest's files: busybox, the static bench, each collector and peer with the
/// libraries ldd names, and /init. Returns the collectors' guest paths, in order.
fn write_initramfs(
    path: &Path,
    args: &Args,
    bench: &Path,
    collectors: &[PathBuf],
) -> anyhow::Result<Vec<String>> {
    let mut tree = Tree::new()?;
    tree.add(GUEST_BENCH, bench)?;
    let mut guest_collectors = Vec::new();
    for (i, collector) in collectors.iter().enumerate() {
        let name = collector
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "egress-collector".to_owned());
        let guest = format!("/collectors/{i}-{name}");
        tree.add_with_libraries(&guest, collector)?;
        guest_collectors.push(guest);
    }
    for peer in &args.peers {
        let host = if peer == "tcpconnect" {
            &args.tcpconnect
        } else {
            &args.tcplife
        };
        tree.add_with_libraries(&format!("/usr/sbin/{peer}"), host)?;
    }
    tree.cpio.file(
        "init",
        0o755,
        init_script(args, &guest_collectors).as_bytes(),
    );
    std::fs::write(path, tree.cpio.finish())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(guest_collectors)
}

/// The initramfs being written, with what it holds: a directory or library is added once.
pub(crate) struct Tree {
    pub(crate) cpio: Cpio,
    entries: BTreeSet<String>,
}

impl Tree {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            cpio: Cpio::with_busybox().map_err(anyhow::Error::msg)?,
            entries: ["bin", "dev", "proc", "sys", "tmp", "run"]
                .map(String::from)
                .into(),
        })
    }

    /// `from` at `guest`, its parent directories made first.
    pub(crate) fn add(&mut self, guest: &str, from: &Path) -> anyhow::Result<()> {
        let relative = guest.trim_start_matches('/');
        let mut parent = String::new();
        let parts: Vec<&str> = relative.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if self.entries.insert(parent.clone()) {
                self.cpio.dir(&parent);
            }
        }
        self.entries.insert(relative.to_owned());
        self.cpio
            .file_from(relative, 0o755, from)
            .map_err(anyhow::Error::msg)
    }

    /// `from` at `guest`, and every shared library it loads at the host path ldd gives
    /// (the guest has no ld.so.cache: the loader looks in /lib/x86_64-linux-gnu).
    pub(crate) fn add_with_libraries(&mut self, guest: &str, from: &Path) -> anyhow::Result<()> {
        self.add(guest, from)?;
        // A static binary: ldd says "not a dynamic executable" and fails.
        let output = Command::new("ldd")
            .arg(from)
            .output()
            .with_context(|| format!("ldd {}", from.display()))?;
        for library in libraries(&String::from_utf8_lossy(&output.stdout)) {
            let guest = library.display().to_string();
            if !self.entries.contains(guest.trim_start_matches('/')) {
                self.add(&guest, &library)?;
            }
        }
        Ok(())
    }
}

/// The absolute paths in ldd's output: `libc.so.6 => /lib/.../libc.so.6 (0x…)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no file.
pub fn libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The guest's /init: mounts, then the bench's own `kernel-cost` with the collectors in
/// `--probe <probe>` and the peers, pinned to CPU 0 (observers on CPU 1, as on the host).
fn init_script(args: &Args, collectors: &[String]) -> String {
    let peers = args.peers.join(",");
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}{GUEST_BPF_MOUNTS}hostname egress-vm
echo "{KERNEL_MARKER}$(uname -r) $(uname -v)"
echo "{CLOCK_MARKER}$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
if EGRESS_BENCH_DETAIL=1 taskset -c 0 {GUEST_BENCH} kernel-cost --collectors {collectors} \
    --probe {probe} --peers {peers} --tcplife /usr/sbin/tcplife --tcpconnect /usr/sbin/tcpconnect \
    --connections {connections} --repeat {repeat} --throughput-seconds 0 \
    --report /tmp/kernel-cost.md; then
    verdict=PASS
else
    verdict=FAIL
fi
echo "{DONE_MARKER}$verdict"
poweroff -f
"#,
        collectors = collectors.join(","),
        probe = args.probe,
        connections = args.connections,
        repeat = args.repeat,
    )
}

/// The `| observer | round | programs | connections | runs | run_time_ns | ns |` rows.
pub fn parse_rounds(console: &str) -> Vec<Round> {
    console
        .lines()
        .filter_map(|line| {
            // From the first bar: the firmware may leave the cursor mid-line.
            let line = line.trim();
            let line = &line[line.find('|')?..];
            let cells: Vec<&str> = line
                .strip_prefix('|')?
                .strip_suffix('|')?
                .split('|')
                .map(str::trim)
                .collect();
            let [observer, round, programs, _connections, runs, _run_time, ns] = cells[..] else {
                return None;
            };
            Some(Round {
                observer: observer.to_owned(),
                round: round.parse().ok()?,
                programs: programs.parse().ok()?,
                runs: runs.parse().ok()?,
                ns_per_connection: ns.parse().ok()?,
            })
        })
        .collect()
}

fn min_median(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[0], values[values.len() / 2])
}

/// Per observer: min and median ns, and the ratio to tcpconnect (min over min, and the
/// median of the rounds' own ratios: each round ran both on the same loop, one after
/// the other).
fn summary(rounds: &[Round], collectors: &[String], repeat: usize) -> anyhow::Result<String> {
    let mut observers: Vec<String> = Vec::new();
    for r in rounds {
        if !observers.contains(&r.observer) {
            observers.push(r.observer.clone());
        }
    }
    let reference = crate::kernel_cost::Peer::Tcpconnect.name();
    let of = |name: &str| -> Vec<&Round> { rounds.iter().filter(|r| r.observer == name).collect() };
    let tcpconnect = of(reference);
    if tcpconnect.len() != repeat {
        bail!("tcpconnect has {} of {repeat} rounds", tcpconnect.len());
    }
    for c in collectors {
        if of(c).len() != repeat {
            bail!("{c} has not every round in the guest's output");
        }
    }
    let (reference_min, _) = min_median(
        &mut tcpconnect
            .iter()
            .map(|r| r.ns_per_connection)
            .collect::<Vec<_>>(),
    );
    let mut table = String::from(
        "| observer | programs | ratio to tcpconnect (min / min) | ratio to tcpconnect (median of rounds) | min ns per connection (emulated) | median ns per connection (emulated) | rounds |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for name in &observers {
        let mine = of(name);
        let (min, median) =
            min_median(&mut mine.iter().map(|r| r.ns_per_connection).collect::<Vec<_>>());
        let mut ratios: Vec<f64> = mine
            .iter()
            .filter_map(|r| {
                let t = tcpconnect.iter().find(|t| t.round == r.round)?;
                Some(r.ns_per_connection / t.ns_per_connection)
            })
            .collect();
        let (_, round_ratio) = min_median(&mut ratios);
        table.push_str(&format!(
            "| {name} | {} | {:.2} | {round_ratio:.2} | {min:.0} | {median:.0} | {} |\n",
            mine[0].programs,
            min / reference_min,
            mine.len()
        ));
    }
    Ok(table)
}

fn section(
    command: &str,
    args: &Args,
    release: &str,
    version: &str,
    clock: &str,
    table: &str,
) -> String {
    let note = args
        .note
        .as_ref()
        .map(|n| format!(" {}", n.trim()))
        .unwrap_or_default();
    format!(
        "## Kernel time per TCP connection in {probe} mode (Debian {series} under qemu)\n\n\
         Generated by `egress-bench kernel-cost-vm` on {date}. Command: `{command}`.\n\n\
         The guest boots Debian's cloud kernel ({version}; `{release}`) under qemu\n\
         TCG (2 emulated CPUs, no KVM) and runs this bench's own `kernel-cost` there (a\n\
         static build): with run-time statistics on, the collector in `--probe {probe}`\n\
         and the peers attach one after the other, each alone, on the same loop of\n\
         {connections} loopback TCP connections per round (observers on CPU 1, the loop on\n\
         CPU 0), and each one's program time (bpf_stats `run_time_ns` of its own\n\
         programs) is divided by the connections. `tcpconnect` (libbpf-tools, Debian's\n\
         dynamically linked binary with its libraries) puts kprobes on\n\
         `tcp_v4_connect`/`tcp_v6_connect` and prints pid, comm and addresses per connect;\n\
         `tcplife` reads `sock:inet_sock_set_state`. **Emulation inflates every time\n\
         (each instruction is translated), and not uniformly**: compare the ratios, not\n\
         the nanoseconds, which are shown only as raw figures of this run. The ratio\n\
         min / min takes each observer's least disturbed round; the other is the median of\n\
         the rounds' own ratios (both observers in one round ran back to back). bpf_stats\n\
         times programs with the guest's sched_clock (clocksource `{clock}`). The host's\n\
         2 cores were shared with whatever else ran, which slows the emulation of all\n\
         observers within a round.{note}\n\n{table}",
        probe = args.probe,
        series = args.series,
        date = crate::report::today(),
        connections = args.connections,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rounds_and_the_libraries() {
        let console = "noise\n| observer | round | programs | connections | runs | run_time_ns | ns per connection |\n\
            |---|---|---|---|---|---|---|\n\
            | /collectors/0-egress-collector | 1 | 9 | 2000 | 8000 | 40000000 | 20000 |\n\
            junk| tcpconnect (libbpf-tools) | 1 | 4 | 2000 | 4000 | 100000000 | 50000 |\n";
        let rounds = parse_rounds(console);
        assert_eq!(rounds.len(), 2, "{rounds:?}");
        assert_eq!(rounds[0].observer, "/collectors/0-egress-collector");
        assert_eq!(rounds[1].ns_per_connection, 50000.0);
        let table =
            summary(&rounds, &["/collectors/0-egress-collector".to_owned()], 1).expect("a table");
        assert!(
            table.contains("| /collectors/0-egress-collector | 9 | 0.40 | 0.40 |"),
            "{table}"
        );

        let ldd = "\tlinux-vdso.so.1 (0x00007f)\n\tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        assert_eq!(
            libraries(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libelf.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(libraries("\tnot a dynamic executable\n").is_empty());
    }
}
