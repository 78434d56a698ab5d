//! Cgroup id -> path, from cgroupfs: a directory's inode number is its cgroup's kernfs id.
//! An id not seen before triggers one walk of the hierarchy, so cgroups created after
//! start-up are found; an id still unknown after a walk (its cgroup is already gone) is
//! remembered as missing and costs nothing more. Walks therefore follow the rate at which
//! cgroups come and go, never the event rate, with `min_rescan` as a floor.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Upper bound on remembered cgroups, far above any node's count.
const MAX_ENTRIES: usize = 500_000;
const MAX_DEPTH: usize = 32;

pub struct CgroupPaths {
    /// The hierarchy's mount point under the host root; `None` disables resolution.
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    missing: HashSet<u64>,
    last_scan: Option<Instant>,
    min_rescan: Duration,
}

impl CgroupPaths {
    pub fn new(root: Option<PathBuf>, min_rescan: Duration) -> Self {
        Self {
            root,
            by_id: HashMap::new(),
            missing: HashSet::new(),
            last_scan: None,
            min_rescan,
        }
    }

    /// The path of cgroup `id` relative to its hierarchy's root (`/kubepods/...`).
    pub fn resolve(&mut self, id: u64, now: Instant) -> Option<&str> {
        if id == 0 {
            return None;
        }
        let unknown = !self.by_id.contains_key(&id) && !self.missing.contains(&id);
        if unknown
            && self
                .last_scan
                .is_none_or(|t| now.duration_since(t) >= self.min_rescan)
        {
            self.rescan(now);
            if !self.by_id.contains_key(&id) {
                if self.missing.len() >= MAX_ENTRIES {
                    self.missing.clear();
                }
                self.missing.insert(id);
            }
        }
        self.by_id.get(&id).map(String::as_str)
    }

    fn rescan(&mut self, now: Instant) {
        self.last_scan = Some(now);
        let Some(root) = self.root.clone() else {
            return;
        };
        self.by_id.clear();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let relative = relative_path(&root, &dir);
            self.by_id.insert(meta.ino(), relative);
            if depth >= MAX_DEPTH || self.by_id.len() >= MAX_ENTRIES {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }
}

fn relative_path(root: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy();
    format!("/{relative}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_created_after_the_first_scan() {
        let root = std::env::temp_dir().join(format!("egress-cgroup-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let early = root.join("kubepods/burstable/podabc");
        std::fs::create_dir_all(&early).expect("dirs");
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let mut paths = CgroupPaths::new(Some(root.clone()), Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(
            paths.resolve(ino(&early), t0),
            Some("/kubepods/burstable/podabc")
        );
        assert_eq!(paths.resolve(ino(&root), t0), Some("/"));

        let late = early.join("c1");
        std::fs::create_dir(&late).expect("dir");
        // Within the floor interval a miss does not walk the tree again.
        assert_eq!(
            paths.resolve(ino(&late), t0 + Duration::from_millis(10)),
            None
        );
        let found = paths.resolve(ino(&late), t0 + Duration::from_secs(2));
        assert_eq!(found, Some("/kubepods/burstable/podabc/c1"));
        // An id no walk finds is not walked for again.
        let gone = early.join("c2");
        std::fs::create_dir(&gone).expect("dir");
        let gone_ino = ino(&gone);
        std::fs::remove_dir(&gone).expect("rmdir");
        assert_eq!(paths.resolve(gone_ino, t0 + Duration::from_secs(4)), None);
        assert_eq!(paths.resolve(gone_ino, t0 + Duration::from_secs(6)), None);
        assert_eq!(
            paths.last_scan,
            Some(t0 + Duration::from_secs(4)),
            "no walk for a known-missing id"
        );
        assert_eq!(paths.resolve(0, t0), None);
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn without_a_hierarchy_nothing_resolves() {
        let mut paths = CgroupPaths::new(None, Duration::ZERO);
        assert_eq!(paths.resolve(42, Instant::now()), None);
    }
}
