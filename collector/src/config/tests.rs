use std::{path::PathBuf, time::Duration};

use clap::Parser;
use egress_shared::{MAX_CGROUP_BURST, MAX_CGROUP_RATE};

use super::{
    duration::{parse_duration, parse_ring_buffer_bytes},
    settings::AttributeSet,
    *,
};

#[test]
fn durations() {
    assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("10 parsecs").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("").is_err());
}

#[test]
fn ring_buffer_sizes() {
    assert_eq!(parse_ring_buffer_bytes("4096"), Ok(4096));
    assert!(parse_ring_buffer_bytes("5000").is_err());
    assert!(parse_ring_buffer_bytes("2048").is_err());
    assert!(parse_ring_buffer_bytes("lots").is_err());
}

#[test]
fn the_config_file_sets_traces_and_self_telemetry_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("egress-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("egress.toml");
    std::fs::write(
        &path,
        "[otlp]\nendpoint = \"http://file:4318\"\nprotocol = \"http/protobuf\"\n\
         [otlp.traces]\nendpoint = \"http://jaeger:4318/v1/traces\"\n\
         [export]\nself_telemetry = true\nbatch_size = 64\n",
    )
    .expect("write");
    let cli = Cli::try_parse_from([
        "egress-collector",
        "--config",
        path.to_str().expect("utf-8"),
        "--batch-size",
        "128",
    ])
    .expect("valid");
    let settings = cli
        .run
        .otlp
        .settings(
            &|_| None,
            cli.run.read_config_file().expect("file").as_ref(),
        )
        .expect("valid")
        .expect("on");
    assert!(settings.self_telemetry);
    assert_eq!(settings.batch_size, 128);
    assert_eq!(settings.logs.url, "http://file:4318/v1/logs");
    assert_eq!(settings.traces.url, "http://jaeger:4318/v1/traces");
    std::fs::write(&path, "[otlp.spans]\nendpoint = \"http://x\"\n").expect("write");
    let error = cli.run.read_config_file().expect_err("unknown table");
    assert!(error.to_string().contains("spans"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads the file once and applies its `[capture]` and `[log]` tables, as main does.
fn apply_capture(run: &mut RunArgs) -> Result<(), ConfigError> {
    let file = run.read_config_file()?;
    run.apply_capture_file(file.as_ref())
}

#[test]
fn the_config_file_sets_capture_filters_unless_a_flag_does() {
    let dir = std::env::temp_dir().join(format!("egress-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("egress.toml");
    std::fs::write(
        &path,
        "[capture]\nexclude_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\nexclude_loopback = true\n\
         exclude_namespaces = [\"kube-system\"]\naggregate_window = \"2s\"\n",
    )
    .expect("write");
    let config = path.to_str().expect("utf-8");
    let mut cli = Cli::try_parse_from(["egress-collector", "--config", config]).expect("valid");
    apply_capture(&mut cli.run).expect("valid file");
    let settings = cli.run.probe.settings();
    assert_eq!(
        settings.excluded_destinations.len(),
        4,
        "2 prefixes + loopback"
    );
    assert!(settings.exclude_cgroups);
    assert_eq!(settings.aggregate_window, Some(Duration::from_secs(2)));
    let mut cli = Cli::try_parse_from([
        "egress-collector",
        "--config",
        config,
        "--exclude-cidr",
        "192.0.2.0/24",
        "--aggregate-window",
        "3s",
    ])
    .expect("valid");
    apply_capture(&mut cli.run).expect("valid file");
    assert_eq!(
        cli.run.probe.exclude_cidrs,
        vec!["192.0.2.0/24".parse().expect("cidr")]
    );
    assert_eq!(cli.run.probe.aggregate_window, Some(Duration::from_secs(3)));
    let mut cli = Cli::try_parse_from([
        "egress-collector",
        "--config",
        config,
        "--exclude-loopback=false",
        "--aggregate-window",
        "off",
    ])
    .expect("valid");
    apply_capture(&mut cli.run).expect("valid file");
    let settings = cli.run.probe.settings();
    assert_eq!(
        settings.excluded_destinations.len(),
        2,
        "loopback turned off by the flag"
    );
    assert_eq!(settings.aggregate_window, None, "off beats the file");
    assert!(
        Cli::try_parse_from(["egress-collector", "--aggregate-window", "500ms"]).is_err(),
        "windows under a second are refused"
    );
    let error_for = |file: &str| {
        std::fs::write(&path, file).expect("write");
        let mut cli = Cli::try_parse_from(["egress-collector", "--config", config]).expect("valid");
        apply_capture(&mut cli.run)
            .expect_err("a bad file")
            .to_string()
    };
    let error = error_for("[capture]\nexclude_cidrs = [\"10.0.0.0/40\"]\n");
    assert!(
        error.contains("[capture] exclude_cidrs") && error.contains("0 to 32"),
        "{error}"
    );
    let error = error_for("[capture]\nexclude_cidr = [\"10.0.0.0/8\"]\n");
    assert!(error.contains("exclude_cidr"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rate_limit_settings_have_bounds_and_the_error_names_the_setting() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["egress-collector"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    };
    let cli = parse(&[
        "--cgroup-rate-limit",
        "1000000",
        "--cgroup-burst",
        "1000000",
    ])
    .expect("the maxima are accepted");
    assert_eq!(cli.run.probe.cgroup_rate_limit, MAX_CGROUP_RATE);
    assert_eq!(cli.run.probe.cgroup_burst, MAX_CGROUP_BURST);
    assert!(
        parse(&["--cgroup-rate-limit", "0"]).is_ok(),
        "0 turns it off"
    );
    for (args, setting) in [
        (["--cgroup-burst", "1000001"], "--cgroup-burst"),
        (["--cgroup-burst", "4294967295"], "--cgroup-burst"),
        (["--cgroup-burst", "0"], "--cgroup-burst"),
        (["--cgroup-rate-limit", "1000001"], "--cgroup-rate-limit"),
    ] {
        let error = parse(&args).expect_err("out of range").to_string();
        let first = error.lines().next().unwrap_or_default();
        assert!(first.contains(setting), "{args:?}: {error}");
    }
}

#[test]
fn the_attribute_set_comes_from_the_flag_then_the_file_then_the_default() {
    let dir = std::env::temp_dir().join(format!("egress-attributes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("egress.toml");
    let config = path.to_str().expect("utf-8");
    let set = |file: &str, flags: &[&str]| {
        std::fs::write(&path, file).expect("write");
        let mut args = vec!["egress-collector", "--config", config];
        args.extend(flags);
        let mut cli = Cli::try_parse_from(args).expect("valid");
        let file = cli.run.read_config_file().map_err(|e| e.to_string())?;
        cli.run
            .apply_capture_file(file.as_ref())
            .map(|()| cli.run.pipeline().attributes)
            .map_err(|e| e.to_string())
    };
    assert_eq!(set("", &[]), Ok(AttributeSet::Default));
    assert_eq!(
        set("[export]\nattributes = \"full\"\n", &[]),
        Ok(AttributeSet::Full)
    );
    assert_eq!(
        set(
            "[export]\nattributes = \"full\"\n",
            &["--attributes", "minimal"]
        ),
        Ok(AttributeSet::Minimal)
    );
    let error = set("[export]\nattributes = \"most\"\n", &[]).expect_err("bad set");
    assert!(
        error.contains("[export] attributes") && error.contains("minimal, default or full"),
        "{error}"
    );
    assert!(Cli::try_parse_from(["egress-collector", "--attributes", "most"]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// docs/configuration.md lists every `run` flag once, in the section of its help
/// heading, with its environment variable; and nothing else.
#[test]
fn the_configuration_reference_lists_every_flag_under_its_heading() {
    use clap::CommandFactory;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let doc = std::fs::read_to_string(path).expect("docs/configuration.md");
    // flag -> (section, row)
    let mut documented: std::collections::BTreeMap<String, (String, String)> = Default::default();
    let mut section = String::new();
    for line in doc.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            section = title.trim().to_owned();
            continue;
        }
        let Some(first_cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
            continue;
        };
        for part in first_cell.split("`--").skip(1) {
            let flag: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let previous = documented.insert(flag.clone(), (section.clone(), line.to_owned()));
            assert!(previous.is_none(), "--{flag} is documented twice");
        }
    }
    let mut command = Cli::command();
    command.build();
    let run = command.find_subcommand("run").expect("run subcommand");
    let mut problems = Vec::new();
    let mut flags = std::collections::BTreeSet::new();
    for arg in run.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if ["help", "version"].contains(&long) {
            continue;
        }
        flags.insert(long.to_owned());
        let heading = arg.get_help_heading();
        if !heading.is_some_and(|h| heading::ALL.contains(&h)) {
            problems.push(format!(
                "--{long} has help heading {heading:?}, not one of {:?}",
                heading::ALL
            ));
        }
        match documented.get(long) {
            None => problems.push(format!("--{long} is missing from docs/configuration.md")),
            Some((section, row)) => {
                if heading.is_some_and(|h| h != section) {
                    problems.push(format!(
                        "--{long} is documented under {section:?}, its help heading is {heading:?}"
                    ));
                }
                if let Some(env) = arg.get_env().and_then(|e| e.to_str())
                    && !row.contains(env)
                {
                    problems.push(format!("--{long}: its row does not name {env}"));
                }
            }
        }
    }
    for flag in documented.keys().filter(|f| !flags.contains(*f)) {
        problems.push(format!(
            "docs/configuration.md documents --{flag}, which run does not take"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn run_is_the_default_command() {
    let cli = Cli::try_parse_from(["egress-collector", "--stdout", "--probe", "tracepoint"])
        .expect("valid");
    assert!(cli.command.is_none());
    assert!(cli.run.stdout);
    let cli =
        Cli::try_parse_from(["egress-collector", "check", "--probe", "kprobe"]).expect("valid");
    assert!(matches!(cli.command, Some(Command::Check(_))));
    assert!(Cli::try_parse_from(["egress-collector", "--probe", "magic"]).is_err());
}

// ---- [enrich]

fn with_file(text: &str, args: &[&str]) -> Result<RunArgs, ConfigError> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("egress-enrich-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("egress.toml");
    std::fs::write(&path, text).expect("write");
    let mut all = vec![
        "egress-collector",
        "--config",
        path.to_str().expect("utf-8"),
    ];
    all.extend_from_slice(args);
    let mut run = Cli::try_parse_from(all).expect("valid flags").run;
    let result = run
        .read_config_file()
        .and_then(|file| run.apply_enrich_file(file.as_ref()))
        .map(|()| run);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn the_enrich_table_sets_runtime_locations_and_the_cache_size() {
    let run = with_file(
        "[enrich]\ncontainer_cache_size = 100\ndocker_data_root = \"/srv/docker\"\n\
         containerd_state_dirs = [\"/run/k0s/containerd\"]\n\
         containerd_namespaces = [\"k8s.io\", \"tenant\"]\n\
         crio_run_root = \"/var/run/crio-storage\"\n",
        &[],
    )
    .expect("valid");
    let pipeline = run.pipeline();
    assert_eq!(pipeline.cache.capacity, 100);
    let r = &pipeline.runtimes;
    assert_eq!(r.docker_data_root, Some(PathBuf::from("/srv/docker")));
    assert_eq!(
        r.containerd_state_dirs,
        vec![PathBuf::from("/run/k0s/containerd")]
    );
    assert_eq!(r.containerd_namespaces, vec!["k8s.io", "tenant"]);
    assert_eq!(
        r.crio_run_root,
        Some(PathBuf::from("/var/run/crio-storage"))
    );
    // The flag beats the file.
    let run = with_file(
        "[enrich]\ncontainer_cache_size = 100\n",
        &["--container-cache-size", "7"],
    )
    .expect("valid");
    assert_eq!(run.pipeline().cache.capacity, 7);
    // Neither: today's default.
    let run = Cli::try_parse_from(["egress-collector"])
        .expect("valid")
        .run;
    assert_eq!(run.pipeline().cache.capacity, 8192);
    assert!(Cli::try_parse_from(["egress-collector", "--container-cache-size", "0"]).is_err());
}

#[test]
fn bad_enrich_settings_are_one_line_errors() {
    let error = |text: &str| {
        with_file(text, &[])
            .map(|_| ())
            .expect_err("a bad file")
            .to_string()
    };
    let e = error("[enrich]\ndocker_data_root = \"var/lib/docker\"\n");
    assert!(
        e.contains("[enrich] docker_data_root") && e.contains("absolute"),
        "{e}"
    );
    let e = error("[enrich]\ncontainerd_namespaces = [\"../x\"]\n");
    assert!(e.contains("containerd_namespaces"), "{e}");
    let e = error("[enrich]\ncontainer_cache_size = 0\n");
    assert!(e.contains("container_cache_size"), "{e}");
    let e = error("[enrich]\ncrio_runroot = \"/x\"\n");
    assert!(e.contains("crio_runroot"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}
