//! Ring-buffer records: any bytes decode to a connection, a close, an identity or a
//! counted error. The input is a run of records (each a 2-byte little-endian length, then
//! its bytes), decoded in order, as the reader does: identities learned from one record
//! are joined with the connections after it.
#![no_main]

use egress_collector::events::{
    clock::BootClock,
    decode::{Decoded, decode},
    identities::Identities,
    outcome::Close,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let clock = BootClock::with_offset(1_700_000_000_000_000_000);
    let mut identities = Identities::default();
    let mut rest = data;
    while let [low, high, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*low, *high])).min(tail.len());
        let (record, after) = tail.split_at(len);
        rest = after;
        match decode(record, &clock, &mut identities) {
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
            Ok(Decoded::Identity) | Err(_) => {}
        }
    }
    let _ = identities.take_unknown();
});
