//! On files written by this machine's dockerd (fixtures/docker-*.json: containers started
//! the way kubelet starts them) and on broken variants of them.

use super::*;

const CONFIG: &[u8] = include_bytes!("../fixtures/docker-config.v2.json");
const HOSTCONFIG: &[u8] = include_bytes!("../fixtures/docker-hostconfig.json");
const HOSTNET_CONFIG: &[u8] = include_bytes!("../fixtures/docker-hostnet-config.v2.json");
const HOSTNET_HOSTCONFIG: &[u8] = include_bytes!("../fixtures/docker-hostnet-hostconfig.json");

#[test]
fn kubelet_labels_give_the_pod() {
    let m = parse(CONFIG, Some(HOSTCONFIG)).expect("real config.v2.json");
    assert_eq!(m.runtime, Some(Runtime::Docker));
    assert_eq!(m.pod_name.as_deref(), Some("shop-7d9f"));
    assert_eq!(m.pod_namespace.as_deref(), Some("prod"));
    assert_eq!(
        m.pod_uid.as_deref(),
        Some("35b82523-06c1-48e7-9e61-2521a89b703b")
    );
    assert_eq!(m.container_name.as_deref(), Some("web"));
    assert_eq!(
        m.name.as_deref(),
        Some("k8s_web_shop-7d9f_prod_35b82523-06c1-48e7-9e61-2521a89b703b_0")
    );
    assert_eq!(m.image.as_deref(), Some("egress-test/busybox"));
    assert!(!m.host_network);
}

#[test]
fn host_network_mode_is_marked() {
    let m = parse(HOSTNET_CONFIG, Some(HOSTNET_HOSTCONFIG)).expect("real config.v2.json");
    assert_eq!(m.pod_name.as_deref(), Some("node-agent-x1"));
    assert!(m.host_network);
}

#[test]
fn a_missing_or_broken_hostconfig_costs_only_the_network_mode() {
    let m = parse(HOSTNET_CONFIG, None).expect("config alone is enough");
    assert_eq!(m.pod_name.as_deref(), Some("node-agent-x1"));
    assert!(!m.host_network);
    let m = parse(HOSTNET_CONFIG, Some(b"{not json")).expect("config alone is enough");
    assert!(!m.host_network);
}

#[test]
fn truncated_and_garbage_configs_are_errors() {
    let json = CONFIG.trim_ascii_end();
    for cut in [0, 1, json.len() / 2, json.len() - 1] {
        assert!(parse(&json[..cut], None).is_err(), "cut at {cut}");
    }
    assert!(parse(b"\xff\xfe garbage", None).is_err());
    assert!(parse(b"[]", None).is_err());
    assert!(parse(b"{}", None).is_err(), "no ID: not a container config");
}

#[test]
fn odd_label_values_survive() {
    let config = br#"{"ID":"x","Name":"/x","Config":{"Image":"i","Labels":{"io.kubernetes.pod.name":"p\u00fcd \"q\" \\ \n","io.kubernetes.pod.namespace":""}}}"#;
    let m = parse(config, None).expect("valid JSON");
    assert_eq!(m.pod_name.as_deref(), Some("püd \"q\" \\ \n"));
    assert_eq!(m.pod_namespace, None, "an empty label is no label");
    let m = parse(br#"{"ID":"x","Config":{"Labels":null}}"#, None).expect("null labels");
    assert_eq!(m.pod_name, None);
}

#[test]
fn daemon_json_data_root() {
    assert_eq!(
        data_root_from_daemon_json(br#"{"data-root":"/mnt/docker"}"#)
            .ok()
            .flatten()
            .as_deref(),
        Some("/mnt/docker")
    );
    assert_eq!(
        data_root_from_daemon_json(br#"{"graph":"/old/docker"}"#)
            .ok()
            .flatten()
            .as_deref(),
        Some("/old/docker")
    );
    assert_eq!(
        data_root_from_daemon_json(br#"{"graph":"/old","data-root":"/new"}"#)
            .ok()
            .flatten()
            .as_deref(),
        Some("/new")
    );
    assert_eq!(
        data_root_from_daemon_json(br#"{"mtu":1400}"#)
            .ok()
            .flatten(),
        None
    );
    assert_eq!(
        data_root_from_daemon_json(br#"{"data-root":"relative"}"#)
            .ok()
            .flatten(),
        None
    );
    assert!(data_root_from_daemon_json(b"// comment\n{\"data-root\":\"/x\"}").is_err());
    assert!(data_root_from_daemon_json(b"garbage").is_err());
}

#[test]
fn discovery_falls_back_to_the_default_with_a_problem() {
    let root = std::env::temp_dir().join(format!("egress-docker-test-{}", std::process::id()));
    std::fs::create_dir_all(root.join("etc/docker")).expect("temp dir");
    std::fs::write(root.join("etc/docker/daemon.json"), "{ /* comment */ }").expect("write");
    let (files, problem) = DockerFiles::discover(&root);
    assert_eq!(files.data_root(), Path::new(DEFAULT_DATA_ROOT));
    assert!(problem.is_some_and(|p| p.to_string().contains("daemon.json")));
    std::fs::write(
        root.join("etc/docker/daemon.json"),
        r#"{"data-root": "/srv/docker"}"#,
    )
    .expect("write");
    let (files, problem) = DockerFiles::discover(&root);
    assert!(problem.is_none());
    assert_eq!(files.containers_dir(), root.join("srv/docker/containers"));
    std::fs::remove_dir_all(&root).expect("clean up");
}
