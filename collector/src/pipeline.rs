//! Spawns the stages with bounded channels between them, reports statistics, and on
//! shutdown detaches the probes and drains what was captured, within a deadline.

use std::{future::Future, net::TcpListener, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use crate::{
    enrich::{
        self, Enricher, HostIdentity, Record, cache::CacheSettings, exclude::NamespaceFilter,
        runtime::RuntimeFiles,
    },
    events::{EventReader, OutcomeSettings, aggregate::Aggregates},
    export::{self, Exporter},
    export::{
        otlp::{OtlpExporter, SnapshotSource, settings::OtlpSettings, transport::TransportError},
        stdout::StdoutExporter,
    },
    health::{self, Health, HealthError},
    probe::{ProbeError, Probes},
    telemetry::{self, KernelCounters, Snapshot, Stats},
};

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Capacity of each queue between stages.
    pub queue_capacity: usize,
    pub stats_interval: Duration,
    /// How long shutdown may take to drain.
    pub drain_deadline: Duration,
    /// Where the host's filesystem is mounted (runtime files are read under it).
    pub host_root: PathBuf,
    pub cache: CacheSettings,
    /// JSON lines on stdout (always, when no OTLP endpoint is configured).
    pub stdout: bool,
    pub otlp: Option<OtlpSettings>,
    /// Kubernetes namespaces whose connections are dropped.
    pub exclude_namespaces: Vec<String>,
    /// Pending attempts and close records (`metrics` is set here from `otlp`).
    pub outcomes: OutcomeSettings,
    /// DNS answers and the names of connections.
    pub dns: crate::events::names::DnsSettings,
}

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
}

/// Runs until `shutdown` completes; returns the final counters. `health`, when given, is
/// where `/healthz` and `/readyz` are served (see [`health::bind`]).
pub async fn run(
    mut probes: Probes,
    host: HostIdentity,
    settings: PipelineSettings,
    health_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<Snapshot, PipelineError> {
    let stats = Arc::new(Stats::default());
    let kernel = Arc::new(KernelCounters::new(probes.take_counters()?));
    let snapshot: SnapshotSource = {
        let (stats, kernel) = (Arc::clone(&stats), Arc::clone(&kernel));
        Arc::new(move || stats.snapshot(&kernel))
    };
    let health = Arc::new(Health::default());
    if let Some(listener) = health_listener {
        let bound = health::serve(listener, Arc::clone(&health), Arc::clone(&snapshot))?;
        tracing::info!(address = %bound, "Serving /healthz and /readyz.");
    }
    // Built before anything starts, so bad TLS material fails the start.
    let otlp = match settings.otlp.clone() {
        Some(otlp) => {
            let flush = settings.drain_deadline.mul_f32(0.8);
            Some(
                OtlpExporter::new(otlp, &host.host_name, Arc::clone(&stats), snapshot, flush)?
                    .with_connection_spans(settings.outcomes.spans)?,
            )
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
    let reader = EventReader::new(probes.take_events()?, aggregates, Arc::clone(&stats))
        .map_err(PipelineError::RingBuffer)?
        .with_outcomes(Some(probes.take_pending()?), outcomes)
        .with_dns(crate::events::names::DnsSettings {
            enabled: settings.dns.enabled && probes.dns_attached,
            ..settings.dns.clone()
        });
    let namespace_filter = if settings.exclude_namespaces.is_empty() {
        None
    } else {
        Some(NamespaceFilter::new(
            &settings.exclude_namespaces,
            probes.take_excluded_cgroups()?,
            Arc::clone(&stats),
        ))
    };

    let (stop_reader, reader_stopped) = watch::channel(false);
    let batches = (settings.queue_capacity / crate::events::BATCH_RECORDS).max(1);
    let (connections_tx, connections_rx) = mpsc::channel(batches);
    let (records_tx, records_rx) = mpsc::channel(batches);
    let reader_task = tokio::spawn(reader.run(connections_tx, reader_stopped));
    let (files, problem) = RuntimeFiles::discover(&settings.host_root);
    if let Some(problem) = problem {
        tracing::warn!(%problem, "Docker configuration is unreadable.");
    }
    tracing::info!(docker_data_root = %files.docker_data_root().display(), "Reading container metadata from the runtimes' files.");
    let changes = enrich::watch::spawn(files.watched_dirs());
    let cgroup_root = (probes.facts.cgroups.hierarchy_mount.as_ref())
        .map(|mount| enrich::runtime::on_host(&settings.host_root, mount));
    let mut enricher = Enricher::new(
        &host,
        cgroup_root,
        files,
        settings.cache.clone(),
        changes,
        Arc::clone(&stats),
    );
    if let Some(filter) = namespace_filter {
        enricher = enricher.with_namespace_filter(filter);
    }
    let enrich_task =
        tokio::task::spawn_blocking(move || enricher.run_blocking(connections_rx, records_tx));
    let export_task = spawn_exporters(otlp, settings.stdout, records_rx, Arc::clone(&stats));

    tracing::info!(
        mode = %probes.mode,
        btf = %probes.facts.btf_path.display(),
        cgroups = %probes.facts.cgroups.layout,
        "Capturing egress connections."
    );
    for (mode, why) in &probes.refused {
        tracing::info!(%mode, reason = %why, "A preferred hook was refused.");
    }
    health.set_ready(probes.mode.as_str());

    let mut previous = Snapshot::default();
    let mut ticker = tokio::time::interval(settings.stats_interval);
    ticker.tick().await;
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    let mut failed = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {
                let now = stats.snapshot(&kernel);
                telemetry::report(&previous, &now);
                previous = now;
            }
            _ = liveness.tick(), if !failed => {
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

    // Stop new events first, then let every stage drain in order.
    probes.detach();
    let _ = stop_reader.send(true);
    let drained = tokio::time::timeout(settings.drain_deadline, async {
        let _ = reader_task.await;
        let _ = enrich_task.await;
        let _ = export_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::error!(deadline = ?settings.drain_deadline, "Shutdown deadline passed; records still queued are lost.");
    }
    let last = stats.snapshot(&kernel);
    telemetry::report(&previous, &last);
    tracing::info!(
        captured = last.captured,
        exported = last.exported,
        lost = last.lost(),
        "Stopped."
    );
    Ok(last)
}

/// OTLP, stdout, or both (a copy of each record to each).
fn spawn_exporters(
    otlp: Option<OtlpExporter>,
    stdout: bool,
    records: mpsc::Receiver<Vec<Record>>,
    stats: Arc<Stats>,
) -> tokio::task::JoinHandle<()> {
    let stdout_exporter = || -> Box<dyn Exporter> { Box::new(StdoutExporter::new()) };
    match otlp {
        None => tokio::spawn(export::run(stdout_exporter(), records, stats)),
        Some(otlp) if !stdout => tokio::spawn(otlp.run(records)),
        Some(otlp) => tokio::spawn(async move {
            let capacity = records.max_capacity();
            let (to_otlp, otlp_rx) = mpsc::channel(capacity);
            let (to_stdout, stdout_rx) = mpsc::channel(capacity);
            let otlp_task = tokio::spawn(otlp.run(otlp_rx));
            // The copy on stdout is not counted: the OTLP exporter counts each record.
            let stdout_task = tokio::spawn(export::run(
                stdout_exporter(),
                stdout_rx,
                Arc::new(Stats::default()),
            ));
            let mut records = records;
            while let Some(record) = records.recv().await {
                if to_stdout.try_send(record.clone()).is_err() {
                    // Only the copy: the record itself goes on to OTLP below.
                    stats.record_stdout_copy_dropped(record.len());
                }
                if to_otlp.send(record).await.is_err() {
                    break;
                }
            }
            drop((to_otlp, to_stdout));
            let _ = otlp_task.await;
            let _ = stdout_task.await;
        }),
    }
}
