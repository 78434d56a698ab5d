//! What DNS capture costs (`egress-bench dns-cost`): kernel program time per received
//! segment or datagram that is not DNS, under a loopback iperf3 bulk transfer (TCP and
//! UDP), with the bulk transfer's throughput without the collector, with it and with it
//! `--dns=false`; and kernel time per DNS answer (connected UDP queries to a dnsmasq on
//! 127.0.0.153). Run-time statistics as in `kernel-cost` (BPF_ENABLE_STATS); programs
//! are told apart by name through bpftool.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::kernel_cost::{
    ProgramStats, counters_of, enable_stats, names, program_ids_of, programs_of,
};

const IPERF_PORT: &str = "5299";
const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let stop = Instant::now() + Duration::from_secs(20);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < stop {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(command: &[&str]) -> anyhow::Result<Killed> {
    Command::new(command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Killed)
        .with_context(|| format!("starting {command:?} (scripts/setup.sh installs it)"))
}

/// Waits until `pid` holds BPF programs and their count has not changed for 2 s.
pub(crate) fn wait_attached(child: &mut Killed) -> anyhow::Result<()> {
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        let now = programs_of(pid).len();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
        if seen > 0 && since.elapsed() > Duration::from_secs(2) {
            return Ok(());
        }
        if Instant::now() > deadline || child.0.try_wait()?.is_some() {
            bail!("the collector never attached its programs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (run time, runs) of the programs whose name starts with `prefix`, between two reads.
pub(crate) fn delta(
    before: &[ProgramStats],
    after: &[ProgramStats],
    names: &[(u64, String)],
    prefix: &str,
) -> (u64, u64) {
    after
        .iter()
        .filter(|a| {
            names
                .iter()
                .any(|(id, n)| *id == a.id && n.starts_with(prefix))
        })
        .fold((0, 0), |(t, c), a| {
            let b = before.iter().find(|b| b.id == a.id);
            (
                t + a.run_time_ns - b.map_or(0, |b| b.run_time_ns),
                c + a.run_cnt - b.map_or(0, |b| b.run_cnt),
            )
        })
}

/// `InSegs` (TCP) or `InDatagrams` (UDP) from /proc/net/snmp.
pub(crate) fn snmp(protocol: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text
        .lines()
        .filter(|l| l.starts_with(&format!("{protocol}:")));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    header
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(h, _)| *h == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Runs the iperf3 client; returns the receiver's bits per second.
fn iperf(udp: bool, seconds: u64) -> anyhow::Result<f64> {
    let secs = seconds.to_string();
    let mut args = vec!["-c", "127.0.0.1", "-p", IPERF_PORT, "-t", &secs, "-J"];
    if udp {
        args.extend(["-u", "-b", "0", "-l", "1400"]);
    }
    let out = Command::new("iperf3").args(&args).output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let end = &json["end"];
    let bps = if udp {
        end["sum"]["bits_per_second"].as_f64()
    } else {
        end["sum_received"]["bits_per_second"].as_f64()
    };
    bps.context("iperf3 reported no throughput")
}

/// One bulk transfer with `pid`'s programs read around it.
struct Bulk {
    gbps: f64,
    /// Segments (TCP) or datagrams (UDP) the host received.
    received: u64,
    dns_ns: u64,
    dns_runs: u64,
    all_ns: u64,
}

fn bulk(pid: Option<u32>, udp: bool, seconds: u64, prefix: &str) -> anyhow::Result<Bulk> {
    let (protocol, field) = if udp {
        ("Udp", "InDatagrams")
    } else {
        ("Tcp", "InSegs")
    };
    let ids = pid.map(program_ids_of).unwrap_or_default();
    let before = counters_of(&ids);
    let received_before = snmp(protocol, field);
    let bps = iperf(udp, seconds)?;
    let received = snmp(protocol, field) - received_before;
    let after = counters_of(&ids);
    let names = names(&ids);
    let (dns_ns, dns_runs) = delta(&before, &after, &names, prefix);
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok(Bulk {
        gbps: bps / 1e9,
        received,
        dns_ns,
        dns_runs,
        all_ns,
    })
}

/// One lookup as Go makes it (connect, write, read) to the dnsmasq on 127.0.0.153.
fn lookup() -> anyhow::Result<()> {
    let query: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01";
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(SocketAddr::from((DNS_ADDR, 53)))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let fd = socket.as_raw_fd();
    let mut buf = [0u8; 512];
    // SAFETY: write and read on a socket this function owns, buffers of those lengths.
    let n = unsafe {
        libc::write(fd, query.as_ptr().cast(), query.len());
        libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
    };
    if n <= 0 {
        bail!("dnsmasq did not answer");
    }
    Ok(())
}

/// A UDP bulk transfer to this process after one lookup of its own: a process that
/// marked a DNS socket, as an application that resolved its peer has, so every read
/// takes the marked path (the descriptor looked up, not found). 1400-byte datagrams from
/// a thread, read with recv(); `pid`: the observer whose programs are read around it.
fn marked_bulk(pid: Option<u32>, seconds: u64) -> anyhow::Result<Bulk> {
    lookup()?;
    let ids = pid.map(program_ids_of).unwrap_or_default();
    let before = counters_of(&ids);
    let transfer = crate::bulk::udp(seconds as f64)?;
    let after = counters_of(&ids);
    let names = names(&ids);
    let (dns_ns, dns_runs) = delta(&before, &after, &names, "tp_dns_");
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok(Bulk {
        gbps: transfer.gbps(),
        received: transfer.reads,
        dns_ns,
        dns_runs,
        all_ns,
    })
}

/// `queries` lookups as Go makes them (connect, write, read) to the dnsmasq on
/// 127.0.0.153; returns the DNS programs' (run time, runs) and every program's time.
fn answers(pid: u32, queries: u64) -> anyhow::Result<(u64, u64, u64)> {
    let ids = program_ids_of(pid);
    let before = counters_of(&ids);
    for _ in 0..queries {
        lookup()?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = counters_of(&ids);
    let names = names(&ids);
    let (dns_ns, dns_runs) = delta(&before, &after, &names, "tp_dns_");
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok((dns_ns, dns_runs, all_ns))
}

/// bpftrace with nothing to do on the syscall exits the collector hooks: what dispatch and
/// bpf_stats cost a program that returns at once, the floor under ours.
const BPFTRACE_EMPTY: &str = "tracepoint:syscalls:sys_exit_read,\
    tracepoint:syscalls:sys_exit_recvfrom,tracepoint:syscalls:sys_exit_recvmsg { }";

#[derive(Clone, Copy)]
enum Observer<'a> {
    None,
    Collector { path: &'a str, dns: bool },
    Empty,
}

impl Observer<'_> {
    fn label(&self) -> String {
        match self {
            Observer::None => "no collector".into(),
            Observer::Collector { path, dns: true } => format!("`{path}`"),
            Observer::Collector { path, dns: false } => format!("`{path}` --dns=false"),
            Observer::Empty => "bpftrace, empty programs (floor)".into(),
        }
    }

    /// The programs counted as DNS programs: the collector's `tp_dns_*`, bpftrace's all.
    fn prefix(&self) -> &'static str {
        match self {
            Observer::Empty => "",
            _ => "tp_dns_",
        }
    }

    fn start(&self) -> anyhow::Result<Option<Killed>> {
        let mut child = match self {
            Observer::None => return Ok(None),
            Observer::Collector { path, dns } => spawn(&[
                path,
                "run",
                "--probe",
                "tracepoint",
                "--stdout",
                "--stats-interval",
                "1h",
                if *dns { "--dns=true" } else { "--dns=false" },
            ])?,
            Observer::Empty => spawn(&["bpftrace", "-e", BPFTRACE_EMPTY])?,
        };
        wait_attached(&mut child)?;
        Ok(Some(child))
    }
}

/// One observer's figures in one round.
struct Row {
    round: u32,
    udp: bool,
    observer: String,
    gbps: f64,
    ratio: f64,
    received: u64,
    per_received: f64,
    per_run: f64,
    runs: u64,
    all_per_received: f64,
}

fn measure_bulk(observer: Observer, udp: bool, seconds: u64) -> anyhow::Result<(Bulk, String)> {
    let child = observer.start()?;
    let b = bulk(
        child.as_ref().map(|c| c.0.id()),
        udp,
        seconds,
        observer.prefix(),
    )?;
    Ok((b, observer.label()))
}

/// Measures and returns the Markdown tables: the lowest cost per run over the rounds for
/// each observer, then every round. Observers alternate order from round to round.
pub fn measure(
    collectors: &[String],
    seconds: u64,
    queries: u64,
    rounds: u32,
) -> anyhow::Result<String> {
    let _stats = enable_stats()?;
    let _server = spawn(&["iperf3", "-s", "-p", IPERF_PORT])?;
    let _dns = spawn(&[
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--local=/test/",
        "--bind-interfaces",
        "--listen-address=127.0.0.153",
        "--host-record=a.test,10.1.2.3",
        "--pid-file=",
    ])?;
    std::thread::sleep(Duration::from_millis(500));
    let mut observers: Vec<Observer> = collectors
        .iter()
        .map(|path| Observer::Collector { path, dns: true })
        .collect();
    if let Some(first) = collectors.first() {
        observers.push(Observer::Collector {
            path: first,
            dns: false,
        });
    }
    observers.push(Observer::Empty);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        if round % 2 == 0 {
            observers.reverse();
        }
        for udp in [false, true] {
            let (none, label) = measure_bulk(Observer::None, udp, seconds)?;
            rows.push(row(round, udp, label, &none, &none));
            for observer in &observers {
                let (b, label) = measure_bulk(*observer, udp, seconds)?;
                eprintln!(
                    "round {round} {} {label}: {:.1} ns / run",
                    if udp { "UDP" } else { "TCP" },
                    b.dns_ns as f64 / b.dns_runs.max(1) as f64
                );
                rows.push(row(round, udp, label, &b, &none));
            }
        }
        let none = marked_bulk(None, seconds)?;
        rows.push(row(round, true, MARKED_NONE.into(), &none, &none));
        for path in collectors {
            let child = Observer::Collector { path, dns: true }.start()?;
            let b = marked_bulk(child.as_ref().map(|c| c.0.id()), seconds)?;
            let label = format!("`{path}`, receiver marked");
            eprintln!(
                "round {round} UDP {label}: {:.1} ns / run",
                b.dns_ns as f64 / b.dns_runs.max(1) as f64
            );
            rows.push(row(round, true, label, &b, &none));
        }
        if round % 2 == 0 {
            observers.reverse();
        }
    }
    let mut out = String::from(
        "Lowest over the rounds (each observer's own lowest; the ratio is the median):\n\n\
         | load | observer | DNS programs per run | per segment/datagram | ratio |\n\
         |---|---|---|---|---|\n",
    );
    let mut seen: Vec<(bool, String)> = Vec::new();
    for r in &rows {
        if is_baseline(&r.observer) || seen.contains(&(r.udp, r.observer.clone())) {
            continue;
        }
        seen.push((r.udp, r.observer.clone()));
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|o| o.udp == r.udp && o.observer == r.observer)
            .collect();
        let low = |f: fn(&Row) -> f64| mine.iter().map(|o| f(o)).fold(f64::INFINITY, f64::min);
        let mut ratios: Vec<f64> = mine.iter().map(|o| o.ratio).collect();
        ratios.sort_by(f64::total_cmp);
        out.push_str(&format!(
            "| {} | {} | {:.1} ns | {:.1} ns | {:.2} |\n",
            load(r.udp),
            r.observer,
            low(|o| o.per_run),
            low(|o| o.per_received),
            ratios[ratios.len() / 2],
        ));
    }
    out.push_str(
        "\nEvery round:\n\n\
         | round | load | observer | Gbit/s | ratio | received | DNS programs | per run | all programs |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let unit = if r.udp { "datagram" } else { "segment" };
        if is_baseline(&r.observer) {
            out.push_str(&format!(
                "| {} | {} | {} | {:.2} | 1.00 | {} | – | – | – |\n",
                r.round,
                load(r.udp),
                r.observer,
                r.gbps,
                r.received
            ));
            continue;
        }
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {:.1} ns / {unit} | {:.1} ns / run ({} runs) | {:.1} ns / {unit} |\n",
            r.round,
            load(r.udp),
            r.observer,
            r.gbps,
            r.ratio,
            r.received,
            r.per_received,
            r.per_run,
            r.runs,
            r.all_per_received,
        ));
    }
    for path in collectors {
        let child = Observer::Collector { path, dns: true }.start()?;
        let pid = child.as_ref().map_or(0, |c| c.0.id());
        let (dns_ns, dns_runs, all_ns) = answers(pid, queries)?;
        out.push_str(&format!(
            "\nPer DNS answer, `{path}` ({queries} connected-UDP lookups, Go's way): DNS \
             programs {:.0} ns ({:.1} runs each), every collector program {:.0} ns (the \
             connect and send hooks included).\n",
            dns_ns as f64 / queries as f64,
            dns_runs as f64 / queries as f64,
            all_ns as f64 / queries as f64,
        ));
    }
    Ok(out)
}

/// The baseline of the marked rows: the same transfer without a collector.
const MARKED_NONE: &str = "no collector, receiver marked";

fn is_baseline(observer: &str) -> bool {
    observer == "no collector" || observer == MARKED_NONE
}

fn load(udp: bool) -> &'static str {
    if udp { "UDP 1400 B" } else { "TCP" }
}

fn row(round: u32, udp: bool, observer: String, b: &Bulk, none: &Bulk) -> Row {
    let received = b.received.max(1) as f64;
    Row {
        round,
        udp,
        observer,
        gbps: b.gbps,
        ratio: b.gbps / none.gbps,
        received: b.received,
        per_received: b.dns_ns as f64 / received,
        per_run: b.dns_ns as f64 / b.dns_runs.max(1) as f64,
        runs: b.dns_runs,
        all_per_received: b.all_ns as f64 / received,
    }
}

/// The `dns-cost` section of the report (`report::put_section` adds its markers).
pub fn section(command: &str, table: &str) -> String {
    format!(
        "## DNS capture: kernel time per received segment, throughput, per answer\n\n\
         Generated by `egress-bench dns-cost` on {}. Command: `{command}`.\n\n\
         A loopback iperf3 bulk transfer (TCP, then UDP with 1400-byte datagrams at full\n\
         rate) without the collector, with each collector given (tracepoint mode, DNS on),\n\
         with the first `--dns=false`, and with bpftrace running empty programs on the\n\
         same three syscall exits (the floor: what dispatch and bpf_stats' clock reads\n\
         cost a program that does nothing), in alternating order over the rounds.\n\
         `DNS programs` is the run time of the read/recvfrom/recvmsg tracepoint programs\n\
         (`tp_dns_*`; bpftrace's all) divided by the segments or datagrams the host\n\
         received (/proc/net/snmp; both ends are on this host), then per program run (a\n\
         run is a syscall exit on the whole node, iperf3's or anyone's: a process that\n\
         marked a DNS socket (a DNS forwarder, say) pays more per read); `all programs`\n\
         adds every program of the observer. `receiver marked`: this benchmark's own\n\
         process makes one lookup through dnsmasq, then receives 1400-byte datagrams\n\
         from one of its threads with recv(): the path of an application that resolved\n\
         its peer (every read looks its descriptor up). The ratio is the throughput against no\n\
         collector in the same round: bpf_stats leaves out dispatch and syscall slow\n\
         paths. A machine shared with other builds makes single rounds noisy: compare\n\
         within a round, and the lowest of the rounds. The kprobe and fentry families'\n\
         DNS hooks (`udp_recvmsg`, `udpv6_recvmsg`, `tcp_recvmsg`) cannot run on this\n\
         host's kernel.\n\n\
         {table}",
        crate::report::today()
    )
}
