//! Cgroup id -> path, from cgroupfs: a directory's inode number is its cgroup's kernfs id.
//!
//! The hierarchy is walked once, at start-up. After that a watcher thread follows
//! directories appearing and going with inotify (one watch per cgroup directory; cgroupfs
//! reports mkdir and rmdir like any filesystem) and hands each change to the enrichment
//! thread, which applies them before resolving. A cgroup too new for the watcher to have
//! reported yet is found directly: the kernel sends the cgroup's own name and its
//! parent's with each event, so one `stat` of `<parent>/<leaf>` for each known directory
//! of the parent's name finds it. Enrichment never walks the tree.
//!
//! Without inotify (none, or no watch left: `fs.inotify.max_user_watches`), the watcher
//! thread walks the tree again every [`RESYNC_EVERY`] instead, on its own thread. A
//! removed cgroup's path is kept for a grace time, for events still in flight.

use std::{
    collections::{HashMap, HashSet},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::{
    events::text::Text,
    fast_hash::FastHash,
    telemetry::enrich::{EnrichEvent, EnrichTelemetry},
};

/// Upper bound on remembered cgroups, far above any node's count.
const MAX_ENTRIES: usize = 500_000;
const MAX_DEPTH: usize = 32;
/// How often the watcher walks the tree again when inotify cannot follow it.
pub const RESYNC_EVERY: Duration = Duration::from_secs(10);

/// What the watcher thread saw change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupChange {
    Added {
        id: u64,
        path: String,
    },
    Removed {
        path: String,
    },
    /// Every cgroup there is (after a walk): anything else is gone.
    Resync(Vec<(u64, String)>),
}

/// One path string shared by the three maps and the records of its cgroup.
type SharedPath = Text;

struct Known {
    path: SharedPath,
    removed_at: Option<Instant>,
}

pub struct CgroupPaths {
    /// The hierarchy's mount point under the host root; `None` disables resolution.
    root: Option<PathBuf>,
    /// Asked for every record: hashed by [`FastHash`].
    by_id: HashMap<u64, Known, FastHash>,
    /// Live cgroups only.
    by_path: HashMap<SharedPath, u64>,
    /// Last path component -> live paths with that name ("" is the root's).
    by_name: HashMap<Box<str>, Vec<SharedPath>>,
    changes: Option<mpsc::Receiver<CgroupChange>>,
    /// Set by the watcher when it queues a whole-tree resync, cleared once applied: at
    /// most one waits in the channel, however long enrichment takes to apply it.
    resync_pending: Arc<AtomicBool>,
    telemetry: EnrichTelemetry,
}

impl CgroupPaths {
    /// Walks `root` and starts its watcher thread.
    pub fn watch(root: Option<PathBuf>, telemetry: EnrichTelemetry) -> Self {
        let mut paths = Self::new(root.clone(), telemetry);
        if let Some(root) = root {
            let (tx, rx) = mpsc::channel();
            let initial = Watcher::start(root, tx, Arc::clone(&paths.resync_pending));
            paths.apply(CgroupChange::Resync(initial), Instant::now());
            paths.changes = Some(rx);
        }
        paths
    }

    /// An empty index without a watcher (tests; or no hierarchy).
    pub fn new(root: Option<PathBuf>, telemetry: EnrichTelemetry) -> Self {
        Self {
            root,
            by_id: HashMap::default(),
            by_path: HashMap::new(),
            by_name: HashMap::new(),
            changes: None,
            resync_pending: Arc::new(AtomicBool::new(false)),
            telemetry,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Applies what the watcher reported since the last call.
    pub fn apply_changes(&mut self, now: Instant) {
        let Some(changes) = self.changes.take() else {
            return;
        };
        while let Ok(change) = changes.try_recv() {
            self.apply(change, now);
        }
        self.changes = Some(changes);
    }

    pub fn apply(&mut self, change: CgroupChange, now: Instant) {
        match change {
            CgroupChange::Added { id, path } => self.insert(id, path),
            CgroupChange::Removed { path } => self.remove(&path, now),
            CgroupChange::Resync(all) => {
                self.resync_pending.store(false, Ordering::Release);
                let live: HashSet<&str> = all.iter().map(|(_, p)| p.as_str()).collect();
                let gone: Vec<SharedPath> = (self.by_path.keys())
                    .filter(|p| !live.contains(p.as_ref()))
                    .cloned()
                    .collect();
                for path in gone {
                    self.remove(&path, now);
                }
                for (id, path) in all {
                    self.insert(id, path);
                }
            }
        }
    }

    fn insert(&mut self, id: u64, path: String) {
        if self.by_path.get(path.as_str()) == Some(&id) {
            return;
        }
        if self.by_id.len() >= MAX_ENTRIES && !self.by_id.contains_key(&id) {
            self.telemetry.emit(EnrichEvent::CgroupIndexFull);
            return;
        }
        // A cgroup renamed (v1 allows it): its old path is no longer its.
        if let Some(known) = self.by_id.get(&id)
            && self.by_path.get(&known.path) == Some(&id)
        {
            let old = known.path.clone();
            self.forget_path(&old);
        }
        let path: SharedPath = path.into();
        match self.by_path.insert(path.clone(), id) {
            // Same path, new cgroup: the old one was removed unseen.
            Some(old) => {
                if let Some(known) = self.by_id.get_mut(&old) {
                    known.removed_at.get_or_insert_with(Instant::now);
                }
            }
            None => self
                .by_name
                .entry(last_component(&path).into())
                .or_default()
                .push(path.clone()),
        }
        self.by_id.insert(
            id,
            Known {
                path,
                removed_at: None,
            },
        );
    }

    /// Drops `path` from the live indexes.
    fn forget_path(&mut self, path: &str) -> Option<u64> {
        let id = self.by_path.remove(path)?;
        let name = last_component(path);
        if let Some(paths) = self.by_name.get_mut(name) {
            paths.retain(|p| p.as_ref() != path);
            if paths.is_empty() {
                self.by_name.remove(name);
            }
        }
        Some(id)
    }

    fn remove(&mut self, path: &str, now: Instant) {
        if let Some(id) = self.forget_path(path)
            && let Some(known) = self.by_id.get_mut(&id)
        {
            known.removed_at.get_or_insert(now);
        }
    }

    /// Forgets cgroups removed longer than `grace` ago.
    pub fn sweep(&mut self, now: Instant, grace: Duration) {
        self.by_id
            .retain(|_, k| k.removed_at.is_none_or(|at| now.duration_since(at) < grace));
    }

    /// The path of cgroup `id` (named `leaf`, child of a cgroup named `parent`, as the
    /// kernel captured them) relative to its hierarchy's root (`/kubepods/...`).
    pub fn resolve(&mut self, id: u64, leaf: &str, parent: &str, now: Instant) -> Option<&str> {
        self.resolve_shared(id, leaf, parent, now).map(Text::as_str)
    }

    /// [`Self::resolve`], as the text records share.
    pub fn resolve_shared(
        &mut self,
        id: u64,
        leaf: &str,
        parent: &str,
        now: Instant,
    ) -> Option<&Text> {
        if id == 0 || self.root.is_none() {
            return None;
        }
        // One lookup for a known cgroup (nearly every record); the rest only on a miss.
        if !self.by_id.contains_key(&id) {
            self.apply_changes(now);
            if !self.by_id.contains_key(&id) && !self.look_up(id, leaf, parent) {
                self.telemetry.emit(EnrichEvent::CgroupUnresolved);
                return None;
            }
        }
        self.by_id.get(&id).map(|k| &k.path)
    }

    /// The path of cgroup `id` when the index knows it (no name to look it up by: the
    /// other hierarchy of a hybrid host).
    pub fn resolve_known(&mut self, id: u64, now: Instant) -> Option<&str> {
        self.known_shared(id, now).map(Text::as_str)
    }

    /// [`Self::resolve_known`], as the text records share.
    pub fn known_shared(&mut self, id: u64, now: Instant) -> Option<&Text> {
        if id == 0 || self.root.is_none() {
            return None;
        }
        if !self.by_id.contains_key(&id) {
            self.apply_changes(now);
        }
        self.by_id.get(&id).map(|k| &k.path)
    }

    /// `<parent>/<leaf>` under each live directory named `parent`; true when one is `id`.
    fn look_up(&mut self, id: u64, leaf: &str, parent: &str) -> bool {
        let Some(root) = &self.root else {
            return false;
        };
        if leaf.is_empty() || leaf.contains('/') || leaf == "." || leaf == ".." {
            return false;
        }
        let Some(parents) = self.by_name.get(parent) else {
            return false;
        };
        let found = parents.iter().find_map(|dir| {
            let path = join(dir, leaf);
            let on_disk = root.join(path.trim_start_matches('/'));
            std::fs::metadata(&on_disk)
                .ok()
                .filter(|m| m.is_dir() && m.ino() == id)
                .map(|_| path)
        });
        match found {
            Some(path) => {
                self.telemetry.emit(EnrichEvent::CgroupLookedUp);
                self.insert(id, path);
                true
            }
            None => false,
        }
    }
}

fn last_component(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// `dir` (relative, starting with `/`) joined with one name.
fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The watcher thread's state: one inotify watch per directory of the tree.
struct Watcher {
    root: PathBuf,
    inotify: Option<Inotify>,
    dirs: HashMap<WatchDescriptor, String>,
    watches: HashMap<String, WatchDescriptor>,
    /// A watch could not be added: fall back to walks (each of which tries to watch
    /// every directory again, and clears this when it could).
    degraded: bool,
    /// Shared with the index: a resync is queued and not applied yet.
    resync_pending: Arc<AtomicBool>,
    /// A resync is owed (degraded walk due, or events lost) but one is still pending.
    resync_owed: bool,
    last_walk: Instant,
}

impl Watcher {
    /// Walks `root` (adding watches as it goes), then follows it on a thread of its own;
    /// returns what the walk found.
    fn start(
        root: PathBuf,
        tx: mpsc::Sender<CgroupChange>,
        resync_pending: Arc<AtomicBool>,
    ) -> Vec<(u64, String)> {
        let inotify = match Inotify::init() {
            Ok(inotify) => Some(inotify),
            Err(e) => {
                tracing::warn!(error = %e, every = ?RESYNC_EVERY, "inotify is unavailable; new cgroups are found by walking the hierarchy periodically.");
                None
            }
        };
        let degraded = inotify.is_none();
        let mut watcher = Self {
            root,
            inotify,
            dirs: HashMap::new(),
            watches: HashMap::new(),
            degraded,
            resync_pending,
            resync_owed: false,
            last_walk: Instant::now(),
        };
        let mut initial = Vec::new();
        watcher.walk("/".to_owned(), &mut |id, path| initial.push((id, path)));
        let spawned = std::thread::Builder::new()
            .name("cgroup-watch".into())
            .spawn(move || watcher.run(tx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "Cannot start the cgroup watcher; new cgroups are found by name only.");
        }
        initial
    }

    /// Walks the tree below `top` (relative), watching each directory before listing it
    /// so that nothing created meanwhile goes unseen.
    fn walk(&mut self, top: String, found: &mut dyn FnMut(u64, String)) {
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::ONLYDIR
            | WatchMask::DONT_FOLLOW;
        let base = top.matches('/').count();
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            let on_disk = self.root.join(dir.trim_start_matches('/'));
            if let Some(inotify) = &mut self.inotify
                && !self.degraded
            {
                match inotify.watches().add(&on_disk, mask) {
                    Ok(wd) => {
                        self.dirs.insert(wd.clone(), dir.clone());
                        self.watches.insert(dir.clone(), wd);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        tracing::warn!(dir = %on_disk.display(), error = %e, every = ?RESYNC_EVERY, "Cannot watch a cgroup directory (raise fs.inotify.max_user_watches); new cgroups are found by walking the hierarchy periodically.");
                        self.degraded = true;
                    }
                }
            }
            let Ok(meta) = std::fs::metadata(&on_disk) else {
                continue;
            };
            let depth = dir.matches('/').count().saturating_sub(base);
            if depth < MAX_DEPTH
                && let Ok(entries) = std::fs::read_dir(&on_disk)
            {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir())
                        && let Some(name) = entry.file_name().to_str()
                    {
                        stack.push(join(&dir, name));
                    }
                }
            }
            found(meta.ino(), dir);
        }
    }

    fn run(mut self, tx: mpsc::Sender<CgroupChange>) {
        let mut buffer = vec![0u8; 64 * 1024];
        while self.step(&tx, &mut buffer) {}
    }

    /// Queues a resync unless one still waits to be applied (then it is owed, and sent
    /// once that one is applied). False when the index is gone.
    fn request_resync(&mut self, tx: &mpsc::Sender<CgroupChange>) -> bool {
        if self.resync_pending.load(Ordering::Acquire) {
            self.resync_owed = true;
            return true;
        }
        self.resync_owed = false;
        self.last_walk = Instant::now();
        let change = self.resync();
        self.resync_pending.store(true, Ordering::Release);
        tx.send(change).is_ok()
    }

    /// Waits up to a second for events and sends what changed; false when the index is
    /// gone (the thread ends).
    fn step(&mut self, tx: &mpsc::Sender<CgroupChange>, buffer: &mut [u8]) -> bool {
        if (self.resync_owed || (self.degraded && self.last_walk.elapsed() >= RESYNC_EVERY))
            && !self.request_resync(tx)
        {
            return false;
        }
        let Some(fd) = self.inotify.as_ref().map(|i| i.as_raw_fd()) else {
            std::thread::sleep(Duration::from_secs(1));
            return true;
        };
        // Bounded waits: the thread never sits in a read that nothing will end.
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) };
        if ready <= 0 {
            return true;
        }
        // (created, moved away, path)
        let mut changes = Vec::new();
        let mut overflow = false;
        if let Some(inotify) = &mut self.inotify {
            let events = match inotify.read_events(buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "Reading cgroup inotify events failed; walking the hierarchy periodically instead.");
                    self.degraded = true;
                    self.inotify = None;
                    return true;
                }
            };
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                if event.mask.contains(EventMask::IGNORED) {
                    if let Some(dir) = self.dirs.remove(&event.wd) {
                        self.watches.remove(&dir);
                    }
                    continue;
                }
                if !event.mask.contains(EventMask::ISDIR) {
                    continue;
                }
                let (Some(dir), Some(name)) = (
                    self.dirs.get(&event.wd),
                    event.name.and_then(|n| n.to_str()),
                ) else {
                    continue;
                };
                let path = join(dir, name);
                let created = event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO);
                let moved = event.mask.contains(EventMask::MOVED_FROM);
                changes.push((created, moved, path));
            }
        }
        if overflow {
            // Events were lost: the whole tree again, as at start.
            return self.request_resync(tx);
        }
        for (created, moved, path) in changes {
            let sent = if created {
                let mut added = Vec::new();
                self.walk(path, &mut |id, path| {
                    added.push(CgroupChange::Added { id, path })
                });
                added.into_iter().try_for_each(|c| tx.send(c))
            } else if moved {
                // A rename (cgroup v1) moves the whole subtree: every path below is gone
                // too (MOVED_TO, if inside the tree, adds them back under the new name).
                self.unwatch_tree(&path)
                    .into_iter()
                    .try_for_each(|path| tx.send(CgroupChange::Removed { path }))
            } else {
                self.unwatch(&path);
                tx.send(CgroupChange::Removed { path })
            };
            if sent.is_err() {
                return false;
            }
        }
        true
    }

    /// Drops the watches of `top` and of every directory below it; returns their paths,
    /// deepest first (`top` last), including `top` when it had no watch.
    fn unwatch_tree(&mut self, top: &str) -> Vec<String> {
        let prefix = format!("{}/", top.trim_end_matches('/'));
        let mut below: Vec<String> = (self.watches.keys())
            .filter(|p| p.starts_with(&prefix))
            .cloned()
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        for path in &below {
            self.unwatch(path);
        }
        self.unwatch(top);
        below.push(top.to_owned());
        below
    }

    /// Drops the watch of a removed directory. cgroupfs sends no `IN_IGNORED` on rmdir
    /// (unlike tmpfs): left alone, the watch would stay, and count against
    /// `fs.inotify.max_user_watches`, for as long as the collector runs.
    fn unwatch(&mut self, path: &str) {
        if let Some(wd) = self.watches.remove(path) {
            self.dirs.remove(&wd);
            if let Some(inotify) = &mut self.inotify {
                // Fails harmlessly when the kernel already dropped it.
                let _ = inotify.watches().remove(wd);
            }
        }
    }

    fn resync(&mut self) -> CgroupChange {
        let mut all = Vec::new();
        // Watches freed since (directories removed) may let every directory be watched
        // again: the walk tries, and marks the watcher degraded again if one fails.
        if self.inotify.is_some() {
            self.degraded = false;
        }
        // Existing watches stay; adding one twice returns the same descriptor.
        self.walk("/".to_owned(), &mut |id, path| all.push((id, path)));
        // Directories gone unseen (events lost) lose their watches too.
        let live: HashSet<&str> = all.iter().map(|(_, p)| p.as_str()).collect();
        let gone: Vec<String> = (self.watches.keys())
            .filter(|p| !live.contains(p.as_str()))
            .cloned()
            .collect();
        for path in gone {
            self.unwatch(&path);
        }
        CgroupChange::Resync(all)
    }
}

/// Walks a whole hierarchy once and returns every cgroup's id and path: what each new
/// cgroup cost before the index was incremental (kept for the benchmark).
pub fn walk_all(root: &Path) -> Vec<(u64, String)> {
    let mut watcher = Watcher {
        root: root.to_owned(),
        inotify: None,
        dirs: HashMap::new(),
        watches: HashMap::new(),
        degraded: true,
        resync_pending: Arc::new(AtomicBool::new(false)),
        resync_owed: false,
        last_walk: Instant::now(),
    };
    let mut all = Vec::new();
    watcher.walk("/".to_owned(), &mut |id, path| all.push((id, path)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Stats;

    fn ino(p: &Path) -> u64 {
        std::fs::metadata(p).expect("stat").ino()
    }

    struct TempTree(PathBuf);

    impl TempTree {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("egress-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("dirs");
            Self(root)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Applies the watcher's changes until `id` resolves or a few seconds pass.
    fn wait_for(paths: &mut CgroupPaths, id: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(path) = paths.resolve_known(id, Instant::now()) {
                return Some(path.to_owned());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_watcher_reports_directories_created_and_removed_after_the_walk() {
        let tree = TempTree::new("cgroup-watch");
        let root = &tree.0;
        let early = root.join("kubepods/burstable/podabc");
        std::fs::create_dir_all(&early).expect("dirs");
        let stats = Arc::new(Stats::default());
        let mut paths =
            CgroupPaths::watch(Some(root.clone()), EnrichTelemetry::new(Arc::clone(&stats)));
        let now = Instant::now();
        assert_eq!(
            paths.resolve(ino(&early), "podabc", "burstable", now),
            Some("/kubepods/burstable/podabc")
        );
        assert_eq!(paths.resolve_known(ino(root), now), Some("/"));

        // A new pod and its container at once: the watcher reports both, and the
        // directory created inside the new one before its watch existed too.
        let late = root.join("kubepods/besteffort/podnew/c1/init.scope");
        std::fs::create_dir_all(&late).expect("dirs");
        assert_eq!(
            wait_for(&mut paths, ino(&late)).as_deref(),
            Some("/kubepods/besteffort/podnew/c1/init.scope")
        );
        let c1 = ino(&root.join("kubepods/besteffort/podnew/c1"));
        std::fs::remove_dir(&late).expect("rmdir");
        std::fs::remove_dir(root.join("kubepods/besteffort/podnew/c1")).expect("rmdir");
        let deadline = Instant::now() + Duration::from_secs(5);
        while paths.by_path.contains_key("/kubepods/besteffort/podnew/c1") {
            assert!(Instant::now() < deadline, "removal never reported");
            std::thread::sleep(Duration::from_millis(10));
            paths.apply_changes(Instant::now());
        }
        // Kept for the grace time, for events in flight; then forgotten.
        let later = Instant::now();
        assert!(paths.resolve_known(c1, later).is_some());
        paths.sweep(later + Duration::from_secs(61), Duration::from_secs(60));
        assert_eq!(paths.resolve_known(c1, later), None);
        assert!(paths.resolve_known(ino(&early), later).is_some());
    }

    #[test]
    fn a_cgroup_the_watcher_has_not_reported_is_found_by_its_names() {
        let tree = TempTree::new("cgroup-lookup");
        let root = &tree.0;
        let pod = root.join("kubepods/podabc");
        std::fs::create_dir_all(&pod).expect("dirs");
        let stats = Arc::new(Stats::default());
        // No watcher: only the walk's index and the lookup by name.
        let mut paths =
            CgroupPaths::new(Some(root.clone()), EnrichTelemetry::new(Arc::clone(&stats)));
        for (id, path) in walk_all(root) {
            paths.apply(CgroupChange::Added { id, path }, Instant::now());
        }
        let container = pod.join("c1");
        std::fs::create_dir(&container).expect("dir");
        let now = Instant::now();
        assert_eq!(
            paths.resolve(ino(&container), "c1", "podabc", now),
            Some("/kubepods/podabc/c1")
        );
        // A wrong id under the right names, unknown names, a gone cgroup: nothing. The
        // ids are no inode's (ext4's are 32-bit): one near this tree's could be another
        // directory's of it, the filesystem reusing numbers freed by other tests (a run
        // once found `c1` at the pod's inode + 7).
        let unknown = u64::MAX;
        assert_eq!(paths.resolve(unknown - 1, "c1", "podabc", now), None);
        assert_eq!(paths.resolve(unknown - 7, "c2", "podzzz", now), None);
        assert_eq!(
            paths.resolve(unknown - 9, "../podabc", "kubepods", now),
            None
        );
        assert_eq!(paths.resolve(0, "x", "y", now), None);
        let counts = stats.snapshot_user().enrichment_events;
        assert_eq!(counts.get("cgroup_looked_up"), Some(&1));
        assert_eq!(counts.get("cgroup_unresolved"), Some(&3));
        // A child of the root: the root's kernfs name is empty.
        let top = root.join("system.slice");
        std::fs::create_dir(&top).expect("dir");
        assert_eq!(
            paths.resolve(ino(&top), "system.slice", "", now),
            Some("/system.slice")
        );
    }

    #[test]
    fn a_resync_forgets_what_is_gone() {
        let mut paths = CgroupPaths::new(
            Some(PathBuf::from("/nonexistent")),
            EnrichTelemetry::default(),
        );
        let t0 = Instant::now();
        paths.apply(
            CgroupChange::Resync(vec![(1, "/".into()), (2, "/a".into()), (3, "/a/b".into())]),
            t0,
        );
        paths.apply(
            CgroupChange::Resync(vec![(1, "/".into()), (2, "/a".into())]),
            t0,
        );
        assert_eq!(
            paths.resolve_known(3, t0),
            Some("/a/b"),
            "in its grace time"
        );
        paths.sweep(t0 + Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(paths.resolve_known(3, t0), None);
        assert_eq!(paths.len(), 2);
        // The same path, a new cgroup: the new id wins, the old one is removed.
        paths.apply(
            CgroupChange::Added {
                id: 4,
                path: "/a".into(),
            },
            t0,
        );
        assert_eq!(paths.resolve_known(4, t0), Some("/a"));
        assert_eq!(paths.by_path.get("/a"), Some(&4));
        assert_eq!(paths.by_name.get("a").map(Vec::len), Some(1));
    }

    /// A watcher on `root`, walked, not started on a thread (the test drives its steps).
    fn watcher(root: &Path, inotify: bool) -> (Watcher, Vec<(u64, String)>) {
        let mut watcher = Watcher {
            root: root.to_owned(),
            inotify: inotify.then(|| Inotify::init().expect("inotify")),
            dirs: HashMap::new(),
            watches: HashMap::new(),
            degraded: !inotify,
            resync_pending: Arc::new(AtomicBool::new(false)),
            resync_owed: false,
            last_walk: Instant::now(),
        };
        let mut all = Vec::new();
        watcher.walk("/".to_owned(), &mut |id, path| all.push((id, path)));
        (watcher, all)
    }

    #[test]
    fn a_renamed_directory_takes_its_subtree_out_of_the_watches_and_the_index() {
        let tree = TempTree::new("cgroup-rename");
        let root = &tree.0;
        std::fs::create_dir_all(root.join("a/b/c/d")).expect("dirs");
        std::fs::create_dir_all(root.join("elsewhere")).expect("dirs");
        let (mut watcher, initial) = watcher(root, true);
        let mut paths = CgroupPaths::new(Some(root.clone()), EnrichTelemetry::default());
        paths.apply(CgroupChange::Resync(initial), Instant::now());
        let (tx, rx) = mpsc::channel();
        let mut buffer = vec![0u8; 64 * 1024];
        // Out of the watched tree (a rename whose MOVED_TO nobody sees): its subtree is gone.
        let outside = std::env::temp_dir().join(format!("egress-moved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&outside);
        std::fs::rename(root.join("a/b"), &outside).expect("rename");
        let deadline = Instant::now() + Duration::from_secs(5);
        while watcher.watches.contains_key("/a/b") {
            assert!(Instant::now() < deadline, "the move was never seen");
            assert!(watcher.step(&tx, &mut buffer));
        }
        let _ = std::fs::remove_dir_all(&outside);
        for change in rx.try_iter() {
            paths.apply(change, Instant::now());
        }
        let stale: Vec<_> = (watcher.watches.keys())
            .filter(|p| p.starts_with("/a/b"))
            .collect();
        assert!(stale.is_empty(), "watches left below: {stale:?}");
        assert_eq!(watcher.watches.len(), watcher.dirs.len());
        for gone in ["/a/b", "/a/b/c", "/a/b/c/d"] {
            assert!(!paths.by_path.contains_key(gone), "{gone} still indexed");
        }
        assert!(paths.by_path.contains_key("/elsewhere"));
    }

    #[test]
    fn at_most_one_resync_waits_and_a_resync_clears_degraded_once_watches_are_free() {
        let tree = TempTree::new("cgroup-resync");
        let root = &tree.0;
        std::fs::create_dir_all(root.join("a/b")).expect("dirs");
        let (mut watcher, _) = watcher(root, true);
        // As if a watch could not be added earlier (fs.inotify.max_user_watches).
        watcher.degraded = true;
        let (tx, rx) = mpsc::channel();
        let mut buffer = vec![0u8; 64 * 1024];
        watcher.last_walk = Instant::now() - RESYNC_EVERY;
        assert!(watcher.step(&tx, &mut buffer));
        assert!(!watcher.degraded, "every directory could be watched again");
        // Degraded again with the first resync still unapplied: no second one is queued.
        watcher.degraded = true;
        watcher.inotify = None;
        for _ in 0..3 {
            watcher.last_walk = Instant::now() - RESYNC_EVERY;
            assert!(watcher.step(&tx, &mut buffer));
        }
        let queued: Vec<_> = rx.try_iter().collect();
        assert_eq!(queued.len(), 1, "one resync waits");
        assert!(watcher.resync_owed);
        // Applied: the owed one goes out at the next step.
        let mut paths = CgroupPaths::new(Some(root.clone()), EnrichTelemetry::default());
        paths.resync_pending = Arc::clone(&watcher.resync_pending);
        for change in queued {
            paths.apply(change, Instant::now());
        }
        assert!(watcher.step(&tx, &mut buffer));
        assert_eq!(rx.try_iter().count(), 1);
        assert!(paths.by_path.contains_key("/a/b"));
    }

    #[test]
    fn without_a_hierarchy_nothing_resolves() {
        let mut paths = CgroupPaths::watch(None, EnrichTelemetry::default());
        assert_eq!(paths.resolve(42, "a", "b", Instant::now()), None);
    }
}
