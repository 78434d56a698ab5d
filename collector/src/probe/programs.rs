//! What the kernel counts about each loaded program: its `recursion_misses`.
//!
//! A program's run is skipped, not delayed, when the same program (fentry/fexit, raw
//! tracepoints since 6.2) or any kprobe/tracepoint program is already running on that CPU:
//! on preemptible kernels (PREEMPT_RT, full or lazy preemption) a task preempted inside a
//! program, or a softirq that interrupts one, makes the next run on that CPU a miss. The
//! kernel counts misses per program in `bpf_prog_info.recursion_misses` (kernel 5.12+;
//! kprobe and tracepoint programs only since 6.7). A miss may be a lost connection (its
//! hook did not run) or nothing (a state change that reports nothing): possible loss.

use std::os::fd::{AsFd, AsRawFd};

use aya::{Ebpf, programs::ProgramFd};

/// `BPF_OBJ_GET_INFO_BY_FD` (uapi/linux/bpf.h).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `offsetof(struct bpf_prog_info, recursion_misses)`; the field ends the 216 bytes asked for.
const RECURSION_MISSES_OFFSET: usize = 208;
const INFO_LEN: usize = RECURSION_MISSES_OFFSET + 8;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Descriptors of the object's programs, kept so their counts can be read until the end
/// (the last statistics come after the probes are detached).
pub struct ProgramCounts {
    programs: Vec<ProgramFd>,
}

impl ProgramCounts {
    /// Every loaded program of the object (the attached family's); one whose descriptor
    /// cannot be duplicated is left out, and says so.
    pub fn of(ebpf: &Ebpf) -> Self {
        let mut programs = Vec::new();
        for (name, program) in ebpf.programs() {
            // The other families' programs are never loaded: nothing to count.
            let Ok(fd) = program.fd() else { continue };
            match fd.try_clone() {
                Ok(fd) => programs.push(fd),
                Err(e) => {
                    tracing::warn!(program = name, error = %e, "Cannot keep the program's descriptor; its recursion misses are not counted.");
                }
            }
        }
        Self { programs }
    }

    /// Sum of every program's recursion misses; `None` when the kernel does not count
    /// them (before 5.12).
    pub fn recursion_misses(&self) -> Option<u64> {
        let mut total = None;
        for fd in &self.programs {
            if let Some(misses) = recursion_misses(fd) {
                *total.get_or_insert(0) += misses;
            }
        }
        total
    }
}

/// One program's count, read with `BPF_OBJ_GET_INFO_BY_FD`.
fn recursion_misses(fd: &ProgramFd) -> Option<u64> {
    let mut info = [0u8; INFO_LEN];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` names a buffer of `info_len` bytes that outlives the call; the kernel
    // writes at most that many bytes and updates `info_len` to what it filled.
    let done = unsafe { super::sys::bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    if done.is_err() || (attr.info_len as usize) < INFO_LEN {
        return None;
    }
    let bytes = info[RECURSION_MISSES_OFFSET..INFO_LEN].try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}
