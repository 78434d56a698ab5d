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
