//! What user space hands the programs before load (as a read-only global, so the
//! verifier sees constants). Offsets come from the running kernel's BTF: nothing
//! here is compiled in for a particular kernel.

/// Byte offsets of the kernel-struct fields the programs read.
///
/// Nested fields are pre-summed by user space: `uts_ns_inum` is
/// `offsetof(struct uts_namespace, ns) + offsetof(struct ns_common, inum)`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct task_struct
    /// `task_struct.pid` (the thread id) and `tgid`: with `cred` and the cgroups below,
    /// what `bpf_get_current_pid_tgid`, `_uid_gid` and `_cgroup_id` return, read with
    /// plain loads where a program has the task's typed pointer (`read::Direct`).
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    pub task_nsproxy: u32,
    pub task_thread_pid: u32,
    pub task_cgroups: u32,
    pub task_files: u32,
    /// `task_struct.self_exec_id` (u64 since 5.7, u32 before: the low 32 bits are read),
    /// bumped by each exec: what tells a process's cached identity it is stale.
    pub task_self_exec_id: u32,
    /// `task_struct.cred` (the subjective credentials `bpf_get_current_uid_gid` reads).
    pub task_cred: u32,
    /// `cred.uid.val`, `cred.gid.val`.
    pub cred_uid: u32,
    pub cred_gid: u32,
    // struct nsproxy
    pub nsproxy_uts_ns: u32,
    pub nsproxy_ipc_ns: u32,
    pub nsproxy_mnt_ns: u32,
    pub nsproxy_net_ns: u32,
    pub nsproxy_cgroup_ns: u32,
    // <namespace>.ns.inum
    pub uts_ns_inum: u32,
    pub ipc_ns_inum: u32,
    pub mnt_ns_inum: u32,
    pub net_ns_inum: u32,
    pub pid_ns_inum: u32,
    pub cgroup_ns_inum: u32,
    /// uts_namespace.name.nodename
    pub uts_nodename: u32,
    // struct pid / struct upid
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_nr: u32,
    pub upid_ns: u32,
    // cgroups
    pub css_set_subsys: u32,
    pub css_set_dfl_cgrp: u32,
    pub css_cgroup: u32,
    /// `cgroup_subsys_state.serial_nr`: unique to each css for the kernel's uptime (its
    /// `id` and its address are reused once it is freed), so a process's cached identity
    /// tells a move to a new v1 cgroup even when the kernel put its new `css_set` at the
    /// old one's address.
    pub css_serial_nr: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_name: u32,
    pub kernfs_node_id: u32,
    pub kernfs_node_parent: u32,
    // struct sock / sock_common
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub sk_protocol: u32,
    // struct msghdr (kernel)
    pub msghdr_msg_name: u32,
    // fd -> socket (tracepoint mode)
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub socket_file: u32,
    /// `sock.sk_socket` and `file.f_flags`: whether a connecting socket's file is
    /// non-blocking (`O_NONBLOCK`), which tells SYN_SENT that its connect() returns
    /// `-EINPROGRESS` and needs no mark (see `TCP_CONNECT_MARKS`).
    pub sk_socket: u32,
    pub file_f_flags: u32,
    /// `sock.sk_sndtimeo` (`SO_SNDTIMEO`): a blocking connect(2) with a send timeout
    /// returns `-EINPROGRESS` when it expires, so it is not marked either.
    pub sk_sndtimeo: u32,
    /// Keeps the count even (the configuration's next u64 aligned).
    pub _pad_offsets: u32,
    /// inet_sock.inet_sport (network order): the source port once CLOSE released it.
    pub inet_sport: u32,
    // struct sock: the outcome of an attempt, the end of a connection
    pub sk_err: u32,
    pub sk_err_soft: u32,
    pub sk_flags: u32,
    /// Bit of `SOCK_DONE` in `sk_flags` (set when the peer's FIN arrives).
    pub sock_done_bit: u32,
    // struct tcp_sock
    pub tcp_total_retrans: u32,
    pub tcp_srtt_us: u32,
    pub tcp_bytes_acked: u32,
    pub tcp_bytes_received: u32,
    /// 0 when the kernel has no `bytes_sent` (before 4.19).
    pub tcp_bytes_sent: u32,
    /// `tcp_sock.tcp_clock_cache` (CLOCK_MONOTONIC ns, refreshed by the kernel when a
    /// segment arrives and when a timer fires): the time an attempt was established, read
    /// instead of the clock (see `emit::completion_time`). 0 when the kernel has none
    /// (before 4.20): the clock is read.
    pub tcp_clock_cache: u32,
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 68 * 4);

/// Field offsets inside tracepoint records, read from tracefs `format` files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    // sock:inet_sock_set_state
    pub state_skaddr: u32,
    pub state_oldstate: u32,
    pub state_newstate: u32,
    pub state_protocol: u32,
    /// Source port in host order (`inet_sport`, still set after the port is released).
    pub state_sport: u32,
    // syscalls:sys_enter_* (the fd and the destination argument)
    pub connect_fd: u32,
    pub connect_addr: u32,
    pub sendto_fd: u32,
    pub sendto_addr: u32,
    pub sendmsg_fd: u32,
    pub sendmsg_msg: u32,
    pub sendmmsg_fd: u32,
    pub sendmmsg_msg: u32,
}

/// With [`KernelOffsets`] (68 u32) and `cgroup_subsys_index` an even number of u32 (82):
/// what follows is 8-byte aligned (asserted below [`ProbeConfig`]).
const _: () = assert!(core::mem::size_of::<TracepointOffsets>() == 13 * 4);

/// Which cgroup's leaf name the programs capture.
pub struct CgroupSource;

impl CgroupSource {
    /// `css_set.dfl_cgrp`: the cgroup v2 (unified) cgroup.
    pub const DEFAULT_HIERARCHY: u32 = u32::MAX;
}

/// Largest `cgroup_rate` (events per second) user space accepts, and the programs apply.
pub const MAX_CGROUP_RATE: u32 = 1_000_000;
/// Largest `cgroup_burst` user space accepts, and the programs apply: `burst x interval`
/// of the cell-rate form (5.12+) is at most 10^15 ns, and the token form's 10^15
/// nano-events cannot overflow its signed arithmetic however many CPUs refill it at once.
pub const MAX_CGROUP_BURST: u32 = 1_000_000;

/// The whole configuration, set as the global `CONFIG` before load.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    pub offsets: KernelOffsets,
    pub tracepoints: TracepointOffsets,
    /// Index into `css_set.subsys[]` of the cgroup v1 controller whose hierarchy names the
    /// container, or [`CgroupSource::DEFAULT_HIERARCHY`].
    pub cgroup_subsys_index: u32,
    /// A UDP flow (5-tuple in a network namespace) is reported at most once per window.
    pub udp_flow_window_ns: u64,
    /// The programs wake the reader only once this many bytes wait in the ring buffer
    /// (the reader also drains on a timer), so a storm costs one wake-up per batch, not
    /// per event. 0 wakes it for every event; else a power of two (a quarter of the ring,
    /// at most 1 MiB), which the record-address test of connection, UDP, close and
    /// identity records needs (`ring::spans_boundary`).
    pub wakeup_bytes: u32,
    /// Events per second each cgroup may submit (token bucket refill); 0 is unlimited. A
    /// container in a connect loop then cannot fill the ring buffer and blind the others.
    pub cgroup_rate: u32,
    /// Events a cgroup may submit at once (token bucket size).
    pub cgroup_burst: u32,
    /// 1: follow established connections to their close (`OPEN_TCP`, close events).
    /// 0 when nothing consumes closes (no OTLP, no `--close-records`): the state machine
    /// then stops at the attempt's outcome and pays nothing per close.
    pub track_closes: u32,
    /// 1 when the kernel has the BPF exchange and fetching atomics (5.12+): the rate limit
    /// then updates its buckets exactly (`emit::admit`); 0 takes the path older kernels
    /// verify (the verifier prunes the path not taken).
    pub fetching_atomics: u32,
    /// The kernel's tick length in ns where tracing programs may read the tick count
    /// (`bpf_jiffies64`) and the rate limit's burst holds two ticks of events: the rate
    /// limit and the identity cache's age then go by the tick count, not by an ordered TSC
    /// read. 0: they read CLOCK_BOOTTIME, as the events do.
    pub coarse_tick_ns: u32,
    /// Identical connections (same process, protocol, destination) within one window of
    /// this length are reported once, with a count; 0 reports every connection.
    pub aggregate_window_ns: u64,
    /// 1 when destinations are dropped: the prefixes in `excluded_v4` and `excluded_v6`
    /// (or, beyond [`EXCLUDED_V4_INLINE`] and [`EXCLUDED_V6_INLINE`], in the family's
    /// trie, `EXCLUDED_V4` or `EXCLUDED_V6`).
    pub exclude_addresses: u32,
    /// 1 when user space may list cgroups to drop in `EXCLUDED_CGROUPS`.
    pub exclude_cgroups: u32,
    /// 1 when DNS answers are captured (sockets that send to port 53 are marked, and
    /// what is read from them copied); 0 leaves the DNS programs with nothing to do.
    pub dns: u32,
    /// Offsets in `struct pt_regs` of a syscall's first two arguments as the task saved
    /// them at entry (x86_64: `di`, `si`): the DNS read hooks then run at syscall exit
    /// only. 0 (other architectures): an entry hook saves them instead.
    pub dns_regs_fd: u32,
    pub dns_regs_buf: u32,
    /// Offset in `struct pt_regs` of the syscall number (x86_64: `orig_ax`) where the
    /// kernel also has `bpf_task_pt_regs` (5.15+, probed): connect() is then seen at its
    /// exit only (its arguments read back from the registers), and CLOSE -> SYN_SENT
    /// marks a blocking TCP connect for that exit (`TCP_CONNECT_MARKS`; a non-blocking
    /// one's exit returns on `-EINPROGRESS`). 0: an entry hook saves the arguments.
    pub regs_syscall_nr: u32,
    /// Offset in `struct pt_regs` of a syscall's fifth argument (x86_64: `r8`, sendto's
    /// destination) where `regs_syscall_nr` is set: the sends are then seen at their
    /// exits only, which read their arguments back (no entry program, no saved call
    /// state: every send on the host, TCP's included, ran both). 0: entry hooks save them.
    pub regs_sendto_addr: u32,
    /// What the rate limit's bucket slots (`CGROUP_BUCKET_SLOTS`) fold a cgroup key's hash
    /// with: [`BUCKET_SLOT_COUNT`] - 1 (0 puts every cgroup on one slot, a test hook).
    pub bucket_slot_mask: u32,
    /// What the identity cache's slots (`IDENTITY_SLOTS`) fold a process id's hash with:
    /// [`IDENTITY_SLOT_COUNT`] - 1 (0 puts every process on one slot, a test hook).
    pub identity_slot_mask: u32,
    /// What the aggregation's repeat slots (`REPEAT_SLOTS`) fold a key's hash with:
    /// `RepeatSlot::PER_CPU` - 1 (0 puts every key on one slot, a test hook).
    pub repeat_slot_mask: u32,
    /// A test hook: the completion of every reported attempt to this destination port
    /// (host order) is skipped, as the kernel skips a program run that would nest in
    /// another on one CPU (`recursion_misses`), so a test can prove such an attempt is
    /// still reported. 0 (always, outside tests): none; the verifier prunes the check.
    pub skip_completions_to_port: u32,
    /// Explicit padding: the structures after it are 8-byte aligned.
    pub _pad: u32,
    /// Where the kprobe and fentry families find a received (or sent) message's bytes.
    pub dns_iter: DnsIterOffsets,
    /// The IPv4 destination prefixes to drop, where there are few.
    pub excluded_v4: ExcludedV4,
    /// The IPv6 destination prefixes to drop, where there are few.
    pub excluded_v6: ExcludedV6,
}

/// The rate limit's bucket slots (`CGROUP_BUCKET_SLOTS`): a power of two, for a few
/// hundred containers per node with few collisions (a collided cgroup's bucket is in the
/// LRU map, slower but as exact).
pub const BUCKET_SLOT_COUNT: u32 = 4096;

/// The identity cache's slots (`IDENTITY_SLOTS`): a power of two, for the processes that
/// connect on a node, with few collisions (a collided process's identity is in the LRU
/// map, as every process's was).
pub const IDENTITY_SLOT_COUNT: u32 = 4096;

/// The slot of `key` (a cgroup key for `CGROUP_BUCKET_SLOTS`, a process id for
/// `IDENTITY_SLOTS`) in a table folded with `mask` (`ProbeConfig::bucket_slot_mask`,
/// `identity_slot_mask`): a multiplicative hash's high bits. Cgroup ids are kernfs ids,
/// handed out in sequence to cgroups and their files alike, so a node's cgroups are
/// dozens apart; process ids come in sequence.
#[inline(always)]
pub fn slot_of(key: u64, mask: u32) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 & mask
}

/// IPv4 prefixes held in the configuration itself (`--exclude-cidr` lists a few as a
/// rule: the cluster's service range, link-local, loopback).
pub const EXCLUDED_V4_INLINE: usize = 8;

/// IPv6 prefixes held in the configuration itself (a dual-stack cluster's service range,
/// link-local, `::1`).
pub const EXCLUDED_V6_INLINE: usize = 4;

/// The destination prefixes of one family the programs drop: up to `N` in the
/// configuration, compared one after the other with plain loads (the verifier reads them
/// as constants), where a lookup in the family's trie (`EXCLUDED_V4`, `EXCLUDED_V6`) is a
/// call that walks its nodes: ~20 ns of a dropped attempt's ~170 above the floor in an
/// Intel host's profile, ~130 of ~290 on an AMD EPYC (Zen 4) host whose kernel returns
/// through the SRSO safe-return thunk (docs/kernel.md). More than `N` all go to the trie
/// (`in_trie`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ExcludedPrefixes<P, const N: usize> {
    /// How many of `prefixes` are set (0 when `in_trie`).
    pub count: u32,
    /// 1: the prefixes are in the family's trie instead.
    pub in_trie: u32,
    /// The first `count` are the prefixes; the rest are zero.
    pub prefixes: [P; N],
}

/// The IPv4 prefixes to drop, where there are few.
pub type ExcludedV4 = ExcludedPrefixes<V4Prefix, EXCLUDED_V4_INLINE>;
/// The IPv6 prefixes to drop, where there are few.
pub type ExcludedV6 = ExcludedPrefixes<V6Prefix, EXCLUDED_V6_INLINE>;

/// An address prefix as the configuration holds it: an address is in it when `address &
/// mask == network`, all in network byte order (as the address is in memory).
pub trait Prefix: Copy {
    /// The family's address, as the kernel holds it (network byte order).
    type Address: Copy;
    /// The unset prefix (zero network, zero mask).
    const ZERO: Self;
    /// The prefix of `len` bits (at most the address's width) at `address`, host bits
    /// cleared.
    fn new(address: Self::Address, len: u8) -> Self;
    /// Whether `address` is in the prefix.
    fn holds(&self, address: &Self::Address) -> bool;
}

/// One IPv4 prefix (see [`Prefix`]), held as words: a struct of byte arrays is loaded
/// one byte at a time by the programs' volatile reads.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct V4Prefix {
    /// The prefix's address with its host bits cleared: its bytes in network order, as
    /// one native word.
    pub network: u32,
    /// Its length as a mask (`len` leading one bits), held as `network` is.
    pub mask: u32,
}

impl Prefix for V4Prefix {
    type Address = [u8; 4];
    const ZERO: Self = Self {
        network: 0,
        mask: 0,
    };

    fn new(address: [u8; 4], len: u8) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0);
        Self {
            network: u32::from_ne_bytes((u32::from_be_bytes(address) & mask).to_be_bytes()),
            mask: u32::from_ne_bytes(mask.to_be_bytes()),
        }
    }

    #[inline(always)]
    fn holds(&self, address: &[u8; 4]) -> bool {
        u32::from_ne_bytes(*address) & self.mask == self.network
    }
}

/// One IPv6 prefix (see [`Prefix`]), held as two words each, as [`V4Prefix`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct V6Prefix {
    /// The prefix's address with its host bits cleared: its bytes in network order, as
    /// two native words.
    pub network: [u64; 2],
    /// Its length as a mask (`len` leading one bits), held as `network` is.
    pub mask: [u64; 2],
}

/// The 16 bytes of an IPv6 address as two native words, the first 8 bytes first.
#[inline(always)]
fn v6_words(bytes: &[u8; 16]) -> [u64; 2] {
    let word = |half: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[half * 8..half * 8 + 8]);
        u64::from_ne_bytes(w)
    };
    [word(0), word(1)]
}

impl Prefix for V6Prefix {
    type Address = [u8; 16];
    const ZERO: Self = Self {
        network: [0; 2],
        mask: [0; 2],
    };

    fn new(address: [u8; 16], len: u8) -> Self {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(len.min(128)))
            .unwrap_or(0);
        Self {
            network: v6_words(&(u128::from_be_bytes(address) & mask).to_be_bytes()),
            mask: v6_words(&mask.to_be_bytes()),
        }
    }

    #[inline(always)]
    fn holds(&self, address: &[u8; 16]) -> bool {
        let words = v6_words(address);
        words[0] & self.mask[0] == self.network[0] && words[1] & self.mask[1] == self.network[1]
    }
}

impl<P: Prefix, const N: usize> ExcludedPrefixes<P, N> {
    pub const fn zeroed() -> Self {
        Self {
            count: 0,
            in_trie: 0,
            prefixes: [P::ZERO; N],
        }
    }

    /// The prefixes `(address, length)`, inline if they fit, else marked for the trie.
    pub fn of(prefixes: &[(P::Address, u8)]) -> Self {
        let mut excluded = Self::zeroed();
        if prefixes.len() > N {
            excluded.in_trie = 1;
            return excluded;
        }
        for (slot, &(address, len)) in excluded.prefixes.iter_mut().zip(prefixes) {
            *slot = P::new(address, len);
        }
        excluded.count = prefixes.len() as u32;
        excluded
    }

    /// Whether `address` is in one of the inline prefixes (none when `in_trie`): the
    /// unit tests' model of the programs' loop, which reads the configuration with
    /// volatile loads instead (`filter.rs`), each prefix with the same [`Prefix::holds`].
    #[cfg(test)]
    fn holds(&self, address: &P::Address) -> bool {
        self.prefixes
            .iter()
            .take(self.count as usize)
            .any(|prefix| prefix.holds(address))
    }
}

const _: () = assert!(core::mem::size_of::<ExcludedV4>() == 8 + 8 * EXCLUDED_V4_INLINE);
const _: () = assert!(core::mem::size_of::<ExcludedV6>() == 8 + 32 * EXCLUDED_V6_INLINE);

const _: () = assert!(
    core::mem::size_of::<ProbeConfig>()
        == 68 * 4
            + 16 * 4
            + 8
            + 8
            + 24
            + 16
            + 16
            + 8 * 4
            + 8
            + 8
            + 8 * EXCLUDED_V4_INLINE
            + 8
            + 32 * EXCLUDED_V6_INLINE
);
/// No padding before the IPv6 prefixes (8-byte aligned): the configuration is plain data.
const _: () = assert!(core::mem::offset_of!(ProbeConfig, excluded_v6) % 8 == 0);
/// The offsets' counts and the subsys index (even in all) keep the first u64 after them aligned.
const _: () = assert!(core::mem::offset_of!(ProbeConfig, udp_flow_window_ns) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(ProbeConfig, aggregate_window_ns) % 8 == 0);

/// The kernel `struct msghdr`'s data iterator, for the DNS hooks below the syscalls
/// (`udp_recvmsg`, `udpv6_recvmsg`, `tcp_recvmsg`, `udp_sendmsg`): after the kernel has
/// copied a message through `msg_iter`, the iterator points just past it in the caller's
/// buffer. All 0 (`usable` 0) where the kernel has no `enum iter_type` with `ITER_UBUF`
/// (before 6.0): DNS then stays off in those families.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsIterOffsets {
    /// 1 when every field below was found in BTF.
    pub usable: u32,
    /// `msghdr.msg_iter`
    pub msghdr_msg_iter: u32,
    /// `iov_iter.iter_type` (u8)
    pub iter_type: u32,
    /// `iov_iter.iov_offset`: bytes consumed in the current segment.
    pub iov_offset: u32,
    /// `iov_iter.ubuf`, which shares its place with `__iov` (`iov` before 6.4).
    pub iter_ptr: u32,
    /// Values of `ITER_UBUF` and `ITER_IOVEC` (their order changed in 6.4).
    pub iter_ubuf: u32,
    pub iter_iovec: u32,
    pub _pad: u32,
}

impl DnsIterOffsets {
    pub const fn zeroed() -> Self {
        Self {
            usable: 0,
            msghdr_msg_iter: 0,
            iter_type: 0,
            iov_offset: 0,
            iter_ptr: 0,
            iter_ubuf: 0,
            iter_iovec: 0,
            _pad: 0,
        }
    }
}

impl ProbeConfig {
    pub const fn zeroed() -> Self {
        // Spelled out so it is usable in a `static` initialiser on the eBPF side.
        Self {
            offsets: KernelOffsets {
                task_pid: 0,
                task_tgid: 0,
                task_real_parent: 0,
                task_group_leader: 0,
                task_comm: 0,
                task_nsproxy: 0,
                task_thread_pid: 0,
                task_cgroups: 0,
                task_files: 0,
                task_self_exec_id: 0,
                task_cred: 0,
                cred_uid: 0,
                cred_gid: 0,
                nsproxy_uts_ns: 0,
                nsproxy_ipc_ns: 0,
                nsproxy_mnt_ns: 0,
                nsproxy_net_ns: 0,
                nsproxy_cgroup_ns: 0,
                uts_ns_inum: 0,
                ipc_ns_inum: 0,
                mnt_ns_inum: 0,
                net_ns_inum: 0,
                pid_ns_inum: 0,
                cgroup_ns_inum: 0,
                uts_nodename: 0,
                pid_level: 0,
                pid_numbers: 0,
                upid_size: 0,
                upid_nr: 0,
                upid_ns: 0,
                css_set_subsys: 0,
                css_set_dfl_cgrp: 0,
                css_cgroup: 0,
                css_serial_nr: 0,
                cgroup_kn: 0,
                kernfs_node_name: 0,
                kernfs_node_id: 0,
                kernfs_node_parent: 0,
                skc_family: 0,
                skc_daddr: 0,
                skc_rcv_saddr: 0,
                skc_dport: 0,
                skc_num: 0,
                skc_v6_daddr: 0,
                skc_v6_rcv_saddr: 0,
                sk_protocol: 0,
                msghdr_msg_name: 0,
                files_fdt: 0,
                fdtable_max_fds: 0,
                fdtable_fd: 0,
                file_private_data: 0,
                socket_sk: 0,
                socket_file: 0,
                sk_socket: 0,
                file_f_flags: 0,
                sk_sndtimeo: 0,
                _pad_offsets: 0,
                inet_sport: 0,
                sk_err: 0,
                sk_err_soft: 0,
                sk_flags: 0,
                sock_done_bit: 0,
                tcp_total_retrans: 0,
                tcp_srtt_us: 0,
                tcp_bytes_acked: 0,
                tcp_bytes_received: 0,
                tcp_bytes_sent: 0,
                tcp_clock_cache: 0,
            },
            tracepoints: TracepointOffsets {
                state_skaddr: 0,
                state_oldstate: 0,
                state_newstate: 0,
                state_protocol: 0,
                state_sport: 0,
                connect_fd: 0,
                connect_addr: 0,
                sendto_fd: 0,
                sendto_addr: 0,
                sendmsg_fd: 0,
                sendmsg_msg: 0,
                sendmmsg_fd: 0,
                sendmmsg_msg: 0,
            },
            cgroup_subsys_index: CgroupSource::DEFAULT_HIERARCHY,
            udp_flow_window_ns: 0,
            wakeup_bytes: 0,
            cgroup_rate: 0,
            cgroup_burst: 0,
            track_closes: 0,
            fetching_atomics: 0,
            coarse_tick_ns: 0,
            aggregate_window_ns: 0,
            exclude_addresses: 0,
            exclude_cgroups: 0,
            dns: 0,
            dns_regs_fd: 0,
            dns_regs_buf: 0,
            regs_syscall_nr: 0,
            regs_sendto_addr: 0,
            bucket_slot_mask: 0,
            identity_slot_mask: 0,
            repeat_slot_mask: 0,
            skip_completions_to_port: 0,
            _pad: 0,
            dns_iter: DnsIterOffsets::zeroed(),
            excluded_v4: ExcludedV4::zeroed(),
            excluded_v6: ExcludedV6::zeroed(),
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for ProbeConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_prefixes_hold_their_addresses_and_no_others() {
        let excluded = ExcludedV4::of(&[([10, 1, 2, 3], 8), ([192, 0, 2, 7], 32), ([0; 4], 0)]);
        assert_eq!((excluded.count, excluded.in_trie), (3, 0));
        assert_eq!(
            excluded.prefixes[0].network,
            u32::from_ne_bytes([10, 0, 0, 0]),
            "host bits cleared"
        );
        assert!(excluded.holds(&[10, 255, 0, 1]));
        assert!(excluded.holds(&[192, 0, 2, 7]));
        // /0 holds everything.
        assert!(excluded.holds(&[8, 8, 8, 8]));
        let narrow = ExcludedV4::of(&[([10, 0, 0, 0], 8), ([192, 0, 2, 7], 32)]);
        assert!(!narrow.holds(&[11, 0, 0, 1]));
        assert!(!narrow.holds(&[192, 0, 2, 8]));
        assert!(!narrow.holds(&[9, 255, 255, 255]));
        let cgnat = ExcludedV4::of(&[([100, 64, 0, 0], 10)]);
        assert!(cgnat.holds(&[100, 127, 255, 255]));
        assert!(!cgnat.holds(&[100, 128, 0, 0]));
        assert!(
            !ExcludedV4::of(&[]).holds(&[10, 0, 0, 1]),
            "none: nothing held"
        );
    }

    #[test]
    fn more_prefixes_than_fit_go_to_the_trie() {
        let many = [([10, 0, 0, 0], 8); EXCLUDED_V4_INLINE + 1];
        let excluded = ExcludedV4::of(&many);
        assert_eq!((excluded.count, excluded.in_trie), (0, 1));
        assert!(
            !excluded.holds(&[10, 0, 0, 1]),
            "the trie holds them, not the table"
        );
        let fit = ExcludedV4::of(&many[..EXCLUDED_V4_INLINE]);
        assert_eq!((fit.count, fit.in_trie), (EXCLUDED_V4_INLINE as u32, 0));
        assert!(fit.holds(&[10, 0, 0, 1]));
    }

    #[test]
    fn inline_v6_prefixes_hold_their_addresses_and_no_others() {
        let v6 = |text: &str| {
            text.parse::<core::net::Ipv6Addr>()
                .expect("an address")
                .octets()
        };
        let excluded = ExcludedV6::of(&[
            (v6("fd00:10:96::1"), 112),
            (v6("fe80::1"), 10),
            (v6("2001:db8::"), 65),
            (v6("::1"), 128),
        ]);
        assert_eq!((excluded.count, excluded.in_trie), (4, 0));
        assert_eq!(
            excluded.prefixes[0].network,
            v6_words(&v6("fd00:10:96::")),
            "host bits cleared"
        );
        assert!(excluded.holds(&v6("fd00:10:96::ffff")));
        assert!(!excluded.holds(&v6("fd00:10:97::1")));
        assert!(excluded.holds(&v6("febf:ffff::1")));
        assert!(!excluded.holds(&v6("fec0::1")));
        // A length past the first word: the second word's mask counts.
        assert!(excluded.holds(&v6("2001:db8::7fff:ffff:ffff:ffff")));
        assert!(!excluded.holds(&v6("2001:db8::8000:0:0:0")));
        assert!(excluded.holds(&v6("::1")));
        assert!(!excluded.holds(&v6("::2")));
        assert!(
            ExcludedV6::of(&[(v6("::"), 0)]).holds(&v6("2001:db8::1")),
            "/0"
        );
        let many = [(v6("fd00::"), 8); EXCLUDED_V6_INLINE + 1];
        assert_eq!(ExcludedV6::of(&many).in_trie, 1);
        assert!(!ExcludedV6::of(&many).holds(&v6("fd00::1")));
    }

    #[test]
    fn sequential_ids_spread_over_the_slots() {
        let mask = BUCKET_SLOT_COUNT - 1;
        // Kernfs ids of cgroups made one after another (a node's containers): each
        // cgroup's interface files take ids too, so theirs advance by dozens.
        for stride in [1, 40, 64] {
            let mut taken = [false; BUCKET_SLOT_COUNT as usize];
            for i in 0..256u64 {
                taken[slot_of(5_000 + i * stride, mask) as usize] = true;
            }
            let distinct = taken.iter().filter(|&&t| t).count();
            assert!(
                distinct >= 240,
                "256 ids {stride} apart share few slots: {distinct} distinct"
            );
        }
        assert_eq!(slot_of(u64::MAX, 0), 0, "one slot: every key on it");
    }
}
