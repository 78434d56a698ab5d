//! Socket addresses: from `struct sock`, from a caller's `sockaddr`, and the socket
//! behind a file descriptor.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_user};
use egress_shared::ConnectEvent;

use crate::{
    maps::config,
    read::{self, Reader},
    words::zero_addr,
};

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A destination given by the caller (`sockaddr_in` / `sockaddr_in6`); family 0 when none.
/// Aligned to 8 for `words::zero_addr`.
#[repr(C, align(8))]
#[derive(Copy, Clone)]
pub struct Dest {
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Dest>() == 24);
const _: () = assert!(core::mem::offset_of!(Dest, addr) % 8 == 0);

impl Dest {
    pub const NONE: Dest = Dest {
        family: 0,
        port: 0,
        _pad: 0,
        addr: [0; 16],
    };

    pub fn is_some(&self) -> bool {
        self.family == AF_INET || self.family == AF_INET6
    }
}

/// The leading part of `sockaddr_in6`, which also covers `sockaddr_in`.
#[repr(C)]
#[derive(Copy, Clone)]
struct RawSockaddr {
    family: u16,
    port_be: u16,
    v4_or_flowinfo: [u8; 4],
    v6: [u8; 16],
}

fn dest_from_raw(raw: &RawSockaddr) -> Dest {
    let mut dest = Dest {
        family: raw.family,
        port: u16::from_be(raw.port_be),
        _pad: 0,
        addr: [0; 16],
    };
    if raw.family == AF_INET {
        dest.addr[..4].copy_from_slice(&raw.v4_or_flowinfo);
    } else if raw.family == AF_INET6 {
        dest.addr = raw.v6;
    } else {
        return Dest::NONE;
    }
    dest
}

/// A `sockaddr` in kernel memory (e.g. `msghdr.msg_name` after the syscall copied it in).
#[inline(always)]
pub fn dest_from_kernel(addr: u64) -> Dest {
    match read::kernel::<RawSockaddr>(addr, 0) {
        Ok(raw) => dest_from_raw(&raw),
        Err(_) => Dest::NONE,
    }
}

/// A `sockaddr` in the calling process's memory.
#[inline(always)]
pub fn dest_from_user(addr: u64) -> Dest {
    if addr == 0 {
        return Dest::NONE;
    }
    // SAFETY: bpf_probe_read_user checks the address and fails instead of faulting.
    match unsafe { bpf_probe_read_user(addr as *const RawSockaddr) } {
        Ok(raw) => dest_from_raw(&raw),
        Err(_) => Dest::NONE,
    }
}

/// `user_msghdr.msg_name` (offset 0 in the stable user ABI) of a user `msghdr`.
#[inline(always)]
pub fn dest_from_user_msghdr(msghdr: u64) -> Dest {
    if msghdr == 0 {
        return Dest::NONE;
    }
    // SAFETY: as above.
    match unsafe { bpf_probe_read_user(msghdr as *const u64) } {
        Ok(name) => dest_from_user(name),
        Err(_) => Dest::NONE,
    }
}

/// `sk->sk_protocol`.
#[inline(always)]
pub fn protocol(sk: u64) -> Result<u8, i64> {
    protocol_by::<read::Probe>(sk)
}

/// `sk->sk_protocol`, read by `R`. 16 bits (5.6+): a protocol beyond a byte, MPTCP's
/// 262, is [`PROTOCOL_BEYOND_BYTE`], never its low byte (262's is TCP's 6: an MPTCP
/// socket, which goes to SYN_SENT beside its TCP subflow, would pass for a TCP attempt).
#[inline(always)]
pub fn protocol_by<R: Reader>(sk: u64) -> Result<u8, i64> {
    R::kernel::<u16>(sk, config!(offsets.sk_protocol))
        .map(|p| u8::try_from(p).unwrap_or(PROTOCOL_BEYOND_BYTE))
}

/// What [`protocol_by`] gives for a protocol number above 255: `IPPROTO_RAW`, which no
/// program follows.
const PROTOCOL_BEYOND_BYTE: u8 = 255;

/// Family, protocol, and both ends of the socket as the kernel has them now.
#[inline(always)]
pub fn fill(ev: &mut ConnectEvent, sk: u64) -> Result<(), i64> {
    ev.protocol = protocol(sk)?;
    ev.family = read::kernel(sk, config!(offsets.skc_family))?;
    fill_ports_and_addrs(ev, sk)
}

/// The parts of the tuple that change while a connect proceeds (the source port is
/// chosen after the socket enters SYN_SENT).
///
/// A dual-stack IPv6 socket connected to an IPv4-mapped address (`::ffff:a.b.c.d`, what
/// Java does for every IPv4 destination) talks IPv4 on the wire: it is recorded as IPv4,
/// from the socket's IPv4 fields (which the kernel's IPv4 code fills), so filters,
/// aggregation, UDP flows and user space all see the one form.
#[inline(always)]
pub fn fill_ports_and_addrs(ev: &mut ConnectEvent, sk: u64) -> Result<(), i64> {
    ev.src_port = read::kernel(sk, config!(offsets.skc_num))?;
    ev.dst_port = u16::from_be(read::kernel(sk, config!(offsets.skc_dport))?);
    if ev.family == AF_INET6 {
        read::kernel_buf(sk, config!(offsets.skc_v6_daddr), &mut ev.dst_addr)?;
        if is_v4_mapped(&ev.dst_addr) {
            ev.family = AF_INET;
            // SAFETY: an aligned `ConnectEvent` field.
            unsafe { zero_addr(&mut ev.dst_addr) };
        } else {
            read::kernel_buf(sk, config!(offsets.skc_v6_rcv_saddr), &mut ev.src_addr)?;
        }
    }
    if ev.family == AF_INET {
        read::kernel_buf(sk, config!(offsets.skc_rcv_saddr), &mut ev.src_addr[..4])?;
        read::kernel_buf(sk, config!(offsets.skc_daddr), &mut ev.dst_addr[..4])?;
    }
    Ok(())
}

/// How much of `struct sock_common` one helper read takes: `skc_daddr`, `skc_rcv_saddr`,
/// `skc_dport`, `skc_num` and `skc_family` lie in its first 18 bytes on every kernel we
/// know (4.x to 6.18), so the TCP paths read them at once instead of one read (~38 ns
/// here) each. A field found elsewhere (BTF says where) is read on its own, as is every
/// field when reads are plain loads ([`Reader::DIRECT`]).
const HEAD_LEN: usize = 24;

/// The head of `sk`'s `struct sock_common`, or nothing when fields are read one by one.
#[inline(always)]
fn head<R: Reader>(sk: u64) -> Result<[u8; HEAD_LEN], i64> {
    if R::DIRECT {
        return Ok([0; HEAD_LEN]);
    }
    read::kernel::<[u8; HEAD_LEN]>(sk, 0)
}

/// The `u16` at `at` in `sk`: from `head` if it lies within it, else read by `R`.
#[inline(always)]
fn head_u16<R: Reader>(head: &[u8; HEAD_LEN], sk: u64, at: u32) -> Result<u16, i64> {
    let at_usize = at as usize;
    if !R::DIRECT && at_usize + 2 <= HEAD_LEN {
        Ok(u16::from_ne_bytes([head[at_usize], head[at_usize + 1]]))
    } else {
        R::kernel::<u16>(sk, at)
    }
}

/// The 4 bytes at `at` in `sk` (an IPv4 address, as stored), as [`head_u16`].
#[inline(always)]
fn head_4<R: Reader>(head: &[u8; HEAD_LEN], sk: u64, at: u32) -> Result<[u8; 4], i64> {
    let at_usize = at as usize;
    if !R::DIRECT && at_usize + 4 <= HEAD_LEN {
        let mut out = [0; 4];
        out.copy_from_slice(&head[at_usize..at_usize + 4]);
        Ok(out)
    } else {
        R::kernel::<u32>(sk, at).map(u32::to_ne_bytes)
    }
}

/// An IPv6 address at `at` in `sk`, into `dst`.
#[inline(always)]
fn addr6<R: Reader>(sk: u64, at: u32, dst: &mut [u8; 16]) -> Result<(), i64> {
    let [low, high] = R::words16(sk, at)?;
    dst[..8].copy_from_slice(&low.to_ne_bytes());
    dst[8..].copy_from_slice(&high.to_ne_bytes());
    Ok(())
}

/// A TCP socket entering SYN_SENT: family and destination (the source port is chosen
/// just after, and the source address is re-read then: only what the filters need now).
/// Read into a small [`Dest`] on the stack, so the filters decide before a record is
/// claimed or zeroed. On a failed read, what was read before it stays in `dest`.
#[inline(always)]
pub fn tcp_dest<R: Reader>(sk: u64, dest: &mut Dest) -> Result<(), i64> {
    let head = head::<R>(sk)?;
    dest.family = head_u16::<R>(&head, sk, config!(offsets.skc_family))?;
    dest.port = u16::from_be(head_u16::<R>(&head, sk, config!(offsets.skc_dport))?);
    if dest.family == AF_INET6 {
        addr6::<R>(sk, config!(offsets.skc_v6_daddr), &mut dest.addr)?;
        // IPv4-mapped: recorded as IPv4 (see `fill_ports_and_addrs`); tcp_v4_connect
        // has filled the IPv4 fields before SYN_SENT.
        if is_v4_mapped(&dest.addr) {
            dest.family = AF_INET;
            // SAFETY: `Dest::addr` is aligned.
            unsafe { zero_addr(&mut dest.addr) };
        }
    }
    if dest.family == AF_INET {
        let daddr = head_4::<R>(&head, sk, config!(offsets.skc_daddr))?;
        dest.addr[..4].copy_from_slice(&daddr);
    }
    Ok(())
}

/// The source of a TCP attempt once it left SYN_SENT (an IPv4-mapped source on an IPv6
/// socket is only written after SYN_SENT).
#[inline(always)]
pub fn fill_tcp_source<R: Reader>(ev: &mut ConnectEvent, sk: u64) -> Result<(), i64> {
    let head = head::<R>(sk)?;
    ev.src_port = head_u16::<R>(&head, sk, config!(offsets.skc_num))?;
    if ev.family == AF_INET {
        let saddr = head_4::<R>(&head, sk, config!(offsets.skc_rcv_saddr))?;
        ev.src_addr[..4].copy_from_slice(&saddr);
    } else if ev.family == AF_INET6 {
        addr6::<R>(sk, config!(offsets.skc_v6_rcv_saddr), &mut ev.src_addr)?;
    }
    Ok(())
}

/// Replaces the destination with the one the caller named (unconnected sends). An IPv4
/// or IPv4-mapped destination on a dual-stack IPv6 socket makes the flow IPv4.
#[inline(always)]
pub fn set_dest(ev: &mut ConnectEvent, sk: u64, dest: &Dest) {
    let mapped = dest.family == AF_INET6 && is_v4_mapped(&dest.addr);
    if (dest.family == AF_INET || mapped) && ev.family == AF_INET6 {
        ev.family = AF_INET;
        // SAFETY: an aligned `ConnectEvent` field.
        unsafe { zero_addr(&mut ev.src_addr) };
        let _ = read::kernel_buf(sk, config!(offsets.skc_rcv_saddr), &mut ev.src_addr[..4]);
    }
    ev.dst_port = dest.port;
    if mapped {
        // SAFETY: as above.
        unsafe { zero_addr(&mut ev.dst_addr) };
        ev.dst_addr[..4].copy_from_slice(&dest.addr[12..]);
    } else {
        ev.dst_addr = dest.addr;
    }
}

/// Whether an IPv6 address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// `current->files->fdt->fd[fd]->private_data->sk`, with the socket's back-pointer to its
/// file checked so a non-socket fd is never taken for one.
#[inline(always)]
pub fn from_fd(fd: u64) -> Result<u64, i64> {
    // The syscalls take an `int` descriptor: the kernel uses the register's low half
    // whatever the caller left in the upper one (the syscall records and the saved
    // registers keep the whole register), so only the low 32 bits name the file.
    let fd = fd & 0xffff_ffff;
    let task = unsafe { bpf_get_current_task() };
    let files = read::pointer(task, config!(offsets.task_files))?;
    let fdt = read::pointer(files, config!(offsets.files_fdt))?;
    let max_fds: u32 = read::kernel(fdt, config!(offsets.fdtable_max_fds))?;
    if fd >= max_fds as u64 {
        return Err(-1);
    }
    let fd_array = read::pointer(fdt, config!(offsets.fdtable_fd))?;
    let file = read::pointer(fd_array + fd * 8, 0)?;
    let socket = read::pointer(file, config!(offsets.file_private_data))?;
    let back = read::pointer(socket, config!(offsets.socket_file))?;
    if back != file {
        return Err(-1);
    }
    read::pointer(socket, config!(offsets.socket_sk))
}
