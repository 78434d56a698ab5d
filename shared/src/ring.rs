//! When a program wakes the reader of the event ring buffer.

/// The header the kernel puts before each ring buffer record (`BPF_RINGBUF_HDR_SZ`).
pub const RING_HEADER: u64 = 8;

/// Whether the record at address `data` (`len` bytes, after its header) spans a multiple
/// of `every` (a power of two) in the ring's address space: records lie one after the
/// other, so each such boundary is spanned by exactly one record, and waking the reader
/// for that record wakes it once per `every` bytes written, without asking the ring how
/// much waits (a helper call, and two cache lines the reader's CPU writes).
#[inline(always)]
pub const fn spans_boundary(data: u64, len: u64, every: u64) -> bool {
    // The header's first byte and the record's last: in different `every`-sized blocks,
    // or the first on a boundary itself.
    let first = data.wrapping_sub(RING_HEADER);
    let last = data.wrapping_add(len).wrapping_sub(1);
    (first ^ last) >= every || first & (every - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of `len` bytes one after the other from `start`: which of them wake.
    fn waking(start: u64, len: u64, every: u64, records: u64) -> [u64; 8] {
        let mut found = [u64::MAX; 8];
        let mut n = 0;
        for i in 0..records {
            let data = start + i * (RING_HEADER + len) + RING_HEADER;
            if spans_boundary(data, len, every) {
                found[n] = i;
                n += 1;
            }
        }
        found
    }

    #[test]
    fn one_record_wakes_per_boundary() {
        // 152-byte strides from 0 over 4096-byte blocks: the record starting at 0 and
        // those holding bytes 4096, 8192 and 12288.
        let found = waking(0, 144, 4096, 100);
        assert_eq!(&found[..5], &[0, 26, 53, 80, u64::MAX]);
        // Shifted so that no record starts on a boundary: those holding 4096, 8192 and
        // 12288.
        let found = waking(4000, 144, 4096, 60);
        assert_eq!(&found[..4], &[0, 27, 54, u64::MAX]);
    }

    /// Connection, close and identity records mixed, over blocks of 4 KiB and of 1 MiB:
    /// as many records wake as there are boundaries in the bytes they cover.
    #[test]
    fn mixed_records_wake_once_per_boundary() {
        const LENS: [u64; 5] = [144, 72, 416, 144, 144];
        for every in [4096u64, 1 << 20] {
            let start = 1_000_000u64;
            let mut at = start;
            let mut woke = 0;
            for i in 0..40_000 {
                let len = LENS[i % LENS.len()];
                if spans_boundary(at + RING_HEADER, len, every) {
                    woke += 1;
                }
                at += RING_HEADER + len;
            }
            // Multiples of `every` in [start, at).
            let boundaries = (at - 1) / every - (start - 1) / every;
            assert_eq!(woke, boundaries, "every {every}");
        }
    }

    #[test]
    fn a_boundary_in_the_header_or_on_the_last_byte_counts() {
        // Boundary at the header's second byte.
        assert!(spans_boundary(4096 + 7, 16, 4096));
        // Boundary is the record's last byte.
        assert!(spans_boundary(4096 - 16, 17, 4096));
        // Ends one byte before it.
        assert!(!spans_boundary(4096 - 16, 16, 4096));
        // Starts one byte after it.
        assert!(!spans_boundary(4096 + 9, 16, 4096));
    }
}
