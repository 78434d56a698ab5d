//! DNS messages as a workload read them (UDP, or TCP with or without the length
//! prefix): any bytes parse to an answer or an error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&first, rest)) = data.split_first() {
        if let Ok(answer) = egress_collector::dns::parse(rest, first & 1 == 1) {
            let _ = egress_collector::dns::type_name(answer.qtype);
            let _ = egress_collector::dns::rcode_name(answer.rcode);
        }
        let _ = egress_collector::dns::parse_query(rest, first & 1 == 1);
    }
});
