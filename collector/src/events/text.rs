//! Names carried by records (process and thread names, nodename, cgroup names and path)
//! as shared text: the kernel sends the same few names over and over, so each distinct
//! one is made into a string once and every record after holds a reference to it. A
//! record then costs no allocation for its names, and dropping it (on another thread)
//! no free; the names the interner made permanent cost no reference count either.

use std::{
    borrow::Borrow,
    cmp::Ordering,
    fmt,
    hash::{Hash, Hasher},
    ops::Deref,
    sync::Arc,
};

/// Immutable shared text; clones are a reference count, or nothing at all for the
/// names the interner made permanent (see [`Interner`]).
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Shared(Arc<str>),
    /// Made by the interner and kept for the process's life: copied without counting
    /// references, which every record's names otherwise cost twice (its decoding
    /// and its drop, on two threads).
    Permanent(&'static str),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Shared(text) => text,
            Repr::Permanent(text) => text,
        }
    }

    /// Whether both are the same shared text (not only equal text).
    pub fn ptr_eq(a: &Text, b: &Text) -> bool {
        a.addr() == b.addr() && a.len() == b.len()
    }

    /// Where the shared text is: the same for every clone, different for every other
    /// text alive.
    pub fn addr(&self) -> usize {
        self.as_str().as_ptr().addr()
    }
}

impl Default for Text {
    fn default() -> Self {
        Self(Repr::Permanent(""))
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Equal texts hash as their `str`s do, so maps keyed by text are searched by `str`.
impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl Hash for Text {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(Repr::Shared(Arc::from(s)))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Repr::Shared(Arc::from(s)))
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Self(Repr::Shared(s))
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Slots of the interning cache: far more than the names one node's connections carry
/// at once; a name that lost its slot is simply made again.
const SLOTS: usize = 1024;

/// Bytes of names an interner makes permanent, at most (with an allocation's overhead
/// counted for each): thousands of names, more than a node's processes, threads, pods
/// and containers at once. Later names are shared texts, whose clones are counted.
const PERMANENT_BYTES: usize = 512 * 1024;
/// What each permanent name is counted beyond its bytes (the allocator's overhead).
const PERMANENT_OVERHEAD: usize = 16;

/// Kernel names (NUL-terminated byte arrays) to [`Text`], through a direct-mapped cache:
/// one hash and one comparison per name, no allocation on a hit. Bounded by [`SLOTS`].
/// The texts it makes are permanent (never freed, so records copy them without counting
/// references) up to [`PERMANENT_BYTES`] over the process's life; the names after that
/// are shared texts. (A node's containers come and go: their names are not all kept.)
pub struct Interner {
    slots: Vec<Option<(Box<[u8]>, Text)>>,
    empty: Text,
    /// Bytes left for permanent texts.
    permanent_left: usize,
    /// Each field's last raw bytes and their text (see [`Interner::get_field`]).
    recent: [Option<(Box<[u8]>, Text)>; FIELDS],
}

/// Fields remembered by [`Interner::get_field`], at most.
pub const FIELDS: usize = 8;

impl Default for Interner {
    fn default() -> Self {
        Self {
            slots: vec![None; SLOTS],
            empty: Text::default(),
            permanent_left: PERMANENT_BYTES,
            recent: Default::default(),
        }
    }
}

impl Interner {
    /// [`Interner::get`] for the field numbered `field` (below [`FIELDS`]) of a kernel
    /// record, through the bytes it held last time: events come in runs from one task,
    /// whose names repeat, and comparing the whole field (NUL padding included) costs
    /// less than finding its end and hashing it.
    #[inline]
    pub fn get_field(&mut self, field: usize, bytes: &[u8]) -> Text {
        if let Some((raw, text)) = &self.recent[field]
            && **raw == *bytes
        {
            return text.clone();
        }
        let text = self.get(bytes);
        match &mut self.recent[field] {
            Some((raw, last)) if raw.len() == bytes.len() => {
                raw.copy_from_slice(bytes);
                *last = text.clone();
            }
            slot => *slot = Some((bytes.into(), text.clone())),
        }
        text
    }

    /// The text up to the first NUL of `bytes`, invalid UTF-8 replaced.
    pub fn get(&mut self, bytes: &[u8]) -> Text {
        let bytes = until_nul(bytes);
        if bytes.is_empty() {
            return self.empty.clone();
        }
        let slot = &mut self.slots[hash(bytes) % SLOTS];
        if let Some((key, text)) = slot
            && **key == *bytes
        {
            return text.clone();
        }
        let name = String::from_utf8_lossy(bytes);
        let cost = name.len() + PERMANENT_OVERHEAD;
        let text = if cost <= self.permanent_left {
            self.permanent_left -= cost;
            Text(Repr::Permanent(Box::leak(
                name.into_owned().into_boxed_str(),
            )))
        } else {
            Text::from(name.as_ref())
        };
        *slot = Some((bytes.into(), text.clone()));
        text
    }
}

/// `bytes` up to its first NUL (all of it without one), found eight bytes at a time:
/// the kernel's names are fixed arrays, mostly NUL padding after a short name.
fn until_nul(bytes: &[u8]) -> &[u8] {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        // The lowest byte flagged is the first NUL (a flag above it may be a borrow's).
        let zero = word.wrapping_sub(ONES) & !word & HIGH;
        if zero != 0 {
            return &bytes[..at + (zero.trailing_zeros() / 8) as usize];
        }
        at += 8;
    }
    let rest = chunks.remainder();
    &bytes[..at + rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
}

/// FNV-1a over 8-byte words: cheap, and good enough to spread a node's names.
fn hash(bytes: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_seen_again_is_the_same_text_and_costs_no_allocation() {
        let mut names = Interner::default();
        let first = names.get(b"curl\0\0\0garbage");
        assert_eq!(first, "curl");
        let before = crate::alloc_counting::allocations();
        let again = names.get(b"curl\0other");
        assert_eq!(crate::alloc_counting::allocations(), before);
        assert!(Text::ptr_eq(&first, &again));
        assert_eq!(names.get(b"\0curl"), "");
        assert_eq!(names.get(b"cur"), "cur");
    }

    #[test]
    fn a_field_holding_what_it_held_last_is_its_last_text_and_a_changed_one_is_not() {
        let mut names = Interner::default();
        let curl = names.get_field(0, b"curl\0\0\0\0");
        let again = names.get_field(0, b"curl\0\0\0\0");
        assert!(Text::ptr_eq(&curl, &again), "the last text");
        // Another field with the same bytes: the interned text, the same one.
        assert!(Text::ptr_eq(&names.get_field(1, b"curl\0\0\0\0"), &curl));
        // Other bytes after the NUL: the same name.
        assert!(Text::ptr_eq(&names.get_field(0, b"curl\0xyz"), &curl));
        assert_eq!(names.get_field(0, b"wget\0\0\0\0"), "wget");
        assert_eq!(names.get_field(0, b"wg\0"), "wg", "another length");
        assert_eq!(names.get_field(0, b"curl\0\0\0\0"), "curl");
        let before = crate::alloc_counting::allocations();
        names.get_field(0, b"curl\0\0\0\0");
        assert_eq!(crate::alloc_counting::allocations(), before);
    }

    #[test]
    fn names_are_permanent_up_to_the_budget_then_shared_and_equal_either_way() {
        let mut names = Interner::default();
        let first = names.get(b"curl");
        assert!(matches!(first.0, Repr::Permanent(_)));
        let shared = Text::from("curl");
        assert!(matches!(shared.0, Repr::Shared(_)));
        assert_eq!(first, shared);
        assert!(!Text::ptr_eq(&first, &shared), "equal, not the same text");
        // Hashed as their text (maps keyed by text are searched by `str`).
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        assert_eq!(state.hash_one(&first), state.hash_one(&shared));
        assert_eq!(state.hash_one(&first), state.hash_one("curl"));
        // Long unique names until the budget is spent: later ones are shared, all right.
        let all: Vec<String> = (0..PERMANENT_BYTES / 64 + 10)
            .map(|i| format!("{i:0>63}"))
            .collect();
        let texts: Vec<Text> = all.iter().map(|name| names.get(name.as_bytes())).collect();
        assert!(names.permanent_left < 64 + PERMANENT_OVERHEAD);
        assert!(matches!(texts.last().expect("names").0, Repr::Shared(_)));
        for (name, text) in all.iter().zip(&texts) {
            assert_eq!(text, name.as_str());
        }
    }

    #[test]
    fn a_name_ends_at_its_first_nul_wherever_it_is() {
        for len in 0..40 {
            for nul in 0..=len {
                let mut bytes: Vec<u8> = (0..len).map(|i| 0x80 | (i as u8 % 3)).collect();
                if nul < len {
                    bytes[nul] = 0;
                    // A second NUL, and a byte a borrow could flag, after the first.
                    if nul + 2 < len {
                        bytes[nul + 1] = 1;
                        bytes[nul + 2] = 0;
                    }
                }
                assert_eq!(until_nul(&bytes).len(), nul, "{bytes:?}");
            }
        }
    }

    #[test]
    fn colliding_names_each_keep_their_own_text() {
        let mut names = Interner::default();
        let all: Vec<String> = (0..5 * SLOTS).map(|i| format!("name-{i}")).collect();
        for _ in 0..2 {
            for name in &all {
                assert_eq!(names.get(name.as_bytes()), name.as_str());
            }
        }
        assert_eq!(names.get(&[0xff, b'a']), "\u{fffd}a");
    }
}
