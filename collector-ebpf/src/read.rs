//! Reads of kernel memory at offsets user space found in BTF.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};

/// Reads a `T` at `base + offset`. `base` is a kernel address.
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
