//! Runs the capture scenario against a collector binary; used inside the test VMs.
//! Prints `SCENARIO PASS …` or `SCENARIO FAIL …` and exits accordingly.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use egress_testkit::scenario::{Options, run};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        collector: PathBuf::from("egress-collector"),
        probe: "auto".into(),
        n: 5,
        extra_args: Vec::new(),
        ready_timeout: Duration::from_secs(120),
        concurrent: 0,
        per_thread: 0,
    };
    while let Some(arg) = args.next() {
        if arg == "--" {
            // The rest goes to the collector.
            options.extra_args = args.by_ref().collect();
            break;
        }
        match (arg.as_str(), args.next()) {
            ("--collector", Some(v)) => options.collector = v.into(),
            ("--probe", Some(v)) => options.probe = v,
            ("--n", Some(v)) => options.n = v.parse().unwrap_or(5),
            // THREADSxPER: the concurrent phase.
            ("--concurrent", Some(v)) => {
                let (threads, per) = v.split_once('x').unwrap_or(("0", "0"));
                options.concurrent = threads.parse().unwrap_or(0);
                options.per_thread = per.parse().unwrap_or(0);
            }
            _ => {
                eprintln!(
                    "usage: egress-scenario --collector PATH [--probe MODE] [--n N] [--concurrent THREADSxPER] [-- COLLECTOR ARGS]"
                );
                return ExitCode::from(2);
            }
        }
    }
    match run(&options) {
        Ok(outcome) => {
            let storm = outcome.storm.map_or(String::new(), |s| {
                format!(
                    " concurrent: made={} reported={} lost={} possibly_lost={}",
                    s.made, s.reported, s.lost, s.possibly_lost
                )
            });
            for warning in &outcome.warnings {
                println!("SCENARIO WARN {warning}");
            }
            println!(
                concat!(
                    "SCENARIO PASS probe={} mode={} tcp_state={} decision_clock={} ",
                    "connections={} records={}{storm}"
                ),
                options.probe,
                outcome.mode,
                outcome.tcp_state,
                outcome.decision_clock,
                outcome.expected,
                outcome.records.len(),
                storm = storm,
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("SCENARIO FAIL probe={}\n{problems}", options.probe);
            ExitCode::from(1)
        }
    }
}
