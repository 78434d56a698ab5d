//! The reader's poll timer: a kernel `timerfd`, so that each poll costs the runtime one
//! wake-up. tokio's timer wheel keeps a deadline more than 64 ms away on its second
//! level and wakes once at that level's slot boundary, to move it down, then again at
//! the deadline: a 100 ms `tokio::time::interval` woke the reader's worker twice per
//! poll, on a quiet node most of the collector's idle wake-ups.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::{Interest, unix::AsyncFd};

/// A periodic timer on `CLOCK_MONOTONIC`, read through the runtime's reactor; a tokio
/// interval if the timerfd cannot be made (out of descriptors) or ever fails to read (a
/// kernel bug): the reader polls either way, and the failure is reported once.
pub struct PollTimer {
    source: Source,
    period: Duration,
    /// Why the timerfd could not be made: returned by the first tick.
    not_made: Option<io::Error>,
}

enum Source {
    Timerfd(AsyncFd<OwnedFd>),
    Interval(tokio::time::Interval),
}

impl PollTimer {
    /// First expiry one `period` from now, then every `period`. Needs a tokio runtime
    /// with I/O and time enabled.
    pub fn new(period: Duration) -> Self {
        match timerfd(period).and_then(|fd| Self::reading(fd, period)) {
            Ok(timer) => timer,
            Err(e) => Self::interval_for(e, period),
        }
    }

    /// A tokio interval instead of the timerfd that could not be made (`not_made`).
    fn interval_for(not_made: io::Error, period: Duration) -> Self {
        Self {
            source: Source::Interval(interval(period)),
            period,
            not_made: Some(not_made),
        }
    }

    /// A timer that reads its expirations from `fd` (a timerfd but in tests).
    fn reading(fd: OwnedFd, period: Duration) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the descriptor and keeps it open, unchanged, while
        // registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            source: Source::Timerfd(fd),
            period,
            not_made: None,
        })
    }

    /// Waits for the next expiry: how many periods ended since the last call (1, or more
    /// when the reader was late; the missed ones are not made up, the next period is
    /// still one `period` after the last expiry). An error is returned once, by the
    /// first tick of a timer whose timerfd could not be made or by the tick on which it
    /// failed: the timer is a tokio interval from then on (and that tick still a tick).
    pub async fn tick(&mut self) -> Result<u64, io::Error> {
        if let Some(e) = self.not_made.take() {
            return Err(e);
        }
        let failed = match &mut self.source {
            Source::Interval(interval) => {
                interval.tick().await;
                return Ok(1);
            }
            Source::Timerfd(fd) => match read(fd).await {
                Ok(expirations) => return Ok(expirations),
                Err(e) => e,
            },
        };
        // Replaced with no await in between: a select that drops this call cannot leave
        // the failed timerfd in use. Dropped, it is closed and disarmed.
        self.source = Source::Interval(interval(self.period));
        Err(failed)
    }
}

/// A tokio interval of `period` whose first tick is one period from now (not at once,
/// as `tokio::time::interval`'s).
fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.reset();
    interval
}

/// A non-blocking timerfd that expires every `period`, the first time one period from now.
fn timerfd(period: Duration) -> io::Result<OwnedFd> {
    // SAFETY: no pointer arguments; the result is checked before use.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid itimerspec (and fills any padding the target has).
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    spec.it_interval.tv_sec = period.as_secs() as _;
    spec.it_interval.tv_nsec = period.subsec_nanos() as _;
    spec.it_value = spec.it_interval;
    // SAFETY: `spec` is valid for the call; the old value is not asked for.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The expirations counted by the timerfd `fd` since it was last read, once there are any.
async fn read(fd: &AsyncFd<OwnedFd>) -> io::Result<u64> {
    loop {
        let mut ready = fd.readable().await?;
        let read = ready.try_io(|fd| {
            let mut expirations = [0u8; 8];
            // SAFETY: an 8-byte buffer for an 8-byte read into it.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            match n {
                8 => Ok(u64::from_ne_bytes(expirations)),
                n if n < 0 => Err(io::Error::last_os_error()),
                n => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("a timerfd read returned {n} bytes"),
                )),
            }
        });
        match read {
            Ok(expirations) => {
                // The read set the timer's count to zero: the next expiry raises a new
                // edge, and tokio clears only the readiness this guard saw, not a newer
                // one. (Left ready, the next tick would first read in vain.)
                if expirations.is_ok() {
                    ready.clear_ready();
                }
                return expirations;
            }
            // Readiness was stale (cleared by try_io): wait again.
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_come_a_period_apart_and_count_missed_ones() {
        let period = Duration::from_millis(20);
        let start = std::time::Instant::now();
        let mut timer = PollTimer::new(period);
        assert!(matches!(timer.source, Source::Timerfd(_)));
        let first_two = timer.tick().await.expect("tick") + timer.tick().await.expect("tick");
        let elapsed = start.elapsed();
        assert!(elapsed >= 2 * period, "{elapsed:?}");
        // As many periods as ended: at least one per tick, no more than the time allows.
        let ended = (elapsed.as_millis() / period.as_millis()) as u64;
        assert!(
            (2..=ended).contains(&first_two),
            "{first_two} in {elapsed:?}"
        );
        // A reader three periods late reads the periods that ended meanwhile at once.
        std::thread::sleep(3 * period + period / 2);
        assert!(timer.tick().await.expect("tick") >= 3);
    }

    /// A read that fails (here a pipe holding 3 bytes, not a count's 8) is reported
    /// once, and the ticks go on from the runtime's timer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_read_is_reported_once_and_the_ticks_go_on() {
        let mut ends = [0; 2];
        // SAFETY: `ends` has room for the two descriptors.
        assert_eq!(
            unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        // SAFETY: new descriptors that nothing else owns.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // SAFETY: three bytes from a valid buffer.
        assert_eq!(
            unsafe { libc::write(write_end.as_raw_fd(), b"abc".as_ptr().cast(), 3) },
            3
        );
        let period = Duration::from_millis(10);
        let mut timer = PollTimer::reading(read_end, period).expect("register");
        let start = std::time::Instant::now();
        let error = timer.tick().await.expect_err("a short read fails");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
        assert!(matches!(timer.source, Source::Interval(_)));
        for _ in 0..3 {
            assert_eq!(timer.tick().await.expect("the fallback ticks"), 1);
        }
        assert!(start.elapsed() >= 3 * period, "{:?}", start.elapsed());
    }

    /// A timerfd that could not be made (out of descriptors) is reported by the first
    /// tick, at once, and the ticks go on from the runtime's timer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_timer_not_made_is_reported_by_its_first_tick_and_the_ticks_go_on() {
        let period = Duration::from_millis(10);
        let start = std::time::Instant::now();
        let mut timer = PollTimer::interval_for(io::Error::from_raw_os_error(libc::EMFILE), period);
        // Ready on its first poll: reported at once, not a period later.
        let first = std::pin::pin!(timer.tick())
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        match first {
            std::task::Poll::Ready(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE)),
            other => panic!("not reported at once: {other:?}"),
        }
        for _ in 0..2 {
            assert_eq!(timer.tick().await.expect("the interval ticks"), 1);
        }
        assert!(start.elapsed() >= 2 * period, "{:?}", start.elapsed());
    }
}
