//! Fault injection for the shutdown tests: `EGRESS_TEST_HANG=<stage>[,<stage>…]` makes the
//! named stage hang for good where it would otherwise return during shutdown, so a test can
//! prove the collector still exits within its deadline with its statistics line. Stages:
//! `enrich` (the enrichment thread), `stdout` (the stdout writer thread) and `shutdown`
//! (the main thread, right after the probes are detached). `EGRESS_TEST_SLOW=detach:<secs>`
//! makes detaching the probes take that much longer (a slow kernel); `enrich:<secs>` holds
//! each batch that long before it is enriched (a lagging enrichment).
//! `EGRESS_TEST_REFUSE_TP_BTF=1` refuses the BTF-enabled state-change program (the raw
//! tracepoint's fallback); `=raw` refuses the raw tracepoint too (the tracepoint's).
//! `EGRESS_TEST_NO_EXIT_REGS=1` leaves the syscall arguments unread at the syscalls'
//! exits, so the tracepoint family's entry hooks save them, as on kernels before 5.15 or
//! off x86_64. A test hook, not a setting:
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

/// `EGRESS_TEST_NO_FETCHING_ATOMICS=1` makes the programs take the rate limit's path for
/// kernels before 5.12 (no atomic exchange), so the flood test runs it on this kernel too.
pub fn without_fetching_atomics() -> bool {
    flag(
        "EGRESS_TEST_NO_FETCHING_ATOMICS",
        "the rate limit takes its pre-5.12 path",
    )
}

/// `EGRESS_TEST_PRECISE_DECISIONS=1` makes the rate limit and the identity cache go by
/// the precise clock, as where the kernel's tick cannot be read, so the flood test runs
/// that path on this kernel too.
pub fn precise_decisions() -> bool {
    flag(
        "EGRESS_TEST_PRECISE_DECISIONS",
        "the rate limit and the identity cache read the precise clock",
    )
}

/// `EGRESS_TEST_ONE_BUCKET_SLOT=1` folds every cgroup onto one of the rate limit's
/// bucket slots, so a test sees cgroups collide there (all but the slot's keep their
/// buckets in the LRU map) and an idle cgroup's slot claimed by another.
pub fn one_bucket_slot() -> bool {
    flag(
        "EGRESS_TEST_ONE_BUCKET_SLOT",
        "every cgroup shares one rate-limit bucket slot",
    )
}

/// `EGRESS_TEST_ONE_IDENTITY_SLOT=1` folds every process onto one of the identity
/// cache's slots, so a test sees processes collide there (all but the slot's holder keep
/// their identities in the LRU map) and take the slot from each other.
pub fn one_identity_slot() -> bool {
    flag(
        "EGRESS_TEST_ONE_IDENTITY_SLOT",
        "every process shares one identity cache slot",
    )
}

/// `EGRESS_TEST_ONE_REPEAT_SLOT=1` folds every aggregate onto one of the aggregation's
/// repeat slots per CPU, so a test sees aggregates collide there (the slot holds one,
/// the others count in the map) and a slot left to another key only once its window was
/// read.
pub fn one_repeat_slot() -> bool {
    flag(
        "EGRESS_TEST_ONE_REPEAT_SLOT",
        "every aggregate shares one repeat slot per CPU",
    )
}

/// `EGRESS_TEST_SKIP_COMPLETIONS_TO_PORT=<port>`: the programs skip the completion of
/// every reported TCP attempt to that destination port, as the kernel skips a program run
/// that would nest in another on one CPU, so a test proves such an attempt is still
/// reported (as `unknown` when its socket's address is reused, else as `pending`). 0 when
/// unset or not a port.
pub fn skip_completions_to_port() -> u32 {
    let Some(port) = std::env::var("EGRESS_TEST_SKIP_COMPLETIONS_TO_PORT")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|port| *port != 0)
    else {
        return 0;
    };
    tracing::warn!(
        port,
        "EGRESS_TEST_SKIP_COMPLETIONS_TO_PORT: the completions of attempts to this port are skipped (test hook)."
    );
    u32::from(port)
}

/// Whether the test hook `name` is set to 1; warned with `effect` when it is.
fn flag(name: &str, effect: &str) -> bool {
    let set = std::env::var_os(name).is_some_and(|v| v == "1");
    if set {
        tracing::warn!("{name}: {effect} (test hook).");
    }
    set
}

/// `EGRESS_TEST_DNS_READ_EXITS=1` reads DNS answers at the syscall exits (read, recvfrom,
/// recvmsg) where `sock_recv_length` would take them, so a test proves that way still
/// works (kernels without the tracepoint).
pub fn dns_read_exits() -> bool {
    flag(
        "EGRESS_TEST_DNS_READ_EXITS",
        "DNS answers at the syscall exits",
    )
}

/// `EGRESS_TEST_REFUSE_TP_BTF=1` (or `=raw`) makes the BTF-enabled state-change program
/// count as refused, so a test proves the raw tracepoint still takes over where it is.
pub fn refuse_tp_btf() -> bool {
    refused_state_hook(&["1", "raw"], "the BTF-enabled state-change program")
}

/// `EGRESS_TEST_REFUSE_TP_BTF=raw` refuses the raw state-change program as well, so a test
/// proves the tracepoint (kernels that refuse raw tracepoints) takes over.
pub fn refuse_raw_state() -> bool {
    refused_state_hook(&["raw"], "the raw state-change program")
}

/// Whether `EGRESS_TEST_REFUSE_TP_BTF` is one of `values` (warned: `program` is then not
/// attached).
fn refused_state_hook(values: &[&str], program: &str) -> bool {
    let set =
        std::env::var("EGRESS_TEST_REFUSE_TP_BTF").is_ok_and(|v| values.contains(&v.as_str()));
    if set {
        tracing::warn!("EGRESS_TEST_REFUSE_TP_BTF: {program} is not attached (test hook).");
    }
    set
}

/// `EGRESS_TEST_NO_EXIT_REGS=1`: the syscall exits do not read the arguments back from
/// the task's saved registers, so the entry hooks that save them run (the path of kernels
/// before 5.15 and of other architectures), and a test proves it on this kernel too.
pub fn without_exit_regs() -> bool {
    static SET: OnceLock<bool> = OnceLock::new();
    *SET.get_or_init(|| {
        flag(
            "EGRESS_TEST_NO_EXIT_REGS",
            "syscall arguments are saved by entry hooks",
        )
    })
}

/// Sleeps for the seconds `EGRESS_TEST_SLOW` gives `stage` (`<stage>:<secs>`), if any.
pub fn slow_if(stage: &str) {
    let Ok(value) = std::env::var("EGRESS_TEST_SLOW") else {
        return;
    };
    for item in value.split(',') {
        if let Some((name, secs)) = item.trim().split_once(':')
            && name == stage
            && let Ok(secs) = secs.parse::<u64>()
        {
            tracing::warn!(
                stage,
                secs,
                "EGRESS_TEST_SLOW: this stage is slowed down (test hook)."
            );
            std::thread::sleep(std::time::Duration::from_secs(secs));
        }
    }
}
