//! The collector's own logs as container runtimes and log shippers see them: plain text
//! off a terminal (no ANSI colour codes), colour on a terminal, and one JSON object per
//! line with `--log-format json` (flag, `EGRESS_LOG_FORMAT`, or `[log] format`).

mod support;

use std::process::{Command, Stdio};

use support::host::require_root;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// Runs the collector for a few seconds, then SIGINT; returns (exit code, stderr).
fn run_briefly(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new("timeout")
        .args(["-s", "INT", "4", COLLECTOR, "run"])
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("EGRESS_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("run the collector");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every line a JSON object with level and message; the `Stopped.` line's counters as
/// numbers.
fn assert_json_lines(stderr: &str, how: &str) {
    assert!(
        stderr.contains("Stopped."),
        "{how}: the collector ran:\n{stderr}"
    );
    for line in stderr.lines() {
        let json: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{how}: not JSON ({e}): {line}\n{stderr}"));
        assert!(json["level"].is_string(), "{how}: {line}");
        assert!(json["message"].is_string(), "{how}: {line}");
        if json["message"] == "Stopped." {
            assert!(json["captured"].is_u64(), "{how}: fields as keys: {line}");
        }
    }
}

#[test]
fn off_a_terminal_the_logs_carry_no_colour_codes() {
    require_root();
    let (code, stderr) = run_briefly(&[], &[]);
    assert!(stderr.contains("Stopped."), "{code:?}:\n{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI escape in a pipe:\n{stderr:?}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(" INFO Stopped. captured=")),
        "plain text lines:\n{stderr}"
    );
}

#[test]
fn on_a_terminal_the_logs_are_coloured_unless_no_color() {
    require_root();
    // script(1) runs the collector with a pseudo-terminal as its stderr.
    let on_terminal = |no_color: Option<&str>| {
        let mut command = Command::new("script");
        command
            .args(["-qfec"])
            .arg(format!("timeout -s INT 4 {COLLECTOR} run >/dev/null"))
            .arg("/dev/null")
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .env_remove("EGRESS_LOG_FORMAT")
            .stdin(Stdio::null());
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let output = command.output().expect("script");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("Stopped."), "{coloured}");
    assert!(
        coloured.contains("\u{1b}["),
        "colour on a terminal:\n{coloured:?}"
    );
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("Stopped."), "{plain}");
    assert!(!plain.contains("\u{1b}["), "NO_COLOR:\n{plain:?}");
}

#[test]
fn json_logs_from_the_flag_the_environment_or_the_config_file_and_the_flag_wins() {
    require_root();
    let (_, stderr) = run_briefly(&["--log-format", "json"], &[]);
    assert_json_lines(&stderr, "--log-format json");
    let (_, stderr) = run_briefly(&[], &[("EGRESS_LOG_FORMAT", "json")]);
    assert_json_lines(&stderr, "EGRESS_LOG_FORMAT=json");

    let dir = std::env::temp_dir().join(format!("egress-log-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("collector.toml");
    std::fs::write(&file, "[log]\nformat = \"json\"\n").expect("write");
    let config = format!("--config={}", file.display());
    let (_, stderr) = run_briefly(&[&config], &[]);
    assert_json_lines(&stderr, "[log] format");

    // The flag beats the environment and the file.
    let (_, stderr) = run_briefly(
        &[&config, "--log-format", "text"],
        &[("EGRESS_LOG_FORMAT", "json")],
    );
    assert!(
        stderr.lines().any(|l| l.contains(" INFO Stopped. ")),
        "text wins:\n{stderr}"
    );
    assert!(!stderr.trim_start().starts_with('{'), "{stderr}");

    std::fs::write(&file, "[log]\nformat = \"xml\"\n").expect("write");
    let (code, stderr) = run_briefly(&[&config], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains("error") && first.contains("[log]") && first.contains("xml"),
        "one line naming the setting:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
