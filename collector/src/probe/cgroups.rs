//! The host's cgroup layout (v1, v2 or hybrid) and which hierarchy names containers.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Controllers bound to v1 hierarchies, no cgroup2 mount.
    V1,
    /// Only the unified hierarchy.
    V2,
    /// v1 controller hierarchies and a cgroup2 mount side by side.
    Hybrid,
}

impl fmt::Display for CgroupLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupLayout::V1 => "v1",
            CgroupLayout::V2 => "v2",
            CgroupLayout::Hybrid => "hybrid",
        })
    }
}

/// The controllers whose v1 hierarchy is searched, in order, for the container's cgroup.
/// Runtimes create the container cgroup in every controller hierarchy; memory and pids
/// are present wherever containers run with limits.
const PREFERRED_V1_CONTROLLERS: [&str; 6] = ["memory", "pids", "cpu", "cpuset", "blkio", "devices"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    pub layout: CgroupLayout,
    /// The v1 controller whose hierarchy the programs read the leaf name from; `None`
    /// means the unified hierarchy.
    pub v1_controller: Option<String>,
    /// Where that hierarchy is mounted, as the host sees it.
    pub hierarchy_mount: Option<PathBuf>,
    /// On a hybrid host whose programs read a v1 hierarchy: where the unified one is
    /// mounted (enrichment looks there when the v1 cgroup names no container).
    pub unified_mount: Option<PathBuf>,
}

/// Controllers bound to a v1 hierarchy, from the text of `/proc/cgroups`.
pub fn v1_controllers(proc_cgroups: &str) -> Vec<String> {
    proc_cgroups
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            let name = columns.next()?;
            let hierarchy: u32 = columns.next()?.parse().ok()?;
            let _num_cgroups = columns.next()?;
            let enabled: u32 = columns.next()?.parse().ok()?;
            (hierarchy != 0 && enabled != 0).then(|| name.to_owned())
        })
        .collect()
}

/// Whether a `cgroup2` filesystem is mounted, from the text of a `mountinfo` file.
pub fn has_cgroup2_mount(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
        line.split(" - ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            == Some("cgroup2")
    })
}

/// Mount point of the v1 hierarchy holding `controller`, or of cgroup2 when `None`.
pub fn hierarchy_mount(mountinfo: &str, controller: Option<&str>) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split_whitespace().nth(4)?;
        let mut after = after.split_whitespace();
        let fstype = after.next()?;
        let super_options = after.nth(1).unwrap_or_default();
        let matches = match controller {
            Some(controller) => {
                fstype == "cgroup" && super_options.split(',').any(|o| o == controller)
            }
            None => fstype == "cgroup2",
        };
        // Octal escapes (\040 for a space) do not occur in cgroup mount points.
        matches.then(|| PathBuf::from(mount_point))
    })
}

pub fn classify(proc_cgroups: &str, mountinfo: &str) -> CgroupInfo {
    let controllers = v1_controllers(proc_cgroups);
    let cgroup2 = has_cgroup2_mount(mountinfo);
    let layout = match (controllers.is_empty(), cgroup2) {
        (true, _) => CgroupLayout::V2,
        (false, true) => CgroupLayout::Hybrid,
        (false, false) => CgroupLayout::V1,
    };
    let v1_controller = PREFERRED_V1_CONTROLLERS
        .iter()
        .find(|preferred| controllers.iter().any(|c| c == *preferred))
        .map(|c| (*c).to_owned());
    let hierarchy_mount = hierarchy_mount(mountinfo, v1_controller.as_deref());
    let unified_mount = (layout == CgroupLayout::Hybrid && v1_controller.is_some())
        .then(|| self::hierarchy_mount(mountinfo, None))
        .flatten();
    CgroupInfo {
        layout,
        v1_controller,
        hierarchy_mount,
        unified_mount,
    }
}

/// Reads the layout of the running kernel. `/proc/cgroups` is kernel-wide; mountinfo is
/// read from the host's init process when visible under `host_root`, else our own.
pub fn detect(host_root: &Path) -> std::io::Result<CgroupInfo> {
    let proc_cgroups = std::fs::read_to_string(host_root.join("proc/cgroups"))
        .or_else(|_| std::fs::read_to_string("/proc/cgroups"))?;
    let mountinfo = std::fs::read_to_string(host_root.join("proc/1/mountinfo"))
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))?;
    Ok(classify(&proc_cgroups, &mountinfo))
}

#[cfg(test)]
mod tests {
    use super::*;

    // This machine's /proc/cgroups (docker, cgroupfs driver, hybrid).
    const HYBRID_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
cpuacct\t2\t1\t1
blkio\t7\t1\t1
memory\t4\t9\t1
devices\t5\t1\t1
freezer\t6\t1\t1
net_cls\t0\t1\t1
pids\t8\t1\t1
";
    const HYBRID_MOUNTINFO: &str =
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V2_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t0\t64\t1
memory\t0\t64\t1
pids\t0\t64\t1
";
    const V2_MOUNTINFO: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn hybrid_host_uses_memory_hierarchy() {
        let info = classify(HYBRID_CGROUPS, HYBRID_MOUNTINFO);
        assert_eq!(info.layout, CgroupLayout::Hybrid);
        assert_eq!(info.v1_controller.as_deref(), Some("memory"));
        assert_eq!(
            info.hierarchy_mount,
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            info.unified_mount,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v1_without_cgroup2_mount() {
        let mountinfo = HYBRID_MOUNTINFO
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            classify(HYBRID_CGROUPS, &mountinfo).layout,
            CgroupLayout::V1
        );
    }

    #[test]
    fn v2_host_uses_unified_hierarchy() {
        let info = classify(V2_CGROUPS, V2_MOUNTINFO);
        assert_eq!(info.layout, CgroupLayout::V2);
        assert_eq!(info.v1_controller, None);
        assert_eq!(info.hierarchy_mount, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(info.unified_mount, None, "one hierarchy only");
    }

    #[test]
    fn disabled_controllers_and_garbage_are_ignored() {
        let text = "memory\t4\t1\t0\npids\tx\t1\t1\n\nblkio 2 1 1\n";
        assert_eq!(v1_controllers(text), vec!["blkio".to_owned()]);
        assert!(!has_cgroup2_mount("garbage - \n - \n"));
    }
}

#[cfg(test)]
mod fuzz {
    use crate::mutate::mutations;

    #[test]
    fn layout_parsing_never_panics() {
        let cgroups =
            b"#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t4\t9\t1\npids\t0\t1\t1\n";
        let mountinfo =
            b"35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:4 - cgroup cgroup rw,memory\n";
        for (a, b) in mutations(cgroups, 20_000).zip(mutations(mountinfo, 20_000)) {
            let _ = super::classify(&String::from_utf8_lossy(&a), &String::from_utf8_lossy(&b));
        }
    }
}
