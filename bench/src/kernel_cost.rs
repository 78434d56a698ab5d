//! Kernel program time per TCP connection: with `kernel.bpf_stats_enabled`, the kernel
//! sums each program's run time (`run_time_ns`) and runs (`run_cnt`), shown in the
//! fdinfo of the program's fd. The observer's programs are found through its own fds,
//! so other programs loaded on the machine do not count.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One program of the observer: its kernel id, and its counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub id: u64,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Every BPF program `pid` holds an fd to, with its counters.
pub fn programs_of(pid: u32) -> Vec<ProgramStats> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut programs: Vec<ProgramStats> = entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Some(ProgramStats {
                id: field("prog_id:")?,
                run_time_ns: field("run_time_ns:").unwrap_or(0),
                run_cnt: field("run_cnt:").unwrap_or(0),
            })
        })
        .collect();
    // A program can be held by several fds (one per attachment): count it once.
    programs.sort_by_key(|p| p.id);
    programs.dedup_by_key(|p| p.id);
    programs
}

/// What one observer cost per connection.
#[derive(Debug)]
pub struct Cost {
    pub programs: usize,
    pub connections: u64,
    pub run_time_ns: u64,
    pub runs: u64,
}

impl Cost {
    pub fn ns_per_connection(&self) -> f64 {
        self.run_time_ns as f64 / self.connections as f64
    }
}

fn total(programs: &[ProgramStats]) -> (u64, u64) {
    programs
        .iter()
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
}

/// Run-time statistics on while the returned fd is open: `BPF_ENABLE_STATS` counts its
/// holders, so another process writing 0 to `kernel.bpf_stats_enabled` cannot switch
/// them off under the measurement (the sysctl alone is one global switch).
pub fn enable_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; ... }: BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 4];
    // SAFETY: bpf(2) reads `size` bytes of attr, which is that long.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("BPF_ENABLE_STATS (or write 1 to {STATS})"));
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Starts `command`, waits for it to hold BPF programs, makes `connections` loopback TCP
/// connections (each connected, then closed by both ends), and reads the time its
/// programs spent.
pub fn measure(command: &[&str], connections: u64) -> anyhow::Result<Cost> {
    let _stats = enable_stats()?;
    measure_enabled(command, connections)
}

fn measure_enabled(command: &[&str], connections: u64) -> anyhow::Result<Cost> {
    let mut child: Child = Command::new(command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Attached once the program count stops growing for a second.
    let mut seen = 0;
    let mut stable_since = Instant::now();
    loop {
        let now = programs_of(pid).len();
        if now != seen {
            seen = now;
            stable_since = Instant::now();
        }
        if seen > 0 && stable_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("{command:?} never attached its programs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || {
        for _ in 0..connections {
            if let Ok((s, _)) = listener.accept() {
                drop(s);
            }
        }
    });
    let before = programs_of(pid);
    for _ in 0..connections {
        let s = TcpStream::connect(addr)?;
        drop(s);
    }
    let _ = server.join();
    // Closes finish in softirq just after: let them land.
    std::thread::sleep(Duration::from_millis(500));
    let after = programs_of(pid);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let stop = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > stop {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if std::env::var_os("EGRESS_BENCH_DETAIL").is_some() {
        for a in &after {
            let b = before
                .iter()
                .find(|b| b.id == a.id)
                .copied()
                .unwrap_or(ProgramStats {
                    id: a.id,
                    run_time_ns: 0,
                    run_cnt: 0,
                });
            let (dt, dc) = (a.run_time_ns - b.run_time_ns, a.run_cnt - b.run_cnt);
            eprintln!(
                "program {}: {dc} runs, {dt} ns, {} ns per run",
                a.id,
                dt / dc.max(1)
            );
        }
    }
    let (t0, c0) = total(&before);
    let (t1, c1) = total(&after);
    Ok(Cost {
        programs: after.len(),
        connections,
        run_time_ns: t1.saturating_sub(t0),
        runs: c1.saturating_sub(c0),
    })
}

/// The collector in tracepoint mode, writing to /dev/null.
pub fn collector_command(collector: &Path) -> Vec<String> {
    [
        collector.to_string_lossy().as_ref(),
        "run",
        "--probe",
        "tracepoint",
        "--stdout",
        "--stats-interval",
        "1h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

const BEGIN: &str = "<!-- kernel-cost -->";
const END: &str = "<!-- /kernel-cost -->";

/// The `kernel-cost` section of a report, markers included (empty when absent).
pub fn section_of(report: &str) -> String {
    match (report.find(BEGIN), report.find(END)) {
        (Some(b), Some(e)) if e > b => format!("\n{}\n", &report[b..e + END.len()]),
        _ => String::new(),
    }
}

/// `report` with its `kernel-cost` section replaced (or appended).
pub fn replace_section(report: &str, command: &str, connections: u64, table: &str) -> String {
    let section = format!(
        "{BEGIN}\n## Kernel time per TCP connection\n\n\
         Generated by `egress-bench kernel-cost` on {}. Command: `{command}`.\n\n\
         With run-time statistics on (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled`),\n\
         each observer in turn attaches, then {connections} loopback TCP connections are\n\
         opened and closed (both ends in this host, so every program sees client and\n\
         server transitions), and the run time of the observer's own programs (found\n\
         through its fds) is divided by the connections. The collector runs in\n\
         tracepoint mode. `tcplife` (libbpf-tools) reads the same state changes and prints\n\
         duration and bytes per connection. On a shared machine other programs'\n\
         connections and CPU contention only add time: the minimum over rounds is the\n\
         least disturbed figure.\n\n{table}{END}",
        crate::report::today()
    );
    match (report.find(BEGIN), report.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{section}{}", &report[..b], &report[e + END.len()..])
        }
        _ => format!("{}\n{section}\n", report.trim_end()),
    }
}
