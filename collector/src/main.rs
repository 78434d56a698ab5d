//! Glue only: command line -> telemetry -> probes -> pipeline -> graceful shutdown.

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use egress_collector::{
    check,
    config::{Cli, Command, RunArgs},
    enrich::HostIdentity,
    otlp_client::collector_resource,
    pipeline,
    probe::Probes,
    telemetry::otel::SelfTelemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Check(args)) => {
            match check::run(&args.settings(), &mut std::io::stdout().lock()) {
                Ok(true) => return ExitCode::SUCCESS,
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(anyhow::Error::from(e).context("writing the report")),
            }
        }
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egress-collector: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// 0 once stopped by a signal or by the close of stdout (its only sink), with every
/// stage drained; 3 when a stage overran the shutdown deadline (see docs/operations.md).
fn run(mut args: RunArgs) -> anyhow::Result<ExitCode> {
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Configuration first: a bad setting fails before anything is loaded into the kernel.
    let env = |name: &str| std::env::var(name).ok();
    // The config file is read and parsed once; each part takes its tables from it.
    let file = args.read_config_file().context("configuration")?;
    args.apply_capture_file(file.as_ref())
        .context("configuration")?;
    args.apply_enrich_file(file.as_ref())
        .context("configuration")?;
    let mut pipeline_settings = args.pipeline();
    pipeline_settings.otlp = args
        .otlp
        .settings(&env, file.as_ref())
        .context("configuration")?;
    pipeline_settings.stdout = args.stdout || pipeline_settings.otlp.is_none();
    if args.connection_spans && pipeline_settings.otlp.is_none() {
        anyhow::bail!("configuration: --connection-spans needs an OTLP endpoint");
    }
    let host = HostIdentity::detect(&args.probe.host_root);
    let self_telemetry = match &pipeline_settings.otlp {
        Some(otlp) if otlp.self_telemetry => Some(
            SelfTelemetry::new(
                otlp,
                collector_resource(&host.host_name, &otlp.self_resource),
                runtime.handle().clone(),
            )
            .context("configuration")?,
        ),
        _ => None,
    };
    egress_collector::telemetry::init_tracing(
        &args.log_level,
        args.log_format.unwrap_or_default(),
        self_telemetry.as_ref(),
    );
    let health_listener = args
        .health_address
        .map(egress_collector::health::bind)
        .transpose()?;
    let result = runtime.block_on(async {
        let signals = shutdown_signals();
        let mut probe_settings = args.probe.settings();
        // Closes feed close records, the OTLP metrics and spans: without any of them the
        // kernel does not follow connections past their outcome.
        probe_settings.track_closes = args.close_records || pipeline_settings.otlp.is_some();
        // Names are kept alive by open connections only where closes are followed.
        pipeline_settings.dns.hold_open = probe_settings.track_closes;
        let probes = Probes::attach(&probe_settings).context("attaching probes")?;
        let (shutdown, force) = (nth_signal(signals.clone(), 1), nth_signal(signals, 2));
        let stopped = pipeline::run(
            probes,
            host,
            pipeline_settings,
            health_listener,
            shutdown,
            force,
        )
        .await?;
        anyhow::Ok(stopped)
    });
    if let Some(telemetry) = self_telemetry {
        // After the pipeline, so its last log lines go out too; the runtime still runs.
        telemetry.shutdown(Duration::from_secs(5));
    }
    // Tasks and blocking threads still running (a stage past its deadline) are left
    // behind: dropping the runtime would wait for them without bound.
    runtime.shutdown_timeout(Duration::from_millis(500));
    let stopped = result?;
    Ok(if stopped.deadline_passed {
        ExitCode::from(pipeline::EXIT_DEADLINE_PASSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Kernels before 5.11 charge eBPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct for the call's duration.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("Could not raise RLIMIT_MEMLOCK; fine on kernels from 5.11.");
    }
}

/// Registers for SIGTERM and SIGINT at once (a signal arriving between start-up and the
/// first wait must not kill the process unflushed); counts the signals received.
fn shutdown_signals() -> tokio::sync::watch::Receiver<u32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (count, counted) = tokio::sync::watch::channel(0u32);
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot listen for SIGTERM/SIGINT; stop the collector with SIGKILL.");
        return counted; // the sender is gone: no signal ever completes
    };
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let n = *count.borrow() + 1;
            if n == 1 {
                tracing::info!(signal = name, "Shutting down.");
            } else {
                tracing::warn!(
                    signal = name,
                    "Signalled again: stopping without waiting for the drain."
                );
            }
            count.send_replace(n);
        }
    });
    counted
}

/// Completes once `n` signals were received.
async fn nth_signal(mut counted: tokio::sync::watch::Receiver<u32>, n: u32) {
    if counted.wait_for(|&count| count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}
