//! The capture scenario on real Debian kernels, each booted under qemu.
//!
//! The host runs one kernel; clusters run others. Each test boots a Debian cloud kernel
//! (fetched and cached by scripts/vm-kernel.sh) with an initramfs that holds static builds
//! of the collector and `egress-scenario`, runs the scenario once per hook family, and
//! reads the verdicts off the serial console. qemu emulates the CPU (TCG): no KVM needed.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use egress_testkit::require_root;

/// Hook families the scenario runs in every VM, in this order (Debian's kernels have all).
const PROBES: [&str; 3] = ["kprobe", "fentry", "tracepoint"];
/// The scenario's concurrent phase: threads x attempts each, at once.
const CONCURRENT: &str = "4x150";
/// Emulation is slow and the two VMs may share the host's CPUs, but a healthy run takes a
/// fraction of this; past it the guest is stuck.
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// Markers /init prints on the console; nothing else in the guest prints them.
const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";
const RESULT_MARKER: &str = "EGRESS-VM-RESULT ";
const BUSYBOX: &str = "/bin/busybox";

#[test]
fn every_family_on_debian_6_1() {
    run_scenario_in_vm("6.1");
}

#[test]
fn every_family_on_debian_6_12() {
    run_scenario_in_vm("6.12");
}

/// PREEMPT_RT (mainline since 6.12): programs can be preempted, so two tasks' programs
/// interleave on one CPU and the kernel skips re-entries (recursion misses). The
/// concurrent phase checks that nothing is lost without being counted, at least as
/// possible loss.
#[test]
fn every_family_on_debian_6_12_preempt_rt() {
    run_scenario_in_vm("6.12-rt");
}

fn run_scenario_in_vm(series: &str) {
    require_root();
    let binaries = static_binaries();
    let kernel = debian_kernel(series);
    let scratch = Scratch::new(series);
    let initrd = scratch.0.join("initramfs.cpio");
    write_initramfs(&initrd, binaries);

    let started = Instant::now();
    let console = boot(series, &kernel, &initrd).unwrap_or_else(|problem| panic!("{problem}"));
    eprintln!(
        "[{series}] boot + scenario took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check_console(series, &console);
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct StaticBinaries {
    collector: PathBuf,
    scenario: PathBuf,
}

/// Builds the binaries once for all tests; a test that comes second waits for the first.
fn static_binaries() -> &'static StaticBinaries {
    static BUILT: OnceLock<Result<StaticBinaries, String>> = OnceLock::new();
    match BUILT.get_or_init(build_static_binaries) {
        Ok(binaries) => binaries,
        Err(problem) => panic!("{problem}"),
    }
}

fn build_static_binaries() -> Result<StaticBinaries, String> {
    let release = egress_testkit::static_build::build(&workspace_root(), env!("CARGO"))?;
    Ok(StaticBinaries {
        collector: release.join("egress-collector"),
        scenario: release.join("egress-scenario"),
    })
}

/// The vmlinuz of the newest Debian cloud kernel of `series`, downloaded on first use.
fn debian_kernel(series: &str) -> PathBuf {
    let script = workspace_root().join("scripts").join("vm-kernel.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(series)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "no {series} kernel ({}):\n{stderr}",
        output.status
    );
    let vmlinuz = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        vmlinuz.is_file(),
        "vm-kernel.sh printed {vmlinuz:?}, which is no file:\n{stderr}"
    );
    vmlinuz
}

/// A directory of this test's own under the system temp dir, removed when dropped: the
/// two tests run in parallel and must not share files.
struct Scratch(PathBuf);

impl Scratch {
    fn new(series: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("egress-vm-{series}-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The start of every guest's /init: busybox, the pseudo filesystems, the console.
const GUEST_MOUNTS: &str = "/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
";

/// The guest's /init. Every step's output goes to the serial console; the verdict lines
/// are printed by the shell, not the scenario, so a crash still leaves a FAIL behind.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname egress-vm
echo "{KERNEL_MARKER}$(uname -r) $(uname -v)"
for probe in {probes}; do
    dmesg -c >/dev/null
    # The user filters are on (matching nothing here) so their kernel code runs too;
    # `check` then loads the aggregation code, which would change the scenario's records.
    if /egress-scenario --collector /egress-collector --probe "$probe" \
        --concurrent {CONCURRENT} -- \
        --exclude-cidr 192.0.2.0/24,2001:db8::/32 --exclude-namespace none-such &&
        /egress-collector check --probe "$probe" --aggregate-window 1s >/dev/null; then
        verdict=PASS
    else
        verdict=FAIL
        # Warnings below loglevel=3 stay off the console; they may explain the failure.
        echo "--- kernel messages during the $probe run ---"
        dmesg
    fi
    echo "{RESULT_MARKER}$probe $verdict"
done
poweroff -f
"#,
        probes = PROBES.join(" ")
    )
}

fn write_initramfs(path: &Path, binaries: &StaticBinaries) {
    let read =
        |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_device("dev/console", 0o600, (5, 1));
    cpio.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX)));
    cpio.file("egress-collector", 0o755, &read(&binaries.collector));
    cpio.file("egress-scenario", 0o755, &read(&binaries.scenario));
    cpio.file("init", 0o755, init_script().as_bytes());
    fs::write(path, cpio.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A "newc" cpio archive, the format the kernel unpacks as an initramfs. Written here
/// rather than by cpio(1) so no staging tree (and no mknod) is needed.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inodes: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, permissions: u32, rdev: (u32, u32)) {
        self.entry(name, 0o020_000 | permissions, 1, rdev, &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.inodes += 1;
        let size = u32::try_from(data.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            self.inodes,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

/// Boots the kernel and returns everything the serial console printed; `Err` holds the
/// reason and that output when qemu failed or the guest did not power off in time.
fn boot(series: &str, kernel: &Path, initrd: &Path) -> Result<String, String> {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // quiet + loglevel=3: kernel chatter must not interleave with the scenario's lines.
        // panic=-1 with -no-reboot: a dying init ends qemu instead of hanging it.
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot start qemu-system-x86_64 (scripts/setup.sh installs it): {e}")
        })?;
    let console = read_console(series, qemu.stdout.take().expect("qemu stdout is piped"));
    let mut qemu_stderr = qemu.stderr.take().expect("qemu stderr is piped");
    let qemu_errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = qemu_stderr.read_to_string(&mut text);
        text
    });

    let exit = wait_or_kill(&mut qemu, VM_TIMEOUT);
    // qemu is gone, so both pipes are closed and the readers finish.
    let console = console.join().expect("console reader panicked");
    let qemu_errors = qemu_errors.join().expect("qemu stderr reader panicked");
    match exit {
        Some(status) if status.success() => Ok(console),
        Some(status) => Err(format!(
            "[{series}] qemu exited with {status}; its stderr:\n{qemu_errors}\nconsole:\n{console}"
        )),
        None => Err(format!(
            "[{series}] the VM did not power off within {VM_TIMEOUT:?}; killed it. console:\n{console}"
        )),
    }
}

/// Collects the console output; marker lines are echoed as they come so that
/// `--nocapture` shows progress without the whole log.
fn read_console(series: &str, stdout: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    let series = series.to_owned();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut console = String::new();
        let mut line = Vec::new();
        // Lines, not a UTF-8 string: the firmware may write bytes that are not text.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = printable(&String::from_utf8_lossy(&line));
            let trimmed = text.trim_end();
            if ["SCENARIO ", KERNEL_MARKER, RESULT_MARKER]
                .iter()
                .any(|m| trimmed.contains(m))
            {
                eprintln!("[{series}] {trimmed}");
            }
            console.push_str(trimmed);
            console.push('\n');
            line.clear();
        }
        console
    })
}

/// `text` without terminal control sequences: the firmware resets and clears the screen
/// (ESC c, ESC [2J), which would garble the terminal that shows a failure's console.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI: parameters, then one final byte in '@'..='~'.
            '\x1b' if chars.clone().next() == Some('[') => {
                chars.by_ref().skip(1).find(|c| ('@'..='~').contains(c));
            }
            // Any other escape is ESC plus one character.
            '\x1b' => {
                chars.next();
            }
            c if c.is_control() && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// Waits for the child to exit; kills it past `timeout` and returns `None`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The guest ran the expected kernel and every probe's scenario passed.
fn check_console(series: &str, console: &str) {
    let lines: Vec<&str> = console.lines().collect();
    let release = lines
        .iter()
        .find_map(|l| after_marker(l, KERNEL_MARKER))
        .unwrap_or_else(|| panic!("[{series}] /init never printed the kernel release:\n{console}"));
    let (version, flavour) = series.split_once('-').unwrap_or((series, ""));
    assert!(
        release.starts_with(&format!("{version}.")),
        "[{series}] the guest runs {release}, not a {version} kernel:\n{console}"
    );
    if flavour == "rt" {
        assert!(
            release.contains("PREEMPT_RT"),
            "[{series}] the guest's kernel is not PREEMPT_RT: {release}\n{console}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("SCENARIO WARN") && l.contains("fentry on a PREEMPT_RT")),
            "[{series}] fentry mode warns that the kernel skips preempted programs:\n{console}"
        );
    }

    let mut problems = Vec::new();
    for probe in PROBES {
        let verdicts: Vec<&str> = lines
            .iter()
            .filter_map(|l| {
                after_marker(l, RESULT_MARKER)?
                    .strip_prefix(probe)?
                    .strip_prefix(' ')
            })
            .collect();
        match verdicts.as_slice() {
            ["PASS"] => {}
            [] => problems.push(format!("{probe}: no verdict")),
            other => problems.push(format!("{probe}: {}", other.join(", "))),
        }
    }
    assert!(
        problems.is_empty(),
        "[{series}] kernel {release}: {}\nconsole:\n{console}",
        problems.join("; ")
    );
}

/// The rest of a line after `marker`. Not a prefix match: the firmware leaves the cursor
/// mid-line, so /init's first marker shares a line with whatever it printed last.
fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.split_once(marker).map(|(_, rest)| rest.trim())
}

// ---- Attribution on a pure cgroup v2 kernel (testkit's `attribution` scenario).

const ATTRIBUTION_MARKER: &str = "EGRESS-VM-ATTRIBUTION ";

/// containerd and CRI-O (systemd driver), docker (cgroupfs driver), k3s and a nested
/// cgroup, each a real cgroup made in the guest's only (unified) hierarchy, the runtime's
/// files at their real paths, a real connect from each.
#[test]
fn attribution_on_pure_cgroup_v2_debian_6_12() {
    run_attribution_in_vm("6.12", false);
}

/// The same workloads on a hybrid guest: the v1 pids hierarchy mounted beside cgroup2,
/// every process left in its v1 root (which names no container), the containers' cgroups
/// in the unified tree only: the collector must find them there.
#[test]
fn attribution_on_a_hybrid_debian_6_12() {
    run_attribution_in_vm("6.12", true);
}

fn run_attribution_in_vm(series: &str, hybrid: bool) {
    require_root();
    let binaries = static_binaries();
    let kernel = debian_kernel(series);
    let layout = if hybrid { "hybrid" } else { "v2" };
    let scratch = Scratch::new(&format!("{series}-attribution-{layout}"));
    let initrd = scratch.0.join("initramfs.cpio");
    write_attribution_initramfs(&initrd, binaries, hybrid);
    let console = boot(series, &kernel, &initrd).unwrap_or_else(|problem| panic!("{problem}"));
    let verdict = console
        .lines()
        .find_map(|l| after_marker(l, ATTRIBUTION_MARKER))
        .unwrap_or_else(|| panic!("[{series} {layout}] no attribution verdict:\n{console}"));
    assert_eq!(
        verdict, "PASS",
        "[{series} {layout}] attribution:\n{console}"
    );
    assert!(
        console.contains("ATTRIBUTION PASS cases=5"),
        "[{series} {layout}] every case ran:\n{console}"
    );
    if hybrid {
        assert!(
            console.contains("cgroups=hybrid"),
            "[{series}] the collector saw a hybrid layout:\n{console}"
        );
    }
}

fn attribution_init_script(hybrid: bool) -> String {
    let (cgroups, unified) = if hybrid {
        (
            "mount -t tmpfs cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/unified /sys/fs/cgroup/pids
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -t cgroup -o pids pids /sys/fs/cgroup/pids",
            "/sys/fs/cgroup/unified",
        )
    } else {
        ("mount -t cgroup2 cgroup2 /sys/fs/cgroup", "/sys/fs/cgroup")
    };
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}{cgroups}
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname egress-vm
echo "{KERNEL_MARKER}$(uname -r)"
if /egress-attribution --collector /egress-collector --unified {unified}; then
    verdict=PASS
else
    verdict=FAIL
fi
echo "{ATTRIBUTION_MARKER}$verdict"
poweroff -f
"#
    )
}

fn write_attribution_initramfs(path: &Path, binaries: &StaticBinaries, hybrid: bool) {
    let read =
        |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    let attribution = binaries.collector.with_file_name("egress-attribution");
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "run", "var", "var/lib", "etc",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 0o600, (5, 1));
    cpio.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX)));
    cpio.file("egress-collector", 0o755, &read(&binaries.collector));
    cpio.file("egress-attribution", 0o755, &read(&attribution));
    cpio.file("init", 0o755, attribution_init_script(hybrid).as_bytes());
    fs::write(path, cpio.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
