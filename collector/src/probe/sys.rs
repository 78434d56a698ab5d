//! The `bpf(2)` system call, for the few commands aya does not offer (feature probes,
//! program info, key walks, batch lookups, test runs).

/// `bpf(cmd, attr, size_of::<A>())`: the kernel's return value, or the error it set.
///
/// # Safety
/// `A` is the `union bpf_attr` layout `cmd` expects (the kernel reads `size_of::<A>()`
/// bytes and treats the rest as zero), and every pointer in `attr` is valid for what
/// the kernel reads or writes through it during the call.
pub(super) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's contract.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_PROG_TEST_RUN` (uapi/linux/bpf.h).
pub(super) const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The test-run member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
pub(super) struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}
