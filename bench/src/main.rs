//! egress-bench: what the collector costs under connection storms, beside no probe and a
//! peer tool, measured in one run on this machine.
//!
//! `egress-bench run` alternates the scenarios (no probe, collector to stdout, collector
//! to OTLP, bpftrace) for each rate and repeat, and writes the table, a PNG cost curve
//! and the raw results. `egress-bench smoke` is the seconds-long CI check that loss
//! accounting adds up. `egress-bench load` is the load generator itself.

mod bpf_stats;
mod bulk;
mod cgroup_index;
mod churn;
mod containers;
mod dns_cost;
mod dns_cost_guest;
mod dns_cost_vm;
mod empty_probe;
mod encode;
mod kernel_cost;
mod kernel_cost_vm;
mod load;
mod outage;
mod receiver;
mod report;
mod run;
mod tool;
mod user_cost;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::{
    load::LoadArgs,
    run::{Plan, RunResult, Scenario},
};

#[derive(Parser)]
#[command(name = "egress-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate the load and print what it did as JSON.
    Load(LoadArgs),
    /// The full benchmark.
    Run(RunArgs),
    /// A few seconds: the collector sees every connection or counts what it lost.
    Smoke(SmokeArgs),
    /// Memory with N containers known to the collector (real cgroups, docker files).
    Containers(ContainersArgs),
    /// What one new cgroup costs enrichment with N cgroups present: a walk of the whole
    /// hierarchy (before) against the incremental index (now).
    CgroupIndex {
        #[arg(long, default_value_t = 2000)]
        cgroups: usize,
        #[arg(long, default_value_t = 50)]
        samples: usize,
        /// Also write the figures into this report's `cgroup-index` section.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Soak: the OTLP endpoint down for a while under steady load; nothing may be lost.
    Outage {
        #[arg(long, default_value = "target/release/egress-collector")]
        collector: PathBuf,
        /// Connects per second during the run.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds the endpoint stays down.
        #[arg(long, default_value_t = 60)]
        down: u64,
    },
    /// What DNS capture costs: kernel time per received segment/datagram that is not
    /// DNS under a loopback iperf3 bulk transfer, the transfer's throughput with and
    /// without the collector, and kernel time per DNS answer.
    DnsCost {
        /// Collector binaries measured in the same rounds (e.g. before and after a change).
        #[arg(
            long,
            alias = "collector",
            value_delimiter = ',',
            default_value = "target/release/egress-collector"
        )]
        collectors: Vec<String>,
        /// Rounds; the observers' order alternates from one round to the next.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds per bulk transfer.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// DNS lookups for the per-answer figure.
        #[arg(long, default_value_t = 2000)]
        queries: u64,
        /// Report to update (its `dns-cost` section).
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
    },
    /// The same in the kprobe and fentry families on a Debian kernel booted under qemu:
    /// a built-in bulk transfer without the collector, with it (DNS on and off) and with
    /// empty programs on the same hooks (the floor), as ratios.
    DnsCostVm(dns_cost_vm::Args),
    /// Internal to `dns-cost-vm`: the guest's half, one line per transfer.
    #[command(hide = true)]
    DnsCostGuest(dns_cost_guest::GuestArgs),
    /// Kernel program time per TCP connection (kernel.bpf_stats_enabled): each collector
    /// given, and the peers (bpftrace, libbpf-tools) in the same run; with each one's
    /// throughput at the maximum connect rate against no probe.
    KernelCost(kernel_cost::Args),
    /// The same in kprobe mode on a Debian kernel booted under qemu: the static collector
    /// against libbpf-tools `tcpconnect` (and `tcplife`) in the same VM, as a ratio.
    KernelCostVm(kernel_cost_vm::Args),
    /// Empty programs on the hooks of the collector's TCP path in tracepoint mode, held
    /// until killed: `kernel-cost`'s floor peer.
    #[command(hide = true)]
    EmptyStateHooks,
    /// The per-record work of decoding, the JSON line and the OTLP record, in process on
    /// one thread (no kernel, no load): this binary and any others given, in turn.
    Encode {
        /// Other egress-bench binaries (e.g. an earlier commit's) measured in turn with this one.
        #[arg(long, value_delimiter = ',')]
        also: Vec<PathBuf>,
        /// Records per pass.
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        /// Timed passes per run (after one untimed).
        #[arg(long, default_value_t = 5)]
        passes: usize,
        /// Runs of each binary, alternated.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Print one run's figures as JSON, nothing else (what `--also` runs).
        #[arg(long, hide = true)]
        json: bool,
        /// Report to update (its `encode` section).
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// User-space CPU per record, overhead ratio and peak RSS of the collector to stdout
    /// and to OTLP, at a fixed rate and at the maximum, rounds alternated.
    UserCost {
        /// Collector binaries measured in the same rounds (e.g. before and after a change).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "target/release/egress-collector"
        )]
        collectors: Vec<PathBuf>,
        /// Target connects per second, comma-separated; 0 is as fast as possible.
        #[arg(long, value_delimiter = ',', default_value = "10000,0")]
        rates: Vec<u64>,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Report to update (its `user-cost` section).
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
    },
    /// Soak: short-lived containers (real cgroups, docker files) made, connected from
    /// and removed at a steady pace; every connection attributed, memory flat.
    Churn {
        #[arg(long, default_value = "target/release/egress-collector")]
        collector: PathBuf,
        #[arg(long, default_value_t = 20000)]
        containers: usize,
        /// Over this many seconds.
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
        /// Seconds each container lives before its cgroup and files are removed.
        #[arg(long, default_value_t = 2.0)]
        lifetime: f64,
        /// Also write the figures into this report's `churn` section.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Internal to `churn`: join each cgroup read from stdin, connect once, answer `ok`.
    #[command(hide = true)]
    HopStdin {
        #[arg(long)]
        port: u16,
    },
    /// Internal to `containers`: join each listed cgroup in turn and connect once.
    #[command(hide = true)]
    Hop {
        #[arg(long)]
        list: PathBuf,
        #[arg(long)]
        port: u16,
    },
}

#[derive(clap::Args)]
struct ContainersArgs {
    #[arg(long, default_value = "target/release/egress-collector")]
    collector: PathBuf,
    #[arg(long, default_value_t = 500)]
    count: usize,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The collector binary to measure.
    #[arg(long, default_value = "target/release/egress-collector")]
    collector: PathBuf,
    /// Target connects per second, comma-separated; 0 is as fast as possible.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,0")]
    rates: Vec<u64>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,stdout,otlp,bpftrace,aggregated,filtered"
    )]
    scenarios: Vec<Scenario>,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds; within a round the scenarios alternate, so machine noise shows.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Connecting threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the plot (PNG) and the raw results (JSON) go.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// The report: machine, command, date, table and plot.
    #[arg(long, default_value = "BENCHMARKS.md")]
    report: PathBuf,
}

#[derive(clap::Args)]
struct SmokeArgs {
    #[arg(long, default_value = "target/release/egress-collector")]
    collector: PathBuf,
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let bench = std::env::current_exe().context("locating egress-bench")?;
    match cli.command {
        Command::Load(args) => {
            let report = load::run(&args).context("load")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Run(args) => full(bench, args),
        Command::Smoke(args) => smoke(bench, args),
        Command::Containers(args) => {
            let report = containers::measure(&bench, &args.collector, args.count)?;
            println!("{}", serde_json::to_string(&report)?);
            if report.attributed < report.containers {
                bail!(
                    "only {} of {} containers were attributed",
                    report.attributed,
                    report.containers
                );
            }
            Ok(())
        }
        Command::Hop { list, port } => containers::hop(&list, port),
        Command::DnsCost {
            collectors,
            rounds,
            seconds,
            queries,
            report,
        } => {
            let table = dns_cost::measure(&collectors, seconds, queries, rounds)?;
            print!("{table}");
            let command = format!(
                "egress-bench dns-cost --collectors {} --rounds {rounds} --seconds {seconds} --queries {queries}",
                collectors.join(",")
            );
            report::put_section(&report, "dns-cost", &dns_cost::section(&command, &table))
        }
        Command::DnsCostVm(args) => dns_cost_vm::run(&args),
        Command::DnsCostGuest(args) => dns_cost_guest::guest(&args),
        Command::KernelCost(args) => kernel_cost::run(&bench, &args),
        Command::KernelCostVm(args) => kernel_cost_vm::run(&args),
        Command::EmptyStateHooks => {
            let _programs = empty_probe::attach_state_hooks()?;
            loop {
                std::thread::park();
            }
        }
        Command::Encode {
            also,
            records,
            passes,
            rounds,
            json,
            report,
        } => {
            let (records, passes) = (records.max(1), passes.max(1));
            if json {
                let figures = encode::measure(
                    records,
                    passes,
                    egress_collector::export::attributes::AttributeSet::Default,
                )?;
                println!("{}", serde_json::to_string(&figures)?);
                return Ok(());
            }
            let mut builds = vec![std::env::current_exe()?];
            builds.extend(also);
            let runs = encode::compare(&builds, rounds.max(1), records, passes)?;
            let command: Vec<String> = std::env::args().collect();
            let section = encode::section(&command.join(" "), &runs);
            println!("{section}");
            match report {
                Some(path) => report::put_section(&path, "encode", &section),
                None => Ok(()),
            }
        }
        Command::UserCost {
            collectors,
            rates,
            seconds,
            repeat,
            report,
        } => {
            let table = user_cost::measure(&user_cost::Args {
                bench,
                collectors,
                rates,
                seconds,
                repeat: repeat.max(1),
            })?;
            println!("{table}");
            let command: Vec<String> = std::env::args().collect();
            report::put_section(
                &report,
                "user-cost",
                &user_cost::section(&command.join(" "), &table),
            )
        }
        Command::HopStdin { port } => churn::hop_stdin(port),
        Command::Churn {
            collector,
            containers,
            seconds,
            lifetime,
            report,
        } => {
            let lifetime = std::time::Duration::from_secs_f64(lifetime.max(0.0));
            let result = churn::run(&bench, &collector, containers, seconds, lifetime)?;
            println!("{}", serde_json::to_string(&result)?);
            if let Some(path) = report {
                let command: Vec<String> = std::env::args().collect();
                report::put_section(
                    &path,
                    "churn",
                    &churn::markdown(&result, &command.join(" ")),
                )?;
            }
            churn::check(&result)
        }
        Command::CgroupIndex {
            cgroups,
            samples,
            report,
        } => {
            let sizes = [cgroups.max(2), (cgroups * 5).max(2)];
            let mut results = Vec::new();
            for size in sizes {
                let result = cgroup_index::measure(size, samples.max(1))?;
                println!("{}", serde_json::to_string(&result)?);
                results.push(result);
            }
            if let Some(path) = report {
                let command: Vec<String> = std::env::args().collect();
                let body = cgroup_index::markdown(&results, &command.join(" "));
                report::put_section(&path, "cgroup-index", &body)?;
            }
            Ok(())
        }
        Command::Outage {
            collector,
            rate,
            down,
        } => outage::run(&bench, &collector, rate, down),
    }
}

fn full(bench: PathBuf, args: RunArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let stats_off = bpf_stats::sysctl_off()?;
    let mut results: Vec<RunResult> = Vec::new();
    for round in 1..=args.repeat {
        for &rate in &args.rates {
            for &scenario in &args.scenarios {
                let plan = Plan {
                    bench: bench.clone(),
                    collector: args.collector.clone(),
                    load: LoadArgs::tcp_loopback(args.threads, args.seconds, rate),
                    count_stdout: false,
                    collector_args: Vec::new(),
                };
                let result = run::measure(&plan, scenario, &rt)
                    .with_context(|| format!("{} at rate {rate}", scenario.name()))?;
                eprintln!(
                    "round {round} rate {rate:>6} {:<20} {:>8.0} connects/s, seen {}/{}, cpu {:.2}s, rss {:.1} MiB",
                    scenario.name(),
                    result.load.connects_per_second,
                    result.seen,
                    result.attempts(),
                    result.cpu_seconds,
                    result.peak_rss_bytes as f64 / 1048576.0,
                );
                results.push(result);
            }
        }
    }
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(
        args.out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let rows = report::rows(&results);
    let table = report::markdown(&rows);
    let plot = args.out_dir.join("cost.png");
    report::plot(&rows, &plot)?;
    let command: Vec<String> = std::env::args().collect();
    let mut document = report::document(
        &table,
        &plot,
        &command.join(" "),
        &args.report,
        bpf_stats::provenance(&stats_off),
    );
    // Sections other commands wrote, and the notes on them, stay until those rerun.
    if let Ok(old) = std::fs::read_to_string(&args.report) {
        document.push_str(&report::after_head(&old));
    }
    std::fs::write(&args.report, document)
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!("{table}");
    Ok(())
}

/// The smoke's load goes to an address no other program on the machine uses, and the
/// collector excludes every other destination in the kernel (counted filtered, never
/// lost): what it reports and counts lost is then the load's alone, so the check is exact.
const SMOKE_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 77, 0, 1);
const SMOKE_PREFIX_LEN: u32 = 16;

fn smoke(bench: PathBuf, args: SmokeArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let plan = Plan {
        bench,
        collector: args.collector,
        load: LoadArgs {
            threads: 2,
            seconds: args.seconds,
            rate: 0,
            udp_ports: 0,
            listeners: 4,
            address: SMOKE_ADDRESS,
        },
        count_stdout: true,
        collector_args: vec![
            "--exclude-cidr".into(),
            load::everything_but(SMOKE_ADDRESS, SMOKE_PREFIX_LEN).join(","),
        ],
    };
    // Every connection a record; then records carrying counts of repeats.
    for scenario in [Scenario::Stdout, Scenario::Aggregated] {
        let r = run::measure(&plan, scenario, &rt)?;
        let made = r.attempts();
        let lost = r
            .lost
            .context("the collector's Stopped. line has no lost=")?;
        println!(
            "smoke ({}): made {made} connects, collector reported {}, counted {lost} lost",
            scenario.name(),
            r.seen
        );
        // Only the load's connections reach the collector: exact.
        if r.seen + lost != made {
            bail!(
                "{}: loss accounting does not add up: reported {} + counted lost {lost} != made {made}",
                scenario.name(),
                r.seen
            );
        }
        if made == 0 {
            bail!("the load made no connections");
        }
    }
    // Container churn, short: every container's connection reported once, attributed.
    let churned = churn::run(
        &plan.bench,
        &plan.collector,
        200,
        4.0,
        std::time::Duration::from_secs(1),
    )?;
    println!(
        "smoke (churn): {} containers, {} connects reported, {} pods attributed, {} lost",
        churned.containers, churned.connects_reported, churned.pods_attributed, churned.lost
    );
    churn::check(&churned)
}
