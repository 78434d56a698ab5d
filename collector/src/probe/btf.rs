//! Kernel-struct offsets from the running kernel's BTF.
//!
//! Aya's Rust eBPF has no CO-RE field relocations, so the programs read at offsets that
//! this module finds in `/sys/kernel/btf/vmlinux` (or `--btf FILE`) and hands over in
//! [`KernelOffsets`]. Nothing is compiled in for a particular kernel.

use std::path::{Path, PathBuf};

use btf_rs::{Backend, Btf, BtfType, Type};
use egress_shared::{DnsIterOffsets, KernelOffsets};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is a bitfield; cannot read it at a byte offset")]
    Bitfield { strukt: String, member: String },
    #[error("kernel BTF: enum {enumeration} has no value {name}")]
    NoEnumValue { enumeration: String, name: String },
    #[error("kernel BTF: {0}")]
    Malformed(String),
}

/// The kernel's type information, with the lookups the probes need.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub const DEFAULT_PATH: &'static str = "/sys/kernel/btf/vmlinux";

    /// Maps the file where the kernel lets it (vmlinux BTF in sysfs since 6.16, any
    /// regular file) and reads the types from the mapping as they are looked up: parsing
    /// and indexing all of vmlinux's ~150k types in memory took ~40 MB for a moment at
    /// start, the collector's peak. Elsewhere the file is parsed into memory.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file_with_backend(path, Backend::Mmap)
            .or_else(|_| Btf::from_file(path))
            .map_err(|source| BtfError::Read {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self { btf })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        let btf = Btf::from_bytes(bytes).map_err(|source| BtfError::Read {
            path: PathBuf::from("<memory>"),
            source,
        })?;
        Ok(Self { btf })
    }

    fn strukt(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(name.to_owned()))?;
        // Pick the definition with members (forward declarations have none).
        types
            .into_iter()
            .filter_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .max_by_key(|s| s.members.len())
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// Byte offset of `path` (dot-separated members, e.g. `__sk_common.skc_daddr`) in
    /// struct `strukt`. Members of anonymous structs and unions are found through them.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = self.strukt(strukt)?;
        let mut current_name = strukt.to_owned();
        let mut total_bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(member) = parts.next() {
            let (bits, member_type) =
                self.find_member(&current, member, 0)?
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: current_name.clone(),
                        member: member.to_owned(),
                    })?;
            total_bits += bits;
            if parts.peek().is_some() {
                current = match self.resolve_aggregate(member_type)? {
                    Some(s) => s,
                    None => {
                        return Err(BtfError::Malformed(format!(
                            "{current_name}.{member} is not a struct or union"
                        )));
                    }
                };
                current_name = member.to_owned();
            }
        }
        if !total_bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield {
                strukt: strukt.to_owned(),
                member: path.to_owned(),
            });
        }
        Ok(total_bits / 8)
    }

    /// Depth-first search of `name` in `s`, descending into anonymous members. Returns
    /// the bit offset from the start of `s` and the member's type.
    fn find_member(
        &self,
        s: &btf_rs::Struct,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, Type)>, BtfError> {
        if depth > 8 {
            return Err(BtfError::Malformed(
                "anonymous members nested too deep".into(),
            ));
        }
        for member in &s.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let member_type = self
                .btf
                .resolve_chained_type(member)
                .map_err(|e| BtfError::Malformed(e.to_string()))?;
            if member_name == name {
                if member.bitfield_size().is_some_and(|size| size != 0) {
                    return Err(BtfError::Bitfield {
                        strukt: self.btf.resolve_name(s).unwrap_or_default(),
                        member: name.to_owned(),
                    });
                }
                return Ok(Some((member.bit_offset(), member_type)));
            }
            if !member_name.is_empty() {
                continue;
            }
            if let Some(inner) = self.resolve_aggregate(member_type)?
                && let Some((bits, found)) = self.find_member(&inner, name, depth + 1)?
            {
                return Ok(Some((member.bit_offset() + bits, found)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to a struct or union, if that is what `t` is.
    fn resolve_aggregate(&self, mut t: Type) -> Result<Option<btf_rs::Struct>, BtfError> {
        for _ in 0..16 {
            t = match t {
                Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
                Type::Typedef(ref x) => self.chained(x)?,
                Type::Const(ref x) => self.chained(x)?,
                Type::Volatile(ref x) => self.chained(x)?,
                Type::Restrict(ref x) => self.chained(x)?,
                Type::TypeTag(ref x) => self.chained(x)?,
                _ => return Ok(None),
            };
        }
        Err(BtfError::Malformed("type chain too long".into()))
    }

    fn chained<T: BtfType + ?Sized>(&self, t: &T) -> Result<Type, BtfError> {
        self.btf
            .resolve_chained_type(t)
            .map_err(|e| BtfError::Malformed(e.to_string()))
    }

    /// Size in bytes of struct `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.strukt(name)?.size() as u32)
    }

    /// Value of enumerator `name` in enum `enumeration`.
    pub fn enum_value(&self, enumeration: &str, name: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NoEnumValue {
            enumeration: enumeration.to_owned(),
            name: name.to_owned(),
        };
        let types = self
            .btf
            .resolve_types_by_name(enumeration)
            .map_err(|_| not_found())?;
        for t in types {
            if let Type::Enum(e) = t {
                for member in &e.members {
                    if self.btf.resolve_name(member).ok().as_deref() == Some(name) {
                        return Ok(member.val());
                    }
                }
            }
        }
        Err(not_found())
    }

    /// Every offset the programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let inum = |ns: &str| -> Result<u32, BtfError> {
            Ok(self.offset(ns, "ns")? + self.offset("ns_common", "inum")?)
        };
        Ok(KernelOffsets {
            task_pid: self.offset("task_struct", "pid")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_real_parent: self.offset("task_struct", "real_parent")?,
            task_group_leader: self.offset("task_struct", "group_leader")?,
            task_comm: self.offset("task_struct", "comm")?,
            task_nsproxy: self.offset("task_struct", "nsproxy")?,
            task_thread_pid: self.offset("task_struct", "thread_pid")?,
            task_cgroups: self.offset("task_struct", "cgroups")?,
            task_files: self.offset("task_struct", "files")?,
            task_self_exec_id: self.offset("task_struct", "self_exec_id")?,
            task_cred: self.offset("task_struct", "cred")?,
            // kuid_t and kgid_t are `struct { uid_t val; }` (typedefs of anonymous
            // structs): the number is where the field starts.
            cred_uid: self.offset("cred", "uid")?,
            cred_gid: self.offset("cred", "gid")?,
            nsproxy_uts_ns: self.offset("nsproxy", "uts_ns")?,
            nsproxy_ipc_ns: self.offset("nsproxy", "ipc_ns")?,
            nsproxy_mnt_ns: self.offset("nsproxy", "mnt_ns")?,
            nsproxy_net_ns: self.offset("nsproxy", "net_ns")?,
            nsproxy_cgroup_ns: self.offset("nsproxy", "cgroup_ns")?,
            uts_ns_inum: inum("uts_namespace")?,
            ipc_ns_inum: inum("ipc_namespace")?,
            mnt_ns_inum: inum("mnt_namespace")?,
            net_ns_inum: inum("net")?,
            pid_ns_inum: inum("pid_namespace")?,
            cgroup_ns_inum: inum("cgroup_namespace")?,
            uts_nodename: self.offset("uts_namespace", "name")?
                + self.offset("new_utsname", "nodename")?,
            pid_level: self.offset("pid", "level")?,
            pid_numbers: self.offset("pid", "numbers")?,
            upid_size: self.struct_size("upid")?,
            upid_nr: self.offset("upid", "nr")?,
            upid_ns: self.offset("upid", "ns")?,
            css_set_subsys: self.offset("css_set", "subsys")?,
            css_set_dfl_cgrp: self.offset("css_set", "dfl_cgrp")?,
            css_cgroup: self.offset("cgroup_subsys_state", "cgroup")?,
            css_serial_nr: self.offset("cgroup_subsys_state", "serial_nr")?,
            cgroup_kn: self.offset("cgroup", "kn")?,
            kernfs_node_name: self.offset("kernfs_node", "name")?,
            kernfs_node_id: self.offset("kernfs_node", "id")?,
            // Renamed `__parent` in 6.15, when it became RCU-protected.
            kernfs_node_parent: self
                .offset("kernfs_node", "__parent")
                .or_else(|_| self.offset("kernfs_node", "parent"))?,
            skc_family: self.offset("sock", "__sk_common.skc_family")?,
            skc_daddr: self.offset("sock", "__sk_common.skc_daddr")?,
            skc_rcv_saddr: self.offset("sock", "__sk_common.skc_rcv_saddr")?,
            skc_dport: self.offset("sock", "__sk_common.skc_dport")?,
            skc_num: self.offset("sock", "__sk_common.skc_num")?,
            skc_v6_daddr: self.offset("sock", "__sk_common.skc_v6_daddr")?,
            skc_v6_rcv_saddr: self.offset("sock", "__sk_common.skc_v6_rcv_saddr")?,
            sk_protocol: self.offset("sock", "sk_protocol")?,
            msghdr_msg_name: self.offset("msghdr", "msg_name")?,
            files_fdt: self.offset("files_struct", "fdt")?,
            fdtable_max_fds: self.offset("fdtable", "max_fds")?,
            fdtable_fd: self.offset("fdtable", "fd")?,
            file_private_data: self.offset("file", "private_data")?,
            socket_sk: self.offset("socket", "sk")?,
            socket_file: self.offset("socket", "file")?,
            sk_socket: self.offset("sock", "sk_socket")?,
            file_f_flags: self.offset("file", "f_flags")?,
            sk_sndtimeo: self.offset("sock", "sk_sndtimeo")?,
            _pad_offsets: 0,
            inet_sport: self.offset("inet_sock", "inet_sport")?,
            sk_err: self.offset("sock", "sk_err")?,
            sk_err_soft: self.offset("sock", "sk_err_soft")?,
            sk_flags: self.offset("sock", "__sk_common.skc_flags")?,
            sock_done_bit: self.enum_value("sock_flags", "SOCK_DONE")?,
            tcp_total_retrans: self.offset("tcp_sock", "total_retrans")?,
            tcp_srtt_us: self.offset("tcp_sock", "srtt_us")?,
            tcp_bytes_acked: self.offset("tcp_sock", "bytes_acked")?,
            tcp_bytes_received: self.offset("tcp_sock", "bytes_received")?,
            // Added in 4.19 (ba113c3aa79a); 0 tells the programs not to read it.
            tcp_bytes_sent: self.offset("tcp_sock", "bytes_sent").unwrap_or(0),
            // Added in 4.20 (the earliest-departure-time model); 0: the clock is read.
            tcp_clock_cache: self.offset("tcp_sock", "tcp_clock_cache").unwrap_or(0),
        })
    }

    /// The message iterator's layout for the DNS hooks of the kprobe and fentry families
    /// (`usable` 0 where a part is missing: kernels before 6.0 have no `ITER_UBUF`).
    pub fn dns_iter_offsets(&self) -> DnsIterOffsets {
        let found = || -> Result<DnsIterOffsets, BtfError> {
            Ok(DnsIterOffsets {
                usable: 1,
                msghdr_msg_iter: self.offset("msghdr", "msg_iter")?,
                iter_type: self.offset("iov_iter", "iter_type")?,
                iov_offset: self.offset("iov_iter", "iov_offset")?,
                // `ubuf` shares a union with the iovec array pointer (`__iov`, `iov`
                // before 6.4): one offset for both.
                iter_ptr: self.offset("iov_iter", "ubuf")?,
                iter_ubuf: self.enum_value("iter_type", "ITER_UBUF")?,
                iter_iovec: self.enum_value("iter_type", "ITER_IOVEC")?,
                _pad: 0,
            })
        };
        found().unwrap_or_default()
    }

    /// Index of a cgroup v1 controller in `css_set.subsys[]` (`enum cgroup_subsys_id`).
    pub fn cgroup_subsys_index(&self, controller: &str) -> Result<u32, BtfError> {
        self.enum_value("cgroup_subsys_id", &format!("{controller}_cgrp_id"))
    }
}

#[cfg(test)]
mod tests;
