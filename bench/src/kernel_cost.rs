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
    let mut costs = measure_together(&[command], connections)?;
    Ok(costs.remove(0))
}

/// Every command attached at once: each connection runs all their programs in the same
/// moments, so machine noise (other load, steal time) falls on all of them alike. The
/// fairest comparison of two builds on a shared machine.
pub fn measure_together(commands: &[&[&str]], connections: u64) -> anyhow::Result<Vec<Cost>> {
    let _stats = enable_stats()?;
    let mut children = Vec::new();
    // One after the other, each attached before the next starts: programs on one
    // tracepoint run in attach order, and the first pays the cache misses on the socket
    // and the task, so callers rotate the order between rounds.
    for command in commands {
        let child = Command::new(command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"));
        match child {
            Ok(child) => children.push(child),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
        if let Err(e) = wait_attached(&mut children) {
            stop(&mut children);
            return Err(e);
        }
    }
    let result = measure_children(&mut children, connections);
    stop(&mut children);
    result
}

/// Until every child holds programs and their count has not grown for two seconds.
fn wait_attached(children: &mut [Child]) -> anyhow::Result<()> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = vec![0; pids.len()];
    let mut stable_since = Instant::now();
    loop {
        let now: Vec<usize> = pids.iter().map(|p| programs_of(*p).len()).collect();
        if now != seen {
            seen = now;
            stable_since = Instant::now();
        }
        if seen.iter().all(|n| *n > 0) && stable_since.elapsed() > Duration::from_secs(2) {
            return Ok(());
        }
        for child in children.iter_mut() {
            if child.try_wait()?.is_some() {
                bail!("an observer exited before attaching");
            }
        }
        if Instant::now() > deadline {
            bail!("the observers never attached their programs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(children: &mut [Child]) {
    for child in children.iter() {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn measure_children(children: &mut [Child], connections: u64) -> anyhow::Result<Vec<Cost>> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    wait_attached(children)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || {
        for _ in 0..connections {
            if let Ok((s, _)) = listener.accept() {
                drop(s);
            }
        }
    });
    let before: Vec<Vec<ProgramStats>> = pids.iter().map(|p| programs_of(*p)).collect();
    for _ in 0..connections {
        let s = TcpStream::connect(addr)?;
        drop(s);
    }
    let _ = server.join();
    // Closes finish in softirq just after: let them land.
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<Vec<ProgramStats>> = pids.iter().map(|p| programs_of(*p)).collect();
    Ok(before
        .iter()
        .zip(&after)
        .map(|(before, after)| {
            if std::env::var_os("EGRESS_BENCH_DETAIL").is_some() {
                detail(before, after);
            }
            let (t0, c0) = total(before);
            let (t1, c1) = total(after);
            Cost {
                programs: after.len(),
                connections,
                run_time_ns: t1.saturating_sub(t0),
                runs: c1.saturating_sub(c0),
            }
        })
        .collect())
}

fn detail(before: &[ProgramStats], after: &[ProgramStats]) {
    for a in after {
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

/// The collector in tracepoint mode, writing to /dev/null, on CPU 1 (`taskset`): the
/// load runs on CPU 0 (run the bench under `taskset -c 0`), so the observers' user
/// space does not preempt the connecting task in the middle of a program, which the
/// kernel would count as program time.
pub fn collector_command(collector: &Path) -> Vec<String> {
    [
        "taskset",
        "-c",
        "1",
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

/// The body of the report's `kernel-cost` section (written by `report::put_section`).
pub fn section(command: &str, connections: u64, table: &str) -> String {
    format!(
        "## Kernel time per TCP connection\n\n\
         Generated by `egress-bench kernel-cost` on {}. Command: `{command}`.\n\n\
         With run-time statistics on (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled`),\n\
         the observers attach (with `--together` the collectors all at once, one after\n\
         the other in an order rotated each round, so machine noise falls on them alike;\n\
         tcplife alone), then {connections} loopback TCP connections are opened and\n\
         closed (both ends in this host, so every program sees client and server\n\
         transitions), and the run time of each observer's own programs (found through\n\
         its fds) is divided by the connections. Observers run on CPU 1, the load on\n\
         CPU 0. The collector runs in tracepoint mode. `tcplife` (libbpf-tools) reads the same state changes and prints\n\
         duration and bytes per connection. On a shared machine other programs'\n\
         connections and CPU contention only add time: the minimum over rounds is the\n\
         least disturbed figure.\n\n{table}",
        crate::report::today()
    )
}
