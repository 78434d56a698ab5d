//! `egress-collector check`: what this kernel supports, without attaching anything
//! long-lived.

use std::io::Write;

use crate::{
    config::settings::ProbeSettings,
    one_line,
    probe::{KernelFacts, kernel_release},
};

/// Writes the report; returns whether some hook family the settings allow can run.
pub fn run(settings: &ProbeSettings, out: &mut dyn Write) -> std::io::Result<bool> {
    writeln!(out, "kernel: {}", kernel_release())?;
    let facts = match KernelFacts::read(settings) {
        Ok(facts) => facts,
        Err(e) => {
            writeln!(out, "btf: unusable: {}", one_line(&e))?;
            writeln!(out, "result: no hook can run without kernel struct offsets")?;
            return Ok(false);
        }
    };
    writeln!(
        out,
        "btf: {} (all struct offsets found)",
        facts.btf_path.display()
    )?;
    let hierarchy = match &facts.cgroups.v1_controller {
        Some(controller) => format!("container cgroup read from the v1 {controller} hierarchy"),
        None => "container cgroup read from the unified hierarchy".to_owned(),
    };
    writeln!(out, "cgroups: {} ({hierarchy})", facts.cgroups.layout)?;
    writeln!(
        out,
        "decision clock: {} (the rate limit and the identity cache's age)",
        facts.decision_clock()
    )?;
    let mut first_usable = None;
    for mode in settings.choice.candidates() {
        match facts.try_mode(mode) {
            Ok(state_hook) => {
                writeln!(
                    out,
                    "hook {mode}: usable (TCP state changes through {state_hook})"
                )?;
                first_usable.get_or_insert((mode, state_hook));
            }
            Err(why) => writeln!(out, "hook {mode}: unusable: {why}")?,
        }
    }
    match first_usable {
        Some((mode, state_hook)) => writeln!(
            out,
            "result: would run with {mode} hooks, TCP state changes through {state_hook}"
        )?,
        None => writeln!(out, "result: no hook can run")?,
    }
    Ok(first_usable.is_some())
}
