//! The collector's per-record user-space work without the machine around it: the same
//! ring record decoded, written as a JSON line and pushed into an OTLP logs request, over
//! and over on one thread, in this process. No kernel, no threads handing batches on, no
//! load competing for the cores: what `user-cost` measures end to end (its figures spread
//! by +-15 % from run to run on a 2-core guest), less everything but the code, so that a
//! change to the decoder or the writers shows as ns per record.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use egress_collector::{
    enrich::{Record, Resource},
    events::{
        clock::BootClock,
        decode::{Decoded, decode},
        identities::Identities,
    },
    export::{
        attributes::AttributeSet,
        otlp::encode::LogsEncoder,
        stdout::{LineScratch, write_line_with},
    },
};
use egress_shared::{ConnState, ConnectEvent, EventKind, IdentityEvent};

/// Records per timed pass; the stdout buffer is emptied and the OTLP request finished as
/// often as the collector does (a batch of 1,024 lines, a request of 2,048 records).
const LINES_PER_WRITE: usize = 1024;
const RECORDS_PER_REQUEST: usize = 2048;

/// ns per record of each step, min and median over the passes.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub min_ns: f64,
    pub median_ns: f64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    pub records: usize,
    pub passes: usize,
    pub decode: Step,
    pub stdout: Step,
    pub otlp: Step,
    /// Bytes of one JSON line, of one record in the OTLP request.
    pub json_bytes: usize,
    pub otlp_bytes: usize,
}

/// An established TCP connection from a pod, as the programs write it (the default
/// attribute set's fields all present), and its process's identity.
fn ring_records() -> (ConnectEvent, IdentityEvent) {
    let mut ev = ConnectEvent::zeroed();
    ev.boot_time_ns = 5_000_000;
    ev.kind = EventKind::TcpConnect as u8;
    ev.protocol = 6;
    ev.family = 2;
    ev.state = ConnState::Established as u8;
    ev.handshake_ns = 65_327;
    ev.sock_id = 0xffff_8880_1234_5600;
    ev.src_addr[..4].copy_from_slice(&[10, 244, 1, 17]);
    ev.dst_addr[..4].copy_from_slice(&[10, 96, 0, 10]);
    ev.src_port = 43_512;
    ev.dst_port = 5432;
    ev.tgid = 48_213;
    ev.tid = 48_219;
    ev.identity_ns = 4_000_000;
    ev.uid = 1000;
    ev.thread_comm[..11].copy_from_slice(b"http-worker");
    ev.cgroup_id = 9_912;
    let mut id = IdentityEvent::zeroed();
    id.filled_ns = 4_000_000;
    id.tgid = 48_213;
    id.cgroup_id = 9_912;
    id.cgroup_leaf_id = 9_912;
    id.parent_tgid = 48_190;
    id.ns_tgid = 1;
    id.ns_inums = [
        4_026_532_001,
        4_026_532_002,
        4_026_532_003,
        4_026_532_004,
        4_026_532_005,
        4_026_532_006,
    ];
    id.process_comm[..8].copy_from_slice(b"checkout");
    id.nodename[..22].copy_from_slice(b"checkout-7d9c5b8f-x2lq");
    (ev, id)
}

/// A pod's resource, as enrichment attaches it.
fn pod_resource() -> Arc<Resource> {
    let attributes = BTreeMap::from([
        ("host.name", "node-a".to_owned()),
        ("k8s.node.name", "node-a".to_owned()),
        ("k8s.namespace.name", "shop".to_owned()),
        ("k8s.pod.name", "checkout-7d9c5b8f-x2lq".to_owned()),
        (
            "k8s.pod.uid",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".to_owned(),
        ),
        ("k8s.container.name", "checkout".to_owned()),
        (
            "container.id",
            "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa99887766554433221100".to_owned(),
        ),
        ("container.runtime", "containerd".to_owned()),
    ]);
    Arc::new(Resource { attributes })
}

fn step(mut per_pass: Vec<f64>) -> Step {
    per_pass.sort_by(f64::total_cmp);
    Step {
        min_ns: per_pass[0],
        median_ns: per_pass[per_pass.len() / 2],
    }
}

/// Identities that know the process of [`ring_records`]' connection, learned from its
/// identity record as the reader learns it.
fn learned(identity: &IdentityEvent, clock: &BootClock) -> anyhow::Result<Identities> {
    let mut identities = Identities::default();
    match decode(identity.as_bytes(), clock, &mut identities) {
        Ok(Decoded::Identity) => Ok(identities),
        other => anyhow::bail!("the identity record decoded as {other:?}"),
    }
}

/// The record the reader makes of `event`, with `resource` as enrichment would attach.
fn record_of(
    event: &ConnectEvent,
    clock: &BootClock,
    identities: &mut Identities,
    resource: &Arc<Resource>,
) -> anyhow::Result<Record> {
    match decode(event.as_bytes(), clock, identities) {
        Ok(Decoded::Connection(connection)) => Ok(Record::captured(connection, resource)),
        other => anyhow::bail!("the connection record decoded as {other:?}"),
    }
}

/// `passes` timed passes of `records` records through each step, after one untimed.
pub fn measure(records: usize, passes: usize, set: AttributeSet) -> anyhow::Result<Figures> {
    let (event, identity) = ring_records();
    let clock = BootClock::now();
    let mut identities = learned(&identity, &clock)?;
    let resource = pod_resource();
    let record_of = |identities: &mut Identities| record_of(&event, &clock, identities, &resource);
    let record = record_of(&mut identities)?;
    let mut line = Vec::new();
    write_line_with(&mut line, &mut LineScratch::default(), &record, set)?;
    let json_bytes = line.len();

    let (mut decoded, mut written, mut encoded) = (Vec::new(), Vec::new(), Vec::new());
    let mut otlp_bytes = 0;
    for pass in 0..=passes {
        let started = Instant::now();
        for _ in 0..records {
            std::hint::black_box(record_of(&mut identities)?);
        }
        let decode_ns = started.elapsed().as_nanos() as f64 / records as f64;

        let mut out = Vec::with_capacity(LINES_PER_WRITE * (json_bytes + 64));
        let mut scratch = LineScratch::default();
        let started = Instant::now();
        for i in 0..records {
            if i % LINES_PER_WRITE == 0 {
                std::hint::black_box(&out);
                out.clear();
            }
            write_line_with(&mut out, &mut scratch, std::hint::black_box(&record), set)?;
        }
        std::hint::black_box(&out);
        let stdout_ns = started.elapsed().as_nanos() as f64 / records as f64;

        let mut encoder = LogsEncoder::new(set);
        let mut bytes = 0;
        let started = Instant::now();
        for i in 0..records {
            encoder.push(std::hint::black_box(&record));
            if (i + 1) % RECORDS_PER_REQUEST == 0 {
                bytes += std::hint::black_box(encoder.finish(1)).len();
            }
        }
        bytes += std::hint::black_box(encoder.finish(1)).len();
        let otlp_ns = started.elapsed().as_nanos() as f64 / records as f64;
        otlp_bytes = bytes / records;

        // The first pass warms caches and buffers up.
        if pass > 0 {
            decoded.push(decode_ns);
            written.push(stdout_ns);
            encoded.push(otlp_ns);
        }
    }
    Ok(Figures {
        records,
        passes,
        decode: step(decoded),
        stdout: step(written),
        otlp: step(encoded),
        json_bytes,
        otlp_bytes,
    })
}

/// Each of `builds` (egress-bench binaries; this one's figures are measured the same
/// way, as a child) run in turn `rounds` times: per build, the least of the minimums and
/// the median of the medians.
pub fn compare(
    builds: &[std::path::PathBuf],
    rounds: usize,
    records: usize,
    passes: usize,
) -> anyhow::Result<Vec<(String, Figures)>> {
    let mut all: Vec<Vec<Figures>> = vec![Vec::new(); builds.len()];
    for _ in 0..rounds {
        for (build, figures) in builds.iter().zip(&mut all) {
            let output = std::process::Command::new(build)
                .args(["encode", "--json", "--records", &records.to_string()])
                .args(["--passes", &passes.to_string()])
                .output()
                .map_err(|e| anyhow::anyhow!("running {}: {e}", build.display()))?;
            anyhow::ensure!(
                output.status.success(),
                "{} encode failed: {}",
                build.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            figures.push(serde_json::from_slice(&output.stdout)?);
        }
    }
    let combine = |of: &[Figures], pick: fn(&Figures) -> Step| {
        let mins: Vec<f64> = of.iter().map(|f| pick(f).min_ns).collect();
        let medians: Vec<f64> = of.iter().map(|f| pick(f).median_ns).collect();
        Step {
            min_ns: step(mins).min_ns,
            median_ns: step(medians).median_ns,
        }
    };
    Ok(builds
        .iter()
        .zip(&all)
        .map(|(build, of)| {
            let name = build.file_name().map_or_else(
                || build.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let first = of[0];
            (
                format!("`{name}`"),
                Figures {
                    passes: first.passes * of.len(),
                    decode: combine(of, |f| f.decode),
                    stdout: combine(of, |f| f.stdout),
                    otlp: combine(of, |f| f.otlp),
                    ..first
                },
            )
        })
        .collect())
}

/// The report's `encode` section.
pub fn section(command: &str, runs: &[(String, Figures)]) -> String {
    let mut out = format!(
        "## Per-record encoding in process (decode, JSON line, OTLP record)\n\n\
         Generated by `egress-bench encode`; do not edit by hand.\n\n{}\n\
         One established TCP connection from a pod (the default attribute set) is decoded from\n\
         its ring record (joined with its process's identity), written as a JSON line into a\n\
         buffer emptied every {LINES_PER_WRITE} lines and pushed into an OTLP logs request\n\
         finished every {RECORDS_PER_REQUEST} records, over and over on one thread: the code's\n\
         cost alone, without the kernel, the threads that hand batches on, or a load\n\
         competing for the cores (all in `user-cost`). ns per record, min and median over\n\
         the passes after a first untimed one. A binary named after a commit is that\n\
         commit's `egress-bench`, run in turn with this one.\n\n\
         | build | records x passes | decode min / median | JSON line min / median | OTLP record min / median | JSON bytes | OTLP bytes |\n\
         |---|---|---|---|---|---|---|\n",
        crate::report::provenance(command)
    );
    for (build, f) in runs {
        out.push_str(&format!(
            "| {build} | {} x {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {} | {} |\n",
            f.records,
            f.passes,
            f.decode.min_ns,
            f.decode.median_ns,
            f.stdout.min_ns,
            f.stdout.median_ns,
            f.otlp.min_ns,
            f.otlp.median_ns,
            f.json_bytes,
            f.otlp_bytes,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench writes what the collector writes for a pod's connection: every resource
    /// and default attribute present, so the figures are of a full record.
    #[test]
    fn the_measured_record_is_a_pods_established_connection() {
        let figures = measure(200, 2, AttributeSet::Default).expect("measures");
        assert!(figures.json_bytes > 600, "{figures:?}");
        assert!(figures.otlp_bytes > 400, "{figures:?}");
        let (event, identity) = ring_records();
        let clock = BootClock::now();
        let mut identities = learned(&identity, &clock).expect("the identity decodes");
        let record = record_of(&event, &clock, &mut identities, &pod_resource())
            .expect("the connection decodes");
        let mut line = Vec::new();
        write_line_with(
            &mut line,
            &mut LineScratch::default(),
            &record,
            AttributeSet::Default,
        )
        .expect("writes");
        let json: serde_json::Value = serde_json::from_slice(&line).expect("one JSON line");
        assert_eq!(json["resource"]["k8s.pod.name"], "checkout-7d9c5b8f-x2lq");
        assert_eq!(json["attributes"]["process.executable.name"], "checkout");
        assert_eq!(json["attributes"]["egress.connection.state"], "established");
        assert_eq!(json["attributes"]["destination.port"], 5432);
    }
}
