//! What DNS capture costs (`egress-bench dns-cost`): kernel program time per received
//! segment or datagram that is not DNS, under a loopback iperf3 bulk transfer (TCP and
//! UDP), with the bulk transfer's throughput without the collector, with it and with it
//! `--dns=false`; and kernel time per DNS answer (connected UDP queries to a dnsmasq on
//! 127.0.0.153). Run-time statistics as in `kernel-cost` (BPF_ENABLE_STATS); programs
//! are told apart by name through bpftool.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::kernel_cost::{ProgramStats, enable_stats, programs_of};

const IPERF_PORT: &str = "5299";
const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);

struct Killed(Child);

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

fn spawn(command: &[&str]) -> anyhow::Result<Killed> {
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
fn wait_attached(child: &mut Killed) -> anyhow::Result<()> {
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

/// Program names by id (bpftool; names are cut at 15 bytes).
fn names(programs: &[ProgramStats]) -> Vec<(u64, String)> {
    programs
        .iter()
        .map(|p| {
            let name = Command::new("bpftool")
                .args(["prog", "show", "id", &p.id.to_string(), "-j"])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .and_then(|v| v["name"].as_str().map(str::to_owned))
                .unwrap_or_default();
            (p.id, name)
        })
        .collect()
}

/// (run time, runs) of the programs whose name starts with `prefix`, between two reads.
fn delta(
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
fn snmp(protocol: &str, field: &str) -> u64 {
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

fn bulk(pid: Option<u32>, udp: bool, seconds: u64) -> anyhow::Result<Bulk> {
    let (protocol, field) = if udp {
        ("Udp", "InDatagrams")
    } else {
        ("Tcp", "InSegs")
    };
    let before = pid.map(programs_of).unwrap_or_default();
    let received_before = snmp(protocol, field);
    let bps = iperf(udp, seconds)?;
    let received = snmp(protocol, field) - received_before;
    let after = pid.map(programs_of).unwrap_or_default();
    let names = names(&after);
    let (dns_ns, dns_runs) = delta(&before, &after, &names, "tp_dns_");
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok(Bulk {
        gbps: bps / 1e9,
        received,
        dns_ns,
        dns_runs,
        all_ns,
    })
}

/// `queries` lookups as Go makes them (connect, write, read) to the dnsmasq on
/// 127.0.0.153; returns the DNS programs' (run time, runs) and every program's time.
fn answers(pid: u32, queries: u64) -> anyhow::Result<(u64, u64, u64)> {
    let query: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01";
    let before = programs_of(pid);
    for _ in 0..queries {
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
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = programs_of(pid);
    let names = names(&after);
    let (dns_ns, dns_runs) = delta(&before, &after, &names, "tp_dns_");
    let (all_ns, _) = delta(&before, &after, &names, "");
    Ok((dns_ns, dns_runs, all_ns))
}

/// Measures and returns the Markdown table rows.
pub fn measure(collector: &Path, seconds: u64, queries: u64) -> anyhow::Result<String> {
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
    let collector = collector.to_string_lossy().into_owned();
    let mut rows = String::new();
    for udp in [false, true] {
        let what = if udp { "UDP 1400 B" } else { "TCP" };
        let unit = if udp { "datagram" } else { "segment" };
        let none = bulk(None, udp, seconds)?;
        rows.push_str(&format!(
            "| {what} | no collector | {:.2} | 1.00 | {} | – | – | – |\n",
            none.gbps, none.received
        ));
        for (label, dns) in [
            ("collector", "--dns=true"),
            ("collector --dns=false", "--dns=false"),
        ] {
            let mut child = spawn(&[
                &collector,
                "run",
                "--probe",
                "tracepoint",
                "--stdout",
                "--stats-interval",
                "1h",
                dns,
            ])?;
            wait_attached(&mut child)?;
            let b = bulk(Some(child.0.id()), udp, seconds)?;
            rows.push_str(&format!(
                "| {what} | {label} | {:.2} | {:.2} | {} | {:.1} ns / {unit} | {:.1} ns / run ({} runs) | {:.1} ns / {unit} |\n",
                b.gbps,
                b.gbps / none.gbps,
                b.received,
                b.dns_ns as f64 / b.received.max(1) as f64,
                b.dns_ns as f64 / b.dns_runs.max(1) as f64,
                b.dns_runs,
                b.all_ns as f64 / b.received.max(1) as f64,
            ));
        }
    }
    let mut child = spawn(&[
        &collector,
        "run",
        "--probe",
        "tracepoint",
        "--stdout",
        "--stats-interval",
        "1h",
    ])?;
    wait_attached(&mut child)?;
    let (dns_ns, dns_runs, all_ns) = answers(child.0.id(), queries)?;
    rows.push_str(&format!(
        "\nPer DNS answer ({queries} connected-UDP lookups, Go's way): DNS programs {:.0} ns \
         ({:.1} runs each), every collector program {:.0} ns (the connect and send hooks \
         included).\n",
        dns_ns as f64 / queries as f64,
        dns_runs as f64 / queries as f64,
        all_ns as f64 / queries as f64,
    ));
    Ok(rows)
}

/// The `dns-cost` section of the report (`report::put_section` adds its markers).
pub fn section(command: &str, table: &str) -> String {
    format!(
        "## DNS capture: kernel time per received segment, throughput, per answer\n\n\
         Generated by `egress-bench dns-cost` on {}. Command: `{command}`.\n\n\
         A loopback iperf3 bulk transfer (TCP, then UDP with 1400-byte datagrams at full\n\
         rate) without the collector, with it (tracepoint mode, DNS on) and with\n\
         `--dns=false`. `DNS programs` is the run time of the read/recvfrom/recvmsg\n\
         tracepoint programs (`tp_dns_*`) divided by the segments or datagrams the host\n\
         received (/proc/net/snmp; both ends are on this host), then per program run (a\n\
         run is a syscall exit on the whole node, iperf3's or anyone's: a process that\n\
         marked a DNS socket (a DNS forwarder, say) pays a hash lookup per read);\n\
         `all programs` adds every program of the collector. The ratio is the\n\
         throughput against no collector: bpf_stats leaves out dispatch and syscall\n\
         slow paths. A machine shared with other builds makes single rounds noisy: take\n\
         the lowest of several rounds. The kprobe and fentry families' DNS hooks\n\
         (`udp_recvmsg`, `udpv6_recvmsg`, `tcp_recvmsg`) cannot run on this host's kernel.\n\n\
         | load | observer | Gbit/s | ratio | received | DNS programs | per run | all programs |\n\
         |---|---|---|---|---|---|---|---|\n{table}",
        crate::report::today()
    )
}
