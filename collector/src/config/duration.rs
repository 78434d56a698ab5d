//! Durations and sizes as the flags, variables and file write them.

use std::time::Duration;

/// `90`, `90s`, `1500ms`, `5m`, `1h`; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 60s, 500ms, 5m)"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    if duration.is_zero() {
        return Err("a duration must be greater than zero".into());
    }
    Ok(duration)
}

/// A duration of at least 1s, or `off` (zero). Windows are numbered in 32 bits of
/// boot time: a second's windows last 136 years of uptime.
pub(super) fn parse_aggregate_window(text: &str) -> Result<Duration, String> {
    if text.trim() == "off" {
        return Ok(Duration::ZERO);
    }
    let window = parse_duration(text)?;
    if window < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is too short: the aggregation window is at least 1s"
        ));
    }
    Ok(window)
}

pub(super) fn parse_ring_buffer_bytes(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} must be a power of two and at least 4096"));
    }
    Ok(bytes)
}
