//! Assembling, de-duplicating and submitting events; the counters.

use aya_ebpf::helpers::bpf_get_current_task;
use egress_shared::{ConnectEvent, Counter, EventKind, NsIndex};

use crate::{
    filter,
    maps::{
        Bucket, CALLS, CGROUP_BUCKETS, COUNTERS, CallState, EVENTS, FlowKey, PENDING_TCP, SCRATCH,
        UDP_FLOWS, config,
    },
    read,
    sock::{self, Dest, IPPROTO_TCP, IPPROTO_UDP},
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

#[inline(always)]
fn submit(ev: &mut ConnectEvent) {
    if filter::excluded_cgroup(ev) {
        count(Counter::Filtered);
        return;
    }
    match admit(filter::cgroup_key(ev)) {
        Some(dropped) => ev.rate_limited_before = dropped,
        None => {
            count(Counter::RateLimited);
            return;
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
    }
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

/// A TCP attempt whose tuple is complete (kprobe/fentry on `tcp_connect`).
#[inline(always)]
pub fn tcp_connect(sk: u64) {
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::TcpConnect as u8;
    fill_sock(ev, sk);
    if !filter::wanted(ev) {
        return;
    }
    fill_task(ev);
    submit(ev);
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
    submit(ev);
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

/// Tracepoint mode: a TCP socket entered SYN_SENT. Its source port is chosen just after,
/// so the event waits in PENDING_TCP for the connect() exit or the next state change.
#[inline(always)]
pub fn tcp_syn_sent(sk: u64) {
    let Some(ev) = scratch() else { return };
    ev.kind = EventKind::TcpConnect as u8;
    fill_sock(ev, sk);
    if !filter::wanted(ev) {
        return;
    }
    fill_task(ev);
    if PENDING_TCP.insert(&sk, ev, 0).is_err() {
        count(Counter::StateMapFull);
    }
}

/// Tracepoint mode: completes and submits the pending attempt on `sk`, once: whoever
/// removes the entry reports it. `sport_hint` stands in when the socket's own source
/// port is already released (0 when unknown).
#[inline(always)]
pub fn tcp_complete(sk: u64, sport_hint: u16) {
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
    if sock::fill_ports_and_addrs(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
    if ev.src_port == 0 {
        ev.src_port = sport_hint;
    }
    submit(ev);
}

/// Tracepoint mode: what to do at the exit of a connect() on `sk`.
#[inline(always)]
pub fn connect_exit(sk: u64, dest: &Dest) {
    match sock::protocol(sk) {
        Ok(IPPROTO_TCP) => tcp_complete(sk, 0),
        Ok(IPPROTO_UDP) => udp(sk, dest, EventKind::UdpConnect, false),
        Ok(_) => {}
        Err(_) => count(Counter::KernelReadFailed),
    }
}
