//! The record each probe writes to the ring buffer.

/// Length of `task_struct.comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// Length of `new_utsname.nodename` (__NEW_UTS_LEN + 1).
pub const NODENAME_LEN: usize = 65;
/// Room for a cgroup's leaf name: a 64-hex container id plus a runtime prefix and `.scope`.
pub const CGROUP_NAME_LEN: usize = 128;

/// What the process did. Values are part of the wire format: never reuse one.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connection attempt (the SYN leaves, whatever the outcome).
    TcpConnect = 1,
    /// `connect()` on a UDP socket.
    UdpConnect = 2,
    /// A datagram sent on a UDP socket (reported once per flow per window).
    UdpSend = 3,
    /// An established TCP connection reached CLOSE (a [`TcpCloseEvent`], not a
    /// `ConnectEvent`).
    TcpClose = 4,
    /// A message read from a socket that sent to port 53: a DNS answer, as the
    /// workload received it (a [`DnsEvent`], not a `ConnectEvent`).
    DnsAnswer = 5,
    /// A process's identity (an [`IdentityEvent`], not a `ConnectEvent`).
    Identity = 6,
}

impl EventKind {
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::TcpConnect),
            2 => Some(Self::UdpConnect),
            3 => Some(Self::UdpSend),
            4 => Some(Self::TcpClose),
            5 => Some(Self::DnsAnswer),
            6 => Some(Self::Identity),
            _ => None,
        }
    }
}

/// Index into [`IdentityEvent::ns_inums`].
#[repr(usize)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NsIndex {
    Net = 0,
    Uts = 1,
    Mnt = 2,
    Pid = 3,
    Ipc = 4,
    Cgroup = 5,
}

pub const NS_COUNT: usize = 6;

/// One connection attempt, as the kernel saw it.
///
/// Addresses are in network byte order as 16 bytes (IPv4 in the first 4); ports are in
/// host byte order. Strings are NUL-padded and may be truncated by the kernel. The
/// process's identity (lineage, namespaces, nodename, cgroup) is not in it: the record
/// refers to the [`IdentityEvent`] its process sent (`tgid`, `identity_ns`), which the
/// ring holds before it.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct ConnectEvent {
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME nanoseconds.
    pub boot_time_ns: u64,
    /// Cgroup v2 id of the task (what `bpf_get_current_cgroup_id` returns).
    pub cgroup_id: u64,
    /// The process's identity: [`IdentityEvent::filled_ns`] of the identity record
    /// (of process `tgid`) this connection's process had.
    pub identity_ns: u64,
    /// Thread id (kernel `pid`).
    pub tid: u32,
    /// Process id (kernel `tgid`).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Events of this cgroup dropped by its rate limit since its previous event.
    pub rate_limited_before: u32,
    /// Non-zero when this event opened an in-kernel aggregate: the window index (see
    /// [`AggregateKey`](crate::AggregateKey)); repeats in that window are counted there.
    pub aggregate_window: u32,
    /// UDP: the network namespace inode the flow is keyed by (see
    /// [`FlowKey`](crate::FlowKey)), read at the send; 0 for TCP.
    pub flow_netns: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    /// An [`EventKind`] value.
    pub kind: u8,
    /// TCP: a [`ConnState`] value (how the attempt completed); 0 for UDP.
    pub state: u8,
    pub _pad: [u8; 3],
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Name of the thread that made the call.
    pub thread_comm: [u8; COMM_LEN],
    /// TCP: retransmitted SYNs (`tcp_sock.total_retrans` when the attempt completed).
    pub syn_retransmits: u32,
    /// TCP failure: `sk->sk_err` and `sk->sk_err_soft` (positive errno) at SYN_SENT->CLOSE.
    pub sk_err: u32,
    pub sk_err_soft: u32,
    pub _pad2: u32,
    /// TCP: nanoseconds from SYN_SENT to the attempt's completion. UDP (`UdpSend`,
    /// `UdpConnect`, which have no handshake): the payload bytes the flow sent since its
    /// previous record, this record's datagram included.
    pub handshake_ns: u64,
    /// TCP: the socket's kernel address; with `boot_time_ns` it names the connection
    /// that a later [`TcpCloseEvent`] closes.
    pub sock_id: u64,
}

pub const CONNECT_EVENT_SIZE: usize = 144;
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == CONNECT_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<ConnectEvent>() == 8);
// The addresses are zeroed a word at a time in the kernel (`words::zero_addr`).
const _: () = assert!(core::mem::offset_of!(ConnectEvent, src_addr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(ConnectEvent, dst_addr) % 8 == 0);

impl ConnectEvent {
    pub const fn zeroed() -> Self {
        Self {
            boot_time_ns: 0,
            cgroup_id: 0,
            identity_ns: 0,
            tid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            rate_limited_before: 0,
            aggregate_window: 0,
            flow_netns: 0,
            family: 0,
            src_port: 0,
            dst_port: 0,
            protocol: 0,
            kind: 0,
            state: 0,
            _pad: [0; 3],
            src_addr: [0; 16],
            dst_addr: [0; 16],
            thread_comm: [0; COMM_LEN],
            syn_retransmits: 0,
            sk_err: 0,
            sk_err_soft: 0,
            _pad2: 0,
            handshake_ns: 0,
            sock_id: 0,
        }
    }

    /// The raw bytes, as the kernel writes them (used by decoder tests and fuzzing).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), every field is an integer or byte array and padding is explicit,
        // so all CONNECT_EVENT_SIZE bytes are initialised.
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), CONNECT_EVENT_SIZE)
        }
    }
}

/// What a process's connections share, as the kernel read it from one of its tasks: sent
/// when read (a process's first connection, a change, and at most once a second while it
/// connects), before any [`ConnectEvent`] that refers to it (`tgid`, `filled_ns`).
#[repr(C)]
#[derive(Copy, Clone)]
pub struct IdentityEvent {
    /// When it was read (CLOCK_BOOTTIME): with `tgid`, what connections refer to.
    pub filled_ns: u64,
    /// Cgroup v2 id of the task it was read from.
    pub cgroup_id: u64,
    /// kernfs id of the cgroup whose leaf name is in `cgroup_name` (v1 hierarchy or v2).
    pub cgroup_leaf_id: u64,
    /// Process id (kernel `tgid`).
    pub tgid: u32,
    /// Process id of the parent (`real_parent->tgid`).
    pub parent_tgid: u32,
    /// Process id as seen inside the task's own pid namespace.
    pub ns_tgid: u32,
    /// Namespace inode numbers, indexed by [`NsIndex`].
    pub ns_inums: [u32; NS_COUNT],
    /// [`EventKind::Identity`].
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Name of the process (its thread-group leader).
    pub process_comm: [u8; COMM_LEN],
    pub cgroup_name: [u8; CGROUP_NAME_LEN],
    /// Name of that cgroup's parent (`pod<uid>` or `kubepods-<qos>-pod<uid>.slice` for a
    /// pod's container), captured so the pod survives the cgroup's removal.
    pub cgroup_parent_name: [u8; CGROUP_NAME_LEN],
    /// UTS nodename of the task's UTS namespace.
    pub nodename: [u8; NODENAME_LEN],
    pub _pad2: [u8; 7],
}

pub const IDENTITY_EVENT_SIZE: usize = 408;
const _: () = assert!(core::mem::size_of::<IdentityEvent>() == IDENTITY_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<IdentityEvent>() == 8);

impl IdentityEvent {
    pub const fn zeroed() -> Self {
        Self {
            filled_ns: 0,
            cgroup_id: 0,
            cgroup_leaf_id: 0,
            tgid: 0,
            parent_tgid: 0,
            ns_tgid: 0,
            ns_inums: [0; NS_COUNT],
            kind: EventKind::Identity as u8,
            _pad: [0; 3],
            process_comm: [0; COMM_LEN],
            cgroup_name: [0; CGROUP_NAME_LEN],
            cgroup_parent_name: [0; CGROUP_NAME_LEN],
            nodename: [0; NODENAME_LEN],
            _pad2: [0; 7],
        }
    }

    /// The raw bytes, as the kernel writes them (decoder tests and fuzzing).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), integer and byte-array fields, explicit padding (size asserted).
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), IDENTITY_EVENT_SIZE)
        }
    }
}

/// How a TCP attempt completed ([`ConnectEvent::state`]). Never reuse a value.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// SYN_SENT -> ESTABLISHED.
    Established = 1,
    /// SYN_SENT -> CLOSE; the cause is in `sk_err`.
    Failed = 2,
    /// How it went was never seen (the kernel skipped the program run of its completion:
    /// a run that would nest in another on one CPU is not made; or a simultaneous open
    /// lost its mark), and a later attempt at the socket's reused address found it still
    /// waiting. Source port, handshake time and outcome are unknown.
    Unseen = 3,
}

impl ConnState {
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::Established),
            2 => Some(Self::Failed),
            3 => Some(Self::Unseen),
            _ => None,
        }
    }
}

/// Who sent the RST that ended a connection ([`TcpCloseEvent::reset`]).
pub struct ResetBy;

impl ResetBy {
    pub const NONE: u8 = 0;
    /// The peer (or a middlebox) reset it. Never set by the programs: user space knows it
    /// from the close's `sk_err` (ECONNRESET, or EPIPE in CLOSE_WAIT), which the kernel's
    /// `tcp_reset()` sets before the socket reaches CLOSE.
    pub const PEER: u8 = 1;
    /// `tcp:tcp_send_reset`: this host reset it.
    pub const LOCAL: u8 = 2;
}

/// Bits of [`TcpCloseEvent::flags`].
pub struct CloseFlags;

impl CloseFlags {
    /// The kernel has `tcp_sock.bytes_sent` (4.19+): `bytes_sent` is meaningful.
    pub const BYTES_SENT_KNOWN: u8 = 1;
    /// The peer's FIN arrived (`SOCK_DONE`: one of `bytes_received` is the FIN).
    pub const FIN_RECEIVED: u8 = 2;
}

/// An established TCP connection reached CLOSE: what `tcp_sock` says about its life.
/// Counters are the kernel's, in sequence space; user space turns them into payload.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TcpCloseEvent {
    /// The socket's kernel address and the attempt's start (`ConnectEvent::sock_id` and
    /// `boot_time_ns`): the connection this closes.
    pub sock_id: u64,
    pub connect_ns: u64,
    /// CLOCK_BOOTTIME of SYN_SENT -> ESTABLISHED and of -> CLOSE.
    pub established_ns: u64,
    pub close_ns: u64,
    /// `tcp_sock.bytes_acked`: our bytes the peer acknowledged, SYN and FIN included.
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`: the peer's bytes, its FIN included (not its SYN).
    pub bytes_received: u64,
    /// `tcp_sock.bytes_sent`: bytes sent, retransmissions included (4.19+).
    pub bytes_sent: u64,
    /// `tcp_sock.total_retrans`: segments retransmitted over the whole connection.
    pub total_retrans: u32,
    /// `tcp_sock.srtt_us`: smoothed RTT in microseconds x 8, as the kernel keeps it.
    pub srtt_us_x8: u32,
    /// The state the socket left for CLOSE (`TCP_*`).
    pub old_state: u8,
    /// A [`ResetBy`] value.
    pub reset: u8,
    /// [`CloseFlags`] bits.
    pub flags: u8,
    /// [`EventKind::TcpClose`].
    pub kind: u8,
    /// `sk->sk_err` at CLOSE (ECONNRESET, ETIMEDOUT, ...); 0 for an orderly close.
    pub sk_err: u32,
}

pub const TCP_CLOSE_EVENT_SIZE: usize = 72;
const _: () = assert!(core::mem::size_of::<TcpCloseEvent>() == TCP_CLOSE_EVENT_SIZE);

impl TcpCloseEvent {
    pub const fn zeroed() -> Self {
        Self {
            sock_id: 0,
            connect_ns: 0,
            established_ns: 0,
            close_ns: 0,
            bytes_acked: 0,
            bytes_received: 0,
            bytes_sent: 0,
            total_retrans: 0,
            srtt_us_x8: 0,
            old_state: 0,
            reset: 0,
            flags: 0,
            kind: EventKind::TcpClose as u8,
            sk_err: 0,
        }
    }

    /// The raw bytes, as the kernel writes them (decoder tests and fuzzing).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), integer fields only, no padding holes (size asserted).
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), TCP_CLOSE_EVENT_SIZE)
        }
    }
}

/// Per-CPU counters the programs keep. Values index the `COUNTERS` array: never reuse one.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Counter {
    /// The ring buffer was full: the event is lost.
    RingBufferFull = 0,
    /// A kernel read failed; the event went out with the affected fields zeroed.
    KernelReadFailed = 1,
    /// A UDP datagram of a flow already reported in this window.
    UdpFlowSuppressed = 2,
    /// A state map was full, so a call could not be followed to its end: the event is lost.
    StateMapFull = 3,
    /// Dropped by the per-cgroup rate limit; the cgroup's next event carries the count.
    RateLimited = 4,
    /// Excluded by a user filter (destination address or cgroup): not lost, not wanted.
    Filtered = 5,
    /// A repeat of a connection already reported in its aggregation window: counted in
    /// the window's aggregate, which user space reports when the window closes.
    Aggregated = 6,
    /// An established connection's close is not reported (its duration and bytes
    /// neither): the map of open connections was full; or its CLOSE was never seen (a
    /// program run the kernel skipped or did not make, or a removal the map refused),
    /// found when another socket takes its address.
    CloseUntracked = 7,
    /// A call's entry saved its state in `CALLS` (a new entry, not one replaced).
    CallsSaved = 8,
    /// A call's exit took its entry's state back from `CALLS`. User space reports
    /// `calls_saved - calls_taken -` the entries still in the map as evicted: calls whose
    /// exit never found their state, each possibly a lost event.
    CallsTaken = 9,
    /// A process's identity entered `IDENTITIES` (a new entry, not one refreshed) or took
    /// a slot of `IDENTITY_SLOTS` (a free one, or another process's stale one). User space
    /// reports this minus the entries in the map and the slots filled as
    /// `identities_evicted`: processes the cache forgot, whose next connection reads their
    /// identity again (a cost, not a loss).
    IdentitiesCached = 10,
    /// A process's identity the full ring buffer refused: not cached, so only the record
    /// whose run read it refers to it, which user space then reports without it
    /// (`identities_unknown`). Not an event lost.
    IdentityLost = 11,
    /// A free slot of `IDENTITY_SLOTS` took a process's identity. Slots are never freed
    /// (another process's identity takes a slot whose own is stale), so this is how many
    /// hold one: user space subtracts it, with the entries of `IDENTITIES`, from
    /// `identities_cached` (which counts slots taken too) for `identities_evicted`.
    IdentitySlotsFilled = 12,
}

pub const COUNTER_COUNT: u32 = 13;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::RingBufferFull,
        Counter::KernelReadFailed,
        Counter::UdpFlowSuppressed,
        Counter::StateMapFull,
        Counter::RateLimited,
        Counter::Filtered,
        Counter::Aggregated,
        Counter::CloseUntracked,
        Counter::CallsSaved,
        Counter::CallsTaken,
        Counter::IdentitiesCached,
        Counter::IdentityLost,
        Counter::IdentitySlotsFilled,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::RingBufferFull => "ring_buffer_full",
            Counter::KernelReadFailed => "kernel_read_failed",
            Counter::UdpFlowSuppressed => "udp_flow_suppressed",
            Counter::StateMapFull => "state_map_full",
            Counter::RateLimited => "rate_limited",
            Counter::Filtered => "filtered",
            Counter::Aggregated => "aggregated",
            Counter::CloseUntracked => "close_untracked",
            Counter::CallsSaved => "calls_saved",
            Counter::CallsTaken => "calls_taken",
            Counter::IdentitiesCached => "identities_cached",
            Counter::IdentityLost => "identity_lost",
            Counter::IdentitySlotsFilled => "identity_slots_filled",
        }
    }
}

/// Most bytes of a DNS message copied: the EDNS0 size most resolvers advertise (DNS flag
/// day 2020); classic UDP answers are at most 512.
pub const DNS_PAYLOAD_MAX: usize = 1232;

/// Bits of [`DnsEvent::flags`].
pub struct DnsFlags;

impl DnsFlags {
    /// The message came from a TCP socket (it starts with its 2-byte length, unless the
    /// resolver read that separately).
    pub const TCP: u8 = 1;
    /// The read returned more than [`DNS_PAYLOAD_MAX`] bytes: the copy is cut short.
    pub const TRUNCATED: u8 = 2;
    /// A query the workload sent (copied at the send), not a message it read.
    pub const QUERY: u8 = 4;
}

/// A DNS message a workload read from a socket marked as DNS (it sent to port 53): the
/// reading task and socket as a [`ConnectEvent`] (`kind` = [`EventKind::DnsAnswer`],
/// source = the workload's socket, destination = the resolver), then the bytes.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct DnsEvent {
    pub head: ConnectEvent,
    /// Bytes of `payload` that hold the message (never more than [`DNS_PAYLOAD_MAX`]).
    pub payload_len: u16,
    /// [`DnsFlags`] bits.
    pub flags: u8,
    pub _pad: [u8; 1],
    /// Nanoseconds from the socket's last query (or connect) to this read.
    pub latency_ns: u32,
    pub payload: [u8; DNS_PAYLOAD_MAX],
}

pub const DNS_EVENT_SIZE: usize = CONNECT_EVENT_SIZE + 8 + DNS_PAYLOAD_MAX;
const _: () = assert!(core::mem::size_of::<DnsEvent>() == DNS_EVENT_SIZE);
const _: () = assert!(DNS_EVENT_SIZE.is_multiple_of(8));

impl DnsEvent {
    pub const fn zeroed() -> Self {
        Self {
            head: ConnectEvent::zeroed(),
            payload_len: 0,
            flags: 0,
            _pad: [0; 1],
            latency_ns: 0,
            payload: [0; DNS_PAYLOAD_MAX],
        }
    }

    /// The raw bytes, as the kernel writes them (decoder tests and fuzzing).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), integer and byte-array fields, explicit padding (size asserted).
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), DNS_EVENT_SIZE) }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for ConnectEvent {}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for TcpCloseEvent {}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for DnsEvent {}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for IdentityEvent {}
