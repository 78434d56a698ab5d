//! The contract between the eBPF programs and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding and a size assert, so the
//! layout the kernel writes is the layout user space reads. Ids in enums are never reused.
#![no_std]

pub mod aggregate;
pub mod config;
pub mod event;
pub mod flow;
pub mod ring;

pub use aggregate::{AggregateKey, RepeatSlot};
pub use config::{
    BUCKET_SLOT_COUNT, CgroupSource, DnsIterOffsets, EXCLUDED_V4_INLINE, EXCLUDED_V6_INLINE,
    ExcludedPrefixes, ExcludedV4, ExcludedV6, IDENTITY_SLOT_COUNT, KernelOffsets, MAX_CGROUP_BURST,
    MAX_CGROUP_RATE, Prefix, ProbeConfig, TracepointOffsets, V4Prefix, V6Prefix, slot_of,
};
pub use event::{
    CGROUP_NAME_LEN, COMM_LEN, CONNECT_EVENT_SIZE, COUNTER_COUNT, CloseFlags, ConnState,
    ConnectEvent, Counter, DNS_EVENT_SIZE, DNS_PAYLOAD_MAX, DnsEvent, DnsFlags, EventKind,
    IDENTITY_EVENT_SIZE, IdentityEvent, NODENAME_LEN, NS_COUNT, NsIndex, ResetBy,
    TCP_CLOSE_EVENT_SIZE, TcpCloseEvent,
};
pub use flow::{FLOW_KEY_WORDS, FlowKey, FlowState};
