//! Container identity from a cgroup path or leaf name, for every layout users run:
//!
//! - cgroupfs driver, v1 or v2: `/kubepods/<qos>/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>`
//!   (Guaranteed), `/docker/<id>`;
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/
//!   <runtime>-<id>.scope` with runtime `docker`, `cri-containerd`, `crio`, `libpod`, and
//!   `system.slice/docker-<id>.scope`;
//! - any of these with child cgroups below the container's (nested init, docker in docker).
//!
//! Pure knowledge of names, no stage: `enrich` finds containers with it, and `events`
//! keys DNS names by pod with [`pod_uid_of_component`].

/// What a cgroup path says about its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// The full 64-hex container id.
    pub id: String,
    /// The runtime named by a systemd scope prefix, when there is one.
    pub runtime_hint: Option<RuntimeHint>,
    /// The pod UID from a `pod<uid>` path component (systemd's `_` turned back into `-`).
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeHint {
    Docker,
    Containerd,
    CriO,
    Podman,
}

const CONTAINER_ID_LEN: usize = 64;

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The container id in one path component (a cgroup's leaf name), if it names one.
pub fn container_id_of_leaf(leaf: &str) -> Option<(String, Option<RuntimeHint>)> {
    if is_container_id(leaf) {
        return Some((leaf.to_owned(), None));
    }
    let stem = leaf.strip_suffix(".scope").unwrap_or(leaf);
    // `crio-conmon-<id>.scope` is CRI-O's monitor process, not the container.
    const PREFIXES: [(&str, RuntimeHint); 5] = [
        ("docker-", RuntimeHint::Docker),
        ("cri-containerd-", RuntimeHint::Containerd),
        ("crio-", RuntimeHint::CriO),
        ("libpod-", RuntimeHint::Podman),
        ("containerd-", RuntimeHint::Containerd),
    ];
    PREFIXES.iter().find_map(|(prefix, hint)| {
        let id = stem.strip_prefix(prefix)?;
        is_container_id(id).then(|| (id.to_owned(), Some(*hint)))
    })
}

/// The pod UID in one path component: `pod<uid>` or `kubepods-<qos>-pod<uid_>.slice`.
pub(crate) fn pod_uid_of_component(component: &str) -> Option<String> {
    pod_uid_in(component).map(|uid| uid.replace('_', "-"))
}

/// Whether one path component is a pod's cgroup (see [`pod_uid_of_component`]), without
/// making its UID: the DNS join asks this for every record.
pub(crate) fn is_pod_component(component: &str) -> bool {
    pod_uid_in(component).is_some()
}

/// The UID part of a pod's cgroup name as it is written there (the systemd driver's has
/// `_` where the UID has `-`).
fn pod_uid_in(component: &str) -> Option<&str> {
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    // A byte search, not `rfind`'s two-way searcher: this runs for every record (the
    // DNS join) on a short name.
    let start = stem.as_bytes().windows(3).rposition(|w| w == b"pod")?;
    if start > 0 && !stem[..start].ends_with('-') {
        return None;
    }
    let uid = &stem[start + 3..];
    let looks_like_uid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-' || b == b'_',
            _ => b.is_ascii_hexdigit(),
        });
    looks_like_uid.then_some(uid)
}

/// Container and pod from a whole cgroup path (or just `parent/leaf`): the nearest
/// component, from the leaf up, that names a container. A process in a child cgroup of
/// its container (a container running its own init or systemd:
/// `cri-containerd-<id>.scope/init.scope`, podman's `libpod-<id>.scope/container`,
/// docker in docker's `/docker/<outer>/docker/<inner>`) belongs to the innermost
/// container above it. The pod is the nearest `pod<uid>` component above that.
pub fn parse(path: &str) -> Option<ContainerRef> {
    let mut components = path.split('/').filter(|c| !c.is_empty()).rev();
    let (id, runtime_hint) = components.find_map(container_id_of_leaf)?;
    let pod_uid = components.find_map(pod_uid_of_component);
    Some(ContainerRef {
        id,
        runtime_hint,
        pod_uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "b5fa49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af";
    const UID: &str = "35b82523-06c1-48e7-9e61-2521a89b703b";
    const UID_: &str = "35b82523_06c1_48e7_9e61_2521a89b703b";

    fn check(path: &str, hint: Option<RuntimeHint>, pod: Option<&str>) {
        let found = parse(path).unwrap_or_else(|| panic!("no container in {path}"));
        assert_eq!(found.id, ID, "{path}");
        assert_eq!(found.runtime_hint, hint, "{path}");
        assert_eq!(found.pod_uid.as_deref(), pod, "{path}");
    }

    /// The DNS join's check says yes exactly where a UID is found, in both drivers' names.
    #[test]
    fn a_pod_component_is_one_with_a_uid() {
        for (component, uid) in [
            (format!("pod{UID}"), Some(UID)),
            (format!("kubepods-burstable-pod{UID_}.slice"), Some(UID)),
            (format!("kubepods-pod{UID_}.slice"), Some(UID)),
            ("kubepods-burstable.slice".to_owned(), None),
            (format!("xpod{UID}"), None),
            (format!("pod{}", &UID[1..]), None),
            (format!("pod{}", UID.replace('-', "x")), None),
            (ID.to_owned(), None),
        ] {
            assert_eq!(
                pod_uid_of_component(&component).as_deref(),
                uid,
                "{component}"
            );
            assert_eq!(is_pod_component(&component), uid.is_some(), "{component}");
        }
    }

    #[test]
    fn cgroupfs_driver_layouts() {
        // The design note's /proc/self/cgroup, docker on Kubernetes.
        check(
            &format!("/kubepods/burstable/pod{UID}/{ID}"),
            None,
            Some(UID),
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}/{ID}"),
            None,
            Some(UID),
        );
        check(&format!("/kubepods/pod{UID}/{ID}"), None, Some(UID));
        check(&format!("/docker/{ID}"), None, None);
        check(ID, None, None);
    }

    #[test]
    fn systemd_driver_layouts() {
        let pod_slice =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        check(
            &format!("{pod_slice}/docker-{ID}.scope"),
            Some(RuntimeHint::Docker),
            Some(UID),
        );
        check(
            &format!("{pod_slice}/cri-containerd-{ID}.scope"),
            Some(RuntimeHint::Containerd),
            Some(UID),
        );
        check(
            &format!("{pod_slice}/crio-{ID}.scope"),
            Some(RuntimeHint::CriO),
            Some(UID),
        );
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            Some(RuntimeHint::Containerd),
            Some(UID),
        );
        check(
            &format!("/system.slice/docker-{ID}.scope"),
            Some(RuntimeHint::Docker),
            None,
        );
        check(
            &format!("/machine.slice/libpod-{ID}.scope"),
            Some(RuntimeHint::Podman),
            None,
        );
        check(
            &format!("docker-{ID}.scope"),
            Some(RuntimeHint::Docker),
            None,
        );
    }

    #[test]
    fn a_child_cgroup_belongs_to_the_nearest_container_above_it() {
        let pod_slice =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        check(
            &format!("{pod_slice}/cri-containerd-{ID}.scope/init.scope"),
            Some(RuntimeHint::Containerd),
            Some(UID),
        );
        check(
            &format!("{pod_slice}/crio-{ID}.scope/system.slice/app.service"),
            Some(RuntimeHint::CriO),
            Some(UID),
        );
        check(
            &format!("/machine.slice/libpod-{ID}.scope/container"),
            Some(RuntimeHint::Podman),
            None,
        );
        check(
            &format!("/kubepods/burstable/pod{UID}/{ID}/init.scope"),
            None,
            Some(UID),
        );
        // As the kernel's two names give it when the cgroup is already gone.
        check(
            &format!("cri-containerd-{ID}.scope/init.scope"),
            Some(RuntimeHint::Containerd),
            None,
        );
        // Docker in docker: the inner container, not the outer one.
        let outer = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        check(&format!("/docker/{outer}/docker/{ID}"), None, None);
        check(
            &format!("/system.slice/docker-{outer}.scope/docker/{ID}/init.scope"),
            None,
            None,
        );
        assert_eq!(
            parse(&format!("/docker/{ID}/docker")).map(|c| c.id),
            Some(ID.to_owned())
        );
    }

    #[test]
    fn not_containers() {
        for path in [
            "/",
            "",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/sshd.service",
            &format!("/kubepods/burstable/pod{UID}"),
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            &format!("/docker/{}", &ID[..63]),
            &format!("/docker/{}", ID.to_uppercase()),
            "/docker/zzzz49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }

    #[test]
    fn malformed_pod_components_do_not_give_a_uid() {
        assert_eq!(
            parse(&format!("/kubepods/burstable/podnot-a-uid/{ID}")).and_then(|c| c.pod_uid),
            None
        );
        assert_eq!(
            parse(&format!("/kubepods/burstable/xpod{UID}/{ID}")).and_then(|c| c.pod_uid),
            None
        );
    }
}

#[cfg(test)]
mod fuzz {
    use crate::mutate::mutations;

    #[test]
    fn cgroup_path_parsing_never_panics() {
        let seed = b"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod35b82523_06c1_48e7_9e61_2521a89b703b.slice/cri-containerd-b5fa49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af.scope";
        for input in mutations(seed, 50_000) {
            let _ = super::parse(&String::from_utf8_lossy(&input));
        }
    }
}
