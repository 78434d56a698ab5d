//! tracefs: where tracepoints live. Mounted if absent; `format` files give the offsets
//! of tracepoint record fields.

use std::{
    collections::HashMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use egress_shared::TracepointOffsets;

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {category}:{name} does not exist ({path}: {source})")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {category}:{name} has no field {field}")]
    NoField {
        category: String,
        name: String,
        field: String,
    },
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs root, mounting it at `/sys/kernel/tracing` if no candidate is mounted.
pub fn root() -> Result<PathBuf, TracefsError> {
    for candidate in CANDIDATES {
        if Path::new(candidate).join("events").is_dir() {
            return Ok(PathBuf::from(candidate));
        }
    }
    let path = PathBuf::from(CANDIDATES[0]);
    mount_tracefs(&path).map_err(|source| TracefsError::Mount {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn mount_tracefs(path: &Path) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Field name -> byte offset, from the text of a tracepoint `format` file.
pub fn parse_format(text: &str) -> HashMap<String, u32> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut declaration = None;
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(value) = part.strip_prefix("offset:") {
                offset = value.trim().parse::<u32>().ok();
            } else if declaration.is_none() && !part.contains(':') && !part.is_empty() {
                declaration = Some(part);
            }
        }
        let (Some(declaration), Some(offset)) = (declaration, offset) else {
            continue;
        };
        // "const void * skaddr", "__u8 saddr[4]", "int fd": the name is the last word.
        let name = declaration
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or_default();
        let name = name.split('[').next().unwrap_or_default();
        if !name.is_empty() {
            fields.insert(name.to_owned(), offset);
        }
    }
    fields
}

/// A tracepoint's fields.
pub struct Format {
    category: String,
    name: String,
    fields: HashMap<String, u32>,
}

impl Format {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::NoTracepoint {
            category: category.to_owned(),
            name: name.to_owned(),
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            category: category.to_owned(),
            name: name.to_owned(),
            fields: parse_format(&text),
        })
    }

    pub fn field(&self, field: &str) -> Result<u32, TracefsError> {
        self.fields
            .get(field)
            .copied()
            .ok_or_else(|| TracefsError::NoField {
                category: self.category.clone(),
                name: self.name.clone(),
                field: field.to_owned(),
            })
    }
}

/// Offsets of every tracepoint field the tracepoint programs read.
pub fn tracepoint_offsets(root: &Path) -> Result<TracepointOffsets, TracefsError> {
    let state = Format::read(root, "sock", "inet_sock_set_state")?;
    let connect = Format::read(root, "syscalls", "sys_enter_connect")?;
    let sendto = Format::read(root, "syscalls", "sys_enter_sendto")?;
    let sendmsg = Format::read(root, "syscalls", "sys_enter_sendmsg")?;
    let sendmmsg = Format::read(root, "syscalls", "sys_enter_sendmmsg")?;
    Ok(TracepointOffsets {
        state_skaddr: state.field("skaddr")?,
        state_oldstate: state.field("oldstate")?,
        state_newstate: state.field("newstate")?,
        state_protocol: state.field("protocol")?,
        state_sport: state.field("sport")?,
        connect_fd: connect.field("fd")?,
        connect_addr: connect.field("uservaddr")?,
        sendto_fd: sendto.field("fd")?,
        sendto_addr: sendto.field("addr")?,
        sendmsg_fd: sendmsg.field("fd")?,
        sendmsg_msg: sendmsg.field("msg")?,
        sendmmsg_fd: sendmmsg.field("fd")?,
        sendmmsg_msg: sendmmsg.field("mmsg")?,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    // Captured from /sys/kernel/tracing/events/sock/inet_sock_set_state/format (6.18).
    pub(super) const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 1474
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn parses_pointer_array_and_plain_fields() {
        let fields = parse_format(INET_SOCK_SET_STATE);
        assert_eq!(fields.get("skaddr"), Some(&8));
        assert_eq!(fields.get("oldstate"), Some(&16));
        assert_eq!(fields.get("newstate"), Some(&20));
        assert_eq!(fields.get("protocol"), Some(&30));
        assert_eq!(fields.get("daddr_v6"), Some(&56));
        assert_eq!(fields.get("common_pid"), Some(&4));
    }

    #[test]
    fn parses_syscall_arguments() {
        let text = "\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
                    \tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;\n\
                    \tfield:struct sockaddr * uservaddr;\toffset:24;\tsize:8;\tsigned:0;\n";
        let fields = parse_format(text);
        assert_eq!(fields.get("fd"), Some(&16));
        assert_eq!(fields.get("uservaddr"), Some(&24));
        assert_eq!(fields.get("__syscall_nr"), Some(&8));
    }

    #[test]
    fn ignores_garbage() {
        let fields = parse_format("field:\nfield:int x; offset:abc;\nnonsense\n\0\u{1}");
        assert!(fields.is_empty());
    }
}

#[cfg(test)]
mod fuzz {
    use crate::mutate::mutations;

    #[test]
    fn format_parsing_never_panics() {
        for input in mutations(super::tests::INET_SOCK_SET_STATE.as_bytes(), 20_000) {
            let _ = super::parse_format(&String::from_utf8_lossy(&input));
        }
    }
}
