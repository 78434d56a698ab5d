//! Kernel program time per TCP connection: with `kernel.bpf_stats_enabled`, the kernel
//! sums each program's run time (`run_time_ns`) and runs (`run_cnt`), shown in the
//! fdinfo of the program's fd. The observer's programs are found through its own fds,
//! so other programs loaded on the machine do not count.
//!
//! The observers: the collectors given, a floor (empty programs on the hooks our TCP path
//! runs on in tracepoint mode), and the peers of issue 15's table in the same run
//! (bpftrace counting the state tracepoint in a map; bpftrace printing pid,
//! comm, cgroup and port per connect, the same job as ours; libbpf-tools `tcplife`, and
//! `tcpconnect` for kprobe mode). Each round can also measure each observer's throughput
//! ratio: the load's connects per second at the maximum rate over that round's no-probe
//! rate.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use socket2::{Domain, Socket, Type};

use crate::load::LoadReport;

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
    // A program can be held by several fds (its own, and a link's, whose fdinfo names the
    // program but has no counters): count it once, with the counters.
    programs.sort_by_key(|p| (p.id, std::cmp::Reverse((p.run_cnt, p.run_time_ns))));
    programs.dedup_by_key(|p| p.id);
    programs
}

/// The counters of the programs `ids` (as [`programs_of`] found them), read with bpf(2)
/// alone: reading `/proc/<pid>/fdinfo` is a read(2) per descriptor, and the collector's
/// DNS hook on read's exit runs for each, billing the measurement's own reads (a few
/// hundred per snapshot, ~15-30 ns per connection of a 5,000-connection round) to the
/// connections it measures.
pub fn counters_of(ids: &[u64]) -> Vec<ProgramStats> {
    let mut programs: Vec<ProgramStats> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&u64::from(info.id())))
        .map(|info| ProgramStats {
            id: u64::from(info.id()),
            run_time_ns: info.run_time().as_nanos() as u64,
            run_cnt: info.run_count(),
        })
        .collect();
    programs.sort_by_key(|p| p.id);
    programs
}

/// The ids of the programs `pid` holds (read from its fdinfo: before a measurement, not
/// within it, see [`counters_of`]).
pub fn program_ids_of(pid: u32) -> Vec<u64> {
    programs_of(pid).iter().map(|program| program.id).collect()
}

/// What one observer cost per connection.
#[derive(Debug)]
pub struct Cost {
    pub programs: usize,
    pub connections: u64,
    pub run_time_ns: u64,
    pub runs: u64,
    /// The same time and runs by program name: where it went, and what of it no
    /// connection caused (a hook that other processes' syscalls run in the meantime).
    pub by_program: Vec<ProgramCost>,
    /// ns per getppid(2) and per read(2) of a file while attached (see [`syscall_ns`]).
    pub syscall_ns: Syscalls,
}

/// ns per call of two syscalls (see [`syscall_ns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Syscalls {
    /// getppid(2): no work, and no program of any observer on it.
    pub getppid: f64,
    /// read(2) of 64 bytes of /dev/zero: a read of a file, which a program on the read
    /// syscall's tracepoints runs for.
    pub read: f64,
}

/// One program's (or, where names repeat, one name's) runs and run time between two reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// The names of the programs `ids` (cut at 15 bytes), read with BPF_OBJ_GET_INFO_BY_FD;
/// a program with no name (or none in UTF-8) is left out.
pub(crate) fn names(ids: &[u64]) -> Vec<(u64, String)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&u64::from(info.id())))
        .filter_map(|info| {
            let name = info.name_as_str().filter(|name| !name.is_empty())?;
            Some((u64::from(info.id()), name.to_owned()))
        })
        .collect()
}

/// Each program's runs and run time from `before` to `after`, summed by name (a program
/// with no name known goes by its id), in the order names first appear in `after`.
fn per_program(
    before: &[ProgramStats],
    after: &[ProgramStats],
    names: &[(u64, String)],
) -> Vec<ProgramCost> {
    let mut costs: Vec<ProgramCost> = Vec::new();
    for a in after {
        let b = before.iter().find(|b| b.id == a.id);
        let runs = a.run_cnt.saturating_sub(b.map_or(0, |b| b.run_cnt));
        let run_time_ns = a.run_time_ns.saturating_sub(b.map_or(0, |b| b.run_time_ns));
        let name = names
            .iter()
            .find(|(id, _)| *id == a.id)
            .map_or_else(|| format!("program {}", a.id), |(_, name)| name.clone());
        match costs.iter_mut().find(|c| c.name == name) {
            Some(cost) => {
                cost.runs += runs;
                cost.run_time_ns += run_time_ns;
            }
            None => costs.push(ProgramCost {
                name,
                runs,
                run_time_ns,
            }),
        }
    }
    costs
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
        return Err(std::io::Error::last_os_error()).context(format!(
            "BPF_ENABLE_STATS (or write 1 to {})",
            crate::bpf_stats::SYSCTL
        ));
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Starts `command`, waits for it to hold BPF programs, makes `connections` loopback TCP
/// connections (each connected, then closed by both ends), and reads the time its
/// programs spent.
pub fn measure(command: &[&str], connections: u64, nonblocking: bool) -> anyhow::Result<Cost> {
    let mut costs = measure_together(&[command], connections, nonblocking)?;
    Ok(costs.remove(0))
}

/// Every command attached at once: each connection runs all their programs in the same
/// moments, so machine noise (other load, steal time) falls on all of them alike. The
/// fairest comparison of two builds on a shared machine.
pub fn measure_together(
    commands: &[&[&str]],
    connections: u64,
    nonblocking: bool,
) -> anyhow::Result<Vec<Cost>> {
    let _stats = enable_stats()?;
    let mut children = start_attached(commands)?;
    let result = measure_children(&mut children, connections, nonblocking);
    stop(&mut children);
    result
}

/// Starts the observers one after the other, each attached before the next starts:
/// programs on one tracepoint run in attach order, and the first pays the cache misses
/// on the socket and the task, so callers rotate the order between rounds. On an error,
/// those already started are stopped.
fn start_attached(commands: &[&[&str]]) -> anyhow::Result<Vec<Child>> {
    let mut children = Vec::new();
    for command in commands {
        let child = Command::new(command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(observer_stderr())
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
    Ok(children)
}

/// The observers' log goes to ours with `EGRESS_BENCH_DETAIL` set (to see why one failed
/// to attach, e.g. in a VM), else nowhere.
fn observer_stderr() -> Stdio {
    if detail_wanted() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn detail_wanted() -> bool {
    std::env::var_os("EGRESS_BENCH_DETAIL").is_some()
}

/// Until every child holds programs and their count has not grown for two seconds.
/// bpftrace compiles its program with LLVM first: seconds on a busy machine.
fn wait_attached(children: &mut [Child]) -> anyhow::Result<()> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
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

fn measure_children(
    children: &mut [Child],
    connections: u64,
    nonblocking: bool,
) -> anyhow::Result<Vec<Cost>> {
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
    let ids: Vec<Vec<u64>> = pids.iter().map(|p| program_ids_of(*p)).collect();
    // Before the first snapshot: the window holds the connections and their closes alone.
    let named: Vec<Vec<(u64, String)>> = ids.iter().map(|ids| names(ids)).collect();
    let before: Vec<Vec<ProgramStats>> = ids.iter().map(|ids| counters_of(ids)).collect();
    for _ in 0..connections {
        if nonblocking {
            connect_nonblocking(addr)?;
        } else {
            drop(TcpStream::connect(addr)?);
        }
    }
    let _ = server.join();
    // Closes finish in softirq just after: let them land.
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<Vec<ProgramStats>> = ids.iter().map(|ids| counters_of(ids)).collect();
    let syscall_ns = syscall_ns()?;
    Ok(before
        .iter()
        .zip(&after)
        .zip(&named)
        .map(|((before, after), names)| {
            let by_program = per_program(before, after, names);
            if detail_wanted() {
                detail(&by_program);
            }
            let (t0, c0) = total(before);
            let (t1, c1) = total(after);
            Cost {
                programs: after.len(),
                connections,
                run_time_ns: t1.saturating_sub(t0),
                runs: c1.saturating_sub(c0),
                by_program,
                syscall_ns,
            }
        })
        .collect())
}

/// One connection as a non-blocking client makes it (Go, Node, the JVM's NIO, Envoy,
/// curl): connect(2) returns `EINPROGRESS`, the socket is polled until writable, and the
/// outcome read from `SO_ERROR`; then closed.
fn connect_nonblocking(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut writable = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, owned by this frame, for a descriptor it holds open.
    if unsafe { libc::poll(&mut writable, 1, 5_000) } != 1 {
        return Err(std::io::Error::other(
            "a non-blocking connect did not finish in 5 s",
        ));
    }
    match socket.take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// getppid(2) calls per [`syscall_ns`] measure (~0.2-0.3 s).
const SYSCALL_CALLS: u32 = 1_000_000;

/// ns per getppid(2), a syscall that does no work, and per read(2) of 64 bytes of
/// /dev/zero, over [`SYSCALL_CALLS`] calls each on this thread. What they cost with an
/// observer attached beyond what they cost with none is what the observer adds to every
/// syscall of every process on the host, and to every read of a file, which no
/// program's run time shows: any program on a syscall tracepoint sends every syscall
/// through the slow path of its entry and exit (`SYSCALL_WORK_SYSCALL_TRACEPOINT`), and
/// a program on read's own tracepoint runs for every read.
pub fn syscall_ns() -> anyhow::Result<Syscalls> {
    let start = Instant::now();
    for _ in 0..SYSCALL_CALLS {
        // SAFETY: getppid takes no arguments and cannot fail.
        std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
    let getppid = start.elapsed().as_nanos() as f64 / f64::from(SYSCALL_CALLS);
    let zero = std::fs::File::open("/dev/zero").context("opening /dev/zero")?;
    let mut buf = [0u8; 64];
    let start = Instant::now();
    for _ in 0..SYSCALL_CALLS {
        // SAFETY: a read into a buffer of the given length, on a descriptor held open.
        let n = unsafe { libc::read(zero.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != buf.len() as isize {
            bail!("read(2) of /dev/zero returned {n}");
        }
    }
    let read = start.elapsed().as_nanos() as f64 / f64::from(SYSCALL_CALLS);
    Ok(Syscalls { getppid, read })
}

fn detail(programs: &[ProgramCost]) {
    for p in programs {
        eprintln!(
            "program {}: {} runs, {} ns, {} ns per run",
            p.name,
            p.runs,
            p.run_time_ns,
            p.run_time_ns / p.runs.max(1)
        );
    }
}

/// The peers of issue 15's table, measured beside the collectors in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Empty programs on the hooks our TCP path runs on in tracepoint mode (the
    /// BTF-enabled `inet_sock_set_state` and `sys_exit_connect`): the floor under ours,
    /// dispatch and bpf_stats' clock reads on the same runs.
    EmptyHooks,
    /// bpftrace counting CLOSE -> SYN_SENT of `sock:inet_sock_set_state` per destination
    /// port in a map: one program on that (classic) tracepoint.
    BpftraceCount,
    /// bpftrace printing pid, comm, cgroup id and port per connect: the same job as ours.
    BpftracePrintf,
    /// libbpf-tools `tcplife`: the same tracepoint; pid, comm, addresses, bytes and
    /// duration per connection.
    Tcplife,
    /// libbpf-tools `tcpconnect`: kprobes on `tcp_v4_connect`/`tcp_v6_connect`; pid, comm
    /// and addresses per connect (the kprobe-mode reference).
    Tcpconnect,
}

/// The printf peer's program: what ours reports of a connect, as text.
const BPFTRACE_PRINTF: &str = "tracepoint:sock:inet_sock_set_state \
    /args->oldstate == 7 && args->newstate == 2/ \
    { printf(\"%d %s %llu %d\\n\", pid, comm, cgroup, args->dport); }";

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::EmptyHooks => "empty programs on our hooks (floor)",
            Peer::BpftraceCount => "bpftrace, count in a map",
            Peer::BpftracePrintf => "bpftrace, printf pid comm cgroup port",
            Peer::Tcplife => "tcplife (libbpf-tools)",
            Peer::Tcpconnect => "tcpconnect (libbpf-tools)",
        }
    }

    fn command(self, tools: &Tools) -> Vec<String> {
        let bpftrace = |program: &str| vec![tools.bpftrace.clone(), "-e".into(), program.into()];
        match self {
            Peer::EmptyHooks => vec![tools.bench.clone(), "empty-state-hooks".into()],
            Peer::BpftraceCount => bpftrace(crate::tool::BPFTRACE_COUNT),
            Peer::BpftracePrintf => bpftrace(BPFTRACE_PRINTF),
            Peer::Tcplife => vec![tools.tcplife.clone()],
            Peer::Tcpconnect => vec![tools.tcpconnect.clone()],
        }
    }
}

/// Where the peer tools are.
pub struct Tools {
    /// This bench's own binary (the empty programs' holder).
    pub bench: String,
    pub bpftrace: String,
    pub tcplife: String,
    pub tcpconnect: String,
}

#[derive(clap::Args)]
pub struct Args {
    /// Collector binaries to measure, in order (e.g. before and after a change).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "target/release/egress-collector"
    )]
    pub collectors: Vec<PathBuf>,
    /// The collectors' hook family (`--probe`); tracepoint is what this host allows.
    #[arg(long, default_value = "tracepoint")]
    pub probe: String,
    /// Peers measured beside them in the same run; `--peers none` measures none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "empty-hooks,bpftrace-count,bpftrace-printf,tcplife",
        value_parser = parse_peer
    )]
    pub peers: Vec<Option<Peer>>,
    /// The tcplife binary; `none` leaves tcplife out (as `--peers` without it).
    #[arg(long, default_value = "/usr/sbin/tcplife")]
    pub tcplife: String,
    #[arg(long, default_value = "/usr/sbin/tcpconnect")]
    pub tcpconnect: String,
    #[arg(long, default_value = "bpftrace")]
    pub bpftrace: String,
    #[arg(long, default_value_t = 5000)]
    pub connections: u64,
    /// Rounds; each alternates the observers.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Seconds of load at the maximum rate per observer and round for the throughput
    /// ratio (and once per round with no probe); 0 skips it.
    #[arg(long, default_value_t = 3.0)]
    pub throughput_seconds: f64,
    /// Where the summary goes (its own section, replaced on each run).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub report: PathBuf,
    /// Attach the collectors (and the floor) at the same time (peers still alone): machine noise then
    /// falls on all of them alike.
    #[arg(long)]
    pub together: bool,
    /// Connect non-blocking, as most clients do (connect(2) returns `EINPROGRESS`, then
    /// the socket is polled until writable); the run then has a section of its own.
    #[arg(long)]
    pub nonblocking: bool,
    /// A sentence about this run's conditions for the report, e.g. what else the machine
    /// was doing.
    #[arg(long)]
    pub note: Option<String>,
    /// How each collector runs, each measured as an observer of its own: `default` (its
    /// default flags), `closes` (close records on: the CLOSE transitions tracked),
    /// `filtered` (the load's destination excluded), `rate-limited` (1 connection per
    /// second per cgroup), `aggregated` (repeats to one destination counted in a window):
    /// the last three drop (nearly) every connection in the kernel.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub variants: Vec<Variant>,
}

/// A way of running the collector (see [`Args::variants`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    Default,
    Closes,
    Filtered,
    RateLimited,
    Aggregated,
}

impl Variant {
    /// The collector flags that make the variant. The load connects to 127.0.0.1, one
    /// port, from one process and cgroup.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Default => &[],
            Variant::Closes => &["--close-records"],
            Variant::Filtered => &["--exclude-cidr", "127.0.0.0/8"],
            Variant::RateLimited => &["--cgroup-rate-limit", "1", "--cgroup-burst", "1"],
            Variant::Aggregated => &["--aggregate-window", "1h"],
        }
    }

    /// Whether the variant sets the rate limit itself (the throughput run otherwise turns
    /// it off).
    fn sets_rate_limit(self) -> bool {
        self == Variant::RateLimited
    }
}

fn parse_peer(text: &str) -> Result<Option<Peer>, String> {
    if text == "none" {
        return Ok(None);
    }
    <Peer as clap::ValueEnum>::from_str(text, false)
        .map(Some)
        .map_err(|_| format!("unknown peer {text:?} (empty-hooks, bpftrace-count, bpftrace-printf, tcplife, tcpconnect or none)"))
}

/// One observer: its name in the tables, and how it runs for the kernel figure (pinned
/// to CPU 1) and for the throughput ratio (unpinned, as in `egress-bench run`).
struct Observer {
    name: String,
    /// One of the collectors (not a peer).
    collector: bool,
    kernel: Vec<String>,
    throughput: Vec<String>,
}

/// The collector in `probe` mode with `variant`'s flags, writing to /dev/null. For the
/// kernel figure it runs on CPU 1 (`taskset`): the load runs on CPU 0 (run the bench
/// under `taskset -c 0`), so the observers' user space does not preempt the connecting
/// task in the middle of a program, which the kernel would count as program time. For
/// the throughput ratio the per-cgroup rate limit is off (the load is one cgroup; as in
/// `egress-bench run`): every connection is reported, as the peers report every one.
fn collector_observer(collector: &Path, probe: &str, variant: Variant) -> Observer {
    let mut base: Vec<String> = [
        collector.to_string_lossy().as_ref(),
        "run",
        "--probe",
        probe,
        "--stdout",
        "--stats-interval",
        "1h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    base.extend(variant.flags().iter().map(|s| s.to_string()));
    let mut throughput = base.clone();
    if !variant.sets_rate_limit() {
        throughput.extend(["--cgroup-rate-limit".to_owned(), "0".to_owned()]);
    }
    // The default variant is named by the binary alone (the CI smoke looks for that row).
    let mut name = collector.display().to_string();
    if variant != Variant::Default {
        name = format!("{name} {}", variant.flags().join(" "));
    }
    Observer {
        name,
        collector: true,
        kernel: pinned(base),
        throughput,
    }
}

fn pinned(command: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = ["taskset", "-c", "1"].map(String::from).to_vec();
    all.extend(command);
    all
}

/// What one observer measured over the rounds.
#[derive(Default)]
struct Figures {
    ns_per_connection: Vec<f64>,
    /// With `--together`, the rounds this observer was not attached first: the first
    /// runs first on every event and pays the cache misses the others then find warm
    /// (hundreds of ns per connection on some hosts), so these are the rounds in which
    /// builds compare with the least noise.
    not_first: Vec<f64>,
    ratios: Vec<f64>,
    /// ns per getppid(2) and read(2) while attached, each round's (see [`syscall_ns`]).
    syscall_ns: Vec<Syscalls>,
    /// Each program's rounds, by name (see [`Cost::by_program`]).
    by_program: Vec<ProgramRounds>,
    /// The rounds added to `by_program`.
    program_rounds: usize,
}

/// One program's figures over the rounds.
#[derive(Default)]
struct ProgramRounds {
    name: String,
    runs_per_connection: Vec<f64>,
    ns_per_connection: Vec<f64>,
    runs: u64,
    run_time_ns: u64,
}

impl Figures {
    /// One round's programs. A program absent from a round (not loaded, or known only by
    /// its id, which changes each round) counts 0 there, so every median is over all rounds.
    fn add_programs(&mut self, cost: &Cost) {
        let round = self.program_rounds;
        self.program_rounds += 1;
        let connections = cost.connections.max(1) as f64;
        for program in &cost.by_program {
            let index = match self.by_program.iter().position(|r| r.name == program.name) {
                Some(index) => index,
                None => {
                    self.by_program.push(ProgramRounds {
                        name: program.name.clone(),
                        runs_per_connection: vec![0.0; round],
                        ns_per_connection: vec![0.0; round],
                        ..ProgramRounds::default()
                    });
                    self.by_program.len() - 1
                }
            };
            let rounds = &mut self.by_program[index];
            rounds
                .runs_per_connection
                .push(program.runs as f64 / connections);
            rounds
                .ns_per_connection
                .push(program.run_time_ns as f64 / connections);
            rounds.runs += program.runs;
            rounds.run_time_ns += program.run_time_ns;
        }
        for rounds in &mut self.by_program {
            rounds.runs_per_connection.resize(round + 1, 0.0);
            rounds.ns_per_connection.resize(round + 1, 0.0);
        }
    }
}

/// The order in which `attached` observers (indices) attach in `round`: rotated by one
/// each round, so over `attached` rounds each is first once.
fn attach_order(attached: usize, round: usize) -> Vec<usize> {
    (0..attached).map(|i| (i + round) % attached).collect()
}

/// The median of `values` (the upper one of an even count); `None` if empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// `egress-bench kernel-cost`: the rounds, the table on stdout, the report's section.
/// Fails when an observer's programs ran no time: the figure was not produced.
pub fn run(bench: &Path, args: &Args) -> anyhow::Result<()> {
    let tools = Tools {
        bench: bench.display().to_string(),
        bpftrace: args.bpftrace.clone(),
        tcplife: args.tcplife.clone(),
        tcpconnect: args.tcpconnect.clone(),
    };
    let mut variants = args.variants.clone();
    variants.dedup();
    let mut observers: Vec<Observer> = args
        .collectors
        .iter()
        .flat_map(|c| {
            variants
                .iter()
                .map(|&v| collector_observer(c, &args.probe, v))
        })
        .collect();
    let mut collectors = observers.len();
    let mut peers: Vec<Peer> = args.peers.iter().flatten().copied().collect();
    peers.dedup();
    // The floor first: with `--together` it is attached with the collectors, so their
    // figures and its own are taken under the same conditions.
    peers.sort_by_key(|&peer| peer != Peer::EmptyHooks);
    for peer in peers {
        if peer == Peer::Tcplife && args.tcplife == "none" {
            continue;
        }
        // Its hooks are tracepoint mode's: no floor for the kprobe or fentry families.
        if peer == Peer::EmptyHooks && args.probe != "tracepoint" {
            continue;
        }
        let command = peer.command(&tools);
        if peer == Peer::EmptyHooks && args.together && collectors > 0 {
            collectors += 1;
        }
        observers.push(Observer {
            name: peer.name().to_owned(),
            collector: false,
            kernel: pinned(command.clone()),
            throughput: command,
        });
    }
    let throughput = args.throughput_seconds > 0.0;
    println!(
        "| observer | round | programs | connections | runs | run_time_ns | ns per connection |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut figures: Vec<Figures> = observers.iter().map(|_| Figures::default()).collect();
    // getppid(2) with nothing attached, once a round (see `syscall_ns`).
    let mut bare_syscall_ns = Vec::new();
    for round in 1..=args.repeat {
        bare_syscall_ns.push(syscall_ns()?);
        let mut costs: Vec<Option<Cost>> = Vec::new();
        costs.resize_with(observers.len(), || None);
        let mut first = None;
        if args.together && collectors > 0 {
            // Rotated each round: the first attached runs first and pays the misses.
            let order = attach_order(collectors, round);
            first = order.first().copied().filter(|_| collectors > 1);
            let commands: Vec<Vec<&str>> = order
                .iter()
                .map(|&i| observers[i].kernel.iter().map(String::as_str).collect())
                .collect();
            let refs: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
            let measured = measure_together(&refs, args.connections, args.nonblocking)
                .context("measuring the collectors together")?;
            for (cost, &i) in measured.into_iter().zip(&order) {
                costs[i] = Some(cost);
            }
        }
        for (i, observer) in observers.iter().enumerate() {
            let command: Vec<&str> = observer.kernel.iter().map(String::as_str).collect();
            let cost = match costs[i].take() {
                Some(cost) => cost,
                None => measure(&command, args.connections, args.nonblocking)
                    .with_context(|| format!("measuring {}", observer.name))?,
            };
            if cost.programs == 0 || cost.runs == 0 || cost.run_time_ns == 0 {
                bail!(
                    "no kernel figure for {}: {} programs ran {} times for {} ns",
                    observer.name,
                    cost.programs,
                    cost.runs,
                    cost.run_time_ns
                );
            }
            figures[i].ns_per_connection.push(cost.ns_per_connection());
            figures[i].syscall_ns.push(cost.syscall_ns);
            figures[i].add_programs(&cost);
            if first.is_some_and(|first| first != i) && i < collectors {
                figures[i].not_first.push(cost.ns_per_connection());
            }
            println!(
                "| {} | {round} | {} | {} | {} | {} | {:.0} |",
                observer.name,
                cost.programs,
                cost.connections,
                cost.runs,
                cost.run_time_ns,
                cost.ns_per_connection()
            );
        }
        if throughput {
            // No probe first, then each observer: alternated, so a busier moment of the
            // machine falls on one round of each rather than on one observer. Run-time
            // statistics off (the sysctl; this process's own fd is closed by now).
            let _stats_off = crate::bpf_stats::sysctl_off()?;
            let baseline = connect_rate(bench, None, args.throughput_seconds)
                .context("the load with no probe")?;
            println!("round {round}: no probe {baseline:.0} connects/s");
            for (i, observer) in observers.iter().enumerate() {
                let command: Vec<&str> = observer.throughput.iter().map(String::as_str).collect();
                let rate = connect_rate(bench, Some(&command), args.throughput_seconds)
                    .with_context(|| format!("the load with {}", observer.name))?;
                let ratio = rate / baseline;
                println!(
                    "round {round}: {} {rate:.0} connects/s, ratio {ratio:.2}",
                    observer.name
                );
                figures[i].ratios.push(ratio);
            }
        }
    }
    let summary = summary(
        &observers,
        &mut figures,
        throughput,
        args.probe == "tracepoint",
    );
    let mut summary = format!("{summary}\n{}", programs_table(&observers, &figures));
    // Alone only: observers attached together add their tax once, to all of them.
    if !args.together {
        summary = format!(
            "{summary}\n{}",
            syscall_table(&observers, &figures, &bare_syscall_ns)
        );
    }
    println!("\n{summary}");
    let command: Vec<String> = std::env::args().collect();
    // A run with the collectors together compares builds; its figures are not what a
    // node pays, and it keeps its own section beside the alone run's.
    let name = match (args.together, args.nonblocking) {
        (false, false) => "kernel-cost",
        (true, false) => "kernel-cost-together",
        (false, true) => "kernel-cost-nonblocking",
        (true, true) => "kernel-cost-together-nonblocking",
    };
    crate::report::put_section(
        &args.report,
        name,
        &section(&command.join(" "), args, &summary),
    )
}

/// Minimum and median of each observer's rounds. Other programs' connections and CPU
/// contention on a shared machine only add: the minimum is the least disturbed round.
fn summary(
    observers: &[Observer],
    figures: &mut [Figures],
    throughput: bool,
    tracepoint_mode: bool,
) -> String {
    for figures in figures.iter_mut() {
        figures.ns_per_connection.sort_by(f64::total_cmp);
    }
    // What our programs add to the empty ones on the same hooks, where those were measured
    // (the hooks of tracepoint mode: the collectors' rows in that mode only).
    let floor = observers
        .iter()
        .position(|o| o.name == Peer::EmptyHooks.name())
        .map(|i| figures[i].ns_per_connection[0])
        .filter(|_| tracepoint_mode);
    let mut table =
        String::from("| observer | min ns per connection | median ns per connection | rounds |");
    let mut columns = 4;
    if floor.is_some() {
        table.push_str(" min ns above the empty programs |");
        columns += 1;
    }
    let positions = figures.iter().any(|f| !f.not_first.is_empty());
    if positions {
        table.push_str(" median ns when not attached first (rounds) |");
        columns += 1;
    }
    if throughput {
        table.push_str(" throughput at max rate vs no probe (median) |");
        columns += 1;
    }
    table.push('\n');
    table.push_str(&"|---".repeat(columns));
    table.push_str("|\n");
    for (observer, figures) in observers.iter().zip(figures.iter_mut()) {
        let values = &figures.ns_per_connection;
        table.push_str(&format!(
            "| {} | {:.0} | {:.0} | {} |",
            observer.name,
            values[0],
            values[values.len() / 2],
            values.len()
        ));
        if let Some(floor) = floor {
            if observer.collector {
                table.push_str(&format!(" {:.0} |", values[0] - floor));
            } else {
                table.push_str(" – |");
            }
        }
        if positions {
            match median(&figures.not_first) {
                Some(m) => table.push_str(&format!(" {m:.0} ({}) |", figures.not_first.len())),
                None => table.push_str(" – |"),
            }
        }
        if throughput {
            figures.ratios.sort_by(f64::total_cmp);
            table.push_str(&format!(
                " {:.2} |",
                figures.ratios[figures.ratios.len() / 2]
            ));
        }
        table.push('\n');
    }
    table
}

/// What each observer adds to every syscall and to every read of a file (see
/// [`syscall_ns`]): the median of its rounds' times and of each round's difference from
/// the same round's with nothing attached.
fn syscall_table(observers: &[Observer], figures: &[Figures], bare: &[Syscalls]) -> String {
    let mut table = String::from(
        "| observer | ns per getppid(2) (median) | added to every syscall (median) | \
         ns per read(2) of a file (median) | added to every read (median) |\n\
         |---|---|---|---|---|\n",
    );
    let column =
        |of: &[Syscalls], pick: fn(&Syscalls) -> f64| -> Vec<f64> { of.iter().map(pick).collect() };
    let getppid = |s: &Syscalls| s.getppid;
    let read = |s: &Syscalls| s.read;
    table.push_str(&format!(
        "| nothing attached | {:.0} | – | {:.0} | – |\n",
        median(&column(bare, getppid)).unwrap_or(0.0),
        median(&column(bare, read)).unwrap_or(0.0),
    ));
    for (observer, figures) in observers.iter().zip(figures) {
        let added = |pick: fn(&Syscalls) -> f64| -> Option<f64> {
            let differences: Vec<f64> = (figures.syscall_ns.iter())
                .zip(bare)
                .map(|(with, without)| pick(with) - pick(without))
                .collect();
            median(&differences)
        };
        let (Some(with_getppid), Some(with_read), Some(getppid_added), Some(read_added)) = (
            median(&column(&figures.syscall_ns, getppid)),
            median(&column(&figures.syscall_ns, read)),
            added(getppid),
            added(read),
        ) else {
            continue;
        };
        table.push_str(&format!(
            "| {} | {with_getppid:.0} | {getppid_added:.0} | {with_read:.0} | {read_added:.0} |\n",
            observer.name
        ));
    }
    table
}

/// Where each collector's time (and the floor's) went, by program: the median over rounds
/// of its runs and nanoseconds per connection, and its nanoseconds per run over all
/// rounds; the programs that cost most first, those that never ran left out. A hook the
/// connections do not run (a read's exit, say) shows what other processes' syscalls
/// cost it during the rounds: in the figure above, though no connection caused it.
fn programs_table(observers: &[Observer], figures: &[Figures]) -> String {
    let mut table = String::from(
        "| observer | program | runs per connection (median) | ns per run | \
         ns per connection (median) |\n|---|---|---|---|---|\n",
    );
    for (observer, figures) in observers.iter().zip(figures) {
        if !observer.collector && observer.name != Peer::EmptyHooks.name() {
            continue;
        }
        let mut rows: Vec<(&ProgramRounds, f64, f64)> = figures
            .by_program
            .iter()
            .filter(|p| p.runs > 0)
            .map(|p| {
                (
                    p,
                    median(&p.runs_per_connection).unwrap_or(0.0),
                    median(&p.ns_per_connection).unwrap_or(0.0),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (program, runs, ns) in rows {
            table.push_str(&format!(
                "| {} | `{}` | {runs:.2} | {:.0} | {ns:.1} |\n",
                observer.name,
                program.name,
                program.run_time_ns as f64 / program.runs as f64,
            ));
        }
    }
    table
}

/// The load's connects per second at the maximum rate (2 threads, loopback, as `egress-bench
/// run` at rate 0) for `seconds`, with `observer` attached, or none. The load may use
/// every CPU even when the bench itself runs pinned.
fn connect_rate(bench: &Path, observer: Option<&[&str]>, seconds: f64) -> anyhow::Result<f64> {
    let mut children = match observer {
        Some(command) => start_attached(&[command])?,
        None => Vec::new(),
    };
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    let output = Command::new("taskset")
        .args(["-c", &format!("0-{}", cpus - 1)])
        .arg(bench)
        .args(["load", "--threads", "2", "--rate", "0", "--seconds"])
        .arg(seconds.to_string())
        .output()
        .context("running the load");
    stop(&mut children);
    let output = output?;
    if !output.status.success() {
        bail!("load failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let report: LoadReport =
        serde_json::from_slice(&output.stdout).context("reading the load's report")?;
    if report.connects == 0 {
        bail!("the load made no connections");
    }
    Ok(report.connects_per_second)
}

/// The body of the report's `kernel-cost` section (written by `report::put_section`).
fn section(command: &str, args: &Args, table: &str) -> String {
    let note = args
        .note
        .as_ref()
        .map(|n| format!(" {}", n.trim()))
        .unwrap_or_default();
    let throughput = if args.throughput_seconds > 0.0 {
        format!(
            "*Throughput* is the load's connects per second over {} s at the maximum rate\n\
             (2 threads, loopback, as `egress-bench run` at rate 0; load and observer\n\
             unpinned on both cores, so the observer's user space competes with the load\n\
             as it would on a node) with the observer attached, over the same load with no\n\
             probe in the same round; the median over rounds. The collector runs with\n\
             `--cgroup-rate-limit 0` there (the load is one cgroup): it reports every\n\
             connection, as the peers do. Their output goes to /dev/null.\n\n",
            args.throughput_seconds
        )
    } else {
        String::new()
    };
    let syscalls = if args.together {
        ""
    } else {
        "\n\n\
         The third table is what each observer costs outside the connections: the time of a\n\
         getppid(2), a syscall that does no work, and of a read(2) of 64 bytes of\n\
         /dev/zero, a million times each on CPU 0 while it is attached, against the same\n\
         with nothing attached in the same round. A program on any syscall tracepoint\n\
         sends every syscall of every process on the host through the slow path of its\n\
         entry and exit, which no program's run time shows, and a program on read's own\n\
         tracepoint runs for every read of every file; a connection of this load makes\n\
         about five syscalls (socket, connect and close; accept4 and close)."
    };
    let connects = if args.nonblocking {
        "non-blocking (connect(2) returns `EINPROGRESS`, then the socket is polled until\n\
         writable and its outcome read, as Go, Node, the JVM's NIO, Envoy and curl connect)"
    } else {
        "blocking"
    };
    let heading = if args.together {
        "## Kernel time per TCP connection, the collectors and the floor attached together \
         (comparing builds)\n\n\
         The same measurement with `--together`: every program after the first on an event \
         finds\nthe socket's and the task's lines in cache, so these figures are lower than \
         the alone ones\n(section above); they are for comparing builds in one run, not for \
         what a node pays.\nThe observer attached first in a round runs first on every \
         event and pays those misses\nfor the others; *when not attached first* is each \
         observer's median over the other rounds,\nthe figure that compares builds with the \
         least noise.\n\n"
    } else if args.nonblocking {
        "## Kernel time per TCP connection, non-blocking connects\n\n"
    } else {
        "## Kernel time per TCP connection\n\n"
    };
    format!(
        "{heading}\
         Generated by `egress-bench kernel-cost` on {}. Command: `{command}`.\n\n\
         With run-time statistics on (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled`),\n\
         each observer attaches in turn (with `--together` the collectors and the floor all\n\
         at once, one after the other in an order rotated each round, so machine noise falls\n\
         on them alike; peers alone), then {} loopback TCP connections are opened, {connects},\n\
         and closed (both ends in this host, so every program sees client and server\n\
         transitions), and the run time of each observer's own programs (found through\n\
         its fds: bpftrace's programs are held by the bpftrace process) is divided by the\n\
         connections. Observers run on CPU 1, the load on CPU 0. The collector runs in\n\
         {} mode with default flags; a row whose name carries flags is the same\n\
         binary run with them (`--variants`): `--close-records` tracks every connection to\n\
         its close; `--exclude-cidr`, the rate limit and aggregation drop (nearly) every\n\
         connection in the kernel, so those rows are what a dropped connection costs, its\n\
         state changes included. The floor: empty programs (two instructions) on the\n\
         hooks our TCP path runs on in tracepoint mode, the BTF-enabled raw tracepoint\n\
         `inet_sock_set_state` and the tracepoint `syscalls:sys_exit_connect`, so the same\n\
         runs: what dispatch and bpf_stats' two clock reads per run cost a program that\n\
         does nothing (*above the empty programs*: an observer's minimum over the\n\
         floor's, what its programs' work costs). The peers, as in issue 15: bpftrace\n\
         counting CLOSE -> SYN_SENT of `sock:inet_sock_set_state` in a map (one program on\n\
         that tracepoint, a classic one); bpftrace printing pid, comm, cgroup id and port per connect\n\
         (the same job as ours, as text); `tcplife` (libbpf-tools), which reads the same\n\
         state changes and prints duration and bytes per connection (and, where asked,\n\
         `tcpconnect`, libbpf-tools' kprobes on `tcp_v4_connect`). On a shared machine\n\
         other programs' connections and CPU contention only add time, so the minimum\n\
         over rounds is the least disturbed figure.{note}\n\n{throughput}{table}\n\
         The second table splits each collector's time (and the floor's) by program. A\n\
         program on a hook the load never runs, the DNS hooks on the socket receives (or\n\
         the exits of read(2) and the receives, where the kernel lacks `sock_recv_length`),\n\
         ran for other processes' receives during the round (a container runtime's, the\n\
         collector's own timer): its time is in the figures above, as the issue defines\n\
         them, though no connection caused it. The floor has no such hook.{syscalls}",
        crate::report::today(),
        args.connections,
        args.probe,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attached_observer_is_first_once_in_as_many_rounds() {
        for attached in 1..6 {
            let mut firsts: Vec<usize> = (1..=attached)
                .map(|round| attach_order(attached, round)[0])
                .collect();
            firsts.sort_unstable();
            assert_eq!(firsts, (0..attached).collect::<Vec<_>>(), "{attached}");
            for round in 1..=attached {
                let mut order = attach_order(attached, round);
                order.sort_unstable();
                assert_eq!(order, (0..attached).collect::<Vec<_>>(), "all attach");
            }
        }
    }

    /// Real programs (the floor's empty ones, held by this process) on the real hooks:
    /// the counters read with bpf(2) are those of the programs fdinfo names, and they
    /// count the connections made between two reads.
    #[test]
    fn counters_read_with_bpf_count_the_runs_of_the_programs_fdinfo_names() {
        let _stats = enable_stats().expect("bpf_stats (run as root)");
        let _hooks = crate::empty_probe::attach_state_hooks().expect("the empty state hooks");
        let ids = program_ids_of(std::process::id());
        assert!(
            ids.len() >= 2,
            "the state hook and the connect exit: {ids:?}"
        );
        let before = counters_of(&ids);
        assert_eq!(before.iter().map(|p| p.id).collect::<Vec<_>>(), ids);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a loopback listener");
        let addr = listener.local_addr().expect("its address");
        for _ in 0..20 {
            let client = TcpStream::connect(addr).expect("a loopback connect");
            drop(listener.accept().expect("its accept"));
            drop(client);
        }
        std::thread::sleep(Duration::from_millis(200));
        let after = counters_of(&ids);
        let (runs_before, runs_after) = (total(&before).1, total(&after).1);
        // Each connection: its connect's exit and the client's opening at least.
        assert!(runs_after - runs_before >= 40, "{before:?} -> {after:?}");
        let fdinfo = programs_of(std::process::id());
        for (read, named) in after.iter().zip(&fdinfo) {
            assert_eq!(read.id, named.id);
            assert!(named.run_cnt >= read.run_cnt, "{read:?} then {named:?}");
        }
    }

    #[test]
    fn the_median_is_the_middle_value_or_the_upper_of_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
    }

    fn observer(name: &str, collector: bool) -> Observer {
        Observer {
            name: name.to_owned(),
            collector,
            kernel: Vec::new(),
            throughput: Vec::new(),
        }
    }

    #[test]
    fn the_summary_shows_the_rounds_an_observer_was_not_first_only_when_together() {
        let observers = [observer("a", true), observer("b", true)];
        let together = |a: &[f64], b: &[f64]| {
            [
                Figures {
                    ns_per_connection: vec![1900.0, 1500.0, 1520.0],
                    not_first: a.to_vec(),
                    ..Figures::default()
                },
                Figures {
                    ns_per_connection: vec![1480.0, 1950.0, 1490.0],
                    not_first: b.to_vec(),
                    ..Figures::default()
                },
            ]
        };
        let table = summary(
            &observers,
            &mut together(&[1500.0, 1520.0], &[1480.0, 1490.0]),
            false,
            true,
        );
        assert!(table.contains("not attached first"), "{table}");
        assert!(
            table.contains("| a | 1500 | 1520 | 3 | 1520 (2) |"),
            "{table}"
        );
        assert!(
            table.contains("| b | 1480 | 1490 | 3 | 1490 (2) |"),
            "{table}"
        );
        let alone = summary(&observers, &mut together(&[], &[]), false, true);
        assert!(!alone.contains("not attached first"), "{alone}");
        assert!(alone.contains("| a | 1500 | 1520 | 3 |\n"), "{alone}");
    }

    fn stats(id: u64, run_cnt: u64, run_time_ns: u64) -> ProgramStats {
        ProgramStats {
            id,
            run_time_ns,
            run_cnt,
        }
    }

    #[test]
    fn each_program_is_counted_from_its_first_read_and_summed_by_name() {
        let before = [stats(7, 100, 5_000), stats(8, 10, 900)];
        let after = [
            stats(7, 150, 7_500),
            stats(8, 12, 1_100),
            stats(9, 4, 400),
            stats(11, 1, 50),
        ];
        let names = [
            (7, "tp_btf_inet_so".to_owned()),
            (8, "tp_dns_exit_rea".to_owned()),
            (9, "tp_dns_exit_rea".to_owned()),
        ];
        let costs = per_program(&before, &after, &names);
        let cost = |name: &str, runs: u64, run_time_ns: u64| ProgramCost {
            name: name.to_owned(),
            runs,
            run_time_ns,
        };
        assert_eq!(
            costs,
            [
                cost("tp_btf_inet_so", 50, 2_500),
                // Two programs of one name (names are cut at 15 bytes), one new: 2 + 4 runs.
                cost("tp_dns_exit_rea", 6, 600),
                cost("program 11", 1, 50),
            ]
        );
    }

    #[test]
    fn the_program_table_shows_each_collectors_and_the_floors_programs_costliest_first() {
        let observers = [
            observer("collector", true),
            observer(Peer::EmptyHooks.name(), false),
            observer(Peer::Tcplife.name(), false),
        ];
        let cost = |programs: &[(&str, u64, u64)]| Cost {
            programs: programs.len(),
            connections: 1000,
            run_time_ns: programs.iter().map(|p| p.2).sum(),
            runs: programs.iter().map(|p| p.1).sum(),
            by_program: programs
                .iter()
                .map(|&(name, runs, run_time_ns)| ProgramCost {
                    name: name.to_owned(),
                    runs,
                    run_time_ns,
                })
                .collect(),
            syscall_ns: Syscalls::default(),
        };
        let mut figures: Vec<Figures> = observers.iter().map(|_| Figures::default()).collect();
        for (exit, reads) in [(60_000, 40_000), (50_000, 20_000), (70_000, 30_000)] {
            figures[0].add_programs(&cost(&[
                ("state", 10_000, 450_000),
                ("exit_connect", 1_000, exit),
                ("dns_read", 50, reads),
                ("udp_sweep", 0, 0),
            ]));
            figures[1].add_programs(&cost(&[("state", 10_000, 300_000)]));
            figures[2].add_programs(&cost(&[("tcplife", 10_000, 9_000_000)]));
        }
        let table = programs_table(&observers, &figures);
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(
            rows,
            [
                "| collector | `state` | 10.00 | 45 | 450.0 |",
                "| collector | `exit_connect` | 1.00 | 60 | 60.0 |",
                "| collector | `dns_read` | 0.05 | 600 | 30.0 |",
                "| empty programs on our hooks (floor) | `state` | 10.00 | 30 | 300.0 |",
            ],
            "{table}"
        );
    }

    #[test]
    fn the_syscall_table_shows_what_each_observer_adds_by_the_median_difference() {
        let observers = [
            observer("collector", true),
            observer(Peer::BpftraceCount.name(), false),
        ];
        let calls = |pairs: &[(f64, f64)]| -> Vec<Syscalls> {
            pairs
                .iter()
                .map(|&(getppid, read)| Syscalls { getppid, read })
                .collect()
        };
        let mut figures: Vec<Figures> = observers.iter().map(|_| Figures::default()).collect();
        figures[0].syscall_ns = calls(&[(270.0, 400.0), (260.0, 380.0), (300.0, 420.0)]);
        figures[1].syscall_ns = calls(&[(201.0, 251.0), (215.0, 260.0), (230.0, 275.0)]);
        let bare = calls(&[(200.0, 250.0), (190.0, 240.0), (220.0, 270.0)]);
        let table = syscall_table(&observers, &figures, &bare);
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(
            rows,
            [
                "| nothing attached | 200 | – | 250 | – |",
                "| collector | 270 | 70 | 400 | 150 |",
                "| bpftrace, count in a map | 215 | 10 | 260 | 5 |",
            ],
            "{table}"
        );
    }

    #[test]
    fn a_program_missing_from_a_round_counts_zero_there() {
        let cost = |programs: &[(&str, u64)]| Cost {
            programs: programs.len(),
            connections: 1000,
            run_time_ns: programs.iter().map(|p| p.1).sum(),
            runs: programs.len() as u64,
            by_program: programs
                .iter()
                .map(|&(name, run_time_ns)| ProgramCost {
                    name: name.to_owned(),
                    runs: 1,
                    run_time_ns,
                })
                .collect(),
            syscall_ns: Syscalls::default(),
        };
        let mut figures = Figures::default();
        figures.add_programs(&cost(&[("state", 100_000)]));
        figures.add_programs(&cost(&[("state", 200_000), ("program 12", 60_000)]));
        figures.add_programs(&cost(&[("state", 300_000)]));
        let [state, once] = &figures.by_program[..] else {
            panic!("two programs");
        };
        assert_eq!(state.ns_per_connection, [100.0, 200.0, 300.0]);
        // Seen in one round of three (a program known by its id, say): its median is 0.
        assert_eq!(once.ns_per_connection, [0.0, 60.0, 0.0]);
        assert_eq!(once.runs_per_connection, [0.0, 0.001, 0.0]);
        assert_eq!(median(&once.ns_per_connection), Some(0.0));
    }
}
