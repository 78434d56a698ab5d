//! Address -> name, per container (cgroup) and per pod: what each workload resolved.
//!
//! An entry lives until max(TTL, floor) after the answer that carried it, and longer
//! while a connection matched to it is open. Bounded per container and in total: an
//! answer that does not fit is not cached and is counted (`full`).

use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::config::settings::CacheLimits;

/// Which cache named a connection (`egress.dns.match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The connecting container resolved the address itself.
    Container,
    /// Another container of the same pod did (a sidecar).
    Pod,
}

impl Match {
    pub fn as_str(self) -> &'static str {
        match self {
            Match::Container => "container",
            Match::Pod => "pod",
        }
    }
}

/// The name a connection's destination was resolved from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    /// The question of the answer that carried the address.
    pub name: String,
    /// CNAME targets between the question and the address.
    pub cname_chain: Vec<String>,
    pub matched: Match,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    cname_chain: Vec<String>,
    expires_ns: u64,
    /// Open connections matched to this entry: it does not expire while any is.
    open: u32,
}

/// A cache scope: a container (cgroup id) or a pod (its UID).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Container(u64),
    Pod(String),
}

#[derive(Debug, Default)]
pub struct NameCache {
    limits: CacheLimits,
    scopes: HashMap<Scope, HashMap<IpAddr, Entry>>,
    total: usize,
    /// Addresses not cached because a scope or the whole cache was full.
    pub full: u64,
}

impl NameCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Records the addresses of an answer `container` (in pod `pod`, if any) received at
    /// `now_ns` (CLOCK_BOOTTIME).
    pub fn insert(
        &mut self,
        container: u64,
        pod: Option<&str>,
        answer: &super::Answer,
        now_ns: u64,
    ) {
        let scopes = std::iter::once(Scope::Container(container))
            .chain(pod.map(|p| Scope::Pod(p.to_owned())));
        for scope in scopes {
            for (address, ttl) in &answer.addresses {
                let keep = Duration::from_secs(u64::from(*ttl)).max(self.limits.floor);
                let expires_ns = now_ns.saturating_add(keep.as_nanos() as u64);
                let entries = self.scopes.entry(scope.clone()).or_default();
                if let Some(entry) = entries.get_mut(address) {
                    // The newest answer names it; the open count stays.
                    entry.name.clone_from(&answer.name);
                    entry.cname_chain.clone_from(&answer.cname_chain);
                    entry.expires_ns = entry.expires_ns.max(expires_ns);
                    continue;
                }
                if entries.len() >= self.limits.per_scope || self.total >= self.limits.total {
                    self.full += 1;
                    continue;
                }
                entries.insert(
                    *address,
                    Entry {
                        name: answer.name.clone(),
                        cname_chain: answer.cname_chain.clone(),
                        expires_ns,
                        open: 0,
                    },
                );
                self.total += 1;
            }
        }
    }

    fn live<'a>(&'a self, scope: &Scope, address: &IpAddr, now_ns: u64) -> Option<&'a Entry> {
        self.scopes
            .get(scope)?
            .get(address)
            .filter(|e| e.open > 0 || e.expires_ns > now_ns)
    }

    /// The name `container` (or its pod) resolved `address` from, if still known.
    pub fn lookup(
        &self,
        container: u64,
        pod: Option<&str>,
        address: &IpAddr,
        now_ns: u64,
    ) -> Option<ServerName> {
        let (entry, matched) = match self.live(&Scope::Container(container), address, now_ns) {
            Some(e) => (e, Match::Container),
            None => {
                let pod = Scope::Pod(pod?.to_owned());
                (self.live(&pod, address, now_ns)?, Match::Pod)
            }
        };
        Some(ServerName {
            name: entry.name.clone(),
            cname_chain: entry.cname_chain.clone(),
            matched,
        })
    }

    fn scope_of(container: u64, pod: Option<&str>, matched: Match) -> Option<Scope> {
        match matched {
            Match::Container => Some(Scope::Container(container)),
            Match::Pod => pod.map(|p| Scope::Pod(p.to_owned())),
        }
    }

    /// A connection named from this entry opened (`delta` 1) or closed (-1).
    pub fn hold(
        &mut self,
        container: u64,
        pod: Option<&str>,
        address: &IpAddr,
        matched: Match,
        open: bool,
    ) {
        let Some(scope) = Self::scope_of(container, pod, matched) else {
            return;
        };
        if let Some(entry) = self.scopes.get_mut(&scope).and_then(|s| s.get_mut(address)) {
            if open {
                entry.open += 1;
            } else {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }

    /// Drops expired entries with no open connection, and empty scopes.
    pub fn expire(&mut self, now_ns: u64) {
        let mut removed = 0;
        self.scopes.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|_, e| e.open > 0 || e.expires_ns > now_ns);
            removed += before - entries.len();
            !entries.is_empty()
        });
        self.total -= removed;
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::Answer;

    const S: u64 = 1_000_000_000;

    fn answer(name: &str, ip: &str, ttl: u32) -> Answer {
        Answer {
            id: 1,
            name: name.into(),
            qtype: 1,
            rcode: 0,
            addresses: vec![(ip.parse().expect("test value"), ttl)],
            cname_chain: vec![],
        }
    }

    #[test]
    fn per_container_then_pod_then_expiry() {
        let mut cache = NameCache::new(CacheLimits {
            floor: Duration::from_secs(5),
            per_scope: 10,
            total: 100,
        });
        let ip: IpAddr = "10.0.0.1".parse().expect("test value");
        cache.insert(1, Some("pod-a"), &answer("one.test", "10.0.0.1", 1), 0);
        cache.insert(2, None, &answer("two.test", "10.0.0.1", 1), 0);
        assert_eq!(
            cache.lookup(1, None, &ip, S).expect("test value").name,
            "one.test"
        );
        assert_eq!(
            cache.lookup(2, None, &ip, S).expect("test value").name,
            "two.test"
        );
        let sidecar = cache.lookup(3, Some("pod-a"), &ip, S).expect("test value");
        assert_eq!(
            (sidecar.name.as_str(), sidecar.matched),
            ("one.test", Match::Pod)
        );
        assert!(cache.lookup(3, Some("pod-b"), &ip, S).is_none());
        // Past the floor: gone, unless a connection holds it.
        cache.hold(1, None, &ip, Match::Container, true);
        assert!(cache.lookup(2, None, &ip, 6 * S).is_none());
        assert!(cache.lookup(1, None, &ip, 6 * S).is_some());
        cache.hold(1, None, &ip, Match::Container, false);
        cache.expire(6 * S);
        assert!(cache.lookup(1, None, &ip, 6 * S).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn bounded_and_counted() {
        let mut cache = NameCache::new(CacheLimits {
            floor: Duration::from_secs(5),
            per_scope: 2,
            total: 3,
        });
        for i in 0..4 {
            cache.insert(1, None, &answer("x.test", &format!("10.0.0.{i}"), 60), 0);
        }
        cache.insert(2, None, &answer("y.test", "10.0.1.1", 60), 0);
        cache.insert(3, None, &answer("z.test", "10.0.2.1", 60), 0);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.full, 3);
    }
}
