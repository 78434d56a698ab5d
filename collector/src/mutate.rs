//! Deterministic input mutation for the parser fuzz tests: every parser of host files or
//! kernel bytes must return an error, never panic, on whatever a broken or hostile file
//! holds. (A coverage-guided run is `cargo fuzz` away; this keeps the property in CI.)

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"{",
    b"}",
    b"\"",
    b"\\",
    b"/",
    b"[]",
    b"null",
    b"-1",
    b"\xf0\x9f\x92",
    b"\n",
];

/// `count` variants of `seed`: bytes flipped, cut, duplicated, spliced with tokens.
pub fn mutations(seed: &[u8], count: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.len() as u64);
    (0..count).map(move |_| {
        let mut data = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(data.len() + 1);
            match rng.below(5) {
                0 if !data.is_empty() => {
                    let i = at.min(data.len() - 1);
                    data[i] ^= 1 << rng.below(8);
                }
                1 => data.truncate(at),
                2 => {
                    let token = INTERESTING[rng.below(INTERESTING.len())];
                    data.splice(at..at, token.iter().copied());
                }
                3 if !data.is_empty() => {
                    let end = (at + rng.below(64)).min(data.len());
                    let chunk = data[at.min(end)..end].to_vec();
                    data.splice(at..at, chunk);
                }
                _ => {
                    let end = (at + rng.below(16)).min(data.len());
                    data.drain(at.min(end)..end);
                }
            }
        }
        data
    })
}
