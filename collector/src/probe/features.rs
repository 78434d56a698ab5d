//! Instructions the kernel's verifier accepts, probed by loading a tiny program.

use std::os::fd::{FromRawFd, OwnedFd};

/// `BPF_PROG_LOAD` and `BPF_PROG_TYPE_SOCKET_FILTER` (uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// The first fields of the `prog_load` member of `union bpf_attr`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
}

/// One BPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
pub(super) const fn insn(code: u8, regs: u8, off: i16, imm: i32) -> u64 {
    (code as u64) | ((regs as u64) << 8) | ((off as u16 as u64) << 16) | ((imm as u32 as u64) << 32)
}

/// Whether the verifier accepts a 64-bit atomic exchange (`BPF_XCHG`; it came in 5.12
/// with `BPF_CMPXCHG` and the fetching atomics, which the rate limit also uses). Kernels before 5.12 refuse the instruction
/// ("BPF_XADD uses reserved fields"). A refusal for any other reason also answers false:
/// the programs then take their older path, which every kernel verifies.
pub fn fetching_atomics() -> bool {
    // BPF_DW | BPF_STX | BPF_ATOMIC; BPF_XCHG = 0xe0 | BPF_FETCH.
    const STX_ATOMIC_DW: u8 = 0x18 | 0x03 | 0xc0;
    const BPF_XCHG: i32 = 0xe0 | 0x01;
    let program = [
        insn(0xb7, 0x01, 0, 0),                  // r1 = 0
        insn(0x7b, 0x1a, -8, 0),                 // *(u64 *)(r10 - 8) = r1
        insn(STX_ATOMIC_DW, 0x1a, -8, BPF_XCHG), // r1 = xchg(r10 - 8, r1)
        insn(0xb7, 0x00, 0, 0),                  // r0 = 0
        insn(0x95, 0x00, 0, 0),                  // exit
    ];
    loads(BPF_PROG_TYPE_SOCKET_FILTER, &program)
}

/// `BPF_PROG_TYPE_TRACEPOINT`; helper ids `bpf_get_current_task_btf` (5.11) and
/// `bpf_task_pt_regs` (5.15).
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_FUNC_GET_CURRENT_TASK_BTF: i32 = 158;
const BPF_FUNC_TASK_PT_REGS: i32 = 175;

/// Whether a tracepoint program may call `bpf_task_pt_regs(bpf_get_current_task_btf())`
/// (5.15+): how connect()'s exit reads back its arguments without an entry hook.
pub fn task_pt_regs() -> bool {
    let program = [
        insn(0x85, 0x00, 0, BPF_FUNC_GET_CURRENT_TASK_BTF), // r0 = bpf_get_current_task_btf()
        insn(0xbf, 0x01, 0, 0),                             // r1 = r0
        insn(0x85, 0x00, 0, BPF_FUNC_TASK_PT_REGS),         // r0 = bpf_task_pt_regs(r1)
        insn(0xb7, 0x00, 0, 0),                             // r0 = 0
        insn(0x95, 0x00, 0, 0),                             // exit
    ];
    loads(BPF_PROG_TYPE_TRACEPOINT, &program)
}

fn loads(prog_type: u32, program: &[u64]) -> bool {
    load(prog_type, program).is_ok()
}

/// Loads `program` as a `prog_type` program: its descriptor, or why the kernel refused it.
pub(super) fn load(prog_type: u32, program: &[u64]) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
    };
    // SAFETY: `attr` points to the instructions and the licence string, which outlive the
    // call; the kernel reads `size_of::<ProgLoadAttr>()` bytes and treats the rest as zero.
    let fd = unsafe { super::sys::bpf(BPF_PROG_LOAD, &mut attr) }?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    /// The host's 6.18 has both helpers (5.15+).
    #[test]
    fn this_kernel_has_task_pt_regs() {
        assert!(super::task_pt_regs());
    }

    /// Every kernel this is tested on (the host's 6.18, Debian's 6.1 and 6.12) is 5.12+,
    /// so the probe must say yes (the tests run as root, as the collector does).
    #[test]
    fn this_kernel_has_fetching_atomics() {
        assert!(super::fetching_atomics());
    }
}
