//! The config file (TOML, `--config`): read and parsed once, each table checked against
//! its keys (`deny_unknown_fields`), its values filling what no flag or variable set.

use std::path::PathBuf;

use super::{
    ConfigError, LogFormat, RunArgs, duration::parse_aggregate_window, otlp::SourceValues,
};

/// `[log]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    pub(super) format: Option<LogFormat>,
}

/// `[export]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileExport {
    pub(super) interval: Option<String>,
    pub(super) batch_size: Option<usize>,
    pub(super) batch_timeout: Option<String>,
    pub(super) queue_records: Option<usize>,
    pub(super) metrics_destination_address: Option<bool>,
    pub(super) self_telemetry: Option<bool>,
    pub(super) attributes: Option<String>,
}

/// `[capture]`: the in-kernel filters and aggregation (docs/records.md).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCapture {
    pub(super) exclude_cidrs: Option<Vec<String>>,
    pub(super) exclude_loopback: Option<bool>,
    pub(super) exclude_namespaces: Option<Vec<String>>,
    pub(super) aggregate_window: Option<String>,
}

/// The config file, read and parsed once ([`RunArgs::read_config_file`]) and handed to
/// each part of the configuration that takes values from it.
#[derive(Debug)]
pub struct ConfigFile {
    pub(super) otlp: SourceValues,
    pub(super) export: FileExport,
    pub(super) capture: FileCapture,
    pub(super) log: FileLog,
    pub(super) enrich: FileEnrich,
}

fn read_config_file(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
    let take = |table: &mut toml::Table, key: &str| -> Result<toml::Table, ConfigError> {
        match table.remove(key) {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(t)) => Ok(t),
            Some(_) => Err(file_error(format!("{key} must be a table"))),
        }
    };
    let mut otlp = take(&mut table, "otlp")?;
    let export = take(&mut table, "export")?;
    let capture = take(&mut table, "capture")?;
    let log = take(&mut table, "log")?;
    let enrich = take(&mut table, "enrich")?;
    if let Some(key) = table.keys().next() {
        return Err(file_error(format!(
            "unknown table or key {key:?} (expected otlp, export, capture, log, enrich)"
        )));
    }
    let logs = take(&mut otlp, "logs")?;
    let metrics = take(&mut otlp, "metrics")?;
    let traces = take(&mut otlp, "traces")?;
    // Each table into its typed keys; an error names the table.
    fn parse<T: serde::de::DeserializeOwned>(
        table: toml::Table,
        name: &str,
        file_error: &dyn Fn(String) -> ConfigError,
    ) -> Result<T, ConfigError> {
        table
            .try_into()
            .map_err(|e: toml::de::Error| file_error(format!("[{name}] {}", e.message())))
    }
    Ok(ConfigFile {
        otlp: SourceValues {
            general: parse(otlp, "otlp", &file_error)?,
            logs: parse(logs, "otlp.logs", &file_error)?,
            metrics: parse(metrics, "otlp.metrics", &file_error)?,
            traces: parse(traces, "otlp.traces", &file_error)?,
        },
        export: parse(export, "export", &file_error)?,
        capture: parse(capture, "capture", &file_error)?,
        log: parse(log, "log", &file_error)?,
        enrich: parse(enrich, "enrich", &file_error)?,
    })
}

impl RunArgs {
    /// Reads and parses `--config` (when given): once, for every part that uses it.
    pub fn read_config_file(&self) -> Result<Option<ConfigFile>, ConfigError> {
        self.otlp
            .config
            .as_deref()
            .map(read_config_file)
            .transpose()
    }

    /// Fills the capture settings that no flag or variable set from the file's
    /// `[capture]` table, the attribute set from `[export] attributes` and the log format
    /// from `[log]`.
    pub fn apply_capture_file(&mut self, file: Option<&ConfigFile>) -> Result<(), ConfigError> {
        let (Some(path), Some(file)) = (self.otlp.config.clone(), file) else {
            return Ok(());
        };
        if self.attributes.is_none()
            && let Some(set) = &file.export.attributes
        {
            self.attributes = Some(set.parse().map_err(|reason| ConfigError::File {
                path: path.clone(),
                reason: format!("[export] attributes: {reason}"),
            })?);
        }
        if self.log_format.is_none() {
            self.log_format = file.log.format;
        }
        let capture = &file.capture;
        let invalid = |key: &str, reason: String| ConfigError::File {
            path: path.clone(),
            reason: format!("[capture] {key}: {reason}"),
        };
        let probe = &mut self.probe;
        if probe.exclude_cidrs.is_empty() {
            for cidr in capture.exclude_cidrs.iter().flatten() {
                probe
                    .exclude_cidrs
                    .push(cidr.parse().map_err(|e| invalid("exclude_cidrs", e))?);
            }
        }
        if probe.exclude_loopback.is_none() {
            probe.exclude_loopback = capture.exclude_loopback;
        }
        if probe.exclude_namespaces.is_empty() {
            probe.exclude_namespaces = capture.exclude_namespaces.clone().unwrap_or_default();
        }
        if probe.aggregate_window.is_none()
            && let Some(window) = &capture.aggregate_window
        {
            probe.aggregate_window =
                Some(parse_aggregate_window(window).map_err(|e| invalid("aggregate_window", e))?);
        }
        Ok(())
    }
}

/// `[enrich]` in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileEnrich {
    pub(super) container_cache_size: Option<u32>,
    pub(super) docker_data_root: Option<PathBuf>,
    pub(super) containerd_state_dirs: Option<Vec<PathBuf>>,
    pub(super) containerd_namespaces: Option<Vec<String>>,
    pub(super) crio_run_root: Option<PathBuf>,
}

impl RunArgs {
    /// The container cache size (unless a flag or variable set it) and the runtimes'
    /// locations from the file's `[enrich]` table.
    pub fn apply_enrich_file(&mut self, file: Option<&ConfigFile>) -> Result<(), ConfigError> {
        let (Some(path), Some(file)) = (self.otlp.config.clone(), file) else {
            return Ok(());
        };
        let file = &file.enrich;
        let invalid = |key: &str, reason: &str| ConfigError::File {
            path: path.clone(),
            reason: format!("[enrich] {key}: {reason}"),
        };
        let host_path = |key: &str, p: &PathBuf| {
            if p.is_absolute() {
                Ok(p.clone())
            } else {
                Err(invalid(
                    key,
                    &format!("{} is not an absolute host path", p.display()),
                ))
            }
        };
        if self.enrich.container_cache_size.is_none() {
            if file.container_cache_size == Some(0) {
                return Err(invalid("container_cache_size", "must be at least 1"));
            }
            self.enrich.container_cache_size = file.container_cache_size;
        }
        let runtimes = &mut self.enrich.runtimes;
        if let Some(p) = &file.docker_data_root {
            runtimes.docker_data_root = Some(host_path("docker_data_root", p)?);
        }
        for p in file.containerd_state_dirs.iter().flatten() {
            let p = host_path("containerd_state_dirs", p)?;
            runtimes.containerd_state_dirs.push(p);
        }
        for ns in file.containerd_namespaces.iter().flatten() {
            if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
                return Err(invalid(
                    "containerd_namespaces",
                    &format!("{ns:?} is not a namespace name"),
                ));
            }
            runtimes.containerd_namespaces.push(ns.clone());
        }
        if let Some(p) = &file.crio_run_root {
            runtimes.crio_run_root = Some(host_path("crio_run_root", p)?);
        }
        Ok(())
    }
}
