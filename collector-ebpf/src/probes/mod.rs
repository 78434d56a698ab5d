//! One module per hook family. Entry points stay thin: read the arguments, call `emit`.
pub mod dns;
pub mod dns_sock;
mod fentry;
mod kprobe;
mod tcp_state;
mod tracepoint;
mod udp_sweep;
