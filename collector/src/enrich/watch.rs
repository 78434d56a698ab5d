//! Follows the runtimes' container directories with inotify, so the cache learns when a
//! container appears (retry a failed lookup at once) or goes (evict after a grace time).

use std::{path::PathBuf, sync::mpsc};

use inotify::{EventMask, Inotify, WatchMask};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirChange {
    Created(String),
    Removed(String),
}

/// Starts a thread watching `dirs` (those that exist); returns the changes it sees.
/// Without inotify the cache still works: lookups then only retry on their timer.
pub fn spawn(dirs: Vec<PathBuf>) -> mpsc::Receiver<DirChange> {
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
                    DirChange::Created(name)
                } else {
                    DirChange::Removed(name)
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
