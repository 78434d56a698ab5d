//! The UDP flow sweep: not attached to any hook. User space runs it with
//! `BPF_PROG_TEST_RUN` (raw tracepoint programs, kernel 5.10+), once per flow whose window
//! is long over, so the bytes are taken with the same atomic exchange the programs use
//! (user space's map syscalls can only copy a value, not exchange a field in it).

use core::ffi::c_void;

use aya_ebpf::programs::RawTracePointContext;
use egress_shared::{FLOW_KEY_WORDS, FlowKey};

use crate::emit;

/// hook: none (run by user space). Arguments: the `FlowKey` as six words, then the age
/// (ns) a flow's window must have reached to be swept. Returns an
/// `egress_shared::flow::sweep` value. Written out rather than with `#[raw_tracepoint]`,
/// whose wrapper returns 0 whatever the function returns.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/udp_flow_sweep")]
pub fn udp_flow_sweep(ctx: *mut c_void) -> u32 {
    let ctx = RawTracePointContext::new(ctx);
    // Constant offsets: the verifier refuses a context read at a variable one.
    let key = FlowKey::from_words([
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3),
        ctx.arg::<u64>(4),
        ctx.arg::<u64>(5),
    ]);
    emit::sweep_flow(&key, ctx.arg::<u64>(FLOW_KEY_WORDS))
}
