//! The capture scenario on real Debian kernels, each booted under qemu.
//!
//! The host runs one kernel; clusters run others. Each test boots a Debian cloud kernel
//! (fetched and cached by scripts/vm-kernel.sh) with an initramfs that holds static builds
//! of the collector and `egress-scenario`, runs the scenario once per hook family, and
//! reads the verdicts off the serial console. qemu emulates the CPU (TCG): no KVM needed.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Instant,
};

use egress_testkit::require_root;
use egress_testkit::vm::{
    Cpio, GUEST_BPF_MOUNTS, GUEST_MOUNTS, KERNEL_MARKER, RESULT_MARKER, Scratch, after_marker,
    boot_test as boot, test_kernel as debian_kernel, workspace_root,
};

/// Hook families the scenario runs in every VM, in this order (Debian's kernels have all).
const PROBES: [&str; 3] = ["kprobe", "fentry", "tracepoint"];
/// The scenario's concurrent phase: threads x attempts each, at once.
const CONCURRENT: &str = "4x150";

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
    let scratch = scratch(series);
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

/// A directory of this test's own: the tests run in parallel and must not share files.
fn scratch(label: &str) -> Scratch {
    Scratch::new(label).unwrap_or_else(|problem| panic!("{problem}"))
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

/// The guest's /init. Every step's output goes to the serial console; the verdict lines
/// are printed by the shell, not the scenario, so a crash still leaves a FAIL behind.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}{GUEST_BPF_MOUNTS}hostname egress-vm
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
    let mut cpio = Cpio::with_busybox().unwrap_or_else(|problem| panic!("{problem}"));
    cpio.file("egress-collector", 0o755, &read(&binaries.collector));
    cpio.file("egress-scenario", 0o755, &read(&binaries.scenario));
    cpio.file("init", 0o755, init_script().as_bytes());
    fs::write(path, cpio.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
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
        // Every kernel here has BTF and the helpers the BTF-enabled state-change program
        // calls (5.11+): every family follows TCP state changes with it.
        let pass = format!("SCENARIO PASS probe={probe} ");
        if !lines
            .iter()
            .any(|l| l.contains(&pass) && l.contains(" tcp_state=tp_btf "))
        {
            problems.push(format!(
                "{probe}: the state changes did not go through tp_btf"
            ));
        }
        // Every kernel here lets tracing programs call `bpf_jiffies64` (5.9+): the rate
        // limit goes by the tick count in every family.
        if !lines
            .iter()
            .any(|l| l.contains(&pass) && l.contains(" decision_clock=jiffies@"))
        {
            problems.push(format!(
                "{probe}: the rate limit does not go by the tick count"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "[{series}] kernel {release}: {}\nconsole:\n{console}",
        problems.join("; ")
    );
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
    let scratch = scratch(&format!("{series}-attribution-{layout}"));
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
    let mut cpio = Cpio::with_busybox().unwrap_or_else(|problem| panic!("{problem}"));
    for dir in ["var", "var/lib", "etc"] {
        cpio.dir(dir);
    }
    cpio.file("egress-collector", 0o755, &read(&binaries.collector));
    cpio.file("egress-attribution", 0o755, &read(&attribution));
    cpio.file("init", 0o755, attribution_init_script(hybrid).as_bytes());
    fs::write(path, cpio.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
