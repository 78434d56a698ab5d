//! Ring-buffer records: any bytes decode to a connection, a close or a counted error.
#![no_main]

use egress_collector::events::{
    clock::BootClock,
    decode::{Decoded, decode},
    outcome::Close,
    text::Interner,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let clock = BootClock::with_offset(1_700_000_000_000_000_000);
    match decode(data, &clock, &mut Interner::default()) {
        Ok(Decoded::Connection(connection)) => {
            let _ = connection.kind_str();
            let _ = connection.network_type();
        }
        Ok(Decoded::Close(raw)) => {
            let _ = Close::from_raw(&raw, &clock);
        }
        Ok(Decoded::Dns(raw)) => {
            let _ = egress_collector::dns::parse(&raw.payload, raw.tcp);
        }
        Err(_) => {}
    }
});
