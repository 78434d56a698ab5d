//! The current task's identity: ids, names, namespaces and cgroup.
//!
//! Split in two for cost: what differs between threads or can change at any call (ids,
//! credentials, thread name, cgroup id) is read on every event, from the current task
//! with plain loads where the program has its typed pointer, else from helpers
//! ([`fill_ids`], `read::Reader::pid_tgid`); what the whole process shares and rarely
//! changes (parent, process name, pid-namespace pid, namespaces, nodename, cgroup names)
//! is read from the task's structs once and cached per process (`IDENTITY_SLOTS`,
//! `IDENTITIES`; [`fill_process`]), checked on each use against what could have changed
//! it.
//!
//! The cached identity goes to user space once, not in every record: the walk sends it
//! as an `IdentityEvent` before it caches it, and a record carries only the time it was
//! read (`ConnectEvent::identity_ns`), which user space joins with the process id. The
//! ring holds the identity before any record that refers to it: a record refers to an
//! identity walked in its own run (sent earlier in that run) or found in the cache (put
//! there after it was sent), and a record's place in the ring is taken when it is
//! reserved, after either. A record then costs no copy of the ~340 bytes of names and
//! ids, and its ring slot, its pending slot and user space's decoding are a third as
//! large.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes,
    generated::bpf_get_current_comm as bpf_get_current_comm_raw,
};
use egress_shared::{
    COMM_LEN, CgroupSource, ConnectEvent, Counter, EventKind, IdentityEvent, NsIndex,
};

use crate::{
    emit::{compare_exchange, count, exchange, load},
    maps::{
        CACHED_IDENTITY_WORDS, CachedIdentity, IDENTITIES, IDENTITY_MAX_AGE_NS, IDENTITY_SCRATCH,
        IDENTITY_SLOTS, IDENTITY_WRITING, Identity, Slot, config,
    },
    read::{self, Reader},
};

const _: () = assert!(
    core::mem::size_of::<Identity>()
        == core::mem::size_of::<CachedIdentity>() + egress_shared::IDENTITY_EVENT_SIZE
);

/// How far ahead of this CPU's clock reading a cached identity's fill time may be (see
/// [`fresh`]): a few ticks.
const IDENTITY_MAX_AHEAD_NS: i64 = 50_000_000;

/// What every event reads from the current task `task` (`R::current_task()`): ids,
/// credentials, thread name and cgroup id, and the time, returned, not written: the
/// caller writes it last (see `emit::identify`). Enough for the per-cgroup decisions on
/// cgroup v2.
#[inline(always)]
pub fn fill_ids<R: Reader>(ev: &mut ConnectEvent, task: u64) -> u64 {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    fill_thread::<R>(ev, task, R::pid_tgid(task), R::cgroup_id(task));
    now
}

/// [`fill_ids`] but the time, from the pid/tgid and cgroup id the caller read already.
/// The thread name is the current task's `comm`: two loads where `R` reads directly,
/// else the helper, writing into the event (aya's wrapper zeroes a stack copy a byte at a
/// time first).
#[inline(always)]
pub fn fill_thread<R: Reader>(ev: &mut ConnectEvent, task: u64, pid_tgid: u64, cgroup_id: u64) {
    ev.tid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    let uid_gid = R::uid_gid(task);
    ev.uid = uid_gid as u32;
    ev.gid = (uid_gid >> 32) as u32;
    ev.cgroup_id = cgroup_id;
    let comm = ev.thread_comm.as_mut_ptr();
    if R::DIRECT {
        let at = config!(offsets.task_comm);
        let (Ok(low), Ok(high)) = (R::kernel::<u64>(task, at), R::kernel::<u64>(task, at + 8))
        else {
            return;
        };
        // SAFETY: `thread_comm` is 16 bytes, 8-byte aligned in the event (asserted below).
        unsafe {
            core::ptr::write(comm.cast::<u64>(), low);
            core::ptr::write(comm.cast::<u64>().add(1), high);
        }
    } else {
        // SAFETY: the helper writes at most `COMM_LEN` bytes into the event's field.
        let _ = unsafe { bpf_get_current_comm_raw(comm.cast(), COMM_LEN as u32) };
    }
}

const _: () = assert!(core::mem::offset_of!(ConnectEvent, thread_comm) % 8 == 0);

/// The whole task part of `ev`; false when a read failed (see [`fill_process`]).
#[inline(always)]
pub fn fill(ev: &mut ConnectEvent, slot: Slot) -> bool {
    let task = read::Probe::current_task();
    let now = fill_ids::<read::Probe>(ev, task);
    ev.boot_time_ns = now;
    fill_process::<read::Probe>(ev, task, slot, now, crate::clock::decision_ns_at(now))
}

/// Whether the cgroup that keys the per-cgroup maps is known from [`fill_ids`] alone
/// (cgroup v2: the leaf is the task's v2 cgroup, whose id every event reads).
#[inline(always)]
pub fn key_known_early() -> bool {
    config!(cgroup_subsys_index) == CgroupSource::DEFAULT_HIERARCHY
}

/// What could have changed a process's identity since it was cached, read from the
/// current task: three reads (five on cgroup v1); the namespaces it names are read from
/// `nsproxy` where they are compared ([`same_namespaces`]).
pub struct Check {
    /// `task->nsproxy` (0: the task is exiting).
    nsproxy: u64,
    exec_id: u64,
    cgroup_serial: u64,
}

/// Reads the current task's [`Check`]. A task that is exiting has no nsproxy any more:
/// never a cache hit.
#[inline(always)]
pub fn check<R: Reader>(task: u64) -> Check {
    Check {
        nsproxy: R::kernel::<u64>(task, config!(offsets.task_nsproxy)).unwrap_or(0),
        exec_id: R::kernel::<u32>(task, config!(offsets.task_self_exec_id)).unwrap_or(0) as u64,
        cgroup_serial: if key_known_early() {
            0
        } else {
            v1_cgroup_serial::<R>(task)
        },
    }
}

/// The namespaces an identity names from `nsproxy` (net, uts, mnt, ipc, cgroup), kept
/// by address in the cached identity, in that order ([`namespace_at`]).
pub const NAMESPACES: usize = 5;

/// Where in `nsproxy` the cached identity's `i`th namespace pointer is.
#[inline(always)]
fn namespace_at(i: usize) -> u32 {
    match i {
        0 => config!(offsets.nsproxy_net_ns),
        1 => config!(offsets.nsproxy_uts_ns),
        2 => config!(offsets.nsproxy_mnt_ns),
        3 => config!(offsets.nsproxy_ipc_ns),
        _ => config!(offsets.nsproxy_cgroup_ns),
    }
}

/// Whether `nsproxy` holds the namespaces `cached` was read from. Their addresses, not
/// `nsproxy`'s own: setns() and unshare() give the task a new nsproxy and free the old
/// one at once, so a thread that enters namespace A, connects, goes back and enters B
/// gets B's nsproxy at A's old address, every time, and its connections in B were
/// reported with A's namespaces. A namespace is not freed while a task holds it. One
/// comparison after another, each read only once the ones before matched (LLVM would
/// turn a compare of two arrays into a byte-wise `bcmp`, which the verifier refuses on
/// spilled pointers). Read one by one where reads take a helper too: one copy of their
/// span in `nsproxy` (64 bytes) was not steadily cheaper in the kprobe family, and inline
/// it put the raw tracepoint's stack at the verifier's 512-byte limit (BENCHMARKS.md,
/// kernel-cost-vm).
#[inline(always)]
fn same_namespaces<R: Reader>(cached: &CachedIdentity, nsproxy: u64) -> bool {
    let held = |i: usize| R::kernel::<u64>(nsproxy, namespace_at(i)).unwrap_or(0);
    cached.namespaces[0] == held(0)
        && cached.namespaces[1] == held(1)
        && cached.namespaces[2] == held(2)
        && cached.namespaces[3] == held(3)
        && cached.namespaces[4] == held(4)
}

/// The serial number of the task's css in the configured v1 hierarchy (0 when a read
/// fails: never a cache hit then, as an identity is cached only with a real one). Not the
/// `css_set` address: a process that left its cgroup (its `css_set` freed) and joined
/// another within the identity's age was given a new `css_set` at the freed one's
/// address often enough (one container in 200 of CI's churn smoke) to be reported with
/// the old cgroup's names; a serial is never given to another css.
#[inline(always)]
fn v1_cgroup_serial<R: Reader>(task: u64) -> u64 {
    let slot = config!(offsets.css_set_subsys) + (config!(cgroup_subsys_index) & 0x3f) * 8;
    R::kernel::<u64>(task, config!(offsets.task_cgroups))
        .and_then(|css_set| R::kernel::<u64>(css_set, slot))
        .and_then(|css| R::kernel::<u64>(css, config!(offsets.css_serial_nr)))
        .unwrap_or(0)
}

/// The cached identity of process `tgid`, whose task is in v2 cgroup `cgroup_id`, if
/// `check` (read at `decision_ns`, see `clock`) says it still holds, and when it was
/// filled: read before the fields it vouches for, so [`unchanged`] tells afterwards
/// whether it was rewritten meanwhile (a slot taken by another process, an LRU element
/// reused for another insert).
#[inline(always)]
pub fn cached<R: Reader>(
    tgid: u32,
    cgroup_id: u64,
    check: &Check,
    decision_ns: u64,
) -> Option<(&'static CachedIdentity, u64)> {
    let cached = cache_entry(tgid)?;
    let filled_ns = filled_ns(cached);
    // The fields it vouches for are read after it (and before `unchanged` reads it
    // again): not moved across by the compiler.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // The owner again, after the fill time: a slot or an element rewritten for another
    // process of the same namespaces, cgroup and exec count would otherwise pass for
    // this one's.
    (check.nsproxy != 0
        && owner(cached) == tgid as u64
        && cached.cgroup_id == cgroup_id
        && cached.exec_id == check.exec_id
        && cached.cgroup_serial == check.cgroup_serial
        && fresh(decision_ns.wrapping_sub(cached.filled_decision_ns) as i64)
        && same_namespaces::<R>(cached, check.nsproxy))
    .then_some((cached, filled_ns))
}

/// Where process `tgid`'s identity is cached: its [`IDENTITY_SLOTS`] slot if it holds
/// it (an array element and one load), else its entry in [`IDENTITIES`], if any.
#[inline(always)]
fn cache_entry(tgid: u32) -> Option<&'static CachedIdentity> {
    if config!(fetching_atomics) != 0
        && let Some(slot) = IDENTITY_SLOTS.get(identity_slot(tgid))
        && owner(slot) == tgid as u64
    {
        return Some(slot);
    }
    // SAFETY: a map value, valid memory for this run. Its content is not guaranteed: the
    // LRU map may reuse the element for another insert meanwhile (see [`unchanged`]).
    IDENTITIES.get_ptr(&tgid).map(|cached| unsafe { &*cached })
}

/// The [`IDENTITY_SLOTS`] slot of process `tgid`.
#[inline(always)]
fn identity_slot(tgid: u32) -> u32 {
    egress_shared::slot_of(tgid as u64, config!(identity_slot_mask))
}

/// `id.owner`, read once (volatile: another CPU may rewrite it).
#[inline(always)]
fn owner(id: &CachedIdentity) -> u64 {
    // SAFETY: a field of a map value.
    unsafe { core::ptr::read_volatile(&id.owner) }
}

/// Whether an identity filled `age` ns ago is young enough to use. Signed: another CPU
/// may have filled it after this CPU read the clock (by a tick at most on the tick
/// count); a fill time further ahead than that is nothing this clock wrote, and is
/// read again.
#[inline(always)]
fn fresh(age: i64) -> bool {
    age > -IDENTITY_MAX_AHEAD_NS && age < IDENTITY_MAX_AGE_NS as i64
}

/// Fills the process part of `ev` (after [`fill_ids`]) from the cache, or from the task
/// when the cache has none or a stale one ([`walk`]). Returns whether every walk
/// succeeded. `R` reads what tells a cached identity is still right (the hot path).
/// `now` is the event's time, `decision_ns` the same moment on the decisions' clock.
#[inline(always)]
pub fn fill_process<R: Reader>(
    ev: &mut ConnectEvent,
    task: u64,
    slot: Slot,
    now: u64,
    decision_ns: u64,
) -> bool {
    let check = check::<R>(task);
    if let Some((cached, filled_ns)) = cached::<R>(ev.tgid, ev.cgroup_id, &check, decision_ns)
        && unchanged(cached, filled_ns, ev.tgid)
    {
        ev.identity_ns = filled_ns;
        return true;
    }
    walk(ev, slot, &check, now, decision_ns).complete
}

/// When `id` was filled: read before its fields, so [`unchanged`] can tell afterwards.
#[inline(always)]
fn filled_ns(id: &CachedIdentity) -> u64 {
    // SAFETY: a field of a map value, read once (volatile: not folded into a later read).
    unsafe { core::ptr::read_volatile(&id.filled_ns) }
}

/// Whether the cached identity `id` of process `tgid` is still the one checked,
/// `filled_ns` being when it was filled then: a slot is rewritten in place (its owner
/// [`IDENTITY_WRITING`] meanwhile, its fill time new after), and the LRU map reuses a
/// freed element for another insert without waiting for the programs reading it, so one
/// rewritten while it was read (another process, or this one again) is told apart by its
/// fill time, and one being rewritten by its first word, the owner; the identity is then
/// read again from the task.
#[inline(always)]
pub fn unchanged(id: &CachedIdentity, filled_ns: u64, tgid: u32) -> bool {
    self::filled_ns(id) == filled_ns && owner(id) == tgid as u64
}

/// Reads the process's identity from the task's structs, sends it to user space and
/// caches it; `ev` refers to it. The struct walks each fail on their own, so one bad
/// read zeroes only its fields; an identity with a failed walk is sent but not cached.
/// The walks, once per process and second at most, always take the helper.
///
/// Sent before it is cached, so every record that refers to it is reserved in the ring
/// after it (see the module's documentation). An identity the full ring refused is not
/// cached (counted `identity_lost`): only this record refers to it, and user space
/// counts it unknown. `now` is the event's time (the identity's `filled_ns`),
/// `decision_ns` the same moment on the decisions' clock (its age).
#[inline(always)]
pub fn walk(
    ev: &mut ConnectEvent,
    slot: Slot,
    check: &Check,
    now: u64,
    decision_ns: u64,
) -> Walked {
    ev.identity_ns = now;
    let Some(id) = IDENTITY_SCRATCH.get_ptr_mut(slot as u32) else {
        return Walked::default();
    };
    // SAFETY: this program's slot on this CPU (see `maps::SCRATCH`); an aligned map
    // value of plain integers. Zeroed a word at a time (see `words`).
    let id = unsafe {
        crate::words::zero(id);
        &mut *id
    };
    let cached = &mut id.cached;
    cached.owner = ev.tgid as u64;
    for (i, namespace) in cached.namespaces.iter_mut().enumerate() {
        *namespace = read::kernel(check.nsproxy, namespace_at(i)).unwrap_or(0);
    }
    cached.cgroup_serial = check.cgroup_serial;
    cached.exec_id = check.exec_id;
    cached.filled_decision_ns = decision_ns;
    cached.filled_ns = now;
    cached.cgroup_id = ev.cgroup_id;
    let record = &mut id.record;
    record.kind = EventKind::Identity as u8;
    record.filled_ns = now;
    record.tgid = ev.tgid;
    record.cgroup_id = ev.cgroup_id;
    // The walks take the helper from an untyped address (see above).
    let task = unsafe { bpf_get_current_task() };
    let namespaces = fill_namespaces(id).is_ok();
    let record = &mut id.record;
    let lineage = fill_lineage(record, task).is_ok();
    let cgroup = fill_cgroup(record, task).is_ok();
    id.cached.cgroup_leaf_id = id.record.cgroup_leaf_id;
    // On v1, a css serial the check could not read would match nothing: not cached.
    let serial = key_known_early() || check.cgroup_serial != 0;
    let walked = Walked {
        complete: lineage && namespaces && cgroup && serial,
        cgroup_leaf_id: id.record.cgroup_leaf_id,
    };
    // Woken by the record's place, as the records that refer to it (a boundary that
    // fell in an identity and woke no one would wait for the next one).
    if !crate::emit::output::<IdentityEvent>(&id.record) {
        count(Counter::IdentityLost);
        return walked;
    }
    if walked.complete {
        cache(&id.cached, ev.tgid, decision_ns);
    }
    walked
}

/// Caches the identity `id` of process `tgid`, read at `decision_ns` (after it was sent):
/// in its [`IDENTITY_SLOTS`] slot if that is free, its own, or stale (on 5.12+), else in
/// [`IDENTITIES`]. A new entry or a slot taken is counted, a refreshed one is not: user
/// space tells the evictions from what is left (`identities_evicted`).
#[inline(always)]
fn cache(id: &CachedIdentity, tgid: u32, decision_ns: u64) {
    if config!(fetching_atomics) != 0
        && let Some(slot) = IDENTITY_SLOTS.get_ptr_mut(identity_slot(tgid))
    {
        // SAFETY: a map value; its words are reached by pointer (other CPUs read them).
        let owner = unsafe { &raw mut (*slot).owner };
        let held = load(owner);
        let mine = held == tgid as u64;
        // A stale identity is taken by no reader ([`cached`] checks its age); one being
        // written is left to its writer.
        let takeable = mine
            || held == 0
            || (held != IDENTITY_WRITING
                && !fresh(
                    decision_ns.wrapping_sub(load(unsafe { &raw mut (*slot).filled_decision_ns }))
                        as i64,
                ));
        if takeable && compare_exchange(owner, held, IDENTITY_WRITING) {
            let (from, to) = (
                (id as *const CachedIdentity).cast::<u64>(),
                slot.cast::<u64>(),
            );
            for i in 1..CACHED_IDENTITY_WORDS {
                // SAFETY: word `i` of both (within their size), aligned map values.
                unsafe { crate::emit::store(to.add(i), core::ptr::read_volatile(from.add(i))) };
            }
            // Its owner last, with a full barrier: a reader that finds the owner finds
            // the rest written (the fence keeps the compiler from moving the stores
            // after it; the exchange is a locked instruction).
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            exchange(owner, tgid as u64);
            // A slot filled is counted before the identity cached (see user space's
            // `identities_evicted`, which reads them in the other order).
            if held == 0 {
                count(Counter::IdentitySlotsFilled);
            }
            if !mine {
                count(Counter::IdentitiesCached);
            }
            return;
        }
    }
    // LRU: a full map forgets the process that connected least recently.
    if IDENTITIES.insert(&tgid, id, BPF_NOEXIST as u64).is_ok() {
        count(Counter::IdentitiesCached);
    } else {
        let _ = IDENTITIES.insert(&tgid, id, 0);
    }
}

/// What [`walk`] found.
#[derive(Default)]
pub struct Walked {
    /// Every walk succeeded (else the failed ones' fields are zero).
    pub complete: bool,
    /// The leaf of the cgroup hierarchy read (the per-cgroup maps' key on v1).
    pub cgroup_leaf_id: u64,
}

/// Parent process id, process name, and the process id inside its pid namespace.
#[inline(always)]
fn fill_lineage(id: &mut IdentityEvent, task: u64) -> Result<(), i64> {
    let parent = read::pointer(task, config!(offsets.task_real_parent))?;
    id.parent_tgid = read::kernel(parent, config!(offsets.task_tgid))?;
    let leader = read::pointer(task, config!(offsets.task_group_leader))?;
    read::kernel_buf(leader, config!(offsets.task_comm), &mut id.process_comm)?;
    // The pid namespace a task lives in is that of its own struct pid at its deepest
    // level (nsproxy->pid_ns_for_children is the one for its future children).
    let pid = read::pointer(leader, config!(offsets.task_thread_pid))?;
    let level: u32 = read::kernel(pid, config!(offsets.pid_level))?;
    let upid = pid
        + config!(offsets.pid_numbers) as u64
        + (level as u64 & 0xff) * config!(offsets.upid_size) as u64;
    id.ns_tgid = read::kernel::<i32>(upid, config!(offsets.upid_nr))? as u32;
    let pid_ns = read::pointer(upid, config!(offsets.upid_ns))?;
    id.ns_inums[NsIndex::Pid as usize] = read::kernel(pid_ns, config!(offsets.pid_ns_inum))?;
    Ok(())
}

#[inline(always)]
fn fill_namespaces(id: &mut Identity) -> Result<(), i64> {
    // As the cache keeps them (0 where a read failed: the inode read fails too).
    let [net, uts, mnt, ipc, cgroup] = id.cached.namespaces;
    let record = &mut id.record;
    record.ns_inums[NsIndex::Net as usize] = read::kernel(net, config!(offsets.net_ns_inum))?;
    record.ns_inums[NsIndex::Uts as usize] = read::kernel(uts, config!(offsets.uts_ns_inum))?;
    let nodename = uts + config!(offsets.uts_nodename) as u64;
    unsafe { bpf_probe_read_kernel_str_bytes(nodename as *const u8, &mut record.nodename) }
        .map_err(|e| e as i64)?;
    record.ns_inums[NsIndex::Mnt as usize] = read::kernel(mnt, config!(offsets.mnt_ns_inum))?;
    record.ns_inums[NsIndex::Ipc as usize] = read::kernel(ipc, config!(offsets.ipc_ns_inum))?;
    record.ns_inums[NsIndex::Cgroup as usize] =
        read::kernel(cgroup, config!(offsets.cgroup_ns_inum))?;
    Ok(())
}

/// The leaf name and kernfs id of the task's cgroup in the configured hierarchy: on
/// cgroup v1 a controller's hierarchy (where docker's cgroupfs driver names the leaf
/// after the container), else the unified hierarchy.
#[inline(always)]
fn fill_cgroup(id: &mut IdentityEvent, task: u64) -> Result<(), i64> {
    let css_set = read::pointer(task, config!(offsets.task_cgroups))?;
    let subsys = config!(cgroup_subsys_index);
    let cgroup = if subsys == CgroupSource::DEFAULT_HIERARCHY {
        read::pointer(css_set, config!(offsets.css_set_dfl_cgrp))?
    } else {
        let slot = config!(offsets.css_set_subsys) + (subsys & 0x3f) * 8;
        let css = read::pointer(css_set, slot)?;
        read::pointer(css, config!(offsets.css_cgroup))?
    };
    let kn = read::pointer(cgroup, config!(offsets.cgroup_kn))?;
    id.cgroup_leaf_id = read::kernel(kn, config!(offsets.kernfs_node_id))?;
    let name = read::pointer(kn, config!(offsets.kernfs_node_name))?;
    unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut id.cgroup_name) }
        .map_err(|e| e as i64)?;
    // The root cgroup has no parent; that is not a failure.
    if let Ok(parent) = read::pointer(kn, config!(offsets.kernfs_node_parent)) {
        let parent_name = read::pointer(parent, config!(offsets.kernfs_node_name))?;
        unsafe {
            bpf_probe_read_kernel_str_bytes(parent_name as *const u8, &mut id.cgroup_parent_name)
        }
        .map_err(|e| e as i64)?;
    }
    Ok(())
}
