//! Runs the DNS scenario (testkit's `dns`) against a collector binary inside the test
//! VMs. Prints `DNS PASS …` or `DNS FAIL …` and exits accordingly.
//!
//!     egress-dns-vm --collector PATH --dnsmasq PATH --probe kprobe|fentry

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(collector), Some(dnsmasq), Some(probe)) =
        (value("--collector"), value("--dnsmasq"), value("--probe"))
    else {
        eprintln!("usage: egress-dns-vm --collector PATH --dnsmasq PATH --probe MODE");
        return ExitCode::from(2);
    };
    match egress_testkit::dns::run(&PathBuf::from(collector), &PathBuf::from(dnsmasq), &probe) {
        Ok(lines) => {
            for line in &lines {
                println!("DNS ok {probe} {line}");
            }
            println!("DNS PASS {probe} names={}", lines.len());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("DNS FAIL {probe}\n{problems}");
            ExitCode::from(1)
        }
    }
}
