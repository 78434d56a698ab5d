//! DNS answers the workloads received: parsed in user space (simple-dns, which checks
//! every length and compression pointer against the message), and the per-container
//! cache that names the addresses their connections go to (`cache`).
//!
//! Reference: docs/dns.md.

pub mod cache;

use std::net::IpAddr;

use simple_dns::{Packet, PacketFlag, rdata::RData};

/// One DNS response, as much of it as naming connections needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The message id (matches a query to its answer on one socket).
    pub id: u16,
    /// The question, lower-cased, without the trailing dot.
    pub name: String,
    /// The question's type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// The response code (0 NOERROR, 3 NXDOMAIN, ...).
    pub rcode: u8,
    /// Addresses the answer carried, each with its TTL in seconds.
    pub addresses: Vec<(IpAddr, u32)>,
    /// CNAME targets, in the order the answer gave them.
    pub cname_chain: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("a DNS query, not a response")]
    NotResponse,
    #[error("a DNS response, not a query")]
    NotQuery,
    #[error("a DNS response without a question")]
    NoQuestion,
}

impl ParseError {
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Malformed(_) => "malformed",
            ParseError::NotResponse => "not_response",
            ParseError::NotQuery => "not_query",
            ParseError::NoQuestion => "no_question",
        }
    }
}

/// Type name for `dns.question.type`-like attributes; the number for the rest.
pub fn type_name(qtype: u16) -> String {
    known_type_name(qtype).map_or_else(|| qtype.to_string(), str::to_owned)
}

/// The name of a common question type (what [`type_name`] gives besides numbers).
pub fn known_type_name(qtype: u16) -> Option<&'static str> {
    Some(match qtype {
        1 => "A",
        5 => "CNAME",
        28 => "AAAA",
        33 => "SRV",
        12 => "PTR",
        16 => "TXT",
        65 => "HTTPS",
        _ => return None,
    })
}

/// Response code name (RFC 1035, 6895).
pub fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "OTHER",
    }
}

fn clean(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Parses what a workload read from a DNS socket. Over TCP the message starts with its
/// 2-byte length unless the resolver read that on its own; both are accepted. A message
/// cut short by the kernel's copy limit fails to parse and is counted by the caller.
pub fn parse(bytes: &[u8], tcp: bool) -> Result<Answer, ParseError> {
    parse_as(bytes, tcp, true)
}

/// Parses a query a workload sent: the question (no answers, rcode 0).
pub fn parse_query(bytes: &[u8], tcp: bool) -> Result<Answer, ParseError> {
    parse_as(bytes, tcp, false)
}

fn parse_as(bytes: &[u8], tcp: bool, response: bool) -> Result<Answer, ParseError> {
    if tcp && bytes.len() >= 2 {
        let prefixed = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        if prefixed == bytes.len() - 2 {
            return parse_message(&bytes[2..], response);
        }
    }
    parse_message(bytes, response)
}

fn parse_message(bytes: &[u8], response: bool) -> Result<Answer, ParseError> {
    let packet = Packet::parse(bytes).map_err(|e| ParseError::Malformed(e.to_string()))?;
    match (response, packet.has_flags(PacketFlag::RESPONSE)) {
        (true, false) => return Err(ParseError::NotResponse),
        (false, true) => return Err(ParseError::NotQuery),
        _ => {}
    }
    let question = packet.questions.first().ok_or(ParseError::NoQuestion)?;
    // The low 4 bits of the header's flags (extended codes need OPT: not used here).
    let rcode = bytes.get(3).map_or(0, |b| b & 0x0f);
    let mut answer = Answer {
        id: packet.id(),
        name: clean(&question.qname.to_string()),
        qtype: question.qtype.into(),
        rcode,
        addresses: Vec::new(),
        cname_chain: Vec::new(),
    };
    for record in &packet.answers {
        match &record.rdata {
            RData::A(a) => answer
                .addresses
                .push((IpAddr::V4(a.address.into()), record.ttl)),
            RData::AAAA(a) => answer
                .addresses
                .push((IpAddr::V6(a.address.into()), record.ttl)),
            RData::CNAME(target) => answer.cname_chain.push(clean(&target.0.to_string())),
            _ => {}
        }
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{CLASS, Name, Question, ResourceRecord, TYPE, rdata};

    fn response(name: &str, rcode_nx: bool) -> Vec<u8> {
        let mut packet = Packet::new_reply(7);
        packet.questions.push(Question::new(
            Name::new_unchecked(name),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        if rcode_nx {
            *packet.rcode_mut() = simple_dns::RCODE::NameError;
        } else {
            packet.answers.push(ResourceRecord::new(
                Name::new_unchecked(name),
                CLASS::IN,
                300,
                RData::CNAME(rdata::CNAME(Name::new_unchecked("edge.example.net"))),
            ));
            packet.answers.push(ResourceRecord::new(
                Name::new_unchecked("edge.example.net"),
                CLASS::IN,
                60,
                RData::A(rdata::A {
                    address: 0x0a00_0001,
                }),
            ));
        }
        packet.build_bytes_vec().expect("test value")
    }

    #[test]
    fn answer_with_cname_chain() {
        let answer = parse(&response("API.Example.com", false), false).expect("test value");
        assert_eq!(answer.name, "api.example.com");
        assert_eq!(answer.qtype, 1);
        assert_eq!(answer.rcode, 0);
        assert_eq!(answer.cname_chain, vec!["edge.example.net".to_owned()]);
        assert_eq!(
            answer.addresses,
            vec![("10.0.0.1".parse().expect("test value"), 60)]
        );
    }

    #[test]
    fn nxdomain_and_tcp_prefix() {
        let bytes = response("nope.example.com", true);
        let mut tcp = (bytes.len() as u16).to_be_bytes().to_vec();
        tcp.extend_from_slice(&bytes);
        let answer = parse(&tcp, true).expect("test value");
        assert_eq!(answer.rcode, 3);
        assert!(answer.addresses.is_empty());
        assert_eq!(
            parse(&bytes, true).expect("test value").name,
            "nope.example.com"
        );
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let good = response("a.example.com", false);
        assert!(parse(&good[..good.len() - 3], false).is_err());
        assert!(parse(&[], true).is_err());
        // A compression pointer to itself.
        let mut looped = good.clone();
        looped.truncate(12);
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert!(parse(&looped, false).is_err());
        let mut query = good;
        query[2] &= 0x7f;
        assert_eq!(parse(&query, false), Err(ParseError::NotResponse));
        let asked = parse_query(&query, false).expect("a query");
        assert_eq!((asked.id, asked.name.as_str()), (7, "a.example.com"));
        let mut state = 1u32;
        for _ in 0..20_000 {
            let len = (state % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8
                })
                .collect();
            let _ = parse(&bytes, state & 1 == 0);
        }
    }
}
