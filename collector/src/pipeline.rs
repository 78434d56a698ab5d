//! Spawns the stages with bounded channels between them, reports statistics, and on
//! shutdown detaches the probes and drains what was captured, within a deadline.
//!
//! Shutdown is bounded by construction: the stages are awaited under one deadline; what
//! is still between them when it passes is counted `abandoned`; the blocking stages
//! (enrichment, the stdout writer, the runtime watcher) run on threads nobody joins; and a
//! watchdog thread ends the process with the statistics line if the main thread itself
//! has not finished a few seconds after the deadline.

use std::{
    future::Future,
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, mpsc as std_mpsc},
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use crate::{
    config::settings::{AttributeSet, DnsSettings, OutcomeSettings, PipelineSettings},
    enrich::{self, Enricher, HostIdentity, exclude::NamespaceFilter, runtime::RuntimeFiles},
    events::{EventReader, aggregate::Aggregates, flows::FlowSweeper},
    export::{
        self, Sink,
        otlp::{OtlpSinks, SnapshotSource},
        stdout::{self, Closed, Role, StdoutExporter, StdoutSink},
    },
    health::{self, Health, HealthError},
    otlp_client::{collector_resource, transport::TransportError},
    probe::{ProbeError, Probes, counters::KernelCounters},
    telemetry::{
        self, Snapshot, Stats, enrich::EnrichTelemetry, events::ReaderTelemetry,
        export::ExportTelemetry,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("cannot poll the ring buffer: {0}")]
    RingBuffer(#[source] std::io::Error),
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] TransportError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("cannot start the stdout writer thread: {0}")]
    StdoutThread(#[source] std::io::Error),
}

/// Why the collector stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// SIGTERM or SIGINT (or the caller's `shutdown` future).
    Signal,
    /// stdout was the only sink and its reader went away (`| head`).
    OutputClosed,
}

/// How the pipeline ended.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// The final counters, as the `Stopped.` line gives them.
    pub last: Snapshot,
    pub cause: StopCause,
    /// A stage had not finished by the shutdown deadline (its records are `abandoned`).
    pub deadline_passed: bool,
}

/// Exit status when a stage overran the shutdown deadline (see docs/operations.md).
pub const EXIT_DEADLINE_PASSED: u8 = 3;
/// How long after the drain deadline the watchdog ends a process whose main thread is stuck.
const WATCHDOG_GRACE: Duration = Duration::from_secs(3);

/// Runs until `shutdown` completes (or stdout, the only sink, is closed); returns the final
/// counters. `force`, completing during the drain (a second signal), ends it at once as
/// the deadline would. `health`, when given, is where `/healthz` and `/readyz` are served
/// (see [`health::bind`]).
pub async fn run(
    mut probes: Probes,
    host: HostIdentity,
    settings: PipelineSettings,
    health_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Result<Stopped, PipelineError> {
    let stats = Arc::new(Stats::default());
    let kernel = Arc::new(KernelCounters::new(
        probes.take_counters()?,
        probes.program_counts(),
        probes.take_calls()?,
        probes.take_identities()?,
    ));
    let snapshot: SnapshotSource = {
        let (stats, kernel) = (Arc::clone(&stats), Arc::clone(&kernel));
        Arc::new(move || stats.snapshot(kernel.figures()))
    };
    let health = Arc::new(Health::default());
    if let Some(listener) = health_listener {
        let bound = health::serve(listener, Arc::clone(&health), Arc::clone(&snapshot))?;
        tracing::info!(address = %bound, "Serving /healthz, /readyz and /metrics.");
    }
    // Built before anything starts, so bad TLS material fails the start.
    // Enrichment tells the OTLP metrics sink which containers went away (their series end).
    let (departures_tx, departures_rx) = tokio::sync::mpsc::unbounded_channel();
    // What the export stage may report, and nothing else.
    let export_telemetry = ExportTelemetry::new(Arc::clone(&stats));
    let otlp = match settings.otlp.clone() {
        Some(otlp) => {
            let self_resource = collector_resource(&host.host_name, &otlp.self_resource);
            let sinks = OtlpSinks {
                settings: otlp,
                self_resource,
                telemetry: export_telemetry.clone(),
                snapshot: Arc::clone(&snapshot),
                flush_deadline: settings.drain_deadline.mul_f32(0.8),
                attributes: settings.attributes,
                departures: departures_rx,
                connection_spans: settings.outcomes.spans,
            };
            Some(sinks.build()?)
        }
        None => None,
    };
    let aggregates = probes
        .take_aggregates()?
        .map(|map| Aggregates::new(map, probes.facts.config.aggregate_window_ns));
    let outcomes = OutcomeSettings {
        metrics: settings.otlp.is_some(),
        spans: settings.outcomes.spans && settings.otlp.is_some(),
        ..settings.outcomes.clone()
    };
    let reader = EventReader::new(
        probes.take_events()?,
        aggregates,
        ReaderTelemetry::new(Arc::clone(&stats)),
    )
    .map_err(PipelineError::RingBuffer)?
    .with_outcomes(Some(probes.take_pending()?), outcomes)
    .with_flow_sweep(
        probes
            .take_flow_sweep()?
            .map(|map| FlowSweeper::new(map, probes.facts.config.udp_flow_window_ns)),
    )
    .with_boot_offset(probes.take_boot_offset()?)
    .with_dns(DnsSettings {
        enabled: settings.dns.enabled && probes.dns_hook.is_some(),
        ..settings.dns.clone()
    });
    // What enrichment may report, and nothing else.
    let enrich_telemetry = EnrichTelemetry::new(Arc::clone(&stats));
    let namespace_filter = if settings.exclude_namespaces.is_empty() {
        None
    } else {
        Some(NamespaceFilter::new(
            &settings.exclude_namespaces,
            probes.take_excluded_cgroups()?,
            enrich_telemetry.clone(),
        ))
    };

    let (stop_reader, reader_stopped) = watch::channel(false);
    let batches = (settings.queue_capacity / crate::events::BATCH_RECORDS).max(1);
    let (connections_tx, connections_rx) = mpsc::channel(batches);
    let (records_tx, records_rx) = mpsc::channel(batches);
    let reader_task = tokio::spawn(reader.run(connections_tx, reader_stopped));
    let (files, problem) = RuntimeFiles::discover(&settings.host_root, &settings.runtimes);
    if let Some(problem) = problem {
        tracing::warn!(%problem, "Docker configuration is unreadable.");
    }
    tracing::info!(
        docker_data_root = %files.docker_data_root().display(),
        containerd_task_dirs = ?files.containerd_task_roots(),
        "Reading container metadata from the runtimes' files."
    );
    let changes = enrich::watch::spawn(files.watched_dirs(), files.clone());
    let under_host = |mount: &Option<PathBuf>| {
        (mount.as_ref()).map(|mount| enrich::runtime::on_host(&settings.host_root, mount))
    };
    let cgroup_roots = enrich::CgroupRoots {
        probed: under_host(&probes.facts.cgroups.hierarchy_mount),
        unified: under_host(&probes.facts.cgroups.unified_mount),
    };
    let mut enricher = Enricher::new(
        &host,
        cgroup_roots,
        files,
        settings.cache.clone(),
        changes,
        enrich_telemetry,
    );
    if let Some(filter) = namespace_filter {
        enricher = enricher.with_namespace_filter(filter);
    }
    if otlp.is_some() {
        enricher = enricher.with_departures(departures_tx);
    }
    let enrich_task =
        tokio::task::spawn_blocking(move || enricher.run_blocking(connections_rx, records_tx));
    // stdout is the only sink: its reader going away stops the collector.
    let stdout_only = otlp.is_none();
    let stdout_closed = Arc::new(Closed::default());
    let export_task = spawn_exporters(
        otlp,
        settings.stdout,
        settings.attributes,
        records_rx,
        export_telemetry,
        Arc::clone(&stdout_closed),
    )?;

    // Ready before the line that says so, which tests and operators wait for.
    health.set_ready(probes.mode.as_str(), probes.state_hook.as_str());
    tracing::info!(
        mode = %probes.mode,
        tcp_state = %probes.state_hook,
        btf = %probes.facts.btf_path.display(),
        cgroups = %probes.facts.cgroups.layout,
        decision_clock = %probes.facts.decision_clock(),
        dns = probes.dns_hook.map_or("off", crate::probe::DnsHook::as_str),
        attributes = settings.attributes.as_str(),
        "Capturing egress connections."
    );
    crate::probe::warn_if_fentry_on_realtime(probes.mode);
    for (mode, why) in &probes.refused {
        tracing::info!(%mode, reason = %why, "A preferred hook was refused.");
    }

    let mut previous = Snapshot::default();
    let mut ticker = tokio::time::interval(settings.stats_interval);
    ticker.tick().await;
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    let mut failed = false;
    let cause;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                cause = StopCause::Signal;
                break;
            }
            _ = stdout_closed.wait() => {
                cause = StopCause::OutputClosed;
                break;
            }
            _ = ticker.tick() => {
                let now = stats.snapshot(kernel.figures());
                telemetry::report(&previous, &now);
                previous = now;
            }
            _ = liveness.tick(), if !failed => {
                // A reader gone while there was nothing to write (the writer learns it
                // from its next write otherwise).
                if stdout_only && stdout::reader_gone() {
                    stdout_closed.report();
                }
                // Stages only end when told to: one that ended on its own is a broken
                // collector, which the liveness probe reports so kubelet restarts it.
                let stopped = [
                    ("event reader", reader_task.is_finished()),
                    ("enrichment", enrich_task.is_finished()),
                    ("exporter", export_task.is_finished()),
                ];
                if let Some((stage, _)) = stopped.iter().find(|(_, done)| *done) {
                    tracing::error!(stage, "A pipeline stage stopped; the collector is unhealthy.");
                    health.set_failed(format!("the {stage} stage stopped"));
                    failed = true;
                }
            }
        }
    }
    health.set_not_ready();
    // One start for the watchdog and the drain: the time detaching takes counts against
    // the drain's deadline too, so the watchdog never fires on a drain still within it.
    let stopping = std::time::Instant::now();
    let watchdog = Watchdog::arm(
        stopping + settings.drain_deadline + WATCHDOG_GRACE,
        Arc::clone(&stats),
        Arc::clone(&snapshot),
    );

    // Stop new events first, then let every stage drain in order.
    crate::testhook::slow_if("detach");
    probes.detach();
    crate::testhook::hang_if("shutdown");
    let _ = stop_reader.send(true);
    let drain_until = tokio::time::Instant::from_std(stopping + settings.drain_deadline);
    let drain = tokio::time::timeout_at(drain_until, async {
        let _ = reader_task.await;
        let _ = enrich_task.await;
        let _ = export_task.await;
    });
    let (deadline_passed, why) = tokio::select! {
        drained = drain => (drained.is_err(), "Shutdown deadline passed"),
        _ = force => (true, "A second signal cut the drain short"),
    };
    let last = if deadline_passed {
        let last = abandon_in_flight(&stats, &snapshot);
        tracing::error!(deadline = ?settings.drain_deadline, records = last.abandoned, "{why}; records still in the pipeline are lost.");
        last
    } else {
        snapshot()
    };
    telemetry::report(&previous, &last);
    report_stopped(&last);
    drop(watchdog);
    Ok(Stopped {
        last,
        cause,
        deadline_passed,
    })
}

/// Counts what is still between stages as `abandoned`; returns the final counters, read
/// once so they add up even while a stage past its deadline still counts.
fn abandon_in_flight(stats: &Stats, snapshot: &SnapshotSource) -> Snapshot {
    stats.abandon_in_flight(snapshot())
}

/// The last line: `captured = exported + filtered + dropped`; `lost` adds what never
/// became a record (kernel drops, decode failures, lost repeats).
fn report_stopped(last: &Snapshot) {
    tracing::info!(
        captured = last.captured,
        exported = last.exported,
        filtered = last.filtered,
        dropped = last.dropped(),
        abandoned = last.abandoned,
        lost = last.lost(),
        possibly_lost = last.possibly_lost(),
        "Stopped."
    );
}

/// Ends the process, with the statistics line, if it is still running `after` from now;
/// dropping it disarms it.
struct Watchdog {
    _disarm: std_mpsc::Sender<()>,
}

impl Watchdog {
    /// Exits the process at `until` unless dropped before.
    fn arm(until: std::time::Instant, stats: Arc<Stats>, snapshot: SnapshotSource) -> Self {
        let (disarm, disarmed) = std_mpsc::channel::<()>();
        let after = until.saturating_duration_since(std::time::Instant::now());
        let spawned = std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || {
                if let Err(std_mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(after) {
                    let last = abandon_in_flight(&stats, &snapshot);
                    tracing::error!(after = ?after, records = last.abandoned, "Shutdown is stuck; exiting without waiting for it.");
                    report_stopped(&last);
                    std::process::exit(i32::from(EXIT_DEADLINE_PASSED));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "Cannot start the shutdown watchdog; shutdown relies on the stages' deadline alone.");
        }
        Self { _disarm: disarm }
    }
}

/// The OTLP sinks, stdout, or both (each batch to each, shared). The handle completes
/// when every sink is done.
fn spawn_exporters(
    otlp: Option<Vec<Box<dyn Sink>>>,
    stdout: bool,
    attributes: AttributeSet,
    records: mpsc::Receiver<export::Records>,
    telemetry: ExportTelemetry,
    stdout_closed: Arc<Closed>,
) -> Result<tokio::task::JoinHandle<()>, PipelineError> {
    let capacity = records.max_capacity();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    // stdout alone is the sink; beside OTLP it is a copy (a full queue skips it).
    let role = if otlp.is_some() {
        Role::Copy
    } else {
        Role::Sink
    };
    if otlp.is_none() || stdout {
        let sink = StdoutSink::start(
            StdoutExporter::new().with_attributes(attributes),
            role,
            telemetry,
            stdout_closed,
        )
        .map_err(PipelineError::StdoutThread)?;
        sinks.push(Box::new(sink));
    }
    sinks.extend(otlp.into_iter().flatten());
    Ok(export::fan_out(records, sinks, capacity))
}
