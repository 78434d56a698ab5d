//! Ring-buffer records: any bytes decode to a connection or a counted error.
#![no_main]

use egress_collector::events::{clock::BootClock, decode::decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let clock = BootClock::with_offset(1_700_000_000_000_000_000);
    if let Ok(connection) = decode(data, &clock) {
        let _ = connection.kind_str();
        let _ = connection.network_type();
    }
});
