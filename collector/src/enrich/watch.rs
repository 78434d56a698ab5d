//! Follows the runtimes' container directories with inotify, so the cache learns when a
//! container appears (its metadata is read at once, while its files exist) or goes
//! (evicted after a grace time).
//!
//! Why read at creation: a container that connects and exits at once can have its files
//! removed (containerd deletes a task's bundle as soon as the task exits; `docker run
//! --rm`) before its first record reaches enrichment (the ring buffer is read every
//! 250 ms, and enrichment can lag under load). Read when the directory appears, the pod is
//! known however late the record comes.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use inotify::{EventMask, Inotify, WatchMask};

use super::runtime::{ContainerMetadata, RuntimeFiles};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirChange {
    Created(String),
    Removed(String),
    /// A new container's metadata, read from its files soon after its directory appeared.
    Read(String, Box<ContainerMetadata>),
}

/// When a new directory's files are read, after it appears: a runtime makes the
/// directory first and writes the files into it after, so the first reads may find
/// nothing yet. Dense at first: a failed read is a few missing-file lookups, and a
/// container can start, connect and exit within a few hundred milliseconds.
const READ_AFTER: [Duration; 9] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// New containers waiting for their files at once; beyond, a new one is left to the
/// lookup at its first connection (the pre-existing path), and that is logged once.
const MAX_WAITING: usize = 4096;

/// Starts a thread watching `dirs` (those that exist), and one reading each new
/// container's metadata through `files`; returns the changes they see. Without inotify
/// the cache still works: lookups then only happen at a container's first connection.
pub fn spawn(dirs: Vec<PathBuf>, files: RuntimeFiles) -> mpsc::Receiver<DirChange> {
    let (tx, rx) = mpsc::channel();
    let mut inotify = match Inotify::init() {
        Ok(inotify) => inotify,
        Err(e) => {
            tracing::warn!(error = %e, "inotify is unavailable; container metadata is refreshed on a timer only.");
            return rx;
        }
    };
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ONLYDIR;
    let mut watched = 0;
    for dir in &dirs {
        if dir.is_dir() {
            match inotify.watches().add(dir, mask) {
                Ok(_) => watched += 1,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch a runtime directory.")
                }
            }
        }
    }
    tracing::debug!(watched, "Watching runtime directories.");
    if watched == 0 {
        return rx;
    }
    let (created_tx, created_rx) = mpsc::channel();
    let reads = tx.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("runtime-read".into())
        .spawn(move || read_new_containers(&files, &created_rx, &reads))
    {
        tracing::warn!(error = %e, "Cannot start the reader of new containers' metadata; it is read at their first connection.");
    }
    let spawned = std::thread::Builder::new().name("runtime-watch".into()).spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let events = match inotify.read_events_blocking(&mut buffer) {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "Reading inotify events failed; container metadata is refreshed on a timer only.");
                    return;
                }
            };
            for event in events {
                let Some(name) = event.name.and_then(|n| n.to_str()).map(str::to_owned) else { continue };
                let change = if event.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                    // The reader may be gone (it could not start): the lookup at the
                    // first connection remains.
                    let _ = created_tx.send(DirChange::Created(name.clone()));
                    DirChange::Created(name)
                } else {
                    // Through the reader, so a removal reaches the cache after the
                    // metadata read before it (and ends that container's retries);
                    // directly when the reader is gone.
                    match created_tx.send(DirChange::Removed(name)) {
                        Ok(()) => continue,
                        Err(mpsc::SendError(change)) => change,
                    }
                };
                if tx.send(change).is_err() {
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "Cannot start the runtime watcher.");
    }
    rx
}

/// Reads each new container's metadata on the [`READ_AFTER`] schedule until found, and
/// sends it; passes removals on after it (stopping that container's reads). Ends when
/// the watcher or the enricher is gone.
fn read_new_containers(
    files: &RuntimeFiles,
    created: &mpsc::Receiver<DirChange>,
    out: &mpsc::Sender<DirChange>,
) {
    // (when, sequence) -> (container, attempts made): the earliest first.
    let mut waiting: BTreeMap<(Instant, u64), (String, usize)> = BTreeMap::new();
    let mut sequence = 0u64;
    let mut overflow_logged = false;
    loop {
        let next = waiting.keys().next().copied();
        let received = match next {
            None => created
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some((at, _)) => created.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match received {
            Ok(DirChange::Removed(id)) => {
                waiting.retain(|_, (waiting_id, _)| *waiting_id != id);
                if out.send(DirChange::Removed(id)).is_err() {
                    return;
                }
            }
            Ok(DirChange::Created(id)) if waiting.len() < MAX_WAITING => {
                sequence += 1;
                waiting.insert((Instant::now(), sequence), (id, 0));
            }
            Ok(DirChange::Read(..)) => {}
            Ok(DirChange::Created(_)) => {
                if !overflow_logged {
                    tracing::warn!(
                        waiting = MAX_WAITING,
                        "Containers appear faster than their files can be read; the rest are read at their first connection."
                    );
                    overflow_logged = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        while let Some(entry) = waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, _), (id, attempts)) = entry.remove_entry();
            match files.lookup(&id, None) {
                Ok(metadata) => {
                    if out.send(DirChange::Read(id, Box::new(metadata))).is_err() {
                        return;
                    }
                }
                // Not written yet (or not a container): try again later, up to the end of
                // the schedule. Failures are logged at the first connection, if any.
                Err(_) => {
                    let attempts = attempts + 1;
                    if let (Some(after), Some(before)) =
                        (READ_AFTER.get(attempts), READ_AFTER.get(attempts - 1))
                    {
                        sequence += 1;
                        waiting.insert((now + (*after - *before), sequence), (id, attempts));
                    }
                }
            }
        }
    }
}
