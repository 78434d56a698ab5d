//! The current task's identity: ids, names, namespaces and cgroup.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
    bpf_probe_read_kernel_str_bytes,
};
use egress_shared::{CgroupSource, ConnectEvent, NsIndex};

use crate::{maps::config, read};

/// Fills the task part of `ev` from the current task. Ids from helpers always succeed;
/// the struct walks (parent, namespaces, cgroup) each fail on their own, so one bad read
/// zeroes only its fields. Returns whether every walk succeeded.
#[inline(always)]
pub fn fill(ev: &mut ConnectEvent) -> bool {
    ev.boot_time_ns = unsafe { bpf_ktime_get_boot_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.tid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    let uid_gid = bpf_get_current_uid_gid();
    ev.uid = uid_gid as u32;
    ev.gid = (uid_gid >> 32) as u32;
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Ok(comm) = bpf_get_current_comm() {
        ev.thread_comm = comm;
    }
    let task = unsafe { bpf_get_current_task() };
    let lineage = fill_lineage(ev, task).is_ok();
    let namespaces = fill_namespaces(ev, task).is_ok();
    let cgroup = fill_cgroup(ev, task).is_ok();
    lineage && namespaces && cgroup
}

/// Parent process id, process name, and the process id inside its pid namespace.
#[inline(always)]
fn fill_lineage(ev: &mut ConnectEvent, task: u64) -> Result<(), i64> {
    let parent = read::pointer(task, config!(offsets.task_real_parent))?;
    ev.parent_tgid = read::kernel(parent, config!(offsets.task_tgid))?;
    let leader = read::pointer(task, config!(offsets.task_group_leader))?;
    read::kernel_buf(leader, config!(offsets.task_comm), &mut ev.process_comm)?;
    // The pid namespace a task lives in is that of its own struct pid at its deepest
    // level (nsproxy->pid_ns_for_children is the one for its future children).
    let pid = read::pointer(leader, config!(offsets.task_thread_pid))?;
    let level: u32 = read::kernel(pid, config!(offsets.pid_level))?;
    let upid = pid
        + config!(offsets.pid_numbers) as u64
        + (level as u64 & 0xff) * config!(offsets.upid_size) as u64;
    ev.ns_tgid = read::kernel::<i32>(upid, config!(offsets.upid_nr))? as u32;
    let pid_ns = read::pointer(upid, config!(offsets.upid_ns))?;
    ev.ns_inums[NsIndex::Pid as usize] = read::kernel(pid_ns, config!(offsets.pid_ns_inum))?;
    Ok(())
}

#[inline(always)]
fn fill_namespaces(ev: &mut ConnectEvent, task: u64) -> Result<(), i64> {
    // A task that is exiting has no nsproxy any more.
    let nsproxy = read::pointer(task, config!(offsets.task_nsproxy))?;
    let net = read::pointer(nsproxy, config!(offsets.nsproxy_net_ns))?;
    ev.ns_inums[NsIndex::Net as usize] = read::kernel(net, config!(offsets.net_ns_inum))?;
    let uts = read::pointer(nsproxy, config!(offsets.nsproxy_uts_ns))?;
    ev.ns_inums[NsIndex::Uts as usize] = read::kernel(uts, config!(offsets.uts_ns_inum))?;
    let nodename = uts + config!(offsets.uts_nodename) as u64;
    unsafe { bpf_probe_read_kernel_str_bytes(nodename as *const u8, &mut ev.nodename) }
        .map_err(|e| e as i64)?;
    let mnt = read::pointer(nsproxy, config!(offsets.nsproxy_mnt_ns))?;
    ev.ns_inums[NsIndex::Mnt as usize] = read::kernel(mnt, config!(offsets.mnt_ns_inum))?;
    let ipc = read::pointer(nsproxy, config!(offsets.nsproxy_ipc_ns))?;
    ev.ns_inums[NsIndex::Ipc as usize] = read::kernel(ipc, config!(offsets.ipc_ns_inum))?;
    let cgroup = read::pointer(nsproxy, config!(offsets.nsproxy_cgroup_ns))?;
    ev.ns_inums[NsIndex::Cgroup as usize] = read::kernel(cgroup, config!(offsets.cgroup_ns_inum))?;
    Ok(())
}

/// The leaf name and kernfs id of the task's cgroup in the configured hierarchy: on
/// cgroup v1 a controller's hierarchy (where docker's cgroupfs driver names the leaf
/// after the container), else the unified hierarchy.
#[inline(always)]
fn fill_cgroup(ev: &mut ConnectEvent, task: u64) -> Result<(), i64> {
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
    ev.cgroup_leaf_id = read::kernel(kn, config!(offsets.kernfs_node_id))?;
    let name = read::pointer(kn, config!(offsets.kernfs_node_name))?;
    unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut ev.cgroup_name) }
        .map_err(|e| e as i64)?;
    // The root cgroup has no parent; that is not a failure.
    if let Ok(parent) = read::pointer(kn, config!(offsets.kernfs_node_parent)) {
        let parent_name = read::pointer(parent, config!(offsets.kernfs_node_name))?;
        unsafe {
            bpf_probe_read_kernel_str_bytes(parent_name as *const u8, &mut ev.cgroup_parent_name)
        }
        .map_err(|e| e as i64)?;
    }
    Ok(())
}
