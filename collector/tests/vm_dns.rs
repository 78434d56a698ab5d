//! DNS names on connections in the kprobe and fentry families, on Debian's 6.1 and 6.12
//! kernels under qemu (the host's kernel has tracepoints only; `tests/dns.rs` covers that
//! family). The guest runs a real dnsmasq (Debian's binary and the shared libraries it
//! links, copied from this host into the initramfs), the static collector in each family,
//! and testkit's `egress-dns-vm`: it resolves names with connected read(), recvfrom(),
//! recvmsg(), an AF_INET6 socket to the IPv4-mapped server and DNS over TCP, connects to
//! each address, and checks the collector named every connection and recorded every
//! lookup.

mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Instant,
};

use egress_testkit::vm::{
    Cpio, GUEST_MOUNTS, KERNEL_MARKER, RESULT_MARKER, Scratch, after_marker, boot_test as boot,
    test_kernel as debian_kernel, workspace_root,
};
use support::host::require_root;

const PROBES: [&str; 2] = ["kprobe", "fentry"];
/// Debian's dnsmasq (scripts/setup.sh installs dnsmasq-base).
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

#[test]
fn dns_names_in_kprobe_and_fentry_modes_on_debian_6_1() {
    run_in_vm("6.1");
}

#[test]
fn dns_names_in_kprobe_and_fentry_modes_on_debian_6_12() {
    run_in_vm("6.12");
}

fn run_in_vm(series: &str) {
    require_root();
    let binaries = static_binaries();
    let kernel = debian_kernel(series);
    let scratch =
        Scratch::new(&format!("{series}-dns")).unwrap_or_else(|problem| panic!("{problem}"));
    let initrd = scratch.0.join("initramfs.cpio");
    write_initramfs(&initrd, binaries);
    let started = Instant::now();
    let console = boot(series, &kernel, &initrd).unwrap_or_else(|problem| panic!("{problem}"));
    eprintln!(
        "[{series}] boot + DNS scenario took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let release = console
        .lines()
        .find_map(|l| after_marker(l, KERNEL_MARKER))
        .unwrap_or_else(|| panic!("[{series}] /init never printed the kernel release:\n{console}"));
    assert!(
        release.starts_with(&format!("{series}.")),
        "[{series}] the guest runs {release}:\n{console}"
    );
    let mut problems = Vec::new();
    for probe in PROBES {
        let verdicts: Vec<&str> = console
            .lines()
            .filter_map(|l| {
                after_marker(l, RESULT_MARKER)?
                    .strip_prefix(probe)?
                    .strip_prefix(' ')
            })
            .collect();
        if verdicts != ["PASS"] {
            problems.push(format!("{probe}: {verdicts:?}"));
        }
        // Every way of reading an answer was checked, not just some.
        if !console.contains(&format!("DNS PASS {probe} names=5")) {
            problems.push(format!("{probe}: not every name was checked"));
        }
    }
    assert!(
        problems.is_empty(),
        "[{series}] kernel {release}: {}\nconsole:\n{console}",
        problems.join("; ")
    );
}

struct StaticBinaries {
    collector: PathBuf,
    scenario: PathBuf,
}

fn static_binaries() -> &'static StaticBinaries {
    static BUILT: OnceLock<Result<StaticBinaries, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let release = egress_testkit::static_build::build(&workspace_root(), env!("CARGO"))?;
        Ok(StaticBinaries {
            collector: release.join("egress-collector"),
            scenario: release.join("egress-dns-vm"),
        })
    });
    match built {
        Ok(binaries) => binaries,
        Err(problem) => panic!("{problem}"),
    }
}

fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
{GUEST_MOUNTS}mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname egress-vm
echo "{KERNEL_MARKER}$(uname -r) $(uname -v)"
for probe in {probes}; do
    if /egress-dns-vm --collector /egress-collector --dnsmasq {DNSMASQ} --probe "$probe"; then
        verdict=PASS
    else
        verdict=FAIL
    fi
    echo "{RESULT_MARKER}$probe $verdict"
done
poweroff -f
"#,
        probes = PROBES.join(" ")
    )
}

/// The shared libraries `binary` loads, as `ldd` lists them (the loader included).
fn shared_libraries(binary: &str) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd {binary}: {e}"));
    assert!(
        out.status.success(),
        "ldd {binary}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn write_initramfs(path: &Path, binaries: &StaticBinaries) {
    let read =
        |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    // bin, dev, proc, sys, tmp, run, /dev/console and busybox.
    let mut cpio = Cpio::with_busybox().unwrap_or_else(|problem| panic!("{problem}"));
    let in_base = ["bin", "dev", "proc", "sys", "tmp", "run"];
    let mut dirs = vec!["etc".to_owned(), "usr".into(), "usr/sbin".into()];
    let libraries = shared_libraries(DNSMASQ);
    for library in &libraries {
        // Every parent directory, outermost first; files at the paths ldd names.
        let mut parent = Path::new(library.strip_prefix("/").expect("absolute"))
            .parent()
            .map(Path::to_owned);
        let mut chain = Vec::new();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            chain.push(dir.to_string_lossy().into_owned());
            parent = dir.parent().map(Path::to_owned);
        }
        for dir in chain.into_iter().rev() {
            if !in_base.contains(&dir.as_str()) && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    for dir in &dirs {
        cpio.dir(dir);
    }
    cpio.file("egress-collector", 0o755, &read(&binaries.collector));
    cpio.file("egress-dns-vm", 0o755, &read(&binaries.scenario));
    cpio.file("usr/sbin/dnsmasq", 0o755, &read(Path::new(DNSMASQ)));
    for library in &libraries {
        let inside = library.strip_prefix("/").expect("absolute");
        cpio.file(&inside.to_string_lossy(), 0o755, &read(library));
    }
    // dnsmasq looks its user and group up by name (--user=root --group=root).
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");
    cpio.file("init", 0o755, init_script().as_bytes());
    fs::write(path, cpio.finish())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
