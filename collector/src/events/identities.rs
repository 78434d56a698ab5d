//! Process identities, joined to connections in user space. The kernel reads a process's
//! identity (lineage, namespaces, nodename, cgroup) once, caches it, and sends it as an
//! [`IdentityEvent`] when it reads it (at a process's first connection, after a change,
//! and at most once a second while the process connects); each connection carries only
//! its process id and the time that identity was read (`ConnectEvent::identity_ns`).
//!
//! The kernel sends an identity before it caches it, so a record that refers to it is
//! later in the ring: joined here in ring order, nothing waits. A record whose identity
//! is not known (its identity record was lost to a full ring, or forgotten here) keeps
//! its own fields and is counted ([`Identities::take_unknown`]).

use std::collections::HashMap;

use egress_shared::{IdentityEvent, NsIndex};

use super::{
    decode::Namespaces,
    text::{Interner, Text},
};
use crate::fast_hash::FastHash;

/// What a process's connections share, as the kernel last read it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub parent_pid: u32,
    /// Process id inside its own pid namespace.
    pub vpid: u32,
    pub name: Text,
    pub namespaces: Namespaces,
    pub nodename: Text,
    /// kernfs id of the cgroup named by `cgroup_leaf_name`.
    pub cgroup_leaf_id: u64,
    pub cgroup_leaf_name: Text,
    pub cgroup_parent_name: Text,
}

/// One identity of a process, and the read times it was sent with: every time in
/// `first_ns..=last_ns` this process sent, it sent this identity (reads that found it
/// unchanged extend the range instead of adding an entry).
#[derive(Debug)]
struct Known {
    first_ns: u64,
    last_ns: u64,
    identity: Identity,
}

/// Identities of one process, oldest first: a process changes identity rarely (an exec,
/// a move to another cgroup or namespace), and a connection refers to the identity its
/// process had when it began, which a long SYN_SENT keeps for minutes.
type History = Vec<Known>;

/// Identities kept per process: distinct ones (an exec, a move), or one again after
/// another (threads of one process in different namespaces or v1 cgroups, each read in
/// turn), whose records may still be pending.
const HISTORY: usize = 8;

/// Processes kept in each of the two generations (see [`Identities`]): more than the
/// kernel's caches hold (`IDENTITY_SLOTS`, 4,096, and `IDENTITIES`, 8,192), so every
/// process the kernel can still refer to without sending its identity again is known
/// here.
const GENERATION: usize = 16_384;

/// The identities of the processes seen lately, bounded: two generations, the current
/// one and the one before; a process found only in the one before moves to the current
/// one, and when the current one is full it becomes the one before (the older one is
/// dropped). At most `2 x GENERATION` processes, no per-lookup bookkeeping.
#[derive(Default)]
pub struct Identities {
    current: HashMap<u32, History, FastHash>,
    previous: HashMap<u32, History, FastHash>,
    /// Names as shared text.
    names: Interner,
    /// Records whose identity was not known, since the last [`Identities::take_unknown`].
    unknown: u64,
}

/// The name fields of an identity, each remembered by [`Interner::get_field`] (the
/// connection's thread name is another).
pub mod name_field {
    pub const PROCESS: usize = 0;
    pub const THREAD: usize = 1;
    pub const NODENAME: usize = 2;
    pub const CGROUP: usize = 3;
    pub const CGROUP_PARENT: usize = 4;
    const _: () = assert!(CGROUP_PARENT < crate::events::text::FIELDS);
}

impl Identities {
    /// The interner that makes names into text (the connections' thread names too).
    pub fn names(&mut self) -> &mut Interner {
        &mut self.names
    }

    /// Learns the identity `raw` sent for its process.
    pub fn learn(&mut self, raw: &IdentityEvent) {
        let identity = self.decode(raw);
        let (tgid, read_ns) = (raw.tgid, raw.filled_ns);
        let history = self.history_mut(tgid);
        if let Some((last, older)) = history.split_last_mut()
            && last.identity == identity
        {
            // Reads on two CPUs may arrive out of order: widened over a time another
            // identity was sent at (a thread of the process in other namespaces, read
            // in between), the range would join that identity's records with this one.
            let (first_ns, last_ns) = (last.first_ns.min(read_ns), last.last_ns.max(read_ns));
            if !older
                .iter()
                .any(|known| known.first_ns <= last_ns && first_ns <= known.last_ns)
            {
                (last.first_ns, last.last_ns) = (first_ns, last_ns);
                return;
            }
        }
        if history.len() == HISTORY {
            history.remove(0);
        }
        history.push(Known {
            first_ns: read_ns,
            last_ns: read_ns,
            identity,
        });
    }

    /// The identity process `tgid` had when the kernel read it at `read_ns`; `None`
    /// (counted) when not known. A read time that starts or ends a range was sent with
    /// that range's identity: looked for first, since a range widened before a read
    /// from another thread arrived out of order may hold that read's time inside it
    /// (see [`Self::learn`]); then the newest range that holds it.
    pub fn get(&mut self, tgid: u32, read_ns: u64) -> Option<Identity> {
        let found = self.history(tgid).and_then(|history| {
            (history.iter().rev())
                .find(|known| known.first_ns == read_ns || known.last_ns == read_ns)
                .or_else(|| {
                    (history.iter().rev())
                        .find(|known| (known.first_ns..=known.last_ns).contains(&read_ns))
                })
                .map(|known| known.identity.clone())
        });
        if found.is_none() {
            self.unknown += 1;
        }
        found
    }

    /// Records whose identity was not known since the last call.
    pub fn take_unknown(&mut self) -> u64 {
        std::mem::take(&mut self.unknown)
    }

    /// Processes known now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn history(&mut self, tgid: u32) -> Option<&History> {
        if !self.current.contains_key(&tgid) {
            let moved = self.previous.remove(&tgid)?;
            self.insert_current(tgid, moved);
        }
        self.current.get(&tgid)
    }

    fn history_mut(&mut self, tgid: u32) -> &mut History {
        if !self.current.contains_key(&tgid) {
            let moved = self.previous.remove(&tgid).unwrap_or_default();
            self.insert_current(tgid, moved);
        }
        self.current.entry(tgid).or_default()
    }

    fn insert_current(&mut self, tgid: u32, history: History) {
        if self.current.len() >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(tgid, history);
    }

    fn decode(&mut self, raw: &IdentityEvent) -> Identity {
        let ns = |i: NsIndex| raw.ns_inums[i as usize];
        let names = &mut self.names;
        Identity {
            parent_pid: raw.parent_tgid,
            vpid: raw.ns_tgid,
            name: names.get_field(name_field::PROCESS, &raw.process_comm),
            namespaces: Namespaces {
                net: ns(NsIndex::Net),
                uts: ns(NsIndex::Uts),
                mnt: ns(NsIndex::Mnt),
                pid: ns(NsIndex::Pid),
                ipc: ns(NsIndex::Ipc),
                cgroup: ns(NsIndex::Cgroup),
            },
            nodename: names.get_field(name_field::NODENAME, &raw.nodename),
            cgroup_leaf_id: raw.cgroup_leaf_id,
            cgroup_leaf_name: names.get_field(name_field::CGROUP, &raw.cgroup_name),
            cgroup_parent_name: names.get_field(name_field::CGROUP_PARENT, &raw.cgroup_parent_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tgid: u32, read_ns: u64, name: &[u8]) -> IdentityEvent {
        let mut id = IdentityEvent::zeroed();
        id.tgid = tgid;
        id.filled_ns = read_ns;
        id.process_comm[..name.len()].copy_from_slice(name);
        id.ns_inums = [1, 2, 3, 4, 5, 6];
        id
    }

    fn name(identities: &mut Identities, tgid: u32, read_ns: u64) -> Option<String> {
        (identities.get(tgid, read_ns)).map(|id| id.name.as_str().to_owned())
    }

    #[test]
    fn reads_that_found_the_identity_unchanged_join_every_record_between_them() {
        let mut identities = Identities::default();
        for read_ns in [100, 300, 200] {
            identities.learn(&identity(7, read_ns, b"curl"));
        }
        for read_ns in [100, 200, 300] {
            assert_eq!(name(&mut identities, 7, read_ns).as_deref(), Some("curl"));
        }
        assert_eq!(identities.take_unknown(), 0);
        // Never sent with these times: not this identity.
        assert_eq!(name(&mut identities, 7, 99), None);
        assert_eq!(name(&mut identities, 7, 301), None);
        assert_eq!(identities.take_unknown(), 2);
    }

    #[test]
    fn a_changed_identity_keeps_the_older_one_for_the_records_that_refer_to_it() {
        let mut identities = Identities::default();
        identities.learn(&identity(7, 100, b"sh"));
        identities.learn(&identity(7, 200, b"sh"));
        // exec: the same process id, another name.
        identities.learn(&identity(7, 300, b"curl"));
        identities.learn(&identity(7, 400, b"curl"));
        assert_eq!(name(&mut identities, 7, 150).as_deref(), Some("sh"));
        assert_eq!(name(&mut identities, 7, 250), None, "never sent");
        assert_eq!(name(&mut identities, 7, 200).as_deref(), Some("sh"));
        assert_eq!(name(&mut identities, 7, 400).as_deref(), Some("curl"));
        // A few identities per process are kept, the oldest forgotten first.
        for (i, read_ns) in (500..500 + HISTORY as u64).enumerate() {
            identities.learn(&identity(7, read_ns, format!("p{i}").as_bytes()));
        }
        assert_eq!(name(&mut identities, 7, 400), None);
        assert_eq!(name(&mut identities, 7, 500).as_deref(), Some("p0"));
    }

    #[test]
    fn a_read_out_of_order_never_widens_an_identity_over_another_ones_time() {
        let mut identities = Identities::default();
        // Two threads in two network namespaces: B read at 1200 arrives first, then A's
        // read at 1000, then A again at 5000.
        let in_netns = |read_ns, net| {
            let mut id = identity(7, read_ns, b"agent");
            id.ns_inums[0] = net;
            id
        };
        identities.learn(&in_netns(1200, 2));
        identities.learn(&in_netns(1000, 1));
        identities.learn(&in_netns(5000, 1));
        let net = |identities: &mut Identities, read_ns| {
            (identities.get(7, read_ns)).map(|id| id.namespaces.net)
        };
        assert_eq!(net(&mut identities, 1200), Some(2));
        assert_eq!(net(&mut identities, 1000), Some(1));
        assert_eq!(net(&mut identities, 5000), Some(1));
        // And the other way: A at 1000 and 5000, then B's read at 1200 arrives.
        let mut identities = Identities::default();
        identities.learn(&in_netns(1000, 1));
        identities.learn(&in_netns(5000, 1));
        identities.learn(&in_netns(1200, 2));
        assert_eq!(net(&mut identities, 1200), Some(2));
        assert_eq!(net(&mut identities, 5000), Some(1));
    }

    #[test]
    fn processes_are_bounded_by_two_generations_and_the_recent_ones_stay() {
        let mut identities = Identities::default();
        identities.learn(&identity(1, 10, b"kept"));
        for tgid in 2..(3 * GENERATION as u32) {
            identities.learn(&identity(tgid, 10, b"churn"));
            // Process 1 keeps connecting: it moves to each new generation.
            if tgid % 1000 == 0 {
                assert_eq!(name(&mut identities, 1, 10).as_deref(), Some("kept"));
            }
        }
        assert!(identities.len() <= 2 * GENERATION);
        assert_eq!(name(&mut identities, 1, 10).as_deref(), Some("kept"));
        assert_eq!(
            name(&mut identities, 2, 10),
            None,
            "the oldest churn is forgotten"
        );
        let last = 3 * GENERATION as u32 - 1;
        assert_eq!(name(&mut identities, last, 10).as_deref(), Some("churn"));
    }
}
