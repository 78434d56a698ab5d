//! One module per hook family. Entry points stay thin: read the arguments, call `emit`.
mod fentry;
mod kprobe;
mod tcp_state;
mod tracepoint;
