//! What the qemu VM tests share: a Debian kernel (scripts/vm-kernel.sh), a newc
//! initramfs, the boot with the serial console read back. The same code as
//! `tests/vm_kernels.rs`, which keeps its own copy for now (two helpers edit it at once).

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Emulation is slow and VMs may share the host's CPUs; past this the guest is stuck.
pub const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// Markers /init prints on the console; nothing else in the guest prints them.
pub const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";
pub const RESULT_MARKER: &str = "EGRESS-VM-RESULT ";
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

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vmlinuz of the newest Debian cloud kernel of `series`, downloaded on first use.
pub fn debian_kernel(series: &str) -> PathBuf {
    let script = workspace_root().join("scripts").join("vm-kernel.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(series)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "no {series} kernel ({}):\n{stderr}",
        output.status
    );
    let vmlinuz = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        vmlinuz.is_file(),
        "vm-kernel.sh printed {vmlinuz:?}, which is no file:\n{stderr}"
    );
    vmlinuz
}

/// A directory of this test's own under the system temp dir, removed when dropped: the
/// two tests run in parallel and must not share files.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(series: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("egress-vm-{series}-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
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
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
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

/// Boots the kernel and returns everything the serial console printed; `Err` holds the
/// reason and that output when qemu failed or the guest did not power off in time.
pub fn boot(series: &str, kernel: &Path, initrd: &Path) -> Result<String, String> {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // quiet + loglevel=3: kernel chatter must not interleave with the scenario's lines.
        // panic=-1 with -no-reboot: a dying init ends qemu instead of hanging it.
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot start qemu-system-x86_64 (scripts/setup.sh installs it): {e}")
        })?;
    let console = read_console(series, qemu.stdout.take().expect("qemu stdout is piped"));
    let mut qemu_stderr = qemu.stderr.take().expect("qemu stderr is piped");
    let qemu_errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = qemu_stderr.read_to_string(&mut text);
        text
    });

    let exit = wait_or_kill(&mut qemu, VM_TIMEOUT);
    // qemu is gone, so both pipes are closed and the readers finish.
    let console = console.join().expect("console reader panicked");
    let qemu_errors = qemu_errors.join().expect("qemu stderr reader panicked");
    match exit {
        Some(status) if status.success() => Ok(console),
        Some(status) => Err(format!(
            "[{series}] qemu exited with {status}; its stderr:\n{qemu_errors}\nconsole:\n{console}"
        )),
        None => Err(format!(
            "[{series}] the VM did not power off within {VM_TIMEOUT:?}; killed it. console:\n{console}"
        )),
    }
}

/// Collects the console output; marker lines are echoed as they come so that
/// `--nocapture` shows progress without the whole log.
pub fn read_console(
    series: &str,
    stdout: impl Read + Send + 'static,
) -> thread::JoinHandle<String> {
    let series = series.to_owned();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut console = String::new();
        let mut line = Vec::new();
        // Lines, not a UTF-8 string: the firmware may write bytes that are not text.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = printable(&String::from_utf8_lossy(&line));
            let trimmed = text.trim_end();
            if ["SCENARIO ", KERNEL_MARKER, RESULT_MARKER]
                .iter()
                .any(|m| trimmed.contains(m))
            {
                eprintln!("[{series}] {trimmed}");
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
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
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
