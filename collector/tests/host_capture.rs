//! The collector on this machine's kernel, as it is: real probes, real connections.

use std::{path::PathBuf, process::Command, time::Duration};

use egress_testkit::scenario::{Options, run};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn require_root() {
    // SAFETY: trivial getter.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs: run them as root (scripts/test.sh does)"
    );
}

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
