//! The programs' `UDP_FLOWS`, as the flow sweep (`events::flows`) reads and empties it:
//! the entries copied out with batch lookups, and the sweep of one flow done by the
//! `udp_flow_sweep` program (run with `BPF_PROG_TEST_RUN`), which takes the flow's bytes
//! with the same atomic exchange the programs use. The handle owns its own copy of the
//! program's fd, so the last sweep still runs after the hooks are detached.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{Array, MapData},
    programs::ProgramFd,
};
use egress_shared::{FLOW_KEY_WORDS, FlowKey, FlowState, flow::sweep};

use super::sys::{self, BPF_PROG_TEST_RUN, TestRunAttr};

/// `BPF_MAP_LOOKUP_BATCH` (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per batch lookup (the map holds 16,384).
const BATCH: usize = 1024;

/// The batch member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// What the sweep of one flow found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swept {
    /// Its window is not over long enough (or the entry is gone): nothing taken.
    Kept,
    /// Taken and deleted; its bytes belong to a window whose record was dropped in the
    /// kernel (excluded, rate-limited, an aggregate's repeat): not reported.
    Unreported,
    /// Taken and deleted: the payload bytes the flow sent after its reported record.
    Reported(u64),
}

/// A sweep syscall failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("batch lookup of UDP_FLOWS: {0}")]
    Lookup(#[source] std::io::Error),
    #[error("running udp_flow_sweep: {0}")]
    Run(#[source] std::io::Error),
    #[error("reading FLOW_SWEPT: {0}")]
    Swept(#[source] aya::maps::MapError),
}

/// `UDP_FLOWS`, `FLOW_SWEPT` and the sweep program.
pub struct FlowSweep {
    flows: MapData,
    swept: Array<MapData, u64>,
    program: ProgramFd,
}

impl FlowSweep {
    pub(super) fn new(flows: MapData, swept: Array<MapData, u64>, program: ProgramFd) -> Self {
        Self {
            flows,
            swept,
            program,
        }
    }

    /// Every entry, copied out a batch at a time. The map changes meanwhile: an entry
    /// may be missed or seen twice, which only moves its sweep to the next round.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>, SweepError> {
        let fd = self.flows.fd().as_fd().as_raw_fd() as u32;
        let mut found = Vec::new();
        let mut keys = vec![FlowKey::from_words([0; FLOW_KEY_WORDS]); BATCH];
        let mut values = vec![FlowState::default(); BATCH];
        // The hash map's batch token: a bucket index.
        let mut token = 0u32;
        let mut first = true;
        loop {
            let mut next = 0u32;
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &token as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: every pointer in `attr` outlives the call and holds `count` keys
            // and values of the map's sizes (FlowKey and FlowState, as the programs'),
            // or one bucket token.
            let error = unsafe { sys::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
            let got = (attr.count as usize).min(BATCH);
            match &error {
                None => {}
                // The last batch (its entries are valid).
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Some(_) => return Err(SweepError::Lookup(error.expect("an error"))),
            }
            found.extend(
                keys[..got]
                    .iter()
                    .copied()
                    .zip(values[..got].iter().copied()),
            );
            if error.is_some() {
                return Ok(found);
            }
            token = next;
            first = false;
        }
    }

    /// Sweeps `key` if its window started at least `min_age_ns` ago.
    pub fn sweep(&self, key: &FlowKey, min_age_ns: u64) -> Result<Swept, SweepError> {
        let mut args = [0u64; FLOW_KEY_WORDS + 1];
        args[..FLOW_KEY_WORDS].copy_from_slice(&key.to_words());
        args[FLOW_KEY_WORDS] = min_age_ns;
        let mut attr = TestRunAttr {
            prog_fd: self.program.as_fd().as_raw_fd() as u32,
            ctx_in: args.as_ptr() as u64,
            ctx_size_in: size_of_val(&args) as u32,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` names a loaded raw tracepoint program and an argument array
        // that outlives the call; the kernel writes only `retval`.
        unsafe { sys::bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(SweepError::Run)?;
        Ok(match attr.retval {
            sweep::KEPT => Swept::Kept,
            sweep::UNREPORTED => Swept::Unreported,
            sweep::IN_MAP => Swept::Reported(self.swept.get(&0, 0).map_err(SweepError::Swept)?),
            n => Swept::Reported(u64::from(n - sweep::BASE)),
        })
    }
}
