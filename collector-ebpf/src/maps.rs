//! Maps and the configuration global shared by every program.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use egress_shared::{AggregateKey, COUNTER_COUNT, ConnectEvent, ProbeConfig};

use crate::sock::Dest;

/// Set by user space before load (`EbpfLoader::set_global`), read-only to the programs.
#[unsafe(no_mangle)]
pub static CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// Reads one field of [`CONFIG`]. The volatile read stops the compiler from folding the
/// zero initialiser in; the verifier then sees the value user space froze.
macro_rules! config {
    ($($field:ident).+) => {
        unsafe { core::ptr::read_volatile(&$crate::maps::CONFIG.$($field).+) }
    };
}
pub(crate) use config;

/// Connection events to user space. User space sizes it (`--ring-buffer-bytes`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters indexed by `egress_shared::Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Where an event is assembled: it is larger than the 512-byte eBPF stack allows.
#[map]
pub static SCRATCH: PerCpuArray<ConnectEvent> = PerCpuArray::with_max_entries(1, 0);

/// Last report time of each UDP flow, for once-per-window reporting.
#[map]
pub static UDP_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Token bucket of each cgroup (by the id of the cgroup that names its container), for
/// the per-cgroup rate limit. LRU: a forgotten cgroup starts again with a full bucket.
#[map]
pub static CGROUP_BUCKETS: LruHashMap<u64, Bucket> = LruHashMap::with_max_entries(8192, 0);

/// Tokens are kept in nano-events (events x 1e9) so refill is integer arithmetic.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct Bucket {
    pub nano_tokens: u64,
    pub last_ns: u64,
    /// Events dropped since the cgroup's last submitted one.
    pub dropped: u64,
}

/// State carried from a call's entry to its exit, by thread id.
#[map]
pub static CALLS: HashMap<u32, CallState> = HashMap::with_max_entries(8192, 0);

/// TCP attempts in SYN_SENT, by `struct sock` address, with the identity captured in the
/// connecting task; completed (and removed) at the socket's next state change. Not LRU:
/// an attempt is never forgotten silently; when full, a new attempt is counted
/// (`state_map_full`) and not reported. User space reads it for `--pending-report`.
#[map]
pub static PENDING_TCP: HashMap<u64, ConnectEvent> = HashMap::with_max_entries(8192, 0);

/// Established connections this collector reported, by `struct sock` address, until
/// they reach CLOSE. Not LRU: under churn an LRU would evict the long-lived connections
/// (the ones whose close matters most) in favour of short ones. When full, the newest
/// connection goes untracked and is counted (`close_untracked`). 65536 x 24 bytes.
#[map]
pub static OPEN_TCP: HashMap<u64, OpenConn> = HashMap::with_max_entries(65536, 0);

/// What the close of a tracked connection needs that the socket does not keep.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct OpenConn {
    /// `ConnectEvent::boot_time_ns`: names the connection to user space.
    pub connect_ns: u64,
    pub established_ns: u64,
    /// An `egress_shared::ResetBy` value, set by the reset tracepoints.
    pub reset: u8,
    pub _pad: [u8; 7],
}

/// A UDP flow: the 5-tuple within one network namespace.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct FlowKey {
    pub netns: u32,
    pub family: u16,
    pub protocol: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// Destinations users exclude (`--exclude-cidr`, `--exclude-loopback`), IPv4 and IPv6.
#[map]
pub static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
pub static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);

/// Cgroups (by [`crate::filter::cgroup_key`]) user space found to belong to an excluded
/// Kubernetes namespace. LRU: a forgotten one is caught and listed again by user space.
#[map]
pub static EXCLUDED_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Repeats counted per open aggregate, per CPU (so no atomics). Not LRU: when full, new
/// connections are reported one by one instead of an aggregate being forgotten with its
/// count. User space sums, reads and deletes the entries of closed windows.
///
/// Not preallocated: kernels before 5.10 reuse a deleted preallocated element without
/// zeroing the other CPUs' slots, which would carry old counts into a new window.
#[map]
pub static AGGREGATES: PerCpuHashMap<AggregateKey, u64> =
    PerCpuHashMap::with_max_entries(8192, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// What a call's entry saw, for its exit.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct CallState {
    /// `struct sock *` (kprobe mode).
    pub sk: u64,
    /// The file descriptor (tracepoint mode).
    pub fd: u64,
    /// User pointer to a `sockaddr` or `user_msghdr` (tracepoint mode), see `user_addr_kind`.
    pub user_addr: u64,
    pub user_addr_kind: u32,
    /// The `EventKind` to report at exit.
    pub event_kind: u32,
    /// Destination given by the caller (kprobe mode), if any.
    pub dest: Dest,
}

/// `CallState::user_addr` points to a `struct sockaddr`.
pub const USER_ADDR_SOCKADDR: u32 = 1;
/// `CallState::user_addr` points to a `struct user_msghdr` (sendmsg, first of sendmmsg).
pub const USER_ADDR_MSGHDR: u32 = 2;

/// Sockets marked as DNS: a UDP send or connect to port 53 (or a TCP connect to it) by
/// process `tgid` on descriptor `fd`, keyed `tgid << 32 | fd`. The read hooks look up
/// every read/recvfrom/recvmsg here first: the one map lookup a non-DNS read pays. LRU:
/// a resolver's short-lived sockets age out; the socket address guards against reuse of
/// the descriptor by another socket.
#[map]
pub static DNS_SOCKETS: LruHashMap<u64, DnsSocket> = LruHashMap::with_max_entries(8192, 0);

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DnsSocket {
    /// `struct sock *` the descriptor named when it was marked.
    pub sk: u64,
    /// When the last query (or the connect) went out, CLOCK_BOOTTIME.
    pub sent_ns: u64,
}

/// A read on a DNS socket, from its syscall's entry to its exit, by thread id.
#[map]
pub static DNS_READS: LruHashMap<u32, DnsRead> = LruHashMap::with_max_entries(1024, 0);

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DnsRead {
    pub sk: u64,
    pub fd: u64,
    /// The user buffer (read, recvfrom) or `struct user_msghdr` (recvmsg).
    pub buf: u64,
    /// 1 when `buf` is a `user_msghdr`.
    pub is_msghdr: u64,
    pub sent_ns: u64,
}

/// Where a DNS record is assembled (1744 bytes).
#[map]
pub static DNS_SCRATCH: PerCpuArray<egress_shared::DnsEvent> = PerCpuArray::with_max_entries(1, 0);

/// One bit per process (by `tgid`, folded into 65536 bits) that has marked a DNS socket:
/// the early exit of every read syscall's entry and exit on the node is this array load
/// (inlined by the verifier), not a hash lookup. Bits are never cleared: a process that
/// looked a name up once pays the hash lookups on its later reads, a fold collision too.
/// Set without an atomic (eBPF Rust has no atomic read-modify-write): two CPUs marking
/// processes of the same word at the same instant can lose one bit, which that
/// process's next query sets again.
#[map]
pub static DNS_PROCESSES: Array<u64> = Array::with_max_entries(1024, 0);
