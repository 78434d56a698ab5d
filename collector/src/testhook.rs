//! Fault injection for the shutdown tests: `EGRESS_TEST_HANG=<stage>[,<stage>…]` makes the
//! named stage hang for good where it would otherwise return during shutdown, so a test can
//! prove the collector still exits within its deadline with its statistics line. Stages:
//! `enrich` (the enrichment thread), `stdout` (the stdout writer thread) and `shutdown`
//! (the main thread, right after the probes are detached). A test hook, not a setting:
//! docs/operations.md says so, and the collector warns when it is set.

use std::sync::OnceLock;

fn stages() -> &'static [String] {
    static STAGES: OnceLock<Vec<String>> = OnceLock::new();
    STAGES.get_or_init(|| {
        std::env::var("EGRESS_TEST_HANG")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    })
}

/// Never returns when `stage` is named in `EGRESS_TEST_HANG`.
pub fn hang_if(stage: &str) {
    if stages().iter().any(|s| s == stage) {
        tracing::warn!(stage, "EGRESS_TEST_HANG: this stage now hangs (test hook).");
        loop {
            std::thread::park();
        }
    }
}
