//! Loading and attaching one hook family's programs. Each family is all-or-nothing: a
//! failure unloads what the family had attached, so the next family starts clean.

use std::path::Path;

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};

use super::HookMode;
use crate::one_line;

/// A program and the kernel functions (or `category/name` tracepoints) it attaches to.
struct Attachment {
    program: &'static str,
    targets: &'static [&'static str],
}

const UDP_SEND: &[&str] = &["udp_sendmsg", "udpv6_sendmsg"];
const UDP_CONNECT: &[&str] = &["ip4_datagram_connect", "ip6_datagram_connect"];

/// Return probes first: an entry without its return would leave state behind.
const KPROBES: &[Attachment] = &[
    Attachment {
        program: "kretprobe_udp",
        targets: &[
            "udp_sendmsg",
            "udpv6_sendmsg",
            "ip4_datagram_connect",
            "ip6_datagram_connect",
        ],
    },
    Attachment {
        program: "kprobe_udp_sendmsg",
        targets: UDP_SEND,
    },
    Attachment {
        program: "kprobe_udp_connect",
        targets: UDP_CONNECT,
    },
];

/// (program, kernel function, is fexit)
const FENTRIES: &[(&str, &str, bool)] = &[
    ("fexit_udp_sendmsg", "udp_sendmsg", true),
    ("fexit_udpv6_sendmsg", "udpv6_sendmsg", true),
    ("fexit_ip4_datagram_connect", "ip4_datagram_connect", true),
    ("fexit_ip6_datagram_connect", "ip6_datagram_connect", true),
];

/// Not attached where connect()'s exit reads its arguments back from the registers
/// (`ProbeConfig::regs_syscall_nr`): a TCP connect then runs one program, not two.
const CONNECT_ENTRY: &str = "tp_sys_enter_connect";
/// Not attached where the sends' exit reads their arguments back from the registers
/// (`ProbeConfig::regs_sendto_addr`): every send on the host (TCP's, unix sockets')
/// then runs one program, and saves no call state.
const SEND_ENTRIES: [&str; 3] = [
    "tp_sys_enter_sendto",
    "tp_sys_enter_sendmsg",
    "tp_sys_enter_sendmmsg",
];

/// Which syscall entry hooks the tracepoint family leaves out, their exits reading the
/// arguments back from the task's saved registers.
#[derive(Copy, Clone, Debug, Default)]
pub struct ExitsOnly {
    pub connect: bool,
    pub sends: bool,
}

impl ExitsOnly {
    pub fn of(config: &egress_shared::ProbeConfig) -> Self {
        Self {
            connect: config.regs_syscall_nr != 0,
            sends: config.regs_sendto_addr != 0,
        }
    }

    fn skips(self, program: &str) -> bool {
        (self.connect && program == CONNECT_ENTRY)
            || (self.sends && SEND_ENTRIES.contains(&program))
    }
}

/// Exits first, for the same reason as the return probes.
const TRACEPOINTS: &[Attachment] = &[
    Attachment {
        program: "tp_sys_exit",
        targets: &[
            "syscalls/sys_exit_sendto",
            "syscalls/sys_exit_sendmsg",
            "syscalls/sys_exit_sendmmsg",
        ],
    },
    Attachment {
        program: "tp_sys_exit_connect",
        targets: &["syscalls/sys_exit_connect"],
    },
    Attachment {
        program: CONNECT_ENTRY,
        targets: &["syscalls/sys_enter_connect"],
    },
    Attachment {
        program: "tp_sys_enter_sendto",
        targets: &["syscalls/sys_enter_sendto"],
    },
    Attachment {
        program: "tp_sys_enter_sendmsg",
        targets: &["syscalls/sys_enter_sendmsg"],
    },
    Attachment {
        program: "tp_sys_enter_sendmmsg",
        targets: &["syscalls/sys_enter_sendmmsg"],
    },
];

/// DNS answers (docs/dns.md), tracepoint family: syscall exits limited to descriptors
/// the send hooks marked. Where the syscall's arguments can be read back from the task's
/// saved registers (x86_64), the exits alone: one program run per read instead of two.
const DNS_EXITS: &[Attachment] = &[
    Attachment {
        program: "tp_dns_exit_read",
        targets: &["syscalls/sys_exit_read", "syscalls/sys_exit_recvfrom"],
    },
    Attachment {
        program: "tp_dns_exit_recvmsg",
        targets: &["syscalls/sys_exit_recvmsg"],
    },
];
/// The entries, where the registers cannot be read back: they save the arguments.
const DNS_ENTRIES: &[Attachment] = &[
    Attachment {
        program: "tp_dns_enter_read",
        targets: &["syscalls/sys_enter_read"],
    },
    Attachment {
        program: "tp_dns_enter_recvfrom",
        targets: &["syscalls/sys_enter_recvfrom"],
    },
    Attachment {
        program: "tp_dns_enter_recvmsg",
        targets: &["syscalls/sys_enter_recvmsg"],
    },
];

/// The kernel functions that receive a message on a socket the kprobe and fentry
/// families mark by address (AF_INET6 UDP sockets, IPv4-mapped peers included, never
/// reach udp_recvmsg).
const DNS_RECEIVES: &[&str] = &["udp_recvmsg", "udpv6_recvmsg", "tcp_recvmsg"];

/// kprobe family: the return probe first, as for the UDP hooks.
const DNS_KPROBES: &[Attachment] = &[
    Attachment {
        program: "kretprobe_dns_recvmsg",
        targets: DNS_RECEIVES,
    },
    Attachment {
        program: "kprobe_dns_recvmsg",
        targets: DNS_RECEIVES,
    },
];

/// fentry family: (program, kernel function); fexit alone has arguments and return.
const DNS_FEXITS: &[(&str, &str)] = &[
    ("fexit_dns_udp_recvmsg", "udp_recvmsg"),
    ("fexit_dns_udpv6_recvmsg", "udpv6_recvmsg"),
    ("fexit_dns_tcp_recvmsg", "tcp_recvmsg"),
];

/// Every DNS program, for unloading.
fn dns_programs() -> impl Iterator<Item = &'static str> {
    std::iter::once(DNS_SOCKET_RECEIVES).chain(
        DNS_EXITS
            .iter()
            .chain(DNS_ENTRIES)
            .chain(DNS_KPROBES)
            .map(|a| a.program)
            .chain(DNS_FEXITS.iter().map(|f| f.0)),
    )
}

/// Where the DNS programs read answers (see [`attach_dns`]), as the start-up line says.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DnsHook {
    /// `sock_recv_length`, BTF-enabled: socket receives only (tracepoint mode).
    SocketReceives,
    /// The exits of read, recvfrom and recvmsg (tracepoint mode; with their entries where
    /// the registers cannot be read back).
    SyscallExits,
    /// kprobes on the receive functions.
    Kprobes,
    /// fexits on the receive functions.
    Fexits,
}

impl DnsHook {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsHook::SocketReceives => "sock_recv_length",
            DnsHook::SyscallExits => "syscall_exits",
            DnsHook::Kprobes => "kprobes",
            DnsHook::Fexits => "fexits",
        }
    }
}

/// Attaches the DNS programs of `mode`; a failure is logged and DNS stays off
/// (connections are still captured). Returns where they read answers, if they run.
/// `exits_only`: tracepoint mode can read the syscall arguments back at exit.
/// `syscall_nr_known`: and the syscall's number (which the socket receives' program
/// needs to tell read, recvfrom and recvmsg apart). `iter_usable`: the kernel's message
/// iterator has the layout the kprobe and fentry programs read (6.0+).
pub fn attach_dns(
    ebpf: &mut Ebpf,
    mode: HookMode,
    btf: Option<&Btf>,
    (exits_only, syscall_nr_known): (bool, bool),
    iter_usable: bool,
) -> Option<DnsHook> {
    let result = match mode {
        HookMode::Tracepoint
            if exits_only && syscall_nr_known && attach_dns_receives(ebpf, btf) =>
        {
            Ok(DnsHook::SocketReceives)
        }
        HookMode::Tracepoint => {
            let entries: &[Attachment] = if exits_only { &[] } else { DNS_ENTRIES };
            DNS_EXITS
                .iter()
                .chain(entries)
                .try_for_each(|a| attach_tracepoint(ebpf, a))
                .map(|()| DnsHook::SyscallExits)
        }
        HookMode::Kprobe | HookMode::Fentry if !iter_usable => {
            tracing::warn!(%mode, "This kernel's message iterator has no ITER_UBUF (before 6.0): DNS capture needs --probe tracepoint here; connections will carry no server.address.");
            return None;
        }
        HookMode::Kprobe => DNS_KPROBES
            .iter()
            .try_for_each(|a| attach_kprobe(ebpf, a))
            .map(|()| DnsHook::Kprobes),
        HookMode::Fentry => {
            let fexits = match btf {
                Some(btf) => DNS_FEXITS.iter().try_for_each(|&(program, function)| {
                    attach_fexit(ebpf, btf, program, function)
                }),
                None => Err(AttachError::NoBtf),
            };
            match fexits {
                Ok(()) => Ok(DnsHook::Fexits),
                // A verifier that refuses the receive fexits (6.1 did until the copy's
                // length was bounded on the register the helper gets, docs/dns.md): the
                // same functions through kprobes then, where the kernel has them.
                Err(refused) if kernel_has_kprobes() => {
                    for &(program, _) in DNS_FEXITS {
                        unload(ebpf, program);
                    }
                    tracing::warn!(%mode, reason = %one_line(&refused), "The DNS receive fexits were refused; DNS answers go through kprobes on the same functions instead.");
                    DNS_KPROBES
                        .iter()
                        .try_for_each(|a| attach_kprobe(ebpf, a))
                        .map(|()| DnsHook::Kprobes)
                }
                Err(refused) => Err(refused),
            }
        }
    };
    match result {
        Ok(hook) => Some(hook),
        Err(e) => {
            tracing::warn!(%mode, reason = %one_line(&e), "DNS capture could not be attached; connections will carry no server.address.");
            for name in dns_programs() {
                unload(ebpf, name);
            }
            None
        }
    }
}

/// The DNS answers at the socket receives (`sock_recv_length`, BTF-enabled), in place of
/// the read exits, which every read(2) of every file on the node ran: whether they are
/// attached. Where the kernel lacks the tracepoint (or refuses the program), the exits
/// take over, as before.
fn attach_dns_receives(ebpf: &mut Ebpf, btf: Option<&Btf>) -> bool {
    const TARGET: &str = "sock_recv_length";
    let Some(btf) = btf else {
        return false;
    };
    if crate::testhook::dns_read_exits() {
        return false;
    }
    let err = AttachError::program(DNS_SOCKET_RECEIVES, TARGET);
    let result = ebpf
        .program_mut(DNS_SOCKET_RECEIVES)
        .ok_or(AttachError::Missing(DNS_SOCKET_RECEIVES))
        .and_then(|program| {
            let program: &mut BtfTracePoint = program.try_into().map_err(&err)?;
            program.load(TARGET, btf).map_err(&err)?;
            program.attach().map(drop).map_err(&err)
        });
    match result {
        Ok(()) => true,
        Err(e) => {
            unload(ebpf, DNS_SOCKET_RECEIVES);
            tracing::info!(reason = %one_line(&e), "No BTF-enabled sock_recv_length here: DNS answers are read at the exits of read, recvfrom and recvmsg instead.");
            false
        }
    }
}

/// See [`attach_dns_receives`].
const DNS_SOCKET_RECEIVES: &str = "tp_dns_sock_recv";

fn unload(ebpf: &mut Ebpf, name: &str) {
    let Some(program) = ebpf.program_mut(name) else {
        return;
    };
    // Unloading a program that was never loaded fails harmlessly.
    let _ = match program {
        aya::programs::Program::KProbe(p) => p.unload(),
        aya::programs::Program::FEntry(p) => p.unload(),
        aya::programs::Program::FExit(p) => p.unload(),
        aya::programs::Program::TracePoint(p) => p.unload(),
        aya::programs::Program::RawTracePoint(p) => p.unload(),
        aya::programs::Program::BtfTracePoint(p) => p.unload(),
        _ => Ok(()),
    };
}

/// The TCP state changes, in every family: the BTF-enabled raw tracepoint (typed
/// arguments: plain loads instead of helper reads), else the raw tracepoint, else the
/// tracepoint (same event, costlier each).
const SOCK_STATE_BTF: &str = "tp_btf_inet_sock_set_state";
const SOCK_STATE_RAW: &str = "raw_tp_inet_sock_set_state";
const SOCK_STATE: Attachment = Attachment {
    program: "tp_inet_sock_set_state",
    targets: &["sock/inet_sock_set_state"],
};
/// The resets this host sends (a raw tracepoint only: without it, a reset sent before
/// CLOSE is not marked `local`). Only a close record says who reset a connection: where
/// closes are not followed, it is not attached (it would cost every reset sent a program
/// run and a map lookup for nothing). The peer's resets need no hook: `tcp_reset()` sets
/// the socket's error before CLOSE, and the close event carries it (`events::outcome`).
const RESET_SENT_RAW: (&str, &str) = ("raw_tp_tcp_send_reset", "tcp_send_reset");

/// Why a hook family could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{program} -> {target}: {source}")]
    Program {
        program: &'static str,
        target: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the embedded eBPF object")]
    Missing(&'static str),
    #[error("fentry and BTF-enabled tracepoints need kernel BTF, and none could be read")]
    NoBtf,
    #[error("program {0} refused by EGRESS_TEST_REFUSE_TP_BTF (test hook)")]
    Refused(&'static str),
    #[error(
        "this kernel has no kprobes (no kprobe PMU in /sys/bus/event_source/devices, no kprobe_events in tracefs)"
    )]
    NoKprobes,
}

impl AttachError {
    fn program(program: &'static str, target: &'static str) -> impl Fn(ProgramError) -> Self {
        move |source| AttachError::Program {
            program,
            target,
            source,
        }
    }
}

/// Which program follows the TCP state changes (see [`SOCK_STATE_BTF`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StateHook {
    BtfTracepoint,
    RawTracepoint,
    Tracepoint,
}

impl StateHook {
    pub fn as_str(self) -> &'static str {
        match self {
            StateHook::BtfTracepoint => "tp_btf",
            StateHook::RawTracepoint => "raw_tracepoint",
            StateHook::Tracepoint => "tracepoint",
        }
    }
}

impl std::fmt::Display for StateHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attaches every program of `mode`; on failure unloads them again. Returns the program
/// that follows the TCP state changes. `exits_only`: see [`ExitsOnly`].
/// `resets`: the reset hook too (see [`RESET_SENT_RAW`]).
pub fn attach(
    ebpf: &mut Ebpf,
    mode: HookMode,
    btf: Option<&Btf>,
    exits_only: ExitsOnly,
    resets: bool,
) -> Result<StateHook, AttachError> {
    let result = match mode {
        HookMode::Kprobe => attach_kprobes(ebpf),
        HookMode::Fentry => attach_fentries(ebpf, btf),
        HookMode::Tracepoint => attach_tracepoints(ebpf, exits_only),
    }
    .and_then(|()| attach_tcp_state(ebpf, mode, btf, resets));
    if result.is_err() {
        detach(ebpf, mode);
    }
    result
}

/// Detaches and unloads the programs of `mode` (those that were loaded).
pub fn detach(ebpf: &mut Ebpf, mode: HookMode) {
    let family: Vec<&str> = match mode {
        HookMode::Kprobe => KPROBES.iter().map(|a| a.program).collect(),
        HookMode::Fentry => FENTRIES.iter().map(|f| f.0).collect(),
        HookMode::Tracepoint => TRACEPOINTS.iter().map(|a| a.program).collect(),
    };
    let names = family
        .into_iter()
        .chain([SOCK_STATE_BTF, SOCK_STATE_RAW, SOCK_STATE.program])
        .chain(dns_programs())
        .chain([RESET_SENT_RAW.0]);
    for name in names {
        unload(ebpf, name);
    }
}

/// Kernels built without CONFIG_KPROBES have neither way of creating a kprobe.
fn kernel_has_kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

fn attach_kprobes(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    if !kernel_has_kprobes() {
        return Err(AttachError::NoKprobes);
    }
    KPROBES.iter().try_for_each(|a| attach_kprobe(ebpf, a))
}

fn attach_kprobe(ebpf: &mut Ebpf, attachment: &Attachment) -> Result<(), AttachError> {
    let program = attachment.program;
    let probe: &mut KProbe = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(AttachError::program(program, "-"))?;
    probe
        .load()
        .map_err(AttachError::program(program, "load"))?;
    for target in attachment.targets {
        probe
            .attach(target, 0)
            .map_err(AttachError::program(program, target))?;
    }
    Ok(())
}

fn attach_fexit(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &'static str,
    function: &'static str,
) -> Result<(), AttachError> {
    let err = AttachError::program(program, function);
    let p: &mut FExit = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(&err)?;
    p.load(function, btf).map_err(&err)?;
    p.attach().map_err(&err)?;
    Ok(())
}

fn attach_fentries(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<(), AttachError> {
    let btf = btf.ok_or(AttachError::NoBtf)?;
    for &(program, function, is_exit) in FENTRIES {
        let err = AttachError::program(program, function);
        let entry = ebpf
            .program_mut(program)
            .ok_or(AttachError::Missing(program))?;
        if is_exit {
            let p: &mut FExit = entry.try_into().map_err(&err)?;
            p.load(function, btf).map_err(&err)?;
            p.attach().map_err(&err)?;
        } else {
            let p: &mut FEntry = entry.try_into().map_err(&err)?;
            p.load(function, btf).map_err(&err)?;
            p.attach().map_err(&err)?;
        }
    }
    Ok(())
}

fn attach_tracepoints(ebpf: &mut Ebpf, exits_only: ExitsOnly) -> Result<(), AttachError> {
    for attachment in TRACEPOINTS {
        if exits_only.skips(attachment.program) {
            continue;
        }
        attach_tracepoint(ebpf, attachment)?;
    }
    Ok(())
}

/// The TCP state machine (every family), then the reset hook (optional; if `resets`).
fn attach_tcp_state(
    ebpf: &mut Ebpf,
    mode: HookMode,
    btf: Option<&Btf>,
    resets: bool,
) -> Result<StateHook, AttachError> {
    let hook = match attach_btf_state(ebpf, btf) {
        Ok(()) => StateHook::BtfTracepoint,
        Err(btf_refused) => {
            tracing::info!(%mode, reason = %one_line(&btf_refused), "No BTF-enabled raw tracepoint for TCP state changes; trying the raw tracepoint.");
            let raw = if crate::testhook::refuse_raw_state() {
                Err(AttachError::Refused(SOCK_STATE_RAW))
            } else {
                attach_raw(ebpf, SOCK_STATE_RAW, "inet_sock_set_state")
            };
            match raw {
                Ok(()) => StateHook::RawTracepoint,
                Err(raw) => {
                    tracing::info!(%mode, reason = %one_line(&raw), "No raw tracepoint for TCP state changes; using the tracepoint.");
                    attach_tracepoint(ebpf, &SOCK_STATE)?;
                    StateHook::Tracepoint
                }
            }
        }
    };
    if resets {
        let (program, target) = RESET_SENT_RAW;
        if let Err(e) = attach_raw(ebpf, program, target) {
            tracing::warn!(%mode, reason = %one_line(&e), "No raw tracepoint for the TCP resets this host sends; a connection it resets before closing will not say so.");
        }
    }
    Ok(hook)
}

/// The BTF-enabled state-change program; unloaded again if it cannot be attached.
fn attach_btf_state(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<(), AttachError> {
    const TARGET: &str = "inet_sock_set_state";
    let btf = btf.ok_or(AttachError::NoBtf)?;
    if crate::testhook::refuse_tp_btf() {
        return Err(AttachError::Refused(SOCK_STATE_BTF));
    }
    let err = AttachError::program(SOCK_STATE_BTF, TARGET);
    let program: &mut BtfTracePoint = ebpf
        .program_mut(SOCK_STATE_BTF)
        .ok_or(AttachError::Missing(SOCK_STATE_BTF))?
        .try_into()
        .map_err(&err)?;
    let result = program
        .load(TARGET, btf)
        .map_err(&err)
        .and_then(|()| program.attach().map(drop).map_err(&err));
    if result.is_err() {
        let _ = program.unload();
    }
    result
}

fn attach_tracepoint(ebpf: &mut Ebpf, attachment: &Attachment) -> Result<(), AttachError> {
    let program = attachment.program;
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(AttachError::program(program, "-"))?;
    tp.load().map_err(AttachError::program(program, "load"))?;
    for target in attachment.targets {
        let (category, name) = target.split_once('/').unwrap_or(("", target));
        tp.attach(category, name)
            .map_err(AttachError::program(program, target))?;
    }
    Ok(())
}

fn attach_raw(
    ebpf: &mut Ebpf,
    program: &'static str,
    target: &'static str,
) -> Result<(), AttachError> {
    let raw: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(AttachError::program(program, "-"))?;
    let result = raw
        .load()
        .map_err(AttachError::program(program, "load"))
        .and_then(|()| {
            raw.attach(target)
                .map(drop)
                .map_err(AttachError::program(program, target))
        });
    if result.is_err() {
        let _ = raw.unload();
    }
    result
}
