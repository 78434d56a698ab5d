//! Address -> name, per container (cgroup) and per pod: what each workload resolved.
//!
//! An entry lives until max(TTL, floor) after the answer that carried it, and longer
//! while a connection matched to it is open. Bounded per container and in total: an
//! answer that does not fit is not cached and is counted (`full`).

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

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

/// The name a connection's destination was resolved from. Shared with the cache entry
/// that named it: naming a record costs two reference counts, not a copy of each name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    /// The question of the answer that carried the address.
    pub name: Arc<str>,
    /// CNAME targets between the question and the address.
    pub cname_chain: Arc<[String]>,
    pub matched: Match,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    cname_chain: Arc<[String]>,
    expires_ns: u64,
    /// Open connections matched to this entry: it does not expire while any is.
    open: u32,
}

type Scope = HashMap<IpAddr, Entry>;

/// A cache scope: a container (cgroup id) or a pod (its cgroup's name, as the kernel
/// gave it: the same pod's containers carry the same one, and a lookup borrows it).
#[derive(Debug, Clone, Copy)]
enum ScopeKey<'a> {
    Container(u64),
    Pod(&'a str),
}

#[derive(Debug, Default)]
pub struct NameCache {
    limits: CacheLimits,
    containers: HashMap<u64, Scope>,
    pods: HashMap<Box<str>, Scope>,
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

    fn scope(&self, key: ScopeKey) -> Option<&Scope> {
        match key {
            ScopeKey::Container(id) => self.containers.get(&id),
            ScopeKey::Pod(pod) => self.pods.get(pod),
        }
    }

    fn scope_mut(&mut self, key: ScopeKey) -> Option<&mut Scope> {
        match key {
            ScopeKey::Container(id) => self.containers.get_mut(&id),
            ScopeKey::Pod(pod) => self.pods.get_mut(pod),
        }
    }

    /// The scope, made if new (the one place a pod's key is copied).
    fn scope_or_new(&mut self, key: ScopeKey) -> &mut Scope {
        match key {
            ScopeKey::Container(id) => self.containers.entry(id).or_default(),
            ScopeKey::Pod(pod) => {
                if !self.pods.contains_key(pod) {
                    self.pods.insert(pod.into(), Scope::new());
                }
                self.pods.get_mut(pod).expect("just inserted")
            }
        }
    }

    /// Records the addresses of an answer `container` (in pod `pod`, its cgroup's name,
    /// if any) received at `now_ns` (CLOCK_BOOTTIME).
    pub fn insert(
        &mut self,
        container: u64,
        pod: Option<&str>,
        answer: &super::Answer,
        now_ns: u64,
    ) {
        let name: Arc<str> = Arc::from(answer.name.as_str());
        let cname_chain: Arc<[String]> = Arc::from(answer.cname_chain.as_slice());
        let scopes = std::iter::once(ScopeKey::Container(container)).chain(pod.map(ScopeKey::Pod));
        for scope in scopes {
            for (address, ttl) in &answer.addresses {
                let keep = Duration::from_secs(u64::from(*ttl)).max(self.limits.floor);
                let expires_ns = now_ns.saturating_add(keep.as_nanos() as u64);
                if let Some(entry) = self.scope_mut(scope).and_then(|s| s.get_mut(address)) {
                    // The newest answer names it; the open count stays.
                    entry.name = Arc::clone(&name);
                    entry.cname_chain = Arc::clone(&cname_chain);
                    entry.expires_ns = entry.expires_ns.max(expires_ns);
                    continue;
                }
                let held = self.scope(scope).map_or(0, Scope::len);
                if held >= self.limits.per_scope || self.total >= self.limits.total {
                    self.full += 1;
                    continue;
                }
                let entries = self.scope_or_new(scope);
                entries.insert(
                    *address,
                    Entry {
                        name: Arc::clone(&name),
                        cname_chain: Arc::clone(&cname_chain),
                        expires_ns,
                        open: 0,
                    },
                );
                self.total += 1;
            }
        }
    }

    fn live(&self, scope: ScopeKey, address: &IpAddr, now_ns: u64) -> Option<&Entry> {
        self.scope(scope)?
            .get(address)
            .filter(|e| e.open > 0 || e.expires_ns > now_ns)
    }

    /// The name `container` (or its pod, by its cgroup's name) resolved `address` from,
    /// if still known. Allocates nothing.
    pub fn lookup(
        &self,
        container: u64,
        pod: Option<&str>,
        address: &IpAddr,
        now_ns: u64,
    ) -> Option<ServerName> {
        let (entry, matched) = match self.live(ScopeKey::Container(container), address, now_ns) {
            Some(e) => (e, Match::Container),
            None => (self.live(ScopeKey::Pod(pod?), address, now_ns)?, Match::Pod),
        };
        Some(ServerName {
            name: Arc::clone(&entry.name),
            cname_chain: Arc::clone(&entry.cname_chain),
            matched,
        })
    }

    fn scope_of<'a>(container: u64, pod: Option<&'a str>, matched: Match) -> Option<ScopeKey<'a>> {
        match matched {
            Match::Container => Some(ScopeKey::Container(container)),
            Match::Pod => pod.map(ScopeKey::Pod),
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
        if let Some(entry) = self.scope_mut(scope).and_then(|s| s.get_mut(address)) {
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
        let mut expire = |entries: &mut Scope| {
            let before = entries.len();
            entries.retain(|_, e| e.open > 0 || e.expires_ns > now_ns);
            removed += before - entries.len();
            !entries.is_empty()
        };
        self.containers.retain(|_, entries| expire(entries));
        self.pods.retain(|_, entries| expire(entries));
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
            &*cache.lookup(1, None, &ip, S).expect("test value").name,
            "one.test"
        );
        assert_eq!(
            &*cache.lookup(2, None, &ip, S).expect("test value").name,
            "two.test"
        );
        let sidecar = cache.lookup(3, Some("pod-a"), &ip, S).expect("test value");
        assert_eq!((&*sidecar.name, sidecar.matched), ("one.test", Match::Pod));
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

    /// The DNS join runs for every record: naming one (by its container or its pod) or
    /// finding no name allocates nothing; the names are shared with the cache.
    #[test]
    fn a_lookup_allocates_nothing() {
        let mut cache = NameCache::new(CacheLimits {
            floor: Duration::from_secs(5),
            per_scope: 10,
            total: 100,
        });
        let pod = "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let mut named = answer("api.test", "10.0.0.1", 60);
        named.cname_chain = vec!["edge.test".into()];
        cache.insert(1, Some(pod), &named, 0);
        let (ip, other): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("test value"),
            "10.9.9.9".parse().expect("test value"),
        );
        let before = crate::alloc_counting::allocations();
        let own = cache.lookup(1, Some(pod), &ip, S);
        let sidecar = cache.lookup(2, Some(pod), &ip, S);
        let unnamed = cache.lookup(2, Some(pod), &other, S);
        let outside = cache.lookup(3, None, &ip, S);
        assert_eq!(crate::alloc_counting::allocations() - before, 0);
        let own = own.expect("named by its container");
        assert_eq!(
            (&*own.name, &own.cname_chain[..], own.matched),
            ("api.test", &["edge.test".to_owned()][..], Match::Container)
        );
        assert_eq!(sidecar.map(|s| s.matched), Some(Match::Pod));
        assert!(unnamed.is_none() && outside.is_none());
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
