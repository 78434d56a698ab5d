//! Maps and the configuration global shared by every program.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use egress_shared::{
    AggregateKey, COUNTER_COUNT, ConnectEvent, FlowKey, FlowState, IdentityEvent, ProbeConfig,
};

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

/// Per-CPU counters indexed by `egress_shared::Counter`. Incremented with atomic adds
/// ([`crate::emit::count`]): programs can interleave on one CPU (see [`SCRATCH`]).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Where an event is assembled: it is larger than the 512-byte eBPF stack allows. One
/// slot per program that assembles events ([`Slot`]), because programs DO interleave on
/// one CPU: fentry/fexit (and raw tracepoints since 6.2) run with migration, not
/// preemption, disabled, so on preemptible kernels (PREEMPT_RT, full or lazy preemption) a
/// task can be preempted inside one program while another task runs a different program
/// on the same CPU; softirqs can interrupt a program on any kernel. A program never
/// interleaves with itself on one CPU: the kernel's recursion guard skips the second run
/// and counts it in the program's `recursion_misses`, which user space reports as possible
/// loss. The one program that also runs in softirq and had no guard before 6.2 (the raw
/// tracepoint's completion path, `emit::tcp_complete`) writes its record in place in the
/// ring buffer instead of here.
#[map]
pub static SCRATCH: PerCpuArray<ConnectEvent> = PerCpuArray::with_max_entries(Slot::COUNT, 0);

/// One word that holds its own address, written by the first program run that finds it
/// 0: how the BTF-enabled state-change program turns its typed socket pointer into a
/// plain number, and the record emitters a ring buffer record's address
/// ([`address_number`]). Both the store of a pointer into a map and the difference of
/// two pointers need the loader's `CAP_PERFMON` (the verifier's `allow_ptr_leaks`), which
/// the collector needs anyway; the word is a kernel address root can read from the map,
/// as the pending slots' socket addresses are. The verifier refuses the arithmetic that
/// hashes an address on any pointer it types, and the map keys and records want the
/// number; but the difference of two pointers is a number to it, and so is a value
/// loaded from a map: `sk - &word + word` is `sk`'s address as a number. A global in the
/// object's `.bss` map (see [`Words`]), read by every CPU and written once: one shared
/// cache line, where a per-CPU slot to store the pointer in and load it back took the
/// map's per-CPU pointer table and the slot, and could be overwritten by a softirq
/// between the two.
static SELF_ADDRESS: Words<1> = Words::new();

/// The address `pointer` holds (a typed pointer, a ring buffer record) as a plain number:
/// its distance from [`SELF_ADDRESS`] (pointer minus pointer: a number to the verifier)
/// plus the address that word holds.
#[inline(always)]
pub fn address_number(pointer: u64) -> u64 {
    let word = SELF_ADDRESS.first();
    // SAFETY: the global's 8-byte aligned word, valid for the program's life; every
    // writer stores the same value.
    let mut address = unsafe { core::ptr::read_volatile(word) };
    if address == 0 {
        // SAFETY: as above; volatile, so the load below is not folded into this store
        // (the verifier must see a number loaded, not the pointer stored).
        address = unsafe {
            core::ptr::write_volatile(word, word as u64);
            core::ptr::read_volatile(word)
        };
    }
    // The distance first, through an opaque copy: LLVM could otherwise compute
    // `address - word` first, a pointer subtracted from a number, which the verifier
    // refuses.
    let distance = core::hint::black_box(pointer.wrapping_sub(word as u64));
    distance.wrapping_add(address)
}

/// Words only the programs use (the socket number's base, marks, hints, counts by slot):
/// globals in the object's `.bss` map instead of array maps of their own. An element's
/// address is then the global's address (an immediate in the program) plus the index,
/// where an array map's lookup stored the index on the stack, loaded it back, and tested
/// the bound and the result for null, on every run that looked (BENCHMARKS.md,
/// kernel-cost: a dropped attempt's runs make five such looks). The same memory to every
/// CPU as an array map's values, and the same operations on it (volatile loads and
/// stores, atomics).
#[repr(transparent)]
pub struct Words<const N: usize>(core::cell::UnsafeCell<[u64; N]>);

// SAFETY: every access goes through raw pointers, with volatile or atomic operations, as
// on an array map's values, which every CPU shares.
unsafe impl<const N: usize> Sync for Words<N> {}

impl<const N: usize> Default for Words<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Words<N> {
    pub const fn new() -> Self {
        Self(core::cell::UnsafeCell::new([0; N]))
    }

    #[inline(always)]
    fn first(&self) -> *mut u64 {
        self.0.get() as *mut u64
    }

    /// The element at `index`, if in bounds (an index folded with `%` by a power of two
    /// `N` makes the test vanish).
    #[inline(always)]
    pub fn get_ptr_mut(&self, index: u32) -> Option<*mut u64> {
        // SAFETY: in bounds of the array, just checked.
        ((index as usize) < N).then(|| unsafe { self.first().add(index as usize) })
    }

    #[inline(always)]
    pub fn get(&self, index: u32) -> Option<&u64> {
        // SAFETY: a valid element (see `get_ptr_mut`), which other CPUs may write, as an
        // array map's value.
        self.get_ptr_mut(index).map(|word| unsafe { &*word })
    }
}

/// The [`SCRATCH`] slot of each program that assembles events.
#[derive(Copy, Clone)]
#[repr(u32)]
pub enum Slot {
    /// Was kprobe/fentry `tcp_connect`'s; TCP now goes through the state change in every
    /// family. Kept so the other slots keep their indices.
    #[allow(dead_code)]
    TcpConnect = 0,
    UdpSend = 1,
    UdpSendV6 = 2,
    UdpConnect = 3,
    UdpConnectV6 = 4,
    /// kprobe mode's one return probe, and tracepoint mode's one syscall-exit program.
    CallExit = 5,
    /// The socket state change tracepoint (`emit::tcp_syn_sent`), every family.
    SockState = 6,
    /// The raw socket state change (its raw or its BTF-enabled program: one of them is
    /// attached), every family.
    RawSockState = 7,
    /// Tracepoint mode's connect() exit (the sends' exit keeps `CallExit`).
    ConnectExit = 8,
    /// The DNS read exits (their `IDENTITY_SCRATCH` slot; a DNS query is identified by
    /// the sends' exit, in `CallExit`'s).
    DnsAnswer = 9,
}

impl Slot {
    pub const COUNT: u32 = 10;
}

/// Each UDP flow's last report and the bytes it sent since, for once-per-window
/// reporting. User space sweeps it (`emit::sweep_flow`, run by `BPF_PROG_TEST_RUN`): a
/// flow whose window has been over for a whole window more gives up its bytes and its
/// entry, so the LRU evicts only flows nobody sweeps. LRU: a forgotten flow is reported
/// again at its next datagram, and the bytes it had counted since its last record are
/// lost.
#[map]
pub static UDP_FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(16384, 0);

/// Where the sweep program leaves bytes too many for its return value (see
/// `egress_shared::flow::sweep`). One sweeper (user space's reader) at a time.
#[map]
pub static FLOW_SWEPT: Array<u64> = Array::with_max_entries(1, 0);

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC (the time the machine spent suspended), written
/// by user space before the programs attach and again every second: turns the socket's
/// clock cache (`tcp_sock.tcp_clock_cache`, monotonic) into the records' boot time
/// without a clock read (`emit::completion_time`). It changes only at a resume.
#[map]
pub static BOOT_OFFSET: Array<u64> = Array::with_max_entries(1, 0);

/// Token bucket of each cgroup (by the id of the cgroup that names its container), for
/// the per-cgroup rate limit, shared by all CPUs (see `emit::admit` for how they update
/// it), where its [`CGROUP_BUCKET_SLOTS`] slot is another cgroup's (or the kernel has no
/// compare-and-exchange). LRU: a forgotten cgroup starts again with a full bucket (the
/// drops it had yet to carry on a record stay counted in `Counter::RateLimited`).
#[map]
pub static CGROUP_BUCKETS: LruHashMap<u64, Bucket> = LruHashMap::with_max_entries(8192, 0);

/// The buckets of most cgroups, on kernels with compare-and-exchange (`fetching_atomics`,
/// 5.12+): one slot per hash of the cgroup key (`ProbeConfig::bucket_slot_mask`), which a
/// cgroup claims by swapping the slot's `cgroup` from 0 (or from a cgroup idle long
/// enough, see `emit::bucket_slot_claimable`) to its key. An array element is a pointer
/// the verifier computes inline, where a lookup in [`CGROUP_BUCKETS`] hashes the key and
/// walks a bucket list in three or four calls (~90 ns per admitted connection on an AMD
/// host whose returns are dear). A cgroup whose slot another holds keeps its bucket in
/// [`CGROUP_BUCKETS`], as every cgroup did before: a collision costs time, never the
/// limit.
#[map]
pub static CGROUP_BUCKET_SLOTS: Array<BucketSlot> =
    Array::with_max_entries(egress_shared::BUCKET_SLOT_COUNT, 0);

/// A cgroup's bucket in [`CGROUP_BUCKET_SLOTS`].
#[repr(C)]
#[derive(Copy, Clone)]
pub struct BucketSlot {
    /// The cgroup key the slot is claimed for; 0 while free.
    pub cgroup: u64,
    pub bucket: Bucket,
}

/// A cgroup's rate-limit state (see `emit::admit`, which keeps one of two forms, chosen
/// per kernel). Every field is changed only by atomic operations or by stores whose
/// repetition is harmless.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct Bucket {
    /// Before 5.12: tokens in nano-events (events x 1e9), so refill is integer
    /// arithmetic. Signed (two's complement): a CPU takes its token before it looks, so
    /// the value can dip below zero for a moment. Unused from 5.12.
    pub nano_tokens: u64,
    /// From 5.12: the theoretical arrival time (on the decisions' clock,
    /// `clock::decision_ns`) at which the bucket is full again. Before: the time up to
    /// which refill has been credited; may run slightly ahead of the clock.
    pub last_ns: u64,
    /// Events dropped since the cgroup's last submitted one.
    pub dropped: u64,
}

/// One counter per thread id (folded into 16,384 slots): non-zero once a thread of that
/// slot saved call state in [`CALLS`]. A syscall exit whose slot is zero has nothing to
/// take and returns on this one load (a global array, see [`Words`]) instead of a hash lookup:
/// every TCP connect() pays that exit, and TCP connects save no call state. Only ever
/// incremented (an atomic add, which every supported kernel has), so no save is missed.
pub static CALL_HINTS: Words<{ CALL_HINT_SLOTS as usize }> = Words::new();

pub const CALL_HINT_SLOTS: u32 = 16384;

/// Tracepoint mode where connect() is seen at its exit only (`regs_syscall_nr`): CLOSE
/// -> SYN_SENT inside a connect() that waits for the handshake's end (a blocking file,
/// no send timeout) stores the thread's `pid_tgid` in its slot (thread id folded into
/// 16,384), and that connect's exit, finding its own value, clears it and returns: the
/// state changes report TCP. Any other value (another thread of the slot, no TCP
/// attempt) sends the exit the slow way (fd -> socket), which is always right: a
/// collision costs time, never a record. Only a connect's own SYN_SENT marks (the
/// syscall number is checked), and only one that cannot return `-EINPROGRESS` (on which
/// the exit returns without looking), so a mark outlives its exit only if the kernel
/// skipped that exit's program (counted as a recursion miss), or if another thread
/// cleared `O_NONBLOCK` on the socket between the connect's call and its SYN
/// (docs/kernel.md, "A non-blocking connect needs no mark"); the thread's next connect
/// that waits then clears it. Marks are only made while [`CONNECT_EXIT_MARKS`] says the
/// exit takes them.
pub static TCP_CONNECT_MARKS: Words<{ CALL_HINT_SLOTS as usize }> = Words::new();

/// 1 while the tracepoint family's connect() exit, which reads its arguments back from
/// the registers (`regs_syscall_nr`), is attached (written by user space before each
/// family's attach: 1 for that family, 0 for the others): only then does SYN_SENT mark
/// a connect ([`TCP_CONNECT_MARKS`], and a DNS-over-TCP descriptor). The kprobe and
/// fentry families see a datagram connect in the kernel's own functions and never look
/// at a mark; with the word clear their SYN_SENT skips the mark's registers, syscall
/// number and store.
#[map]
pub static CONNECT_EXIT_MARKS: Array<u32> = Array::with_max_entries(1, 0);

/// Sockets in the middle of a simultaneous open (SYN_SENT -> SYN_RECV, both sides
/// connect()ed to each other at once), by a fold of the socket address into 256 slots,
/// so SYN_RECV -> ESTABLISHED, which every accepted connection also passes, costs an
/// array load. Two such opens in one slot at once: the first stays in `PENDING_TCP`
/// (reported pending) instead of completing. Simultaneous opens are rare.
pub static SIMULTANEOUS_OPENS: Words<{ SIMULTANEOUS_OPEN_SLOTS as usize }> = Words::new();

/// How many `SIMULTANEOUS_OPENS` slots hold a mark (kernels 5.12+, where a slot is set
/// and cleared with fetching atomics; elsewhere unused): while none does (always, but
/// for a simultaneous open in flight), a move out of SYN_RECV, which every accepted
/// connection makes, returns on this one word instead of finding its socket's number and
/// slot (two more lines, the slot's cold: its index is the socket's address). A mark the
/// kernel never takes (a skipped run) keeps it above zero: the slots are then looked at
/// as before.
pub static SIMULTANEOUS_MARKED: Words<1> = Words::new();

pub const SIMULTANEOUS_OPEN_SLOTS: u32 = 256;

/// State carried from a call's entry to its exit, by thread id. LRU: an entry whose exit
/// never runs (a missed return probe, a program skipped by the recursion guard, a call
/// that began before attach) is the least recently used one and goes first, instead of
/// staying for good and, 8,192 of them later, refusing every new call. A call in flight is
/// microseconds old, so only stale entries are evicted in practice.
#[map]
pub static CALLS: LruHashMap<u32, CallState> = LruHashMap::with_max_entries(8192, 0);

/// TCP attempts in SYN_SENT, by `struct sock` address, with the identity captured in the
/// connecting task; completed (and removed) at the socket's next state change (every
/// hook family). Kernels before 5.12 keep every attempt here; later ones only those whose
/// [`PENDING_SLOTS`] slot was taken. LRU, as `CALLS`: an attempt whose completion was skipped does not stay
/// for good; a full map (8,192 attempts in flight at once) forgets the oldest attempt.
/// User space reads it for `--pending-report`.
#[map]
pub static PENDING_TCP: LruHashMap<u64, ConnectEvent> = LruHashMap::with_max_entries(8192, 0);

/// Where an admitted TCP attempt waits from SYN_SENT to its completion, on kernels with
/// compare-and-exchange (`fetching_atomics`, 5.12+): one slot per socket address hash
/// (1,024 slots), claimed by swapping its `sock_id` from 0 to the socket, released by
/// swapping it back. An array element is a pointer the verifier computes inline, so an
/// attempt costs two atomic swaps and one copy (it is assembled in its slot, and copied
/// into the ring buffer at completion) instead of a hash insert and delete
/// (~290 ns and more each here). A socket whose slot another attempt holds goes to
/// [`PENDING_TCP`] instead (counted in [`PENDING_SPILLS`]), so a collision costs time,
/// never a record. Mmapable: user space reads it for `--pending-report` without a
/// syscall per slot. A released slot's `boot_time_ns` is `u64::MAX`, and an attempt
/// assembled in place writes its own last (after its identity), so a reader never takes
/// the leftovers of the previous attempt for a pending one.
#[map]
pub static PENDING_SLOTS: Array<ConnectEvent> =
    Array::with_max_entries(PENDING_SLOT_COUNT, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// log2 of the [`PENDING_SLOTS`] count.
pub const PENDING_SLOT_BITS: u32 = 10;
pub const PENDING_SLOT_COUNT: u32 = 1 << PENDING_SLOT_BITS;

/// Per [`PENDING_SLOTS`] slot: attempts of that slot now in [`PENDING_TCP`] (added at
/// insert, taken back at removal; an attempt the LRU evicted leaves it high, which only
/// costs its slot's misses a hash lookup). Zero, a completion that finds its slot held
/// by another socket (an attempt the filters or the rate limit dropped) looks no further.
pub static PENDING_SPILLS: Words<{ PENDING_SLOT_COUNT as usize }> = Words::new();

/// The sum of [`PENDING_SPILLS`], kept beside it (the same adds): while zero (always, but
/// in a storm of concurrent attempts whose slots collide), an attempt that was dropped
/// (filtered, rate-limited, aggregated) and its completion look at this one word, read by
/// every CPU and written only where an attempt enters or leaves `PENDING_TCP`, instead of
/// their slot's count (a line indexed by the socket's address, cold on a node with many
/// sockets). An attempt the LRU evicted, or a stale one overwritten at its address,
/// leaves it high for good, as it leaves its slot's count: the counts are then looked at
/// as before (time, never a record).
pub static PENDING_SPILLED: Words<1> = Words::new();

/// The part of a task's identity its whole process shares and that rarely changes, by
/// `tgid`, so a process's connections after its first cost a lookup and a few checking
/// loads instead of ~25 kernel reads and three string reads, and carry a reference to
/// the identity sent once (`task::walk`), not a copy. Where the process's
/// [`IDENTITY_SLOTS`] slot is another's (or the kernel has no compare-and-exchange). LRU:
/// 8,192 processes; an evicted one is read again at its next connection.
#[map]
pub static IDENTITIES: LruHashMap<u32, CachedIdentity> = LruHashMap::with_max_entries(8192, 0);

/// Most processes' cached identities, on kernels with compare-and-exchange
/// (`fetching_atomics`, 5.12+): one slot per hash of the process id
/// (`ProbeConfig::identity_slot_mask`). An array element is a pointer the verifier
/// computes inline, where a lookup in [`IDENTITIES`] hashes the key and walks a bucket
/// list in three or four kernel calls (~130 ns per connection in a profile on an AMD host
/// whose returns are dear). A process fills its slot if it is free, its own, or holds a
/// stale identity (older than [`IDENTITY_MAX_AGE_NS`], which no reader takes), by
/// swapping `owner` to [`IDENTITY_WRITING`] first and to its id last (`task::cache`);
/// else its identity goes to [`IDENTITIES`]. Readers check the slot's owner and fill
/// time before and after they read it (`task::unchanged`), as for an LRU element reused.
#[map]
pub static IDENTITY_SLOTS: Array<CachedIdentity> =
    Array::with_max_entries(egress_shared::IDENTITY_SLOT_COUNT, 0);

/// The owner of an [`IDENTITY_SLOTS`] slot being written (no process id is this).
pub const IDENTITY_WRITING: u64 = u64::MAX;

/// Where an [`Identity`] is read before it is cached (one slot per program, as [`SCRATCH`]).
#[map]
pub static IDENTITY_SCRATCH: PerCpuArray<Identity> = PerCpuArray::with_max_entries(Slot::COUNT, 0);

/// A process's identity as it is read ([`IDENTITY_SCRATCH`]): what is cached, then what
/// is sent.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct Identity {
    pub cached: CachedIdentity,
    /// The identity as it is sent to user space; its `filled_ns` (CLOCK_BOOTTIME) is
    /// what records refer to it by.
    pub record: IdentityEvent,
}

/// What the programs keep of a process's identity ([`IDENTITY_SLOTS`], [`IDENTITIES`]):
/// what tells it is stale, and what a record needs of it (its time, its cgroup key).
/// The names went to user space when it was read (`IdentityEvent`).
#[repr(C)]
#[derive(Copy, Clone)]
pub struct CachedIdentity {
    // Compared on every use, with the task's `cgroup_id` (a move to another v2 cgroup)
    // and `filled_decision_ns` (its age): any change reads the identity again.
    /// The process's id, first: an element the LRU hands to another process while a
    /// program reads it is overwritten from its start, and a slot is
    /// [`IDENTITY_WRITING`] while it is written, so this word tells it
    /// (`task::unchanged`).
    pub owner: u64,
    /// The namespaces named, by address (`task::same_namespaces`): setns/unshare change
    /// them.
    pub namespaces: [u64; crate::task::NAMESPACES],
    /// The serial number of the task's css in the configured hierarchy, on cgroup v1
    /// only: a move in a v1 hierarchy, which the v2 id does not see. 0 on v2.
    pub cgroup_serial: u64,
    /// `task->self_exec_id`: bumped by exec (new process name, possibly new cgroup or
    /// namespaces set up by the exec'd program's parent).
    pub exec_id: u64,
    /// When it was filled, on the decisions' clock (`clock::decision_ns`): older than
    /// `IDENTITY_MAX_AGE_NS`, it is read (and sent) again. The age limit bounds the
    /// staleness of what nothing above detects: a new parent after the parent exited, a
    /// nodename changed by sethostname, a process renamed through its leader's comm, a
    /// recycled pid whose process has the same exec count, namespaces and cgroup.
    pub filled_decision_ns: u64,
    /// The sent identity's `filled_ns`: records refer to it by this time.
    pub filled_ns: u64,
    /// The task's v2 cgroup id when it was read.
    pub cgroup_id: u64,
    /// The sent identity's `cgroup_leaf_id`: the per-cgroup maps' key on cgroup v1.
    pub cgroup_leaf_id: u64,
}

/// [`CachedIdentity`] in 8-byte words, `owner` first.
pub const CACHED_IDENTITY_WORDS: usize = core::mem::size_of::<CachedIdentity>() / 8;
const _: () = assert!(core::mem::size_of::<CachedIdentity>() == 8 * (7 + crate::task::NAMESPACES));
const _: () = assert!(core::mem::offset_of!(CachedIdentity, owner) == 0);

/// A cached identity is read again after this long (see `CachedIdentity::filled_decision_ns`).
pub const IDENTITY_MAX_AGE_NS: u64 = 1_000_000_000;

/// Established connections this collector reported, by `struct sock` address, until
/// they reach CLOSE (only with `track_closes`): on 5.12+ only those whose [`OPEN_SLOTS`]
/// slot was taken, before every one. Not LRU: under churn an LRU would evict
/// the long-lived connections (the ones whose close matters most) in favour of short
/// ones. When full, the newest connection goes untracked and is counted
/// (`close_untracked`), as is an entry found stale here or in [`OPEN_SLOTS`]: a
/// connection whose CLOSE was never seen, found when another socket takes its address
/// (its SYN_SENT, or a close whose ports are not the entry's). 65536 x 24 bytes.
#[map]
pub static OPEN_TCP: HashMap<u64, OpenConn> = HashMap::with_max_entries(65536, 0);

/// Where an established connection waits for its close on kernels with
/// compare-and-exchange (`fetching_atomics`, 5.12+), as an attempt waits in
/// [`PENDING_SLOTS`]: one slot per socket address hash (4,096 slots), claimed by swapping
/// its `sock_id` from 0 to the socket, released at CLOSE by swapping it back. The close
/// of every TCP socket (both ends of every connection, reported or not) then costs an
/// inline array load instead of a hash lookup, and a reported connection a swap each way
/// instead of a hash insert and delete. A connection whose slot another one holds goes
/// to [`OPEN_TCP`] (counted in [`OPEN_SPILLS`]): a collision costs time, never a close.
#[map]
pub static OPEN_SLOTS: Array<OpenSlot> = Array::with_max_entries(OPEN_SLOT_COUNT, 0);

/// log2 of the [`OPEN_SLOTS`] count.
pub const OPEN_SLOT_BITS: u32 = 12;
pub const OPEN_SLOT_COUNT: u32 = 1 << OPEN_SLOT_BITS;

/// Per [`OPEN_SLOTS`] slot: its connections now in [`OPEN_TCP`] (added at insert, taken
/// back at removal). Zero, a close whose slot another socket holds looks no further.
#[map]
pub static OPEN_SPILLS: Array<u64> = Array::with_max_entries(OPEN_SLOT_COUNT, 0);

/// An [`OPEN_SLOTS`] slot: the socket that holds it (0: free) and its [`OpenConn`]. The
/// connection's transitions after ESTABLISHED (its resets, its CLOSE) run under the
/// socket's lock, one at a time, so the fields need no atomics; only the tag does.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct OpenSlot {
    pub sock_id: u64,
    pub open: OpenConn,
}

/// What the close of a tracked connection needs that the socket does not keep.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct OpenConn {
    /// `ConnectEvent::boot_time_ns`: names the connection to user space.
    pub connect_ns: u64,
    pub established_ns: u64,
    /// An `egress_shared::ResetBy` value, set by the `tcp_send_reset` tracepoint.
    pub reset: u8,
    pub _pad: [u8; 3],
    /// The connection's source port (high half) and destination port, host order: a
    /// close at this socket address whose ports differ is another socket's (this one's
    /// CLOSE was never seen, and its address was reused).
    pub ports: u32,
}
const _: () = assert!(core::mem::size_of::<OpenConn>() == 24);

/// Destinations users exclude (`--exclude-cidr`, `--exclude-loopback`), IPv4 and IPv6.
#[map]
pub static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
pub static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);

/// Cgroups (by [`crate::filter::cgroup_key`]) user space found to belong to an excluded
/// Kubernetes namespace. LRU: a forgotten one is caught and listed again by user space.
#[map]
pub static EXCLUDED_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Repeats counted per open aggregate, per CPU (so no contention between CPUs; the add is
/// still atomic, as programs interleave on one CPU). Not LRU: when full, new
/// connections are reported one by one instead of an aggregate being forgotten with its
/// count. User space sums, reads and deletes the entries of closed windows. Where a
/// CPU's [`REPEAT_SLOTS`] slot holds the key, that CPU's repeats count there instead.
///
/// Not preallocated: kernels before 5.10 reuse a deleted preallocated element without
/// zeroing the other CPUs' slots, which would carry old counts into a new window.
#[map]
pub static AGGREGATES: PerCpuHashMap<AggregateKey, u64> =
    PerCpuHashMap::with_max_entries(8192, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Repeats counted in place per CPU (`egress_shared::RepeatSlot`): one slot per hash of the
/// aggregate key, claimed for a key whose repeat found it in [`AGGREGATES`] once the
/// slot's window has been read ([`AGGREGATES_READ`]). A repeat whose key its CPU's slot
/// holds costs a compare of four words and an add, where the hash lookup took three or
/// four kernel calls (~250 ns per connection in a profile on an AMD host whose returns
/// are dear). User space sums the slots with the map when it closes a window.
#[map]
pub static REPEAT_SLOTS: PerCpuArray<egress_shared::RepeatSlot> =
    PerCpuArray::with_max_entries(egress_shared::RepeatSlot::PER_CPU, 0);

/// The last aggregation window user space has read (the map and the slots) and closed:
/// a slot of that window or an earlier one may take another key.
#[map]
pub static AGGREGATES_READ: Array<u64> = Array::with_max_entries(1, 0);

/// What a call's entry saw, for its exit.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct CallState {
    /// `struct sock *` (kprobe mode; tracepoint mode connect(), found at its entry).
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
/// `CallState::user_addr` points to a `struct user_msghdr` (sendmsg).
pub const USER_ADDR_MSGHDR: u32 = 2;
/// `CallState::user_addr` points to a `struct mmsghdr` array (sendmmsg), which starts
/// with its first message's `user_msghdr`.
pub const USER_ADDR_MMSGHDR: u32 = 3;

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

/// Where a DNS record is assembled (1,384 bytes): slot 0 for answers (the read exits,
/// kprobe mode's receive return), slot 1 for queries (the send exits), 2-4 for the fentry
/// family's three receive fexits, as [`SCRATCH`] has a slot per program.
#[map]
pub static DNS_SCRATCH: PerCpuArray<egress_shared::DnsEvent> = PerCpuArray::with_max_entries(5, 0);

/// One bit per process (by `tgid`, folded into 65536 bits) that has marked a DNS socket:
/// the early exit of every read syscall's entry and exit on the node is this array load
/// (inlined by the verifier), not a hash lookup. Bits are never cleared: a process that
/// looked a name up once pays the hash lookups on its later reads, a fold collision too.
/// Set without an atomic (eBPF Rust has no atomic read-modify-write): two CPUs marking
/// processes of the same word at the same instant can lose one bit, which that
/// process's next query sets again.
#[map]
pub static DNS_PROCESSES: Array<u64> = Array::with_max_entries(1024, 0);

/// Sockets marked as DNS in the kprobe and fentry families, by `struct sock` address: a
/// UDP send or connect to port 53, or a TCP connect to it (every family marks TCP here, at
/// SYN_SENT). The receive hooks (`udp_recvmsg`, `udpv6_recvmsg`, `tcp_recvmsg`) look a
/// socket up here only once [`DNS_PROCESSES`] says its process marked one. LRU: a
/// resolver's short-lived sockets age out; `local_port` guards against the address being
/// reused by another socket (see `probes::dns_sock`).
#[map]
pub static DNS_SOCKS: LruHashMap<u64, DnsSock> = LruHashMap::with_max_entries(8192, 0);

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DnsSock {
    /// When the last query (or the connect) went out, CLOCK_BOOTTIME.
    pub sent_ns: u64,
    /// The socket's local port when marked (UDP; 0 for TCP, marked before it has one).
    pub local_port: u16,
    pub _pad: [u8; 6],
}

/// kprobe family: a receive on a marked socket, from `kprobe_dns_recvmsg` to its return
/// probe, by thread id (LRU, as [`CALLS`]: a missed return leaves no entry for good).
#[map]
pub static DNS_RECVS: LruHashMap<u32, DnsRecv> = LruHashMap::with_max_entries(1024, 0);

#[repr(C)]
#[derive(Copy, Clone)]
pub struct DnsRecv {
    pub sk: u64,
    /// The kernel `struct msghdr`, alive until the call returns.
    pub msg: u64,
    /// The caller's buffer size (`len` argument).
    pub len: u64,
    pub sent_ns: u64,
}
