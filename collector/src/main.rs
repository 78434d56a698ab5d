//! Glue only: command line -> telemetry -> probes -> pipeline -> graceful shutdown.

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use egress_collector::{
    check,
    config::{Cli, Command, RunArgs},
    enrich::HostIdentity,
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-collector: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(mut args: RunArgs) -> anyhow::Result<()> {
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Configuration first: a bad setting fails before anything is loaded into the kernel.
    let env = |name: &str| std::env::var(name).ok();
    args.apply_capture_file().context("configuration")?;
    args.apply_enrich_file().context("configuration")?;
    let mut pipeline_settings = args.pipeline();
    pipeline_settings.otlp = args.otlp.settings(&env).context("configuration")?;
    pipeline_settings.stdout = args.stdout || pipeline_settings.otlp.is_none();
    let host = HostIdentity::detect(&args.probe.host_root);
    let self_telemetry = match &pipeline_settings.otlp {
        Some(otlp) if otlp.self_telemetry => Some(
            SelfTelemetry::new(otlp, &host.host_name, runtime.handle().clone())
                .context("configuration")?,
        ),
        _ => None,
    };
    egress_collector::telemetry::init_tracing(&args.log_level, self_telemetry.as_ref());
    let health_listener = args
        .health_address
        .map(egress_collector::health::bind)
        .transpose()?;
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let probes = Probes::attach(&args.probe.settings()).context("attaching probes")?;
        pipeline::run(probes, host, pipeline_settings, health_listener, shutdown).await?;
        Ok(())
    });
    if let Some(telemetry) = self_telemetry {
        // After the pipeline, so its last log lines go out too; the runtime still runs.
        telemetry.shutdown(Duration::from_secs(5));
    }
    result
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
/// first wait must not kill the process unflushed); the future completes on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            tracing::error!("Cannot listen for SIGTERM/SIGINT; stop the collector with SIGKILL.");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down."),
            _ = int.recv() => tracing::info!("SIGINT: shutting down."),
        }
    }
}
