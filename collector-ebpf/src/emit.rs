//! Assembling, de-duplicating and submitting events; the counters.

use aya_ebpf::helpers::bpf_get_current_task;
use egress_shared::{
    CloseFlags, ConnState, ConnectEvent, Counter, EventKind, NsIndex, ResetBy, TcpCloseEvent,
};

use crate::{
    filter,
    maps::{
        Bucket, CALLS, CGROUP_BUCKETS, COUNTERS, CallState, EVENTS, FlowKey, OPEN_TCP, OpenConn,
        PENDING_TCP, SCRATCH, UDP_FLOWS, config,
    },
    read,
    sock::{self, Dest, IPPROTO_UDP},
    task,
};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and programs do not nest on one CPU for these hooks.
        unsafe { *slot += 1 };
    }
}

/// A zeroed per-CPU event to fill.
#[inline(always)]
fn scratch() -> Option<&'static mut ConnectEvent> {
    let slot = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU slot is ours for the rest of this program run.
    let ev = unsafe { &mut *slot };
    *ev = ConnectEvent::zeroed();
    Some(ev)
}

/// The per-cgroup token bucket: `Some(dropped before)` admits the event, `None` drops it.
/// Updates race between CPUs (a plain map value): at worst a few extra events pass.
#[inline(always)]
fn admit(cgroup: u64) -> Option<u32> {
    let rate = config!(cgroup_rate) as u64;
    if rate == 0 {
        return Some(0);
    }
    let burst = (config!(cgroup_burst) as u64).max(1) * 1_000_000_000;
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    let Some(bucket) = CGROUP_BUCKETS.get_ptr_mut(&cgroup) else {
        let fresh = Bucket {
            nano_tokens: burst - 1_000_000_000,
            last_ns: now,
            dropped: 0,
        };
        let _ = CGROUP_BUCKETS.insert(&cgroup, &fresh, 0);
        return Some(0);
    };
    // SAFETY: a valid map value; see the race note above.
    let bucket = unsafe { &mut *bucket };
    // Capped so elapsed x rate cannot overflow; a bucket idle that long is full anyway.
    let elapsed = now.wrapping_sub(bucket.last_ns).min(10_000_000_000);
    bucket.last_ns = now;
    bucket.nano_tokens = (bucket.nano_tokens + elapsed * rate).min(burst);
    if bucket.nano_tokens < 1_000_000_000 {
        bucket.dropped += 1;
        return None;
    }
    bucket.nano_tokens -= 1_000_000_000;
    let dropped = bucket.dropped;
    bucket.dropped = 0;
    Some(dropped.min(u32::MAX as u64) as u32)
}

/// Submits `ev`; false when a filter, the rate limit or a full ring kept it out.
#[inline(always)]
fn submit(ev: &mut ConnectEvent) -> bool {
    if filter::excluded_cgroup(ev) {
        count(Counter::Filtered);
        return false;
    }
    match admit(filter::cgroup_key(ev)) {
        Some(dropped) => ev.rate_limited_before = dropped,
        None => {
            count(Counter::RateLimited);
            return false;
        }
    }
    // bpf_ringbuf_query / bpf_ringbuf_output flags (uapi/linux/bpf.h).
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let threshold = config!(wakeup_bytes) as u64;
    let flags = if threshold == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    filter::open_aggregate(ev);
    if EVENTS.output::<ConnectEvent>(&*ev, flags).is_err() {
        // An aggregate this record opened stays: user space finds its repeats without
        // their opening record when the window closes and counts them as lost.
        count(Counter::RingBufferFull);
        return false;
    }
    true
}

#[inline(always)]
fn fill_task(ev: &mut ConnectEvent) {
    if !task::fill(ev) {
        count(Counter::KernelReadFailed);
    }
}

#[inline(always)]
fn fill_sock(ev: &mut ConnectEvent, sk: u64) {
    if sock::fill(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
}

/// A UDP connect or send on `sk`; `dest` is the caller's destination, if it named one.
/// `v4_mapped_reported_inside`: the hook is udpv6_sendmsg, which hands IPv4-mapped
/// destinations to udp_sendmsg, whose own hook reports them.
#[inline(always)]
pub fn udp(sk: u64, dest: &Dest, kind: EventKind, v4_mapped_reported_inside: bool) {
    match sock::protocol(sk) {
        Ok(IPPROTO_UDP) => {}
        Ok(_) => return,
        Err(_) => {
            count(Counter::KernelReadFailed);
            return;
        }
    }
    let Some(ev) = scratch() else { return };
    ev.kind = kind as u8;
    fill_sock(ev, sk);
    if dest.is_some() {
        sock::set_dest(ev, sk, dest);
    }
    if v4_mapped_reported_inside && ev.family == sock::AF_INET6 && sock::is_v4_mapped(&ev.dst_addr)
    {
        return;
    }
    if ev.dst_port == 0 && ev.dst_addr == [0; 16] {
        // No destination: nothing leaves (EDESTADDRREQ, or a disconnect).
        return;
    }
    // Cheap part first: a datagram of a flow already reported costs one map lookup.
    ev.ns_inums[NsIndex::Net as usize] = current_netns();
    if !first_in_window(ev) {
        count(Counter::UdpFlowSuppressed);
        return;
    }
    if !filter::wanted(ev) {
        return;
    }
    fill_task(ev);
    let _ = submit(ev);
}

#[inline(always)]
fn current_netns() -> u32 {
    let task = unsafe { bpf_get_current_task() };
    let Ok(nsproxy) = read::pointer(task, config!(offsets.task_nsproxy)) else {
        return 0;
    };
    let Ok(net) = read::pointer(nsproxy, config!(offsets.nsproxy_net_ns)) else {
        return 0;
    };
    read::kernel(net, config!(offsets.net_ns_inum)).unwrap_or(0)
}

/// Records the flow and says whether it was last reported more than a window ago.
#[inline(always)]
fn first_in_window(ev: &ConnectEvent) -> bool {
    let key = FlowKey {
        netns: ev.ns_inums[NsIndex::Net as usize],
        family: ev.family,
        protocol: ev.protocol as u16,
        src_port: ev.src_port,
        dst_port: ev.dst_port,
        _pad: 0,
        src_addr: ev.src_addr,
        dst_addr: ev.dst_addr,
    };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    // SAFETY: the value is a plain u64 read once.
    if let Some(last) = unsafe { UDP_FLOWS.get(&key) } {
        if now.wrapping_sub(*last) < config!(udp_flow_window_ns) {
            return false;
        }
    }
    // LRU: a full map forgets the oldest flow, which at worst reports it again.
    let _ = UDP_FLOWS.insert(&key, &now, 0);
    true
}

/// Saves what a call's entry knows for its exit.
#[inline(always)]
pub fn remember_call(state: &CallState) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if CALLS.insert(&tid, state, 0).is_err() {
        count(Counter::StateMapFull);
    }
}

/// Takes back what the entry of the current thread's call saved.
#[inline(always)]
pub fn take_call() -> Option<CallState> {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal.
    let state = unsafe { *CALLS.get(&tid)? };
    let _ = CALLS.remove(&tid);
    Some(state)
}

/// A TCP socket entered SYN_SENT, in the connecting task (every hook family): the
/// attempt's identity is captured here. Its source port is chosen just after, so the
/// event waits in PENDING_TCP for the socket's next state change.
#[inline(always)]
pub fn tcp_syn_sent(sk: u64) {
    // This connect() is TCP: its syscall exit (tracepoint mode) has nothing to do, and
    // finds no call state instead of walking fd -> file -> socket.
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal.
    let call = unsafe { CALLS.get(&tid) }.copied();
    let _ = CALLS.remove(&tid);
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::TcpConnect as u8;
    if sock::fill_tcp_dest(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
    // DNS over TCP: the connect's descriptor (tracepoint mode) is marked for its reads.
    if ev.dst_port == crate::probes::dns::DNS_PORT {
        if let Some(call) = call {
            if call.fd != 0 || call.sk == 0 {
                crate::probes::dns::mark(call.fd, sk);
            }
        }
    }
    if !filter::wanted(ev) {
        return;
    }
    fill_task(ev);
    ev.sock_id = sk;
    if PENDING_TCP.insert(&sk, ev, 0).is_err() {
        count(Counter::StateMapFull);
    }
}

/// The attempt on `sk` left SYN_SENT for `established` (true) or CLOSE: completes and
/// submits it, once (whoever removes the entry reports it). Runs in softirq or in any
/// task: nothing here reads the current task.
#[inline(always)]
pub fn tcp_complete(sk: u64, established: bool) {
    let Some(pending) = PENDING_TCP.get_ptr(&sk) else {
        return;
    };
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: both pointers are valid map values; the copy happens before removal.
    let ev = unsafe {
        *slot = *pending;
        &mut *slot
    };
    if PENDING_TCP.remove(&sk).is_err() {
        return;
    }
    if sock::fill_tcp_source(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
    if ev.src_port == 0 {
        // On the way to CLOSE the port is released (inet_num zeroed) before this runs;
        // inet_sport (network order) still names it.
        ev.src_port = read::kernel::<u16>(sk, config!(offsets.inet_sport)).map_or(0, u16::from_be);
    }
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    ev.handshake_ns = now.wrapping_sub(ev.boot_time_ns);
    ev.syn_retransmits = read::kernel(sk, config!(offsets.tcp_total_retrans)).unwrap_or(0);
    if established {
        ev.state = ConnState::Established as u8;
    } else {
        ev.state = ConnState::Failed as u8;
        ev.sk_err = read::kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or(0) as u32;
        ev.sk_err_soft = read::kernel::<i32>(sk, config!(offsets.sk_err_soft)).unwrap_or(0) as u32;
    }
    let connect_ns = ev.boot_time_ns;
    if submit(ev) && established {
        let open = OpenConn {
            connect_ns,
            established_ns: now,
            reset: ResetBy::NONE,
            _pad: [0; 7],
        };
        if OPEN_TCP.insert(&sk, &open, 0).is_err() {
            count(Counter::CloseUntracked);
        }
    }
}

/// A socket reached CLOSE from `old_state` (not SYN_SENT): if it is a connection this
/// collector reported, its life as `tcp_sock` counted it goes out. One map lookup for
/// every other socket (servers, unreported ones).
#[inline(always)]
pub fn tcp_closed(sk: u64, old_state: u8) {
    let Some(open) = OPEN_TCP.get_ptr(&sk) else {
        return;
    };
    // SAFETY: a valid map value, copied before removal.
    let open = unsafe { *open };
    if OPEN_TCP.remove(&sk).is_err() {
        return;
    }
    let mut ev = TcpCloseEvent::zeroed();
    ev.sock_id = sk;
    ev.connect_ns = open.connect_ns;
    ev.established_ns = open.established_ns;
    ev.close_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    ev.old_state = old_state;
    ev.reset = open.reset;
    let mut failed = false;
    let mut read_u64 = |offset: u32| -> u64 {
        read::kernel::<u64>(sk, offset).unwrap_or_else(|_| {
            failed = true;
            0
        })
    };
    ev.bytes_acked = read_u64(config!(offsets.tcp_bytes_acked));
    ev.bytes_received = read_u64(config!(offsets.tcp_bytes_received));
    let sent_at = config!(offsets.tcp_bytes_sent);
    if sent_at != 0 {
        ev.bytes_sent = read_u64(sent_at);
        ev.flags |= CloseFlags::BYTES_SENT_KNOWN;
    }
    let sk_flags = read_u64(config!(offsets.sk_flags));
    if (sk_flags >> (config!(offsets.sock_done_bit) & 63)) & 1 == 1 {
        ev.flags |= CloseFlags::FIN_RECEIVED;
    }
    ev.total_retrans = read::kernel(sk, config!(offsets.tcp_total_retrans)).unwrap_or(0);
    ev.srtt_us_x8 = read::kernel(sk, config!(offsets.tcp_srtt_us)).unwrap_or(0);
    ev.sk_err = read::kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or(0) as u32;
    if failed {
        count(Counter::KernelReadFailed);
    }
    if EVENTS
        .output::<TcpCloseEvent>(&ev, close_wakeup_flags())
        .is_err()
    {
        count(Counter::RingBufferFull);
    }
}

/// As `submit` does for connections: wake the reader only once `wakeup_bytes` wait, so
/// a close costs no wake-up of its own (the reader also drains on a timer).
#[inline(always)]
pub fn close_wakeup_flags() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let threshold = config!(wakeup_bytes) as u64;
    if threshold == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// `tcp:tcp_receive_reset` / `tcp:tcp_send_reset` on `sk`: marks a tracked connection.
#[inline(always)]
pub fn tcp_reset(sk: u64, by: u8) {
    if sk == 0 {
        return;
    }
    if let Some(open) = OPEN_TCP.get_ptr_mut(&sk) {
        // SAFETY: a valid map value; a byte store.
        unsafe {
            if (*open).reset == ResetBy::NONE {
                (*open).reset = by;
            }
        }
    }
}

/// Tracepoint mode: what to do at the exit of a connect() on `sk`. TCP connects removed
/// their call state at SYN_SENT; one that failed before SYN_SENT (no route, bad
/// address) fires no state change and is not an attempt on the wire.
#[inline(always)]
pub fn connect_exit(sk: u64, dest: &Dest) {
    match sock::protocol(sk) {
        Ok(IPPROTO_UDP) => udp(sk, dest, EventKind::UdpConnect, false),
        Ok(_) => {}
        Err(_) => count(Counter::KernelReadFailed),
    }
}
