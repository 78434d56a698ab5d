//! Where records go: JSON lines on stdout (the embedded default while no endpoint is set)
//! and OTLP (`otlp`: a logs, a metrics and a connection-spans sink), with the attributes
//! they share. Every destination is a [`Sink`], and [`fan_out`] is the only place that
//! hands batches to them; a new output (a DNS-records stream, say) is one more sink.
//! Sinks report what happened through [`crate::telemetry::export::ExportTelemetry`]
//! (typed events, counted and logged in one place), never through the shared `Stats`.
//!
//! Public items: [`Sink`] (what every destination is) with its [`Feed`] and [`Running`],
//! [`Records`] (a batch as
//! every sink gets it: shared, never copied), [`fan_out`] (one queue per sink, fed from
//! enrichment's), [`ExportError`].

pub mod attributes;
pub mod otlp;
pub mod stdout;

use std::{future::Future, pin::Pin, sync::Arc};

use tokio::sync::mpsc;

use crate::enrich::Record;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing records failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A batch of records as every sink receives it: one allocation shared by all of them.
pub type Records = Arc<Vec<Record>>;

/// A sink's work, from its first batch to its flush.
pub type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How the fan-out hands batches to a sink.
pub enum Feed {
    /// Every batch; a full queue makes the fan-out (and so enrichment) wait.
    Every,
    /// A copy beside the sinks fed [`Feed::Every`]: a batch that finds the queue full is
    /// skipped and given to `skipped` (to count it); a sink that ended is fed no more.
    Copy { skipped: Box<dyn Fn(usize) + Send> },
}

/// A destination of records: stdout, OTLP logs, OTLP metrics, OTLP spans. Each runs on
/// its own (a task, or a thread for a blocking writer) and takes batches from its own
/// queue, fed by [`fan_out`].
pub trait Sink: Send {
    /// For logs.
    fn name(&self) -> &'static str;
    fn feed(&self) -> Feed;
    /// Takes batches from `input` until it closes, then flushes what it holds (within
    /// its own deadline); completes when done.
    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running;
}

/// Runs every sink and hands each batch of `input` to all of them (a reference each, no
/// copy); queues hold `capacity` batches. The handle completes when every sink is done.
/// A lone sink fed every batch takes `input` itself: no task in between to wake per batch.
pub fn fan_out(
    mut input: mpsc::Receiver<Records>,
    mut sinks: Vec<Box<dyn Sink>>,
    capacity: usize,
) -> tokio::task::JoinHandle<()> {
    if sinks.len() == 1
        && matches!(sinks[0].feed(), Feed::Every)
        && let Some(sink) = sinks.pop()
    {
        return tokio::spawn(sink.run(input));
    }
    struct Fed {
        to: Option<mpsc::Sender<Records>>,
        feed: Feed,
        name: &'static str,
    }
    let mut fed = Vec::with_capacity(sinks.len());
    let mut running = Vec::with_capacity(sinks.len());
    for sink in sinks {
        let (to, from) = mpsc::channel(capacity.max(1));
        fed.push(Fed {
            to: Some(to),
            feed: sink.feed(),
            name: sink.name(),
        });
        running.push(tokio::spawn(sink.run(from)));
    }
    tokio::spawn(async move {
        while let Some(batch) = input.recv().await {
            for sink in &mut fed {
                let Some(to) = &sink.to else { continue };
                match &sink.feed {
                    Feed::Every => {
                        if to.send(Arc::clone(&batch)).await.is_err() {
                            tracing::debug!(sink = sink.name, "A sink stopped taking records.");
                            sink.to = None;
                        }
                    }
                    Feed::Copy { skipped } => match to.try_send(Arc::clone(&batch)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(batch)) => skipped(batch.len()),
                        // The sink ended (stdout's reader went away; it said so once).
                        Err(mpsc::error::TrySendError::Closed(_)) => sink.to = None,
                    },
                }
            }
            // Every sink fed `Every` is gone: nothing takes records any more.
            if fed
                .iter()
                .all(|s| s.to.is_none() || matches!(s.feed, Feed::Copy { .. }))
                && fed.iter().any(|s| matches!(s.feed, Feed::Every))
            {
                break;
            }
        }
        drop(fed);
        for sink in running {
            let _ = sink.await;
        }
    })
}
