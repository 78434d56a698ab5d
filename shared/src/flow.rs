//! UDP flows: the kernel's per-flow window (`UDP_FLOWS`), as both sides see it. User space
//! reads the map to sweep the bytes a flow sent after its last record (`events::flows`),
//! and hands a key to the sweep program as its six arguments.

/// A UDP flow: the 5-tuple within one network namespace, of one process. The process
/// is part of it because two processes can send the same 5-tuple within a window (a
/// port freed by one and taken by the next, SO_REUSEPORT, two hostNetwork pods): folded
/// into one record, the second would never be attributed to its own pod.
///
/// Addresses as in `ConnectEvent`: an IPv4 one in the first 4 bytes, the rest zero.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns: u32,
    pub family: u16,
    pub protocol: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub tgid: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// The key in `u64` words: the sweep program's raw tracepoint arguments.
pub const FLOW_KEY_WORDS: usize = 6;

const _: () = assert!(core::mem::size_of::<FlowKey>() == FLOW_KEY_WORDS * 8);

impl FlowKey {
    /// The key as the sweep program's arguments (native byte order, as it reads them).
    pub fn to_words(&self) -> [u64; FLOW_KEY_WORDS] {
        // SAFETY: both are plain old data of the same size (asserted above) with no
        // padding; every bit pattern of `u64` is valid.
        unsafe { core::mem::transmute::<FlowKey, [u64; FLOW_KEY_WORDS]>(*self) }
    }

    /// The key from the sweep program's arguments.
    pub fn from_words(words: [u64; FLOW_KEY_WORDS]) -> Self {
        // SAFETY: as above; every bit pattern is a valid `FlowKey`.
        unsafe { core::mem::transmute::<[u64; FLOW_KEY_WORDS], FlowKey>(words) }
    }
}

/// A UDP flow's window (`UDP_FLOWS`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// When the flow's last record was made (CLOCK_BOOTTIME): its window's start.
    pub last_ns: u64,
    /// Payload bytes of the flow's datagrams since that record (atomic adds: sends of
    /// one flow run on many CPUs; taken with an exchange by the next record or the sweep).
    pub bytes: u64,
    /// `last_ns` of the window whose record passed the filters and the rate limit (set
    /// just before it is submitted): bytes counted in a window whose record was dropped
    /// in the kernel (excluded, limited, an aggregate's repeat) are not reported.
    pub reported_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FlowState>() == 24);

/// What the sweep program returns (`BPF_PROG_TEST_RUN`'s 32-bit return value).
pub mod sweep {
    /// No entry, or its window has not been over long enough: nothing was taken.
    pub const KEPT: u32 = 0;
    /// The entry was taken and deleted; its bytes (if any) belong to a window whose
    /// record was not reported, and are dropped.
    pub const UNREPORTED: u32 = 1;
    /// Reported bytes `b` below `IN_MAP - BASE` come back as `BASE + b`.
    pub const BASE: u32 = 2;
    /// Reported bytes too many for the return value: in `FLOW_SWEPT[0]`.
    pub const IN_MAP: u32 = u32::MAX;
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for FlowKey {}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for FlowState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_survives_the_trip_through_the_program_arguments() {
        let key = FlowKey {
            netns: 4026531840,
            family: 2,
            protocol: 17,
            src_port: 40000,
            dst_port: 53,
            tgid: 1234,
            src_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(FlowKey::from_words(key.to_words()), key);
    }
}
