//! Configuration: the command line, the config file and the environment, layered (a
//! flag beats its variable, which beats the file) and validated into the typed settings
//! each stage takes. Depends on nothing else in the crate: the stages depend on it. A bad
//! setting is a one-line [`ConfigError`] naming it, before anything is loaded.
//!
//! Public items: [`Cli`] / [`Command`] / [`RunArgs`] (the command line; the doc comments
//! on the arguments are the reference, `egress-collector run --help`),
//! [`RunArgs::read_config_file`] (the file, read once: [`ConfigFile`]), [`settings`] (the
//! typed settings of each stage), [`otlp`] (the OTLP endpoint settings from flags,
//! `OTEL_EXPORTER_OTLP_*` and the file), [`parse_duration`], [`LogFormat`] and
//! [`heading`].

mod args;
mod duration;
mod file;
pub mod otlp;
pub mod settings;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use self::otlp::SettingError;
pub use self::{
    args::{Cli, Command, RunArgs},
    duration::parse_duration,
    file::ConfigFile,
};

/// The sections of `run --help`, and of docs/configuration.md (a unit test keeps them in
/// step): every `run` flag belongs to one.
pub mod heading {
    pub const CAPTURE: &str = "Capture";
    pub const ATTRIBUTION: &str = "Attribution";
    pub const FILTERS: &str = "Filters";
    pub const OTLP: &str = "OTLP";
    pub const EXPORT: &str = "Export";
    pub const RUNTIME: &str = "Runtime";
    pub const ALL: [&str; 6] = [CAPTURE, ATTRIBUTION, FILTERS, OTLP, EXPORT, RUNTIME];
}

/// A problem with the configuration: one line naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// How the collector's own logs are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human lines; ANSI colours only when stderr is a terminal (and NO_COLOR is unset).
    #[default]
    Text,
    /// One JSON object per line, the event's fields as keys.
    Json,
}
