//! Debian kernels booted under qemu (TCG: no KVM needed), shared by the VM tests
//! (collector/tests/vm_kernels.rs) and the VM benchmark (`egress-bench kernel-cost-vm`):
//! the kernel fetched by scripts/vm-kernel.sh, an initramfs written without a staging
//! tree, the guest's common /init preamble, and the boot that returns the serial console.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Debian's busybox-static: the guest's shell and tools.
pub const BUSYBOX: &str = "/bin/busybox";

/// The start of every guest's /init: busybox, the pseudo filesystems, the console.
pub const GUEST_MOUNTS: &str = "/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
";

/// What a guest that loads BPF programs mounts after [`GUEST_MOUNTS`]: debugfs, the
/// cgroup2 hierarchy the collector attributes by, bpffs; and loopback up.
pub const GUEST_BPF_MOUNTS: &str = "mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
";

/// The vmlinuz of the newest Debian cloud kernel of `series` (6.1, 6.12, 6.12-rt),
/// downloaded by `workspace`'s scripts/vm-kernel.sh on first use.
pub fn debian_kernel(workspace: &Path, series: &str) -> Result<PathBuf, String> {
    let script = workspace.join("scripts").join("vm-kernel.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(series)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("no {series} kernel ({}):\n{stderr}", output.status));
    }
    let vmlinuz = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !vmlinuz.is_file() {
        return Err(format!(
            "vm-kernel.sh printed {vmlinuz:?}, which is no file:\n{stderr}"
        ));
    }
    Ok(vmlinuz)
}

/// A directory of one VM's own under the system temp dir, removed when dropped: VMs run
/// in parallel and must not share files.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Result<Self, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("egress-vm-{label}-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A "newc" cpio archive, the format the kernel unpacks as an initramfs. Written here
/// rather than by cpio(1) so no staging tree (and no mknod) is needed.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    inodes: u32,
}

impl Cpio {
    /// The directories every guest needs, /dev/console (the kernel opens it for init's
    /// stdio before anything is mounted) and busybox.
    pub fn with_busybox() -> Result<Self, String> {
        let mut cpio = Self::default();
        for dir in ["bin", "dev", "proc", "sys", "tmp", "run"] {
            cpio.dir(dir);
        }
        cpio.char_device("dev/console", 0o600, (5, 1));
        cpio.file_from("bin/busybox", 0o755, Path::new(BUSYBOX))?;
        Ok(cpio)
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
    }

    /// The contents of the host file `from`, as `name`.
    pub fn file_from(&mut self, name: &str, permissions: u32, from: &Path) -> Result<(), String> {
        let data = fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        self.file(name, permissions, &data);
        Ok(())
    }

    pub fn char_device(&mut self, name: &str, permissions: u32, rdev: (u32, u32)) {
        self.entry(name, 0o020_000 | permissions, 1, rdev, &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.inodes += 1;
        let size = u32::try_from(data.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            self.inodes,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

/// How to boot one guest.
pub struct Boot<'a> {
    /// Prefixes the echoed console lines and errors, e.g. the kernel series.
    pub label: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Past this the guest is stuck: qemu is killed.
    pub timeout: Duration,
    /// Console lines holding one of these are echoed to stderr as they come, so a long
    /// run shows progress without the whole log.
    pub echo: &'a [&'a str],
}

/// Boots the kernel and returns everything the serial console printed; `Err` holds the
/// reason and that output when qemu failed or the guest did not power off in time.
pub fn boot(boot: &Boot) -> Result<String, String> {
    let label = boot.label;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        // quiet + loglevel=3: kernel chatter must not interleave with the guest's lines.
        // panic=-1 with -no-reboot: a dying init ends qemu instead of hanging it.
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot start qemu-system-x86_64 (scripts/setup.sh installs it): {e}")
        })?;
    let echo: Vec<String> = boot.echo.iter().map(|m| m.to_string()).collect();
    let console = read_console(
        label,
        echo,
        qemu.stdout.take().expect("qemu stdout is piped"),
    );
    let mut qemu_stderr = qemu.stderr.take().expect("qemu stderr is piped");
    let qemu_errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = qemu_stderr.read_to_string(&mut text);
        text
    });

    let exit = wait_or_kill(&mut qemu, boot.timeout);
    // qemu is gone, so both pipes are closed and the readers finish.
    let console = console.join().unwrap_or_default();
    let qemu_errors = qemu_errors.join().unwrap_or_default();
    match exit {
        Some(status) if status.success() => Ok(console),
        Some(status) => Err(format!(
            "[{label}] qemu exited with {status}; its stderr:\n{qemu_errors}\nconsole:\n{console}"
        )),
        None => Err(format!(
            "[{label}] the VM did not power off within {:?}; killed it. console:\n{console}",
            boot.timeout
        )),
    }
}

/// Collects the console output, echoing the lines that hold one of `echo`.
fn read_console(
    label: &str,
    echo: Vec<String>,
    stdout: impl Read + Send + 'static,
) -> thread::JoinHandle<String> {
    let label = label.to_owned();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut console = String::new();
        let mut line = Vec::new();
        // Lines, not a UTF-8 string: the firmware may write bytes that are not text.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = printable(&String::from_utf8_lossy(&line));
            let trimmed = text.trim_end();
            if echo.iter().any(|m| trimmed.contains(m.as_str())) {
                eprintln!("[{label}] {trimmed}");
            }
            console.push_str(trimmed);
            console.push('\n');
            line.clear();
        }
        console
    })
}

/// `text` without terminal control sequences: the firmware resets and clears the screen
/// (ESC c, ESC [2J), which would garble the terminal that shows a failure's console.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI: parameters, then one final byte in '@'..='~'.
            '\x1b' if chars.clone().next() == Some('[') => {
                chars.by_ref().skip(1).find(|c| ('@'..='~').contains(c));
            }
            // Any other escape is ESC plus one character.
            '\x1b' => {
                chars.next();
            }
            c if c.is_control() && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// Waits for the child to exit; kills it past `timeout` and returns `None`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The rest of a line after `marker`. Not a prefix match: the firmware leaves the cursor
/// mid-line, so /init's first marker shares a line with whatever it printed last.
pub fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.split_once(marker).map(|(_, rest)| rest.trim())
}

/// What the test guests' /init prints before and with each verdict; nothing else in the
/// guest prints them.
pub const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";
pub const RESULT_MARKER: &str = "EGRESS-VM-RESULT ";
/// Emulation is slow and VMs may share the host's CPUs; past this a test guest is stuck.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The workspace these tests and benchmarks belong to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// For the tests: the vmlinuz of `series`, downloaded on first use; panics with the
/// reason when there is none (a test must not skip).
pub fn test_kernel(series: &str) -> PathBuf {
    debian_kernel(&workspace_root(), series).unwrap_or_else(|problem| panic!("{problem}"))
}

/// For the tests: boots `kernel` with `initrd`, echoing the scenario's and the markers'
/// lines as they come, and returns everything the serial console printed. A guest
/// kernel that panicked before /init ran (nothing of ours had run yet; under TCG,
/// Debian's 6.12-rt once died of an int3 Oops in early boot) is booted once more.
pub fn boot_test(series: &str, kernel: &Path, initrd: &Path) -> Result<String, String> {
    let settings = Boot {
        label: series,
        kernel,
        initrd,
        timeout: TEST_TIMEOUT,
        echo: &["SCENARIO ", KERNEL_MARKER, RESULT_MARKER],
    };
    match boot(&settings) {
        Ok(ref console) | Err(ref console) if died_before_init(console) => {
            eprintln!(
                "[{series}] the guest kernel panicked before /init ran; booting it once more. Its console:\n{console}"
            );
            boot(&settings)
        }
        first => first,
    }
}

/// The console of a guest whose kernel panicked before /init printed its first marker.
fn died_before_init(console: &str) -> bool {
    !console.contains(KERNEL_MARKER) && console.contains("Kernel panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_kernel_that_died_before_init_is_booted_again() {
        let early = "Booting from ROM...\n[ 1.3] Oops: int3\n[ 1.36] Kernel panic - not syncing";
        assert!(died_before_init(early));
        // Our code ran (the marker is there): a panic then is the test's to report.
        let late = format!("{KERNEL_MARKER}6.12.0\nKernel panic - not syncing");
        assert!(!died_before_init(&late));
        // No panic: a guest that hung or powered off early is not retried.
        assert!(!died_before_init("Booting from ROM..."));
    }

    #[test]
    fn control_sequences_are_dropped_and_markers_found_mid_line() {
        assert_eq!(printable("\x1bc\x1b[2Jabc\x1b[0m def\r"), "abc def");
        assert_eq!(after_marker("junkMARK x y ", "MARK "), Some("x y"));
        assert_eq!(after_marker("nothing", "MARK "), None);
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("bin/x", 0o755, b"hello");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
