//! The collector on this machine's kernel, as it is: real probes, real connections.

mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use egress_testkit::{
    records::attr,
    require_root,
    scenario::{Options, run},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

#[test]
fn auto_mode_captures_every_connection_exactly_once() {
    require_root();
    let options = Options {
        collector: PathBuf::from(COLLECTOR),
        probe: "auto".into(),
        n: 20,
        extra_args: Vec::new(),
        ready_timeout: Duration::from_secs(60),
        concurrent: 4,
        per_thread: 500,
    };
    match run(&options) {
        Ok(outcome) => eprintln!(
            "auto mode ran {} and saw all {} connections; concurrent phase: {:?}",
            outcome.mode, outcome.expected, outcome.storm
        ),
        Err(problems) => panic!("{problems}"),
    }
}

#[test]
fn check_reports_a_usable_hook() {
    require_root();
    let output = Command::new(COLLECTOR)
        .arg("check")
        .output()
        .expect("run check");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "check failed:\n{report}");
    for line in [
        "kernel: ",
        "btf: ",
        "cgroups: ",
        // This kernel lets tracing programs read the tick count.
        "decision clock: jiffies@",
        "hook kprobe: ",
        "hook fentry: ",
        "hook tracepoint: ",
        "result: would run with ",
    ] {
        assert!(
            report.contains(line),
            "check output lacks {line:?}:\n{report}"
        );
    }
    // The result names the program that would follow TCP state changes.
    let result = report
        .lines()
        .find(|l| l.starts_with("result: "))
        .unwrap_or_default();
    assert!(
        ["tp_btf", "raw_tracepoint", "tracepoint"]
            .iter()
            .any(|hook| result.ends_with(&format!("TCP state changes through {hook}"))),
        "the result names the TCP state program:\n{report}"
    );
}

/// A hook family this kernel refuses (kprobe and fentry on this project's CI host) is a
/// one-line error and a non-zero exit, not a silent fallback.
#[test]
fn a_refused_hook_exits_non_zero_with_one_line() {
    require_root();
    let report = Command::new(COLLECTOR)
        .arg("check")
        .output()
        .expect("run check");
    let report = String::from_utf8_lossy(&report.stdout).into_owned();
    let refused: Vec<&str> = report
        .lines()
        .filter_map(|l| {
            l.strip_prefix("hook ")?
                .split_once(": unusable")
                .map(|(mode, _)| mode)
        })
        .collect();
    // On a kernel that supports everything, force a refusal with a BTF that does not exist.
    let runs: Vec<Vec<&str>> = if refused.is_empty() {
        vec![vec!["--probe", "kprobe", "--btf", "/nonexistent/vmlinux"]]
    } else {
        refused.iter().map(|mode| vec!["--probe", *mode]).collect()
    };
    for args in runs {
        let output = Command::new(COLLECTOR)
            .arg("run")
            .arg("--stdout")
            .args(&args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run collector");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?} should fail; stderr:\n{stderr}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("egress-collector: error: "),
            "{args:?}: last line {last:?}"
        );
        assert!(
            last.contains(args[1]),
            "{args:?}: the reason names the refused hook: {last:?}"
        );
        assert!(output.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

/// `--btf` with a copy of the kernel's BTF in a file of its own: the object loads with
/// it (not the one aya's loader reads from /sys by itself) and the typed state program
/// attaches with it, so connections are captured as with the default.
#[test]
fn a_btf_file_given_by_path_serves_the_load_and_the_attach() {
    use std::net::{Ipv4Addr, TcpListener};

    require_root();
    let path = std::env::temp_dir().join(format!("egress-test-vmlinux-{}", std::process::id()));
    std::fs::copy("/sys/kernel/btf/vmlinux", &path).expect("copy the kernel's BTF");
    let btf = path.to_str().expect("utf-8 path");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (mine, stderr) = three_connects_seen_by(&["--btf", btf], port);
    let _ = std::fs::remove_file(&path);
    let start = stderr
        .iter()
        .find(|l| l.contains("Capturing egress connections."))
        .cloned()
        .unwrap_or_default();
    assert!(
        start.contains("tcp_state=tp_btf") && start.contains(&format!("btf={btf}")),
        "the start line names the file and the typed program: {start:?}"
    );
    assert_eq!(mine.len(), 3, "three connects, three records: {mine:#?}");
}

/// `--attributes`: each set's records carry the audit's keys, its own extras, and none
/// of the fields it leaves out; the body line is the same whatever the set.
#[test]
fn each_attribute_set_carries_its_keys_and_the_same_body() {
    use std::net::{Ipv4Addr, TcpListener};

    require_root();
    const AUDIT: [&str; 6] = [
        "egress.event",
        "process.pid",
        "process.executable.name",
        "network.transport",
        "destination.address",
        "destination.port",
    ];
    const DETAIL: [&str; 9] = [
        "network.peer.address",
        "network.peer.port",
        "egress.dns.match",
        "source.address",
        "source.port",
        "process.parent_pid",
        "process.user.id",
        "network.type",
        "egress.network.host",
    ];
    const FORENSIC: [&str; 8] = [
        "process.vpid",
        "egress.process.group.id",
        "thread.id",
        "thread.name",
        "egress.namespace.net",
        "egress.uts.nodename",
        "egress.cgroup.id",
        "egress.cgroup.leaf.name",
    ];
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
    let body_end = format!(
        " {}[{}] → 127.0.0.1:{port} tcp established",
        comm.trim(),
        std::process::id()
    );
    for (set, has, lacks) in [
        ("minimal", &AUDIT[..], [&DETAIL[..], &FORENSIC[..]].concat()),
        (
            "default",
            &[&AUDIT[..], &DETAIL[..]].concat()[..],
            FORENSIC.to_vec(),
        ),
        (
            "full",
            &[&AUDIT[..], &DETAIL[..], &FORENSIC[..]].concat()[..],
            Vec::new(),
        ),
    ] {
        let (mine, _) = three_connects_seen_by(&["--attributes", set], port);
        assert_eq!(mine.len(), 3, "{set}: three connects, three records");
        for r in &mine {
            for key in has {
                assert!(!r["attributes"][*key].is_null(), "{set} lacks {key}: {r}");
            }
            for key in &lacks {
                assert!(r["attributes"][*key].is_null(), "{set} carries {key}: {r}");
            }
            let body = r["body"].as_str().unwrap_or_default();
            assert!(body.ends_with(&body_end), "{set}: body {body:?}");
        }
    }
}

/// The kernel sends a process's identity once and each record refers to it: a process
/// that connects, execs another program (the same pid, another name) and connects again
/// within the identity cache's second has each record joined with the identity it had
/// then, the first one still after the second was sent; threads of the process share it.
#[test]
fn each_record_carries_the_identity_its_process_had_when_it_connected() {
    use std::net::{Ipv4Addr, TcpListener};

    require_root();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let collector = full_collector();
    // python3 connects from two threads, then execs bash, which connects twice.
    let script = format!(
        "import os, socket, threading\n\
         def connect():\n    socket.create_connection(('127.0.0.1', {port})).close()\n\
         connect()\n\
         t = threading.Thread(target=connect); t.start(); t.join()\n\
         os.execv('/bin/bash', ['bash', '-c', 'exec 3<>/dev/tcp/127.0.0.1/{port}; exec 3>&-; exec 4<>/dev/tcp/127.0.0.1/{port}'])\n"
    );
    let child = Command::new("python3")
        .args(["-c", &script])
        .spawn()
        .expect("spawn python3");
    let pid = child.id();
    let status = child.wait_with_output().expect("python3 runs").status;
    assert!(status.success(), "the script failed: {status}");
    let (mine, stderr) = records_of(collector, port, pid);
    let names = process_names(&mine);
    assert_eq!(
        names,
        ["python3", "python3", "bash", "bash"],
        "records in order: {mine:#?}"
    );
    let ours = std::process::id();
    for record in &mine {
        let attributes = &record["attributes"];
        assert_eq!(attributes["process.parent_pid"], ours, "{record:#}");
        assert!(
            attributes["egress.namespace.net"].as_u64().unwrap_or(0) > 0,
            "the namespaces are joined: {record:#}"
        );
        assert!(
            attributes["egress.uts.nodename"]
                .as_str()
                .is_some_and(|n| !n.is_empty()),
            "the nodename is joined: {record:#}"
        );
    }
    let threads: std::collections::HashSet<&serde_json::Value> = mine[..2]
        .iter()
        .map(|r| &r["attributes"]["thread.id"])
        .collect();
    assert_eq!(threads.len(), 2, "two threads of python3: {mine:#?}");
    support::host::assert_every_identity_arrived(&stderr);
}

/// A cached identity is read again once it is a second old, on either decision clock
/// (the tick count, and CLOCK_BOOTTIME with the test hook): a process renamed through its
/// leader's `comm`, which no check on use catches, connects at once and again 1.5 s
/// later; the later record has the new name. The one at once has the old name when it
/// came within half a second of the first connect (the cache was used; a machine that
/// stalled the script longer may have read it again already).
#[test]
fn a_cached_identity_is_read_again_after_a_second() {
    require_root();
    let port = support::host::sink_port();
    let precise: &[&str] = &["env", "EGRESS_TEST_PRECISE_DECISIONS=1"];
    for (clock, wrapper) in [("jiffies@", &[][..]), ("boottime", precise)] {
        let collector = egress_testkit::collector::RunningCollector::start_wrapped(
            wrapper,
            std::path::Path::new(COLLECTOR),
            &["--stdout", "--attributes", "full", "--stats-interval", "1h"],
            Duration::from_secs(60),
        )
        .expect("collector starts");
        let script = format!(
            "import ctypes, socket, time\n\
             def connect():\n    socket.create_connection(('127.0.0.1', {port})).close()\n\
             connect(); first = time.monotonic()\n\
             ctypes.CDLL(None).prctl(15, b'renamed', 0, 0, 0)\n\
             connect(); print(time.monotonic() - first, flush=True)\n\
             time.sleep(1.5); connect()\n"
        );
        let child = Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let pid = child.id();
        let output = child.wait_with_output().expect("python3 runs");
        assert!(output.status.success(), "the script failed: {output:?}");
        let cached_within: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the script printed the time between its first two connects");
        let (mine, stderr) = records_of(collector, port, pid);
        let start = stderr
            .iter()
            .find(|l| l.contains("decision_clock="))
            .unwrap_or_else(|| panic!("no start line:\n{}", stderr.join("\n")));
        assert!(
            start.contains(&format!("decision_clock={clock}")),
            "{clock}: {start}"
        );
        let names = process_names(&mine);
        assert_eq!(names.len(), 3, "{clock}: three records: {mine:#?}");
        assert_eq!(names[0], "python3", "{clock}: {mine:#?}");
        if cached_within < 0.5 {
            assert_eq!(
                names[1], "python3",
                "{clock}: {cached_within:.3} s after the first connect the cached identity holds: {mine:#?}"
            );
        }
        assert_eq!(
            names[2], "renamed",
            "{clock}: 1.5 s later the identity is read again: {mine:#?}"
        );
    }
}

/// The ids a record carries are the connecting thread's, whichever way the programs read
/// them: the TCP attempt from the task's typed pointer (plain loads in the BTF-enabled
/// state program), the UDP connect through the helpers. An unprivileged uid and gid and
/// a second thread, so a root id, the process's main thread or another task's cgroup
/// would show.
#[test]
fn each_record_carries_the_ids_of_the_thread_that_connected() {
    use std::{
        net::{Ipv4Addr, TcpListener, UdpSocket},
        os::unix::fs::MetadataExt,
    };

    require_root();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp bind");
    let udp_port = udp.local_addr().expect("addr").port();
    let collector = full_collector();
    let script = format!(
        "import socket, threading\n\
         def connect():\n    print(threading.get_native_id(), flush=True)\n    \
         socket.create_connection(('127.0.0.1', {port})).close()\n    \
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(('127.0.0.1', {udp_port})); u.send(b'x')\n\
         t = threading.Thread(target=connect); t.start(); t.join()\n"
    );
    // The system's python3: a per-user shim on PATH (pyenv's, under /root) is not
    // executable by uid 65534.
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65533", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", &script])
        .output()
        .expect("spawn setpriv python3");
    assert!(output.status.success(), "the script failed: {output:?}");
    let tid: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the thread printed its id");
    let (records, stderr) = collector.stop_after_poll();
    assert!(
        stderr.iter().any(|l| l.contains("tcp_state=tp_btf")),
        "this kernel loads tp_btf programs, whose reads this test is about:\n{}",
        stderr.join("\n")
    );
    // The child ran in this test's cgroup: its v2 id is the inode of that directory.
    let cgroup_id = std::fs::metadata(unified_mount().join(unified_path().trim_start_matches('/')))
        .expect("this test's cgroup v2 directory")
        .ino();
    for (kind, destination) in [("tcp_connect", port), ("udp_connect", udp_port)] {
        let record = records
            .iter()
            .find(|r| {
                attr(r, "egress.event") == kind
                    && attr(r, "destination.port") == destination
                    && attr(r, "thread.id") == tid
            })
            .unwrap_or_else(|| panic!("no {kind} record of thread {tid}: {records:#?}"));
        let attributes = &record["attributes"];
        assert_eq!(attributes["process.user.id"], 65534, "{record:#}");
        assert_eq!(attributes["egress.process.group.id"], 65533, "{record:#}");
        assert_ne!(
            attributes["process.pid"], tid,
            "the thread is not the main one: {record:#}"
        );
        assert_eq!(attributes["egress.cgroup.id"], cgroup_id, "{record:#}");
    }
}

/// Each record's process name, in order.
fn process_names(records: &[serde_json::Value]) -> Vec<&str> {
    (records.iter())
        .map(|r| {
            r["attributes"]["process.executable.name"]
                .as_str()
                .unwrap_or("?")
        })
        .collect()
}

/// Where this host mounts cgroup2 (the unified hierarchy: `/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one).
fn unified_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            fs.starts_with("cgroup2 ").then_some(())?;
            // The whole hierarchy (root `/`), not a bind mount of a subtree.
            let fields: Vec<&str> = mount.split(' ').collect();
            (fields.get(3) == Some(&"/")).then_some(())?;
            Some(PathBuf::from(fields.get(4)?))
        })
        .expect("a cgroup2 mount")
}

/// This process's cgroup v2 path (`0::<path>` in /proc/self/cgroup).
fn unified_path() -> String {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_string()
}

/// A collector with every attribute set (the identity tests read namespaces, cgroup ids,
/// thread ids), statistics quiet.
fn full_collector() -> egress_testkit::collector::RunningCollector {
    egress_testkit::collector::RunningCollector::start(
        std::path::Path::new(COLLECTOR),
        &["--attributes", "full", "--stats-interval", "1h"],
        Duration::from_secs(60),
    )
    .expect("collector starts")
}

/// A collector started with `args`, three connects of this process to 127.0.0.1:`port`
/// (a listener the caller holds): their records and the collector's log.
fn three_connects_seen_by(args: &[&str], port: u16) -> (Vec<serde_json::Value>, Vec<String>) {
    let args = [args, &["--stats-interval", "1h"]].concat();
    let collector = egress_testkit::collector::RunningCollector::start(
        std::path::Path::new(COLLECTOR),
        &args,
        Duration::from_secs(60),
    )
    .expect("collector starts");
    for _ in 0..3 {
        let _ =
            std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).expect("connect");
    }
    records_of(collector, port, std::process::id())
}

/// The records of TCP connections process `pid` made to 127.0.0.1:`port`, in order,
/// and the log of `collector`, stopped.
fn records_of(
    collector: egress_testkit::collector::RunningCollector,
    port: u16,
    pid: u32,
) -> (Vec<serde_json::Value>, Vec<String>) {
    let (records, stderr) = collector.stop_after_poll();
    let mine = records
        .into_iter()
        .filter(|r| support::host::to_loopback_tcp(r, port) && attr(r, "process.pid") == pid)
        .collect();
    (mine, stderr)
}
