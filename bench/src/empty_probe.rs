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
use aya::programs::{FExit, KProbe, ProbeKind, loaded_programs};
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

/// `r0 = 0; exit`, loaded with BPF_PROG_LOAD; `fexit_of`: the BTF id of the function an
/// fexit program is for.
fn load(prog_type: bpf_prog_type, fexit_of: Option<u32>, name: &str) -> anyhow::Result<OwnedFd> {
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
    if let Some(btf_id) = fexit_of {
        put32(&mut attr, 68, bpf_attach_type::BPF_TRACE_FEXIT as u32);
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
