//! Runs the attribution scenario (testkit's `attribution`) against a collector binary,
//! inside the pure cgroup v2 test VMs. Prints `ATTRIBUTION PASS …` or `ATTRIBUTION FAIL …`.
//! `--join <cgroup> --connect <port>` is its own child: join the cgroup, connect once.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [join, cgroup, connect, port] = args.as_slice()
        && join == "--join"
        && connect == "--connect"
    {
        let port = port.parse().unwrap_or(0);
        return match egress_testkit::attribution::join_and_connect(cgroup.as_ref(), port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("egress-attribution: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut collector = None;
    let mut unified = PathBuf::from(egress_testkit::attribution::CGROUP2);
    let mut extra = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (arg.as_str(), rest.clone().next()) {
            ("--", _) => {
                extra = rest.by_ref().cloned().collect();
            }
            ("--collector", Some(v)) => {
                collector = Some(PathBuf::from(v));
                rest.next();
            }
            ("--unified", Some(v)) => {
                unified = PathBuf::from(v);
                rest.next();
            }
            _ => collector = None,
        }
    }
    let Some(collector) = collector else {
        eprintln!(
            "usage: egress-attribution --collector PATH [--unified CGROUP2_MOUNT] [-- COLLECTOR ARGS]"
        );
        return ExitCode::from(2);
    };
    let this = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            println!("ATTRIBUTION FAIL cannot locate this binary: {e}");
            return ExitCode::from(1);
        }
    };
    match egress_testkit::attribution::run(&this, &collector, &unified, &extra) {
        Ok(lines) => {
            for line in &lines {
                println!("ATTRIBUTION ok {line}");
            }
            println!("ATTRIBUTION PASS cases={}", lines.len() - 1);
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("ATTRIBUTION FAIL\n{problems}");
            ExitCode::from(1)
        }
    }
}
