//! Zeroing records a word at a time.
//!
//! LLVM's BPF backend turns a large `*ev = zeroed()` or a byte-slice copy into a call to
//! compiler-builtins' `memset`/`memcpy`, which on BPF are byte loops: zeroing the
//! 504-byte `ConnectEvent` of the time ran ~2,000 instructions (~390 ns here). Volatile
//! 8-byte stores are never merged back into those calls, and a loop of them runs a
//! quarter of an instruction per byte.

use core::ptr::write_volatile;

/// Zeroes the whole of `*dst`, 8 bytes at a time.
///
/// # Safety
/// `dst` is valid for writes and 8-byte aligned; `T` is plain data whose size is a
/// multiple of 8 (asserted at compile time) and for which all-zero bytes are a value.
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let words = dst.cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: within `*dst` (the loop stops at its size), aligned (the caller).
        unsafe { write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Zeroes the 8-byte words `from..to` of `*dst`.
///
/// # Safety
/// As for [`zero`]; `to` is at most `*dst`'s size in words.
#[inline(always)]
pub unsafe fn zero_between<T>(dst: *mut T, from: usize, to: usize) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let words = dst.cast::<u64>();
    let mut i = from;
    while i < to && i < core::mem::size_of::<T>() / 8 {
        // SAFETY: within `*dst`, aligned (the caller).
        unsafe { write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Zeroes a 16-byte address (`ConnectEvent::src_addr`/`dst_addr`, `Dest::addr`) with two
/// 8-byte stores: `*addr = [0; 16]` is one of the byte-loop `memset` calls above.
///
/// # Safety
/// `addr` is 8-byte aligned (those fields are: asserted beside their types).
#[inline(always)]
pub unsafe fn zero_addr(addr: &mut [u8; 16]) {
    let words = addr.as_mut_ptr().cast::<u64>();
    // SAFETY: 16 bytes, aligned (the caller).
    unsafe {
        write_volatile(words, 0);
        write_volatile(words.add(1), 0);
    }
}
