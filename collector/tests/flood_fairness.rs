//! A container in a connect loop must not blind the collector to the others: the kernel's
//! per-cgroup rate limit drops and counts its excess, its records carry the count, and a
//! quiet container next to it is reported in full.

mod support;

use std::{path::Path, time::Duration};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
    ports::unused_port,
};
use serde_json::Value;
use support::host::{require_root, sink_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

#[test]
fn a_flooding_container_is_limited_and_counted_while_a_quiet_one_is_reported_in_full() {
    let _alone = one_flood_at_a_time();
    require_root();
    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let (noisy_port, quiet_port) = (sink_port(), sink_port());
    const QUIET: u32 = 20;
    // Four connect loops in parallel, as fast as the shell forks (the image has only sh,
    // nc, sleep: no clock, so the count is fixed).
    const WORKERS: u64 = 4;
    const PER_WORKER: u64 = 150;
    let noisy_script = format!(
        "w=0; while [ $w -lt {WORKERS} ]; do (i=0; while [ $i -lt {PER_WORKER} ]; do \
         nc -w 1 {gateway} {noisy_port} </dev/null; i=$((i+1)); done) & w=$((w+1)); done; wait"
    );
    let quiet_script = format!(
        "i=0; while [ $i -lt {QUIET} ]; do nc -w 1 {gateway} {quiet_port} </dev/null; \
         sleep 0.2; i=$((i+1)); done"
    );
    let noisy_pod = Pod::new("flood", "load", "loop", Some("besteffort"), 41);
    let quiet_pod = Pod::new("calm", "shop", "web", Some("burstable"), 42);
    let noisy = Container::create(&noisy_pod, &noisy_script).expect("create noisy");
    let quiet = Container::create(&quiet_pod, &quiet_script).expect("create quiet");

    // A limit low enough that the loop exceeds it many times over.
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--cgroup-rate-limit", "20", "--cgroup-burst", "20"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let quiet_run = std::thread::spawn(move || {
        quiet.run_to_completion().expect("quiet runs");
        quiet
    });
    noisy.run_to_completion().expect("noisy runs");
    let _quiet = quiet_run.join().expect("quiet thread");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let attempts = WORKERS * PER_WORKER;
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let to = |port: u16| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["attributes"]["destination.port"] == port)
            .collect()
    };
    let (noisy_records, quiet_records) = (to(noisy_port), to(quiet_port));
    assert_eq!(
        quiet_records.len() as u32,
        QUIET,
        "every connection of the quiet container is reported"
    );
    assert!(
        quiet_records
            .iter()
            .all(|r| r["resource"]["k8s.pod.name"] == quiet_pod.name.as_str()),
        "and attributed to its pod"
    );
    let carried: u64 = noisy_records
        .iter()
        .filter_map(|r| r["attributes"]["egress.rate_limited.before"].as_u64())
        .sum();
    let seen = noisy_records.len() as u64;
    let limited_total = stderr
        .iter()
        .rev()
        .find(|l| l.contains("Collector statistics.") || l.contains("Events were lost"))
        .and_then(|l| l.split("rate_limited=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
        .unwrap_or_else(|| panic!("rate_limited in the statistics:\n{}", stderr.join("\n")));
    eprintln!(
        "noisy: {attempts} attempts, {seen} reported, {carried} carried on records, {limited_total} counted"
    );
    assert!(
        seen < attempts,
        "the limit held the loop back ({seen} of {attempts})"
    );
    assert!(carried > 0, "records carry the drops before them");
    // Every attempt is a record, a drop carried on a later record, or a counted drop.
    assert!(
        seen + carried <= attempts && attempts <= seen + limited_total,
        "seen {seen} + carried {carried} <= attempts {attempts} <= seen + counted {limited_total}"
    );
}

/// The flooding and the quiet processes of the test below: this test binary run again,
/// as this one ignored test, in a cgroup of its own (a child of every mounted hierarchy,
/// as a runtime makes for a container). `EGRESS_FLOOD_WORKER` says what to do.
const WORKER: &str = "flood_worker";
const WORKER_ENV: &str = "EGRESS_FLOOD_WORKER";

/// Two CPUs, each running a connect loop for several seconds, against a limit of 200
/// events per second: the bucket is shared by the CPUs, so the cgroup gets the rate, not
/// the rate per CPU, and never the refill a CPU once took from a wrapped clock difference.
/// Exact books: every attempt is a record or a drop that exactly one record carries (the
/// worker's last connection, made once the bucket has a token again, carries the rest),
/// and the two CPUs crediting the same interval do not hold the cgroup below its rate.
/// The limit goes by the kernel's tick count here (this kernel lets tracing programs
/// read it): time in steps of 4 ms.
#[test]
fn a_cgroup_flooding_from_both_cpus_gets_its_rate_and_every_drop_is_counted() {
    let _alone = one_flood_at_a_time();
    let run = flood_from_both_cpus(&[], false);
    assert!(
        run.decision_clock.starts_with("jiffies@"),
        "the decisions go by the tick count: {}",
        run.decision_clock
    );
    // The programs' own times: the tick count times the tick, which runs ahead of
    // CLOCK_MONOTONIC by `(2^32 - 300 x HZ) x tick` (the count starts 5 min short of a
    // 32-bit wrap), at least 41 days at any HZ.
    let tick = clock_resolution_ns(libc::CLOCK_MONOTONIC_COARSE);
    let hz = (1e9 / tick as f64).round() as u64;
    let ticks_ahead = ((1u64 << 32) - 300 * hz) * tick;
    assert_bucket_times(&run, now_ns(libc::CLOCK_MONOTONIC) + ticks_ahead);
    assert_exact_books(&run);
}

/// The same flood with the limit on the precise clock, as on kernels whose tick the
/// collector cannot read (forced by a test hook): the same books and rate.
#[test]
fn on_the_precise_clock_the_flood_gets_its_rate_and_every_drop_is_counted() {
    let _alone = one_flood_at_a_time();
    let run = flood_from_both_cpus(&[("EGRESS_TEST_PRECISE_DECISIONS", "1")], false);
    assert_eq!(run.decision_clock, "boottime");
    assert_bucket_times(&run, now_ns(libc::CLOCK_BOOTTIME));
    assert_exact_books(&run);
}

/// Every bucket's time lies within two minutes of `expected` (the run lasts seconds; a
/// bucket's arrival time runs at most a burst's worth of intervals ahead), and the
/// flood's cgroup has its bucket in its slot (`CGROUP_BUCKET_SLOTS`), where every
/// cgroup's is but a collided one's.
fn assert_bucket_times(run: &FloodRun, expected: u64) {
    // In its slot, unless another cgroup of the host holds that slot (a collision: then
    // in the map).
    let slot_of = |key: u64| egress_shared::slot_of(key, egress_shared::BUCKET_SLOT_COUNT - 1);
    let slot_holder = |slot: u32| run.buckets.iter().find(|b| b.slot == Some(slot));
    assert!(
        run.buckets
            .iter()
            .any(|b| run.noisy_keys.contains(&b.cgroup)
                && (b.slot == Some(slot_of(b.cgroup))
                    || slot_holder(slot_of(b.cgroup)).is_some_and(|h| h.cgroup != b.cgroup))),
        "the flood's cgroup has its bucket in its slot: {:?}",
        run.buckets
    );
    for bucket in &run.buckets {
        assert!(
            bucket.last_ns.abs_diff(expected) < 120_000_000_000,
            "a bucket's time {} is not on the expected clock ({expected})",
            bucket.last_ns
        );
    }
}

/// A rate-limit bucket as the programs left it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SeenBucket {
    /// The cgroup key it belongs to.
    cgroup: u64,
    /// `Bucket::last_ns`.
    last_ns: u64,
    /// Its slot in `CGROUP_BUCKET_SLOTS`, if it is there (else in the LRU map
    /// `CGROUP_BUCKETS`).
    slot: Option<u32>,
}

impl SeenBucket {
    fn in_slot(&self) -> bool {
        self.slot.is_some()
    }
}

/// The buckets of the collector `pid`: the claimed slots of its `CGROUP_BUCKET_SLOTS`
/// and the entries of its `CGROUP_BUCKETS` (its maps found through its descriptors).
fn buckets(pid: u32) -> Vec<SeenBucket> {
    let own = support::host::ids_held_by(pid, "map_id");
    let mut buckets = Vec::new();
    for info in aya::maps::loaded_maps() {
        let info = info.expect("the loaded maps can be listed");
        if !own.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str();
        if name == Some("CGROUP_BUCKETS") {
            let map = aya::maps::MapData::from_id(info.id()).expect("the bucket map opens");
            let map =
                aya::maps::HashMap::<_, u64, [u64; 3]>::try_from(aya::maps::Map::LruHashMap(map))
                    .expect("a hash map of u64 to a bucket");
            // `Bucket`: nano_tokens, last_ns, dropped.
            buckets.extend(map.iter().map(|entry| {
                let (cgroup, bucket) = entry.expect("a bucket");
                SeenBucket {
                    cgroup,
                    last_ns: bucket[1],
                    slot: None,
                }
            }));
        } else if name == Some("CGROUP_BUCKET_S") {
            // `CGROUP_BUCKET_SLOTS`, as the kernel keeps a map's name: 15 bytes.
            let map = aya::maps::MapData::from_id(info.id()).expect("the slot map opens");
            let map = aya::maps::Array::<_, [u64; 4]>::try_from(aya::maps::Map::Array(map))
                .expect("an array of slots");
            // `BucketSlot`: the cgroup key (0: free), then the bucket.
            buckets.extend(
                (0u32..)
                    .zip(map.iter().map(|slot| slot.expect("a slot")))
                    .filter(|(_, slot)| slot[0] != 0)
                    .map(|(index, slot)| SeenBucket {
                        cgroup: slot[0],
                        last_ns: slot[2],
                        slot: Some(index),
                    }),
            );
        }
    }
    buckets
}

fn now_ns(clock: libc::clockid_t) -> u64 {
    clock_ns(libc::clock_gettime, clock)
}

fn clock_resolution_ns(clock: libc::clockid_t) -> u64 {
    clock_ns(libc::clock_getres, clock)
}

/// What `read` (`clock_gettime` or `clock_getres`) gives for `clock`, in ns.
fn clock_ns(
    read: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    clock: libc::clockid_t,
) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    assert_eq!(unsafe { read(clock, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the 5.12+ rate limit guarantees: every attempt reported or carried by exactly
/// one record, and the cgroup given its rate.
fn assert_exact_books(run: &FloodRun) {
    assert_eq!(
        run.reported + run.carried,
        run.made,
        "every attempt is reported or carried as a drop on exactly one later record"
    );
    assert!(
        run.counted >= run.carried,
        "every carried drop is counted too ({} < {})",
        run.counted,
        run.carried
    );
    // Two CPUs crediting one interval once held the cgroup under its rate.
    assert!(
        run.reported as f64 >= 0.95 * run.due,
        "the cgroup gets its rate and burst: {} records, {:.0} due",
        run.reported,
        run.due
    );
}

/// Every cgroup on one bucket slot (a test hook), which a cgroup that connected just
/// before holds: the flood and the quiet cgroup both collide there, keep their buckets in
/// the LRU map, and each still gets its own limit, the flood with exact books.
#[test]
fn cgroups_whose_bucket_slot_is_held_get_their_own_limits_and_exact_books() {
    let _alone = one_flood_at_a_time();
    let run = flood_from_both_cpus(&[("EGRESS_TEST_ONE_BUCKET_SLOT", "1")], true);
    assert_exact_books(&run);
    // The holder's, which connected first (or a cgroup of the host's that connected
    // before it).
    let slots: Vec<&SeenBucket> = run.buckets.iter().filter(|b| b.in_slot()).collect();
    let theirs =
        |b: &SeenBucket| run.noisy_keys.contains(&b.cgroup) || run.quiet_keys.contains(&b.cgroup);
    assert!(
        slots.len() == 1 && !theirs(slots[0]),
        "the one slot is held by a cgroup that connected before the flood: {:?}",
        run.buckets
    );
    for (what, keys) in [("flood's", &run.noisy_keys), ("quiet", &run.quiet_keys)] {
        assert!(
            run.buckets
                .iter()
                .any(|b| !b.in_slot() && keys.contains(&b.cgroup)),
            "the {what} cgroup's bucket is in the LRU map: {:?}",
            run.buckets
        );
    }
}

/// A slot whose cgroup has been idle for 10 s (its bucket full, nothing to carry) goes
/// to the next cgroup of that slot that has no bucket yet: a removed container's slot is
/// used again.
#[test]
fn a_bucket_slot_idle_for_ten_seconds_is_claimed_by_the_next_cgroup() {
    let _alone = one_flood_at_a_time();
    require_root();
    let first = TestCgroup::create("first");
    let next = TestCgroup::create("next");
    // Another cgroup of the host may connect first and take the one slot: tried again
    // then, with a new collector (new maps).
    for attempt in 1..=3 {
        let collector = RunningCollector::start_wrapped(
            &["env", "EGRESS_TEST_ONE_BUCKET_SLOT=1"],
            Path::new(COLLECTOR),
            &["--stdout", "--stats-interval", "1h"],
            Duration::from_secs(60),
        )
        .expect("collector starts");
        let holder = || -> Vec<u64> {
            buckets(collector.pid())
                .iter()
                .filter(|b| b.in_slot())
                .map(|b| b.cgroup)
                .collect()
        };
        wait_worker(first.spawn_worker(&format!("quiet {} 1 0", unused_port())));
        let before = holder();
        let first_holds = before.len() == 1 && first.ids().contains(&before[0]);
        if !first_holds && attempt < 3 {
            eprintln!("attempt {attempt}: the slot went to another cgroup first: {before:?}");
            let _ = collector.stop(Duration::from_secs(30));
            continue;
        }
        // Idle for 10 s by the bucket's time: the next event is 10.5 s after the first's.
        std::thread::sleep(Duration::from_millis(10_500));
        wait_worker(next.spawn_worker(&format!("quiet {} 1 0", unused_port())));
        let after = holder();
        let (ok, _, stderr) = collector
            .stop(Duration::from_secs(30))
            .expect("collector stops");
        assert!(ok, "collector failed:\n{}", stderr.join("\n"));
        assert!(
            first_holds,
            "the first cgroup to connect claims the free slot: {before:?}, ids {:?}",
            first.ids()
        );
        assert!(
            after.len() == 1 && next.ids().contains(&after[0]),
            "the next cgroup claims the slot its idle holder left: {after:?}, ids {:?}",
            next.ids()
        );
        return;
    }
}

/// The same flood on the rate limit's path for kernels before 5.12 (no atomic exchange),
/// forced by a test hook: the bound holds and every attempt is reported or counted; a
/// drop may be carried twice there (docs/kernel.md), but no record carries a wrapped count.
#[test]
fn without_fetching_atomics_the_flood_is_still_bounded_and_counted() {
    let _alone = one_flood_at_a_time();
    let run = flood_from_both_cpus(&[("EGRESS_TEST_NO_FETCHING_ATOMICS", "1")], false);
    assert!(
        run.reported + run.counted >= run.made,
        "reported {} + counted {} >= made {}",
        run.reported,
        run.counted,
        run.made
    );
    assert!(
        run.largest_carried <= run.made,
        "no record carries more drops than there were attempts ({})",
        run.largest_carried
    );
}

/// What [`flood_from_both_cpus`] saw.
struct FloodRun {
    made: u64,
    reported: u64,
    carried: u64,
    largest_carried: u64,
    counted: u64,
    /// What the start line names as the decisions' clock.
    decision_clock: String,
    /// The rate limit's buckets, as the programs left them.
    buckets: Vec<SeenBucket>,
    /// The keys the flood's and the quiet cgroup may have (their ids in every hierarchy).
    noisy_keys: Vec<u64>,
    quiet_keys: Vec<u64>,
    /// rate x the time the worker flooded + burst.
    due: f64,
}

/// Runs the flood and a quiet cgroup beside it; checks what holds on both paths (the
/// bound, the quiet cgroup in full, the last record) and returns the figures. `holder`:
/// a third cgroup connects once first (with one bucket slot, it takes the slot).
fn flood_from_both_cpus(env: &[(&str, &str)], holder: bool) -> FloodRun {
    require_root();
    const RATE: u64 = 200;
    const BURST: u64 = 100;
    const SECONDS: u64 = 4;
    const QUIET: u64 = 40;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the test floods from two CPUs; this machine has {cpus}"
    );
    // Refused connections: the cheapest attempt there is (no accept, no TIME_WAIT), and
    // each one is a full connect attempt, reported once.
    let (noisy_port, last_port, quiet_port) = (unused_port(), unused_port(), unused_port());
    let noisy_group = TestCgroup::create("noisy");
    let quiet_group = TestCgroup::create("quiet");

    // `env VAR=value collector ...`: the test hooks in `env`, if any.
    let wrapper: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let wrapper: Vec<&str> = std::iter::once("env")
        .chain(wrapper.iter().map(String::as_str))
        .collect();
    let (rate, burst) = (RATE.to_string(), BURST.to_string());
    let collector = RunningCollector::start_wrapped(
        &wrapper,
        Path::new(COLLECTOR),
        &[
            "--stdout",
            "--cgroup-rate-limit",
            &rate,
            "--cgroup-burst",
            &burst,
            "--stats-interval",
            "1h",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let holder_group = holder.then(|| TestCgroup::create("holder"));
    if let Some(group) = &holder_group {
        wait_worker(group.spawn_worker(&format!("quiet {} 1 0", unused_port())));
    }
    let noisy = noisy_group.spawn_worker(&format!(
        "flood {noisy_port} {SECONDS} 2 {last_port} {}",
        2_000 / RATE + 200
    ));
    let quiet = quiet_group.spawn_worker(&format!("quiet {quiet_port} {QUIET} 50"));
    let (noisy_pid, noisy_out) = wait_worker(noisy);
    let (quiet_pid, _) = wait_worker(quiet);
    std::thread::sleep(Duration::from_millis(500));
    let buckets = buckets(collector.pid());
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let worker_says = |what: &str| -> &str {
        noisy_out
            .lines()
            .find_map(|l| l.split(what).nth(1))
            .map(str::trim)
            .unwrap_or_else(|| panic!("the flood worker says {what}:\n{noisy_out}"))
    };
    let made: u64 = worker_says("FLOOD MADE ").parse().expect("a count");
    // How long the worker's threads flooded, from their start to the last one's end (not
    // the worker's start-up, nor its pause before the last connection).
    let flood_time: f64 = worker_says("FLOOD SECONDS ").parse().expect("seconds");
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let from = |pid: u32, port: u16| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| {
                r["attributes"]["process.pid"] == pid && r["attributes"]["destination.port"] == port
            })
            .collect()
    };
    let flood = from(noisy_pid, noisy_port);
    let last = from(noisy_pid, last_port);
    let carried_each: Vec<u64> = flood
        .iter()
        .chain(&last)
        .filter_map(|r| r["attributes"]["egress.rate_limited.before"].as_u64())
        .collect();
    let carried: u64 = carried_each.iter().sum();
    let counted = support::host::last_stat(&stderr, "rate_limited")
        .unwrap_or_else(|| panic!("rate_limited in the statistics:\n{}", stderr.join("\n")));
    let reported = flood.len() as u64;
    let bound = (RATE as f64 * flood_time + BURST as f64) * 1.1;
    eprintln!(
        "noisy: {made} attempts in {flood_time:.2} s ({:.0}/s), {reported} reported (bound \
         {bound:.0}, rate x time {:.0}), {carried} drops carried, {counted} counted in all",
        made as f64 / flood_time,
        RATE as f64 * flood_time
    );
    assert_eq!(
        last.len(),
        1,
        "the noisy worker's last connection is reported"
    );
    assert!(
        made > 10 * RATE * SECONDS,
        "the flood exceeds the limit many times over ({made} attempts)"
    );
    assert!(
        (reported as f64) <= bound,
        "{reported} records in {flood_time:.2} s: more than {RATE}/s x time + {BURST} (+10 %)"
    );
    assert!(
        reported as f64 >= 0.5 * RATE as f64 * SECONDS as f64,
        "the limit lets the rate through ({reported} records)"
    );
    assert_eq!(
        from(quiet_pid, quiet_port).len() as u64,
        QUIET,
        "the quiet cgroup beside the flood is reported in full"
    );
    FloodRun {
        made,
        reported,
        carried,
        largest_carried: carried_each.iter().copied().max().unwrap_or(0),
        counted,
        due: RATE as f64 * flood_time + BURST as f64,
        buckets,
        noisy_keys: noisy_group.ids(),
        quiet_keys: quiet_group.ids(),
        decision_clock: stderr
            .iter()
            .find_map(|l| l.split("decision_clock=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("the start line names the clock:\n{}", stderr.join("\n")))
            .to_owned(),
    }
}

#[test]
#[ignore = "a worker process of the test above, which runs it in its own cgroup"]
fn flood_worker() {
    let job = std::env::var(WORKER_ENV).expect("run by the flood test, which sets the job");
    let args: Vec<&str> = job.split_whitespace().collect();
    let num = |i: usize| -> u64 { args[i].parse().expect("a number") };
    let connect = |port: u64| {
        let to = (std::net::Ipv4Addr::LOCALHOST, port as u16);
        match std::net::TcpStream::connect(to) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => panic!("connect to a closed port: {other:?}"),
        }
    };
    match args[0] {
        // flood PORT SECONDS THREADS LAST_PORT PAUSE_MS
        "flood" => {
            let started = std::time::Instant::now();
            let deadline = started + Duration::from_secs(num(2));
            let port = num(1);
            let threads: Vec<_> = (0..num(3))
                .map(|cpu| {
                    std::thread::spawn(move || {
                        pin_to_cpu(cpu as usize);
                        let mut made = 0u64;
                        while std::time::Instant::now() < deadline {
                            connect(port);
                            made += 1;
                        }
                        made
                    })
                })
                .collect();
            let made: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
            let flooded = started.elapsed();
            // Once the bucket has a token again, one more: it carries the last drops.
            std::thread::sleep(Duration::from_millis(num(5)));
            connect(num(4));
            println!("FLOOD MADE {made}");
            println!("FLOOD SECONDS {:.3}", flooded.as_secs_f64());
        }
        // quiet PORT COUNT INTERVAL_MS
        "quiet" => {
            for _ in 0..num(2) {
                connect(num(1));
                std::thread::sleep(Duration::from_millis(num(3)));
            }
        }
        other => panic!("unknown job {other}"),
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Waits for a worker; returns its pid and stdout, or panics with its output.
fn wait_worker(child: std::process::Child) -> (u32, String) {
    let pid = child.id();
    let output = child.wait_with_output().expect("worker runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "worker {pid} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (pid, stdout)
}

/// A cgroup of this test's own in every mounted hierarchy (v1 controllers and cgroup2),
/// as runtimes create one per container, so it is a cgroup of its own whichever
/// hierarchy the collector reads. Removed when dropped.
struct TestCgroup {
    dirs: Vec<std::path::PathBuf>,
}

impl TestCgroup {
    fn create(name: &str) -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mut dirs = Vec::new();
        for line in mountinfo.lines() {
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let fstype = after.split_whitespace().next().unwrap_or_default();
            let Some(mount) = before.split_whitespace().nth(4) else {
                continue;
            };
            if fstype != "cgroup" && fstype != "cgroup2" {
                continue;
            }
            let dir = Path::new(mount).join(format!("egress-flood-{}-{name}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    // A v1 cpuset cgroup takes no process until it has CPUs and nodes.
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        if let Ok(parent) = std::fs::read_to_string(Path::new(mount).join(file)) {
                            std::fs::write(dir.join(file), parent.trim())
                                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()));
                        }
                    }
                    dirs.push(dir);
                }
                // One hierarchy mounted twice.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("cannot create {}: {e}", dir.display()),
            }
        }
        assert!(!dirs.is_empty(), "no cgroup hierarchy is mounted");
        Self { dirs }
    }

    /// Its kernfs ids, one per hierarchy (a directory's inode number on 64-bit): the
    /// rate limit's key is one of them.
    fn ids(&self) -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        self.dirs
            .iter()
            .map(|d| {
                std::fs::metadata(d)
                    .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
                    .ino()
            })
            .collect()
    }

    /// This test binary, as [`flood_worker`], moved into the cgroup before it runs.
    fn spawn_worker(&self, job: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let procs: Vec<std::ffi::CString> = self
            .dirs
            .iter()
            .map(|d| {
                std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                    .expect("no NUL in a path")
            })
            .collect();
        let mut command = std::process::Command::new(std::env::current_exe().expect("test binary"));
        command
            .args([
                WORKER,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, job)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: only open/write/close between fork and exec (async-signal-safe).
        unsafe {
            command.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    libc::close(fd);
                    if written != 2 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command.spawn().expect("start a worker")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Each flood saturates both CPUs: two at once starve each other's quiet connections
/// (a `nc -w 1` that times out is a connection never made), so they take turns.
fn one_flood_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FLOODS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
