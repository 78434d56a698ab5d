//! A hasher for the maps looked up for every record (the cgroup index, the OTLP metrics'
//! series): a multiply per eight bytes where SipHash took most of a record's hashing
//! time. Their keys are kernel ids or bounded sets (each map caps its entries), so the
//! flooding SipHash guards against costs at most that cap.

use std::hash::{BuildHasherDefault, Hasher};

/// Builds [`FastHasher`]s; for `HashMap<K, V, FastHash>` (made with `default()`).
pub type FastHash = BuildHasherDefault<FastHasher>;

#[derive(Clone, Copy)]
pub struct FastHasher(u64);

/// Not zero: a zero state would be left unchanged by a zero word, so `(0, x)` and `x`
/// would hash alike.
impl Default for FastHasher {
    fn default() -> Self {
        Self(0x243f_6a88_85a3_08d3)
    }
}

impl FastHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length apart, "a" and "a\0" would be one word.
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    /// Folds a wide multiply: a table takes both the high bits (its tags) and the low
    /// bits (its buckets) from the hash.
    #[inline]
    fn finish(&self) -> u64 {
        let wide = u128::from(self.0) * 0xa076_1d64_78bd_642f;
        (wide as u64) ^ ((wide >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn different_keys_hash_apart() {
        use std::hash::Hash;
        let hash = |value: &dyn Fn(&mut FastHasher)| {
            let mut hasher = FastHash::default().build_hasher();
            value(&mut hasher);
            hasher.finish()
        };
        // Hashed as the maps hash them (`Hash`, a string with its terminator).
        let strings = [
            "",
            "a",
            "a\0",
            "tcp",
            "udp",
            "api.stripe.com",
            "api.stripe.co",
        ];
        // Keys of one map are of one type: each type's keys apart.
        let mut seen = std::collections::HashSet::new();
        for s in strings {
            assert!(seen.insert(hash(&|h| s.hash(h))), "{s:?}");
        }
        let (mut ids, mut pairs) = (std::collections::HashSet::new(), seen);
        pairs.clear();
        for id in 0..10_000u64 {
            assert!(ids.insert(hash(&|h| id.hash(h))), "{id}");
            assert!(pairs.insert(hash(&|h| (id, 7u64).hash(h))), "({id}, 7)");
            assert!(
                pairs.insert(hash(&|h| (7u64, id + 10_000).hash(h))),
                "(7, {id})"
            );
        }
    }
}
