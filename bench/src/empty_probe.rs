//! Programs that return at once, attached where the collector's DNS receive hooks are
//! (kprobe + kretprobe, or fexit, on udp_recvmsg, udpv6_recvmsg, tcp_recvmsg): the floor
//! under ours in `dns-cost-vm`, what dispatch and bpf_stats' clock reads cost a program
//! that does nothing on the same hook. Two instructions loaded with bpf(2) directly (no
//! object file, no compiler in the guest: bpftrace, the floor on the host, would need
//! LLVM there), then attached through aya.

use std::{
    borrow::Cow,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, bail};
use aya::programs::{
    BtfTracePoint, FExit, KProbe, ProbeKind, RawTracePoint, TracePoint, loaded_programs,
};
use aya_obj::{
    btf::BtfKind,
    generated::{bpf_attach_type, bpf_prog_type},
};

/// The collector's DNS receive functions (collector/src/probe/attach.rs, `DNS_RECEIVES`).
pub const DNS_RECEIVES: [&str; 3] = ["udp_recvmsg", "udpv6_recvmsg", "tcp_recvmsg"];

/// The attached programs; dropping them detaches and unloads.
pub struct EmptyPrograms {
    _kprobes: Vec<KProbe>,
    _fexits: Vec<FExit>,
}

/// Attaches empty programs on [`DNS_RECEIVES`] the way the collector's `probe` family
/// does: `kprobe` (a kretprobe and a kprobe per function) or `fentry` (an fexit each).
pub fn attach(probe: &str) -> anyhow::Result<EmptyPrograms> {
    let (mut kprobes, mut fexits) = (Vec::new(), Vec::new());
    match probe {
        "kprobe" => {
            for kind in [ProbeKind::Return, ProbeKind::Entry] {
                for function in DNS_RECEIVES {
                    let fd = load(bpf_prog_type::BPF_PROG_TYPE_KPROBE, None, "empty_kprobe")?;
                    let info = info_of(&fd)?;
                    // SAFETY: the program was loaded as BPF_PROG_TYPE_KPROBE just above.
                    let mut program = unsafe {
                        KProbe::from_program_info(info, Cow::Borrowed("empty_kprobe"), kind)
                    }?;
                    program
                        .attach(function, 0)
                        .with_context(|| format!("an empty kprobe on {function}"))?;
                    kprobes.push(program);
                }
            }
        }
        "fentry" => {
            let btf = aya::Btf::from_sys_fs().context("kernel BTF")?;
            for function in DNS_RECEIVES {
                let id = btf.id_by_type_name_kind(function, BtfKind::Func)?;
                let fd = load(
                    bpf_prog_type::BPF_PROG_TYPE_TRACING,
                    Some(id),
                    "empty_fexit",
                )?;
                let info = info_of(&fd)?;
                // SAFETY: loaded as BPF_PROG_TYPE_TRACING, BPF_TRACE_FEXIT, on `function`.
                let mut program =
                    unsafe { FExit::from_program_info(info, Cow::Borrowed("empty_fexit")) }?;
                program
                    .attach()
                    .with_context(|| format!("an empty fexit on {function}"))?;
                fexits.push(program);
            }
        }
        other => bail!("no empty programs for the {other:?} family (kprobe or fentry)"),
    }
    Ok(EmptyPrograms {
        _kprobes: kprobes,
        _fexits: fexits,
    })
}

/// Empty programs where the collector's default TCP path runs in tracepoint mode on
/// x86_64: the BTF-enabled raw tracepoint `inet_sock_set_state` (each of a connection's
/// ~10 state changes; the raw tracepoint where that is refused, as the collector falls
/// back) and the tracepoint `syscalls:sys_exit_connect` (each connect(); elsewhere the
/// collector also has `sys_enter_connect`, not counted here). The floor
/// under ours in `kernel-cost`: what dispatch and bpf_stats' clock reads cost programs
/// that do nothing on the same hooks, the same number of times.
pub struct EmptyStateHooks {
    _state: StateProgram,
    _connect_exit: TracePoint,
}

/// The state-change program, as the collector chooses it: BTF-enabled where the kernel
/// allows, else the raw tracepoint.
/// Held, never read: dropping it detaches.
enum StateProgram {
    Btf { _program: BtfTracePoint },
    Raw { _program: RawTracePoint },
}

/// Attaches [`EmptyStateHooks`].
pub fn attach_state_hooks() -> anyhow::Result<EmptyStateHooks> {
    let state = match attach_btf_state() {
        Ok(program) => StateProgram::Btf { _program: program },
        Err(btf_refused) => {
            let fd = load_for(
                bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT,
                None,
                "empty_raw_tp",
            )?;
            let mut program =
                RawTracePoint::from_program_info(info_of(&fd)?, Cow::Borrowed("empty_raw_tp"))?;
            program.attach("inet_sock_set_state").with_context(|| {
                format!("an empty raw tracepoint on inet_sock_set_state (the BTF-enabled one: {btf_refused:#})")
            })?;
            StateProgram::Raw { _program: program }
        }
    };
    let fd = load_for(bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT, None, "empty_tp")?;
    let mut connect_exit = TracePoint::from_program_info(info_of(&fd)?, Cow::Borrowed("empty_tp"))?;
    connect_exit
        .attach("syscalls", "sys_exit_connect")
        .context("an empty tracepoint on syscalls:sys_exit_connect")?;
    Ok(EmptyStateHooks {
        _state: state,
        _connect_exit: connect_exit,
    })
}

fn attach_btf_state() -> anyhow::Result<BtfTracePoint> {
    let btf = aya::Btf::from_sys_fs().context("kernel BTF")?;
    let typedef = btf.id_by_type_name_kind("btf_trace_inet_sock_set_state", BtfKind::Typedef)?;
    let fd = load_for(
        bpf_prog_type::BPF_PROG_TYPE_TRACING,
        Some((bpf_attach_type::BPF_TRACE_RAW_TP, typedef)),
        "empty_tp_btf",
    )?;
    // SAFETY: loaded as BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP, on that tracepoint.
    let mut program =
        unsafe { BtfTracePoint::from_program_info(info_of(&fd)?, Cow::Borrowed("empty_tp_btf")) }?;
    program
        .attach()
        .context("an empty BTF-enabled raw tracepoint on inet_sock_set_state")?;
    Ok(program)
}

/// `r0 = 0; exit`, loaded with BPF_PROG_LOAD; `fexit_of`: the BTF id of the function an
/// fexit program is for.
fn load(prog_type: bpf_prog_type, fexit_of: Option<u32>, name: &str) -> anyhow::Result<OwnedFd> {
    load_for(
        prog_type,
        fexit_of.map(|id| (bpf_attach_type::BPF_TRACE_FEXIT, id)),
        name,
    )
}

/// As [`load`], for any attach type: `attach_to`, the expected attach type and the BTF id
/// of what the program is for (a function, or a BTF-enabled tracepoint's typedef).
fn load_for(
    prog_type: bpf_prog_type,
    attach_to: Option<(bpf_attach_type, u32)>,
    name: &str,
) -> anyhow::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    // struct bpf_insn: code, dst/src registers, offset, immediate (little endian).
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    // union bpf_attr, the BPF_PROG_LOAD part, by offset (include/uapi/linux/bpf.h).
    let mut attr = [0u8; 120];
    let put32 = |attr: &mut [u8; 120], at: usize, v: u32| {
        attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    };
    let put64 = |attr: &mut [u8; 120], at: usize, v: u64| {
        attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    };
    put32(&mut attr, 0, prog_type as u32);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    let bytes = name.as_bytes();
    attr[48..48 + bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
    if let Some((attach_type, btf_id)) = attach_to {
        put32(&mut attr, 68, attach_type as u32);
        put32(&mut attr, 108, btf_id);
    }
    // SAFETY: bpf(2) reads `size` bytes of attr; the pointers in it outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("loading {name}"));
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's description of the program behind `fd` (its id read from fdinfo).
fn info_of(fd: &OwnedFd) -> anyhow::Result<aya::programs::ProgramInfo> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let id: u32 = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no prog_id in fdinfo")?;
    loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == id)
        .context("the program just loaded is not listed")
}
