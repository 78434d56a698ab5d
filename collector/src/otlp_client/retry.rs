//! Retries: exponential backoff with jitter, honouring the server's hint.

use std::time::Duration;

/// Exponential backoff with jitter: 0.5 s doubling to 30 s, each delay drawn uniformly
/// from its upper half; a server's Retry-After/RetryInfo wins when longer.
pub struct Backoff {
    attempt: u32,
    seed: u64,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x2545_f491)
            | 1;
        Self { attempt: 0, seed }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Duration {
        let ceiling = Self::INITIAL
            .saturating_mul(1 << self.attempt.min(16))
            .min(Self::MAX);
        self.attempt = self.attempt.saturating_add(1);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = ceiling / 2;
        let jitter = half.mul_f64((self.seed % 1000) as f64 / 1000.0);
        let delay = half + jitter;
        match server_hint {
            Some(hint) if hint > delay => hint.min(Self::MAX * 4),
            _ => delay,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_the_server() {
        let mut b = Backoff::new();
        let first = b.next_delay(None);
        assert!(
            first >= Duration::from_millis(250) && first <= Duration::from_millis(500),
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..10 {
            last = b.next_delay(None);
        }
        assert!(
            last >= Duration::from_secs(15) && last <= Duration::from_secs(30),
            "{last:?}"
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(45))),
            Duration::from_secs(45)
        );
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_millis(500));
    }
}
