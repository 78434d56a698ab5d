//! Offset lookup on a hand-built BTF blob (every case known by construction) and on the
//! running kernel's BTF.

use super::*;

/// A minimal BTF writer: just the kinds the lookup walks.
#[derive(Default)]
struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

const INT: u32 = 1;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;

impl BtfBuilder {
    fn new() -> Self {
        Self {
            strings: vec![0],
            next_id: 1,
            ..Default::default()
        }
    }

    fn string(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        offset
    }

    fn push(&mut self, words: &[u32]) -> u32 {
        for w in words {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn header(
        &mut self,
        name: &str,
        kind: u32,
        kind_flag: bool,
        vlen: u32,
        size_or_type: u32,
    ) -> [u32; 3] {
        let info = (kind << 24) | (u32::from(kind_flag) << 31) | vlen;
        [self.string(name), info, size_or_type]
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        let h = self.header(name, INT, false, 0, size);
        self.push(&[h[0], h[1], h[2], size * 8])
    }

    /// Members: (name, type id, bit offset, bitfield size).
    fn aggregate(
        &mut self,
        kind: u32,
        name: &str,
        size: u32,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        let bitfields = members.iter().any(|m| m.3 != 0);
        let mut words = self
            .header(name, kind, bitfields, members.len() as u32, size)
            .to_vec();
        for &(member, type_id, bit_offset, bitfield_size) in members {
            let offset = if bitfields {
                (bitfield_size << 24) | bit_offset
            } else {
                bit_offset
            };
            words.extend([self.string(member), type_id, offset]);
        }
        self.push(&words)
    }

    fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
        let mut words = self
            .header(name, ENUM, false, values.len() as u32, 4)
            .to_vec();
        for &(value_name, value) in values {
            words.extend([self.string(value_name), value]);
        }
        self.push(&words)
    }

    fn simple(&mut self, kind: u32, name: &str, type_id: u32) -> u32 {
        let h = self.header(name, kind, false, 0, type_id);
        self.push(&h)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            self.types.len() as u32,
            self.types.len() as u32,
            self.strings.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_le_bytes(word));
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// `struct sock { sock_common_t __sk_common; u16 sk_protocol; }` where sock_common holds
/// an anonymous union of an anonymous struct, as the kernel's does, and a bitfield.
fn sample() -> KernelBtf {
    let mut b = BtfBuilder::new();
    let u32_t = b.int("unsigned int", 4);
    let u16_t = b.int("unsigned short", 2);
    let pair = b.aggregate(
        STRUCT,
        "",
        8,
        &[("skc_daddr", u32_t, 0, 0), ("skc_rcv_saddr", u32_t, 32, 0)],
    );
    let addr_union = b.aggregate(UNION, "", 8, &[("", pair, 0, 0)]);
    let common = b.aggregate(
        STRUCT,
        "sock_common",
        16,
        &[
            ("", addr_union, 0, 0),
            ("skc_family", u16_t, 64, 0),
            ("skc_flags", u32_t, 80, 3),
        ],
    );
    let common_t = b.simple(TYPEDEF, "sock_common_t", common);
    b.simple(FWD, "sock", 0);
    b.aggregate(
        STRUCT,
        "sock",
        24,
        &[
            ("__sk_common", common_t, 0, 0),
            ("sk_protocol", u16_t, 128, 0),
        ],
    );
    b.enumeration(
        "cgroup_subsys_id",
        &[("cpuset_cgrp_id", 0), ("memory_cgrp_id", 4)],
    );
    KernelBtf::from_bytes(&b.bytes()).expect("valid BTF")
}

#[test]
fn finds_members_through_typedefs_and_anonymous_members() {
    let btf = sample();
    assert_eq!(
        btf.offset("sock", "__sk_common.skc_daddr").expect("found"),
        0
    );
    assert_eq!(
        btf.offset("sock", "__sk_common.skc_rcv_saddr")
            .expect("found"),
        4
    );
    assert_eq!(
        btf.offset("sock", "__sk_common.skc_family").expect("found"),
        8
    );
    assert_eq!(btf.offset("sock", "sk_protocol").expect("found"), 16);
    assert_eq!(
        btf.offset("sock_common", "skc_rcv_saddr").expect("found"),
        4
    );
    assert_eq!(
        btf.struct_size("sock").expect("found"),
        24,
        "the definition, not the forward declaration"
    );
}

#[test]
fn refuses_bitfields_and_reports_what_is_missing() {
    let btf = sample();
    assert!(matches!(
        btf.offset("sock", "__sk_common.skc_flags"),
        Err(BtfError::Bitfield { .. })
    ));
    assert!(matches!(
        btf.offset("sock", "sk_nope"),
        Err(BtfError::NoMember { ref member, .. }) if member == "sk_nope"
    ));
    assert!(
        matches!(btf.offset("task_struct", "pid"), Err(BtfError::NoStruct(ref s)) if s == "task_struct")
    );
    assert!(matches!(
        btf.offset("sock", "sk_protocol.deeper"),
        Err(BtfError::Malformed(_))
    ));
}

#[test]
fn reads_cgroup_subsystem_ids() {
    let btf = sample();
    assert_eq!(btf.cgroup_subsys_index("memory").expect("found"), 4);
    assert_eq!(btf.cgroup_subsys_index("cpuset").expect("found"), 0);
    assert!(matches!(
        btf.cgroup_subsys_index("pids"),
        Err(BtfError::NoEnumValue { .. })
    ));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(KernelBtf::from_bytes(b"not btf at all").is_err());
    assert!(KernelBtf::from_bytes(&[]).is_err());
    let mut truncated = BtfBuilder::new();
    truncated.int("int", 4);
    let bytes = truncated.bytes();
    assert!(KernelBtf::from_bytes(&bytes[..bytes.len() - 6]).is_err());
}

/// The running kernel's BTF yields every offset, and the ones whose relation is fixed by
/// the kernel's own layout agree with it.
#[test]
fn running_kernel_offsets_are_consistent() {
    let btf = KernelBtf::from_file(Path::new(KernelBtf::DEFAULT_PATH))
        .expect("this machine has kernel BTF");
    let o = btf.kernel_offsets().expect("every offset found");
    // struct { __be32 skc_daddr; __be32 skc_rcv_saddr; } inside sock_common.
    assert_eq!(o.skc_rcv_saddr, o.skc_daddr + 4);
    // struct upid { int nr; struct pid_namespace *ns; }
    assert_eq!((o.upid_nr, o.upid_ns, o.upid_size), (0, 8, 16));
    // The socket fields live in the leading sock_common.
    let common = btf.struct_size("sock_common").expect("sock_common");
    for offset in [
        o.skc_family,
        o.skc_dport,
        o.skc_num,
        o.skc_v6_daddr,
        o.skc_v6_rcv_saddr,
    ] {
        assert!(
            offset < common,
            "{offset} lies outside sock_common ({common} bytes)"
        );
    }
    assert!(o.sk_protocol >= common);
    assert_ne!(o.task_nsproxy, o.task_cgroups);
    // The clock cache the completion reads as a u64 (this kernel has it: 4.20+), inside
    // tcp_sock, past the sock at its start.
    let tcp_sock = btf.struct_size("tcp_sock").expect("tcp_sock");
    assert!(
        o.tcp_clock_cache >= common && o.tcp_clock_cache + 8 <= tcp_sock,
        "tcp_clock_cache at {} in a tcp_sock of {tcp_sock} bytes",
        o.tcp_clock_cache
    );
    assert_eq!(o.tcp_clock_cache % 8, 0);
}

#[test]
fn mutated_btf_is_an_error_not_a_panic() {
    let mut b = BtfBuilder::new();
    let u32_t = b.int("unsigned int", 4);
    b.aggregate(
        STRUCT,
        "sock",
        8,
        &[("sk_protocol", u32_t, 0, 0), ("x", u32_t, 32, 0)],
    );
    b.enumeration("cgroup_subsys_id", &[("memory_cgrp_id", 4)]);
    for input in crate::mutate::mutations(&b.bytes(), 20_000) {
        if let Ok(btf) = KernelBtf::from_bytes(&input) {
            let _ = btf.offset("sock", "x");
            let _ = btf.cgroup_subsys_index("memory");
            let _ = btf.kernel_offsets();
        }
    }
}
