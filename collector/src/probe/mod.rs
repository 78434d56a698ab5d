//! Hook selection, BTF offsets, load and attach.
//!
//! `auto` tries kprobes (the design's choice), then fentry, then tracepoints, and keeps
//! the reason each better family was refused so the operator can read it.
//!
//! Public items: [`Probes`] (load, attach, and the maps the other stages take from it:
//! the ring buffer ([`ring`]), the pending attempts ([`pending`]), the UDP flow sweep
//! ([`flow_sweep`]), and the handles in [`feedback`] through which `events` and `enrich`
//! write back into the kernel without touching aya), [`ProbeError`] and [`AttachError`],
//! [`counters`] (the kernel's counters for the telemetry), [`KernelFacts`] and
//! [`kernel_release`] (for `check`), [`warn_if_fentry_on_realtime`], and the building
//! blocks the tests reuse (`btf`,
//! `cgroups`, `features`, `filters`, `programs`, `state_maps`, `tracefs`).

mod attach;
pub use attach::DnsHook;
pub mod boot_offset;
pub mod btf;
pub mod cgroups;
pub mod counters;
pub mod features;
pub mod feedback;
pub mod filters;
pub mod flow_sweep;
pub mod pending;
pub mod programs;
pub mod ring;
pub mod state_maps;
mod sys;
mod tick;
pub mod tracefs;

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProgramError, RawTracePoint},
};
use egress_shared::{CgroupSource, ProbeConfig, TracepointOffsets};

pub use self::attach::{AttachError, StateHook};
use self::{btf::KernelBtf, cgroups::CgroupInfo};
use crate::{
    config::settings::{HookMode, ProbeSettings},
    one_line,
};

/// The eBPF object built by build.rs from `collector-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("cannot read the cgroup layout: {0}")]
    Cgroups(#[source] std::io::Error),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("{}", refusals(.0))]
    NoUsableHook(Vec<(HookMode, String)>),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {name}: {reason}")]
    MapView { name: &'static str, reason: String },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot install the exclusion of {cidr}: {source}")]
    Filter {
        cidr: String,
        #[source]
        source: MapError,
    },
}

fn refusals(reasons: &[(HookMode, String)]) -> String {
    let parts: Vec<String> = reasons
        .iter()
        .map(|(mode, why)| format!("{mode}: {why}"))
        .collect();
    format!("no usable hook ({})", parts.join("; "))
}

/// Everything that must be known about the kernel before the programs load.
pub struct KernelFacts {
    pub btf_path: PathBuf,
    pub config: ProbeConfig,
    pub cgroups: CgroupInfo,
    /// Tracepoint offsets, or why tracepoints cannot be used.
    pub tracepoints: Result<TracepointOffsets, String>,
}

/// `ProbeConfig::coarse_tick_ns`: the kernel's tick; 0 (the decisions then read the
/// precise clock, at some cost per event) with one line saying why where it cannot be
/// had or would hold a cgroup below its rate.
fn coarse_tick_ns(settings: &ProbeSettings) -> u32 {
    if crate::testhook::precise_decisions() {
        return 0;
    }
    let tick_ns = match tick::tick_ns() {
        Ok(ns) => ns,
        Err(e) => {
            tracing::info!(
                reason = %e,
                "The rate limit and the identity cache read the precise clock."
            );
            return 0;
        }
    };
    let burst = settings.cgroup_burst.max(1);
    if !tick::suits_limit(tick_ns, settings.cgroup_rate, burst) {
        tracing::info!(
            rate = settings.cgroup_rate,
            burst,
            tick_ns,
            "The rate limit reads the precise clock: its burst is under two ticks' worth of events."
        );
        return 0;
    }
    tick_ns
}

/// What a slot table of `slots` entries (a power of two) folds its hash with: every slot,
/// or one where the table's test hook (`one_slot`) says so.
fn slot_mask(slots: u32, one_slot: bool) -> u32 {
    if one_slot { 0 } else { slots - 1 }
}

impl KernelFacts {
    /// The clock the rate limit and the identity cache go by, for the start line:
    /// `jiffies@<HZ>Hz`, or `boottime` (see `ProbeConfig::coarse_tick_ns`).
    pub fn decision_clock(&self) -> String {
        match self.config.coarse_tick_ns {
            0 => "boottime".to_owned(),
            ns => format!("jiffies@{}Hz", (1e9 / f64::from(ns)).round()),
        }
    }

    pub fn read(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        let btf_path = settings
            .btf_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(KernelBtf::DEFAULT_PATH));
        let kernel_btf = KernelBtf::from_file(&btf_path)?;
        let cgroups = cgroups::detect(&settings.host_root).map_err(ProbeError::Cgroups)?;
        let cgroup_subsys_index = match &cgroups.v1_controller {
            Some(controller) => kernel_btf.cgroup_subsys_index(controller)?,
            None => CgroupSource::DEFAULT_HIERARCHY,
        };
        let tracepoints = tracefs::root()
            .and_then(|root| tracefs::tracepoint_offsets(&root))
            .map_err(|e| one_line(&e));
        let exit_regs = ExitRegs::of(&kernel_btf);
        let (excluded_v4, excluded_v6) = filters::inline(&settings.excluded_destinations);
        let config = ProbeConfig {
            offsets: kernel_btf.kernel_offsets()?,
            tracepoints: tracepoints.clone().unwrap_or_default(),
            udp_flow_window_ns: settings.udp_flow_window.as_nanos().min(u64::MAX as u128) as u64,
            // 1 MiB at most: a wake-up per ~7,000 connection records, each of which
            // costs the reader and every stage after it a sleep and a wake. Below ~25k
            // events/s the reader's poll (250 ms) drains the ring before this fills.
            wakeup_bytes: ring::wakeup_bytes(settings.ring_buffer_bytes),
            cgroup_rate: settings.cgroup_rate,
            cgroup_burst: settings.cgroup_burst.max(1),
            track_closes: u32::from(settings.track_closes),
            fetching_atomics: u32::from(
                features::fetching_atomics() && !crate::testhook::without_fetching_atomics(),
            ),
            coarse_tick_ns: coarse_tick_ns(settings),
            aggregate_window_ns: settings
                .aggregate_window
                .map_or(0, |w| w.as_nanos().clamp(1, u64::MAX as u128) as u64),
            exclude_addresses: u32::from(!settings.excluded_destinations.is_empty()),
            exclude_cgroups: u32::from(settings.exclude_cgroups),
            dns: u32::from(settings.dns),
            dns_regs_fd: exit_regs.fd,
            dns_regs_buf: exit_regs.buf,
            regs_syscall_nr: exit_regs.syscall_nr,
            regs_sendto_addr: exit_regs.sendto_addr,
            bucket_slot_mask: slot_mask(
                egress_shared::BUCKET_SLOT_COUNT,
                crate::testhook::one_bucket_slot(),
            ),
            identity_slot_mask: slot_mask(
                egress_shared::IDENTITY_SLOT_COUNT,
                crate::testhook::one_identity_slot(),
            ),
            repeat_slot_mask: slot_mask(
                egress_shared::RepeatSlot::PER_CPU,
                crate::testhook::one_repeat_slot(),
            ),
            skip_completions_to_port: crate::testhook::skip_completions_to_port(),
            _pad: 0,
            dns_iter: kernel_btf.dns_iter_offsets(),
            excluded_v4,
            excluded_v6,
            cgroup_subsys_index,
        };
        Ok(Self {
            btf_path,
            config,
            cgroups,
            tracepoints,
        })
    }

    /// Loads the object. Each parsed copy of vmlinux BTF takes ~15 MiB of heap, and the
    /// collector's peak memory is set by how many are alive at once: this one (aya's
    /// loader parses `/sys/kernel/btf/vmlinux` itself when it is made) is gone before
    /// [`Self::attach_btf`] parses the one the attach needs.
    fn load(&self, ring_buffer_bytes: u32) -> Result<Ebpf, ProbeError> {
        let own_path = self.btf_path != std::path::Path::new(KernelBtf::DEFAULT_PATH);
        let given;
        let mut loader = EbpfLoader::new();
        if own_path {
            // The loader's own copy goes before the given file is parsed.
            loader.btf(None);
            given = self.attach_btf();
            loader.btf(given.as_ref());
        }
        loader
            .override_global("CONFIG", &self.config, true)
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)
    }

    /// The kernel's BTF (`btf_path`) as aya wants it to attach the BTF-typed programs
    /// (fentry, `tp_btf`); `None` where it cannot be read (those families are then
    /// refused). Parsed after the load, dropped after the attach; with `--btf`, also
    /// the load's own (see [`Self::load`]).
    fn attach_btf(&self) -> Option<aya::Btf> {
        aya::Btf::parse_file(&self.btf_path, aya::Endianness::default()).ok()
    }

    /// Tries `mode` in a fresh object and detaches at once (for `check`).
    pub fn try_mode(&self, mode: HookMode) -> Result<StateHook, String> {
        if mode == HookMode::Tracepoint {
            self.tracepoints.as_ref().map_err(Clone::clone)?;
        }
        let mut ebpf = self.load(4096).map_err(|e| one_line(&e))?;
        let exits = attach::ExitsOnly::of(&self.config);
        let btf = self.attach_btf();
        let state_hook =
            attach::attach(&mut ebpf, mode, btf.as_ref(), exits, true).map_err(|e| one_line(&e))?;
        attach::detach(&mut ebpf, mode);
        Ok(state_hook)
    }
}

/// Where `struct pt_regs` keeps what the syscall exits read back from the registers the
/// task saved at entry (x86_64, and only where the programs can reach them through
/// `bpf_task_pt_regs`, 5.15+: a program calling it elsewhere would be refused, and its
/// whole family with it). All 0 elsewhere: entry hooks save the arguments instead.
#[derive(Default)]
struct ExitRegs {
    /// A syscall's first two arguments (`di`, `si`; the return value goes to `ax`): the
    /// fd, and the buffer or message header (the DNS reads, the sends).
    fd: u32,
    buf: u32,
    /// The syscall number (`orig_ax`): connect() and the sends are seen at their exits.
    syscall_nr: u32,
    /// sendto()'s fifth argument, its destination (`r8`).
    sendto_addr: u32,
}

impl ExitRegs {
    /// One probe of the kernel (a program load), then BTF offsets.
    fn of(btf: &KernelBtf) -> Self {
        if !cfg!(target_arch = "x86_64")
            || crate::testhook::without_exit_regs()
            || !features::task_pt_regs()
        {
            return Self::default();
        }
        let (Ok(fd), Ok(buf)) = (btf.offset("pt_regs", "di"), btf.offset("pt_regs", "si")) else {
            return Self::default();
        };
        if fd == 0 || buf == 0 {
            return Self::default();
        }
        let syscall_nr = btf.offset("pt_regs", "orig_ax").unwrap_or(0);
        let sendto_addr = if syscall_nr == 0 {
            0
        } else {
            btf.offset("pt_regs", "r8").unwrap_or(0)
        };
        Self {
            fd,
            buf,
            syscall_nr,
            sendto_addr,
        }
    }
}

/// The loaded programs, attached in one family.
pub struct Probes {
    ebpf: Ebpf,
    pub mode: HookMode,
    /// Better families that were refused, and why.
    pub refused: Vec<(HookMode, String)>,
    pub facts: KernelFacts,
    /// Where the DNS programs read answers, if they are attached (see `attach::attach_dns`).
    pub dns_hook: Option<attach::DnsHook>,
    /// The program that follows the TCP state changes.
    pub state_hook: attach::StateHook,
    /// The boot offset written before the programs attached (see [`boot_offset`]).
    boot_offset_written: u64,
}

/// The boot offset, written before the programs attach (see [`boot_offset`]).
fn install_boot_offset(ebpf: &mut Ebpf) -> Result<u64, ProbeError> {
    let name = "BOOT_OFFSET";
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    let mut array = Array::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
    boot_offset::write(&mut array).map_err(|source| ProbeError::Map { name, source })
}

/// Tells SYN_SENT whether the tracepoint family's connect() exit takes its marks
/// (`CONNECT_EXIT_MARKS`, see `TCP_CONNECT_MARKS`): set before that family attaches,
/// cleared before any other (a mark no exit takes only costs time).
fn set_connect_exit_marks(ebpf: &mut Ebpf, on: bool) -> Result<(), ProbeError> {
    let name = "CONNECT_EXIT_MARKS";
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    let mut array =
        Array::<_, u32>::try_from(map).map_err(|source| ProbeError::Map { name, source })?;
    array
        .set(0, u32::from(on), 0)
        .map_err(|source| ProbeError::Map { name, source })
}

/// The kernel's BTF is only needed to load and attach: tens of MiB handed back.
fn release_btf(btf: Option<aya::Btf>) {
    drop(btf);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Probes {
    #[tracing::instrument(name = "probe.attach", skip_all, fields(probe.mode, probe.refused))]
    pub fn attach(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        let facts = KernelFacts::read(settings)?;
        let mut ebpf = facts.load(settings.ring_buffer_bytes)?;
        filters::install(
            &mut ebpf,
            &settings.excluded_destinations,
            (&facts.config.excluded_v4, &facts.config.excluded_v6),
        )?;
        let boot_offset_written = install_boot_offset(&mut ebpf)?;
        let btf = facts.attach_btf();
        let mut refused = Vec::new();
        for mode in settings.choice.candidates() {
            if mode == HookMode::Tracepoint
                && let Err(why) = &facts.tracepoints
            {
                refused.push((mode, why.clone()));
                continue;
            }
            let exits = attach::ExitsOnly::of(&facts.config);
            let resets = facts.config.track_closes != 0;
            // Before the attach: a non-blocking DNS-over-TCP connect's descriptor is
            // marked by SYN_SENT only while this is set (its exit returns early).
            let marks = mode == HookMode::Tracepoint && exits.connect;
            set_connect_exit_marks(&mut ebpf, marks)?;
            match attach::attach(&mut ebpf, mode, btf.as_ref(), exits, resets) {
                Ok(state_hook) => {
                    let dns_hook = if !settings.dns {
                        None
                    } else {
                        attach::attach_dns(
                            &mut ebpf,
                            mode,
                            btf.as_ref(),
                            (
                                facts.config.dns_regs_fd != 0,
                                facts.config.regs_syscall_nr != 0,
                            ),
                            facts.config.dns_iter.usable != 0,
                        )
                    };
                    release_btf(btf);
                    let span = tracing::Span::current();
                    span.record("probe.mode", mode.as_str());
                    span.record("probe.refused", refused.len());
                    return Ok(Self {
                        ebpf,
                        mode,
                        refused,
                        facts,
                        dns_hook,
                        state_hook,
                        boot_offset_written,
                    });
                }
                Err(e) => refused.push((mode, one_line(&e))),
            }
        }
        Err(ProbeError::NoUsableHook(refused))
    }

    /// The ring buffer the programs write events to.
    pub fn take_events(&mut self) -> Result<ring::EventRing, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map)
            .map(ring::EventRing::new)
            .map_err(|source| ProbeError::Map {
                name: "EVENTS",
                source,
            })
    }

    /// The per-CPU counters the programs keep.
    pub fn take_counters(&mut self) -> Result<PerCpuArray<MapData, u64>, ProbeError> {
        let map = self
            .ebpf
            .take_map("COUNTERS")
            .ok_or(ProbeError::MissingMap("COUNTERS"))?;
        PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })
    }

    /// `IDENTITIES`, for the evictions user space reports (see [`state_maps`]).
    pub fn take_identities(&mut self) -> Result<state_maps::CallsMap, ProbeError> {
        self.ebpf
            .take_map("IDENTITIES")
            .and_then(state_maps::CallsMap::new)
            .ok_or(ProbeError::MissingMap("IDENTITIES"))
    }

    /// `CALLS`, for the evictions user space reports (see [`state_maps`]).
    pub fn take_calls(&mut self) -> Result<state_maps::CallsMap, ProbeError> {
        self.ebpf
            .take_map("CALLS")
            .and_then(state_maps::CallsMap::new)
            .ok_or(ProbeError::MissingMap("CALLS"))
    }

    /// The kernel's counts about each program (recursion misses), readable after detach.
    pub fn program_counts(&self) -> programs::ProgramCounts {
        programs::ProgramCounts::of(&self.ebpf)
    }

    /// The open aggregates of repeated connections, when aggregation is on.
    pub fn take_aggregates(&mut self) -> Result<Option<feedback::AggregateWindows>, ProbeError> {
        if self.facts.config.aggregate_window_ns == 0 {
            return Ok(None);
        }
        let map = self.take_typed("AGGREGATES", PerCpuHashMap::try_from)?;
        let slots = self.take_typed("REPEAT_SLOTS", PerCpuArray::try_from)?;
        let read = self.take_typed("AGGREGATES_READ", Array::try_from)?;
        Ok(Some(feedback::AggregateWindows::new(map, slots, read)))
    }

    /// The map `name`, as the type `convert` makes of it.
    fn take_typed<T>(
        &mut self,
        name: &'static str,
        convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
    ) -> Result<T, ProbeError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ProbeError::MissingMap(name))?;
        convert(map).map_err(|source| ProbeError::Map { name, source })
    }

    /// TCP attempts in SYN_SENT, for `--pending-report`.
    pub fn take_pending(&mut self) -> Result<pending::PendingAttempts, ProbeError> {
        let map = self
            .ebpf
            .take_map("PENDING_TCP")
            .ok_or(ProbeError::MissingMap("PENDING_TCP"))?;
        let spilled = HashMap::try_from(map).map_err(|source| ProbeError::Map {
            name: "PENDING_TCP",
            source,
        })?;
        let slots = self
            .ebpf
            .take_map("PENDING_SLOTS")
            .ok_or(ProbeError::MissingMap("PENDING_SLOTS"))?;
        let slots = pending::SlotView::new(slots).map_err(|reason| ProbeError::MapView {
            name: "PENDING_SLOTS",
            reason,
        })?;
        Ok(pending::PendingAttempts::new(spilled, slots))
    }

    /// `UDP_FLOWS` and its sweep program, for the bytes a flow sends after its last
    /// record; `None` on kernels without the atomic exchange the sweep needs (5.12+).
    pub fn take_flow_sweep(&mut self) -> Result<Option<flow_sweep::FlowSweep>, ProbeError> {
        const PROGRAM: &str = "udp_flow_sweep";
        if self.facts.config.fetching_atomics == 0 {
            return Ok(None);
        }
        let program = |source| ProbeError::Program {
            name: PROGRAM,
            source,
        };
        let sweep: &mut RawTracePoint = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(ProbeError::MissingProgram(PROGRAM))?
            .try_into()
            .map_err(program)?;
        sweep.load().map_err(program)?;
        let fd = sweep
            .fd()
            .map_err(program)?
            .try_clone()
            .map_err(|e| program(ProgramError::IOError(e)))?;
        let flows = match self.ebpf.take_map("UDP_FLOWS") {
            Some(Map::LruHashMap(data)) => data,
            _ => return Err(ProbeError::MissingMap("UDP_FLOWS")),
        };
        let swept = self
            .ebpf
            .take_map("FLOW_SWEPT")
            .ok_or(ProbeError::MissingMap("FLOW_SWEPT"))?;
        let swept = Array::try_from(swept).map_err(|source| ProbeError::Map {
            name: "FLOW_SWEPT",
            source,
        })?;
        Ok(Some(flow_sweep::FlowSweep::new(flows, swept, fd)))
    }

    /// `BOOT_OFFSET`, for the reader to keep current.
    pub fn take_boot_offset(&mut self) -> Result<boot_offset::BootOffset, ProbeError> {
        let map = self
            .ebpf
            .take_map("BOOT_OFFSET")
            .ok_or(ProbeError::MissingMap("BOOT_OFFSET"))?;
        let written = self.boot_offset_written;
        Array::try_from(map)
            .map(|map| boot_offset::BootOffset::new(map, written))
            .map_err(|source| ProbeError::Map {
                name: "BOOT_OFFSET",
                source,
            })
    }

    /// The cgroups the programs drop, for user space to add to.
    pub fn take_excluded_cgroups(&mut self) -> Result<feedback::ExcludedCgroups, ProbeError> {
        let map = self
            .ebpf
            .take_map("EXCLUDED_CGROUPS")
            .ok_or(ProbeError::MissingMap("EXCLUDED_CGROUPS"))?;
        HashMap::try_from(map)
            .map(feedback::ExcludedCgroups::new)
            .map_err(|source| ProbeError::Map {
                name: "EXCLUDED_CGROUPS",
                source,
            })
    }

    /// Detaches every program (dropping `Probes` does the same).
    pub fn detach(mut self) {
        attach::detach(&mut self.ebpf, self.mode);
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    uname_field(|uts| uts.release.as_ptr())
}

/// `uname -v`: the build's version string (names `PREEMPT_RT` on real-time kernels).
fn kernel_version() -> String {
    uname_field(|uts| uts.version.as_ptr())
}

fn uname_field(field: impl Fn(&libc::utsname) -> *const libc::c_char) -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated.
    unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return "unknown".into();
        }
        std::ffi::CStr::from_ptr(field(&uts))
            .to_string_lossy()
            .into_owned()
    }
}

/// On PREEMPT_RT kernels fentry programs are preempted inside, and the kernel skips the
/// next task's run on that CPU (a recursion miss): seen losing up to a third of
/// concurrent connections, where kprobes and tracepoints lost none.
pub fn warn_if_fentry_on_realtime(mode: HookMode) {
    if mode == HookMode::Fentry && kernel_version().contains("PREEMPT_RT") {
        tracing::warn!(
            "fentry on a PREEMPT_RT kernel: the kernel skips programs preempted on a busy CPU \
             (counted as possibly_lost); --probe kprobe or tracepoint lose none there."
        );
    }
}
