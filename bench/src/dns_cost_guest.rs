//! The guest's half of `dns-cost-vm` (`egress-bench dns-cost-guest`, run by the VM's
//! /init): each family, round and observer in turn, the built-in bulk transfers under
//! it, one line per transfer on stdout for the host to read off the console.

use std::{process::Stdio, time::Duration};

use anyhow::Context;

use crate::{
    dns_cost::{Killed, delta, snmp},
    dns_cost_vm::{LOG_MARKER, Observer, Row},
    kernel_cost::{ProgramStats, counters_of, enable_stats, names, program_ids_of},
};

/// What the collector logs once every program is attached (collector/src/pipeline.rs).
const READY: &str = "Capturing egress connections.";
/// The collector's DNS receive programs in every family (names cut at 15 bytes).
const DNS_PROGRAMS: [&str; 4] = ["kprobe_dns", "kretprobe_dns", "fexit_dns", "tp_dns_"];

/// The guest's half (run by /init in the VM, or on any kernel with these families).
#[derive(clap::Args)]
pub struct GuestArgs {
    #[arg(long)]
    pub collector: String,
    #[arg(long, value_delimiter = ',', default_value = "kprobe,fentry")]
    pub probes: Vec<String>,
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
}

/// What holds the observer's programs while it runs.
enum Running {
    Nothing,
    Collector(Killed),
    /// Held, never read: dropping it detaches the programs.
    Empty(#[allow(dead_code)] crate::empty_probe::EmptyPrograms),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Nothing => None,
            Running::Collector(child) => Some(child.0.id()),
            Running::Empty(_) => Some(std::process::id()),
        }
    }
}

fn start(observer: Observer, collector: &str, probe: &str) -> anyhow::Result<Running> {
    let dns = match observer {
        Observer::None => return Ok(Running::Nothing),
        Observer::Empty => return Ok(Running::Empty(crate::empty_probe::attach(probe)?)),
        Observer::Dns => "--dns=true",
        Observer::NoDns => "--dns=false",
    };
    let mut child = Killed(
        std::process::Command::new(collector)
            .args([
                "run",
                "--probe",
                probe,
                "--stdout",
                "--stats-interval",
                "1h",
                dns,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {collector}"))?,
    );
    let stderr = child.0.stderr.take().context("the collector's stderr")?;
    wait_ready(stderr)?;
    Ok(Running::Collector(child))
}

/// Until the collector says it captures (every program attached: under emulation the
/// attaching takes long pauses, so a program count that stopped growing proves
/// nothing). Its warnings go to the console with a line marker the host echoes.
fn wait_ready(stderr: std::process::ChildStderr) -> anyhow::Result<()> {
    use std::io::BufRead;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(READY) {
                let _ = ready_tx.send(());
            } else if line.contains("WARN") || line.contains("ERROR") {
                println!("{LOG_MARKER}{line}");
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(300))
        .context("the collector never said it captures")
}

/// The guest's half: every family, round and observer, one line per transfer.
pub fn guest(args: &GuestArgs) -> anyhow::Result<()> {
    let _stats = enable_stats()?;
    for probe in &args.probes {
        for round in 1..=args.rounds {
            let mut order = Observer::ALL;
            if round % 2 == 0 {
                order.reverse();
            }
            for observer in order {
                let running = start(observer, &args.collector, probe)
                    .with_context(|| format!("{probe}: {}", observer.label()))?;
                for udp in [false, true] {
                    let row = transfer(&running, probe, round, udp, observer, args.seconds)?;
                    println!("{}", row.line());
                }
            }
        }
    }
    Ok(())
}

fn transfer(
    running: &Running,
    probe: &str,
    round: u32,
    udp: bool,
    observer: Observer,
    seconds: u64,
) -> anyhow::Result<Row> {
    let (protocol, field) = if udp {
        ("Udp", "InDatagrams")
    } else {
        ("Tcp", "InSegs")
    };
    let pid = running.pid();
    let ids = pid.map(program_ids_of).unwrap_or_default();
    let before = counters_of(&ids);
    let received_before = snmp(protocol, field);
    let moved = if udp {
        crate::bulk::udp(seconds as f64)?
    } else {
        crate::bulk::tcp(seconds as f64)?
    };
    let received = snmp(protocol, field) - received_before;
    let after = counters_of(&ids);
    let names = names(&ids);
    let counted: &[&str] = if observer == Observer::Empty {
        &[""]
    } else {
        &DNS_PROGRAMS
    };
    let (dns_ns, dns_runs) = counted.iter().fold((0, 0), |(t, c), prefix| {
        let (dt, dc) = delta(&before, &after, &names, prefix);
        (t + dt, c + dc)
    });
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok(Row {
        probe: probe.to_owned(),
        round,
        udp,
        observer,
        gbps: moved.gbps(),
        received,
        dns_ns,
        dns_runs,
        all_ns,
        programs: ran(&before, &after, &names, counted),
    })
}

/// The distinct names of the counted programs that ran, joined by `+`.
fn ran(
    before: &[ProgramStats],
    after: &[ProgramStats],
    names: &[(u64, String)],
    counted: &[&str],
) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for (id, name) in names {
        let runs = |p: &[ProgramStats]| p.iter().find(|p| p.id == *id).map_or(0, |p| p.run_cnt);
        if counted.iter().any(|c| name.starts_with(c))
            && runs(after) > runs(before)
            && !seen.contains(&name.as_str())
        {
            seen.push(name);
        }
    }
    seen.sort_unstable();
    seen.join("+")
}
