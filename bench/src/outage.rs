//! The soak for an endpoint outage under steady load (too long for CI): the collector
//! exports to an address where nothing listens for `down` seconds while the load runs,
//! then the receiver comes up there; every connection made must arrive, and the
//! collector must count nothing lost, as long as the outage fits its queue.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    load::LoadArgs,
    receiver,
    tool::{self, Observer},
};

pub fn run(bench: &Path, collector: &Path, rate: u64, down: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, egress_testkit::ports::unused_port()));
    // Room for the whole outage, with margin: the bound is what makes it lossless.
    let queue = (rate * (down + 30) * 2).to_string();
    let observer = Observer::collector(
        collector,
        &[
            format!("--otlp-endpoint=http://{address}"),
            format!("--queue-records={queue}"),
            "--cgroup-rate-limit=0".into(),
            "--batch-timeout=500ms".into(),
        ],
        false,
    )?;
    let load = LoadArgs {
        threads: 1,
        seconds: (down + 10) as f64,
        rate,
        udp_ports: 0,
        listeners: 2,
        address: Ipv4Addr::LOCALHOST,
    };
    let bench = bench.to_owned();
    let loader = std::thread::spawn(move || crate::run::run_load(&bench, &load));
    eprintln!("outage: endpoint down for {down} s at {rate} connects/s");
    std::thread::sleep(Duration::from_secs(down));
    let receiver = runtime.block_on(receiver::start_on(address))?;
    eprintln!("outage: endpoint up again at {address}");
    let made = loader
        .join()
        .map_err(|_| anyhow::anyhow!("load panicked"))??;
    let want = made.connects + made.failed;
    let count = || -> u64 {
        let seen = receiver.seen.lock().expect("lock");
        made.ports.iter().filter_map(|p| seen.get(p)).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while count() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let rss = tool::peak_rss_bytes(observer.pid());
    let (lines, _) = observer.stop()?;
    let lost = tool::stopped_field(&lines, "lost").context("Stopped. line")?;
    let seen = count();
    println!(
        "outage: {down} s down, {want} connections made, {seen} delivered, {lost} counted lost, peak RSS {:.1} MiB",
        rss as f64 / 1048576.0
    );
    if seen != want || lost != 0 {
        bail!("records were lost across the outage");
    }
    Ok(())
}
