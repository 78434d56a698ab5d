//! Reads of kernel memory at offsets user space found in BTF.
//!
//! Two ways, behind [`Reader`], so the code that walks the kernel's structs is written
//! once and compiled twice (everything is `#[inline(always)]`):
//! - [`Probe`]: `bpf_probe_read_kernel`, on any address. Every program type has it.
//! - [`Direct`]: plain loads from the typed (BTF) pointers a BTF-enabled program gets as
//!   its arguments and from `bpf_get_current_task_btf()`. The verifier turns each into a
//!   fault-safe load (a fault gives 0) of about a nanosecond, where the helper costs tens.
//!   It accepts one only at an offset it knows, landing on a member of the pointer's
//!   BTF type: the offsets come from `CONFIG`, a frozen read-only map whose values the
//!   verifier reads as constants, and a field beyond the pointer's type (`tcp_sock`'s,
//!   `inet_sock`'s) is read through the pointer [`Reader::tcp_sock`] gives.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
    bpf_get_current_uid_gid, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    generated::{bpf_get_current_task_btf, bpf_skc_to_tcp_sock, bpf_task_pt_regs},
};

use crate::maps::config;

/// How a program reads kernel memory (see the module's comment). Addresses are `u64`s;
/// for [`Direct`] they must be the verifier's typed pointers plus constant offsets.
pub trait Reader {
    /// Whether reads are plain loads: callers then read each field on its own instead
    /// of copying a run of them with one helper call.
    const DIRECT: bool;

    /// A `T` (an integer of 1, 2, 4 or 8 bytes, naturally aligned in the kernel) at
    /// `base + offset`. `base` is a kernel address.
    fn kernel<T: Copy>(base: u64, offset: u32) -> Result<T, i64>;

    /// The current task's `task_struct`.
    fn current_task() -> u64;

    /// The `tcp_sock` of the TCP socket `sk`, through which fields beyond `struct sock`
    /// are read (0 if `sk` is not a full TCP socket; reads from it then fail).
    fn tcp_sock(sk: u64) -> u64;

    // The current task's ids, each given `task` = [`Reader::current_task`], read once
    // per program run: a `Direct` reader loads them from it, where each helper would be
    // a call (tens of ns each with the return thunks of today's CPU mitigations; on
    // 6.18 `bpf_get_current_task_btf` is one too: perf samples land in its body); a
    // `Probe` reader calls the helper (one call, where its reads would be several).

    /// What `bpf_get_current_pid_tgid()` returns: the thread's id in the low half, its
    /// process's in the high half.
    #[inline(always)]
    fn pid_tgid(_task: u64) -> u64 {
        bpf_get_current_pid_tgid()
    }

    /// What `bpf_get_current_uid_gid()` returns: the uid in the low half, the gid in the
    /// high half.
    #[inline(always)]
    fn uid_gid(_task: u64) -> u64 {
        bpf_get_current_uid_gid()
    }

    /// What `bpf_get_current_cgroup_id()` returns: the id of the task's cgroup v2
    /// (unified hierarchy) cgroup.
    #[inline(always)]
    fn cgroup_id(_task: u64) -> u64 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_get_current_cgroup_id() }
    }

    /// The user registers the current task `task` saved on kernel entry.
    #[inline(always)]
    fn pt_regs(_task: u64) -> u64 {
        Self::current_pt_regs()
    }

    /// The user registers the current task saved on kernel entry.
    #[inline(always)]
    fn current_pt_regs() -> u64 {
        // SAFETY: the helpers take the current task's BTF pointer and return its pt_regs
        // (typed: a Direct reader loads from it).
        unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
    }

    /// 16 bytes at `base + offset` (an IPv6 address, 8-byte aligned in the kernel).
    #[inline(always)]
    fn words16(base: u64, offset: u32) -> Result<[u64; 2], i64> {
        Ok([Self::kernel(base, offset)?, Self::kernel(base, offset + 8)?])
    }
}

/// `bpf_probe_read_kernel` (see the module's comment).
pub struct Probe;

impl Reader for Probe {
    const DIRECT: bool = false;

    #[inline(always)]
    fn kernel<T: Copy>(base: u64, offset: u32) -> Result<T, i64> {
        kernel(base, offset)
    }

    #[inline(always)]
    fn current_task() -> u64 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_get_current_task() }
    }

    #[inline(always)]
    fn tcp_sock(sk: u64) -> u64 {
        // `tcp_sock` starts with its `struct sock`.
        sk
    }

    #[inline(always)]
    fn words16(base: u64, offset: u32) -> Result<[u64; 2], i64> {
        kernel(base, offset)
    }
}

/// Plain loads from typed pointers (see the module's comment): BTF-enabled programs only.
pub struct Direct;

impl Reader for Direct {
    const DIRECT: bool = true;

    #[inline(always)]
    fn kernel<T: Copy>(base: u64, offset: u32) -> Result<T, i64> {
        if base == 0 {
            return Err(-1);
        }
        // SAFETY: the verifier makes this a fault-safe load (PROBE_MEM) after checking
        // the offset lands on a member of `base`'s BTF type; volatile, so LLVM keeps it
        // one load of exactly `T`'s size at that offset.
        Ok(unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) })
    }

    #[inline(always)]
    fn current_task() -> u64 {
        // SAFETY: a helper without arguments (5.11+; tracing programs have it).
        unsafe { bpf_get_current_task_btf() as u64 }
    }

    /// `task->pid` and `task->tgid`, as the helper reads them.
    #[inline(always)]
    fn pid_tgid(task: u64) -> u64 {
        // Two loads: the verifier refuses one 8-byte load across the two members.
        let pid = Self::kernel::<u32>(task, config!(offsets.task_pid)).unwrap_or(0);
        let tgid = Self::kernel::<u32>(task, config!(offsets.task_tgid)).unwrap_or(0);
        (tgid as u64) << 32 | pid as u64
    }

    /// `task->cred->uid`, `->gid`, as the helper reads them.
    #[inline(always)]
    fn uid_gid(task: u64) -> u64 {
        let Ok(cred) = Self::kernel::<u64>(task, config!(offsets.task_cred)) else {
            // Never for the current task; the helper rather than uid 0 if it were.
            return bpf_get_current_uid_gid();
        };
        let uid = Self::kernel::<u32>(cred, config!(offsets.cred_uid)).unwrap_or(0);
        let gid = Self::kernel::<u32>(cred, config!(offsets.cred_gid)).unwrap_or(0);
        (gid as u64) << 32 | uid as u64
    }

    /// `task->cgroups->dfl_cgrp->kn->id`, as the helper reads it.
    #[inline(always)]
    fn cgroup_id(task: u64) -> u64 {
        Self::kernel::<u64>(task, config!(offsets.task_cgroups))
            .and_then(|css_set| Self::kernel::<u64>(css_set, config!(offsets.css_set_dfl_cgrp)))
            .and_then(|cgroup| Self::kernel::<u64>(cgroup, config!(offsets.cgroup_kn)))
            .and_then(|kn| Self::kernel::<u64>(kn, config!(offsets.kernfs_node_id)))
            .unwrap_or(0)
    }

    #[inline(always)]
    fn pt_regs(task: u64) -> u64 {
        // SAFETY: `task` is the current task's typed pointer.
        unsafe { bpf_task_pt_regs(task as *mut _) as u64 }
    }

    #[inline(always)]
    fn tcp_sock(sk: u64) -> u64 {
        // SAFETY: `sk` is the program's typed socket argument (5.9+: checks the socket
        // is a full TCP one).
        unsafe { bpf_skc_to_tcp_sock(sk as *mut core::ffi::c_void) as u64 }
    }
}

/// Reads a `T` at `base + offset` with `bpf_probe_read_kernel`. `base` is a kernel address.
#[inline(always)]
pub fn kernel<T>(base: u64, offset: u32) -> Result<T, i64> {
    if base == 0 {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).map_err(|e| e as i64) }
}

/// Reads a kernel pointer at `base + offset`.
#[inline(always)]
pub fn pointer(base: u64, offset: u32) -> Result<u64, i64> {
    let value: u64 = kernel(base, offset)?;
    if value == 0 { Err(-1) } else { Ok(value) }
}

/// Copies `dst.len()` bytes at `base + offset`.
#[inline(always)]
pub fn kernel_buf(base: u64, offset: u32, dst: &mut [u8]) -> Result<(), i64> {
    if base == 0 {
        return Err(-1);
    }
    // SAFETY: as above.
    unsafe {
        bpf_probe_read_kernel_buf((base + offset as u64) as *const u8, dst).map_err(|e| e as i64)
    }
}
