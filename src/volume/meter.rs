//! How far a long task on a volume (a scrub, a copy) has come, for
//! `status`: shared between the task's thread, which moves it on, and
//! whoever reports it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug)]
pub struct Meter {
    /// Bytes the task covers.
    total: u64,
    /// Bytes done so far.
    done: AtomicU64,
    started: Instant,
    /// The first position reported, and when: the rate is measured from
    /// there (a paced task's first chunk goes at once).
    first: std::sync::OnceLock<(u64, Instant)>,
}

impl Meter {
    pub fn new(total: u64) -> Meter {
        Meter {
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            first: std::sync::OnceLock::new(),
        }
    }

    pub fn set(&self, done: u64) {
        self.first
            .get_or_init(|| (done.min(self.total), Instant::now()));
        self.done.store(done.min(self.total), Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn percent(&self) -> f64 {
        match self.total {
            0 => 100.0,
            t => (self.done() as f64 * 100.0 / t as f64).min(100.0),
        }
    }

    /// Bytes/s since the first position was reported (scrubs and copies
    /// run evenly, so the average is their rate); 0 before half a second
    /// has passed since the task started and since that first position.
    pub fn rate(&self) -> u64 {
        let Some((from, at)) = self.first.get() else {
            return 0;
        };
        let secs = at.elapsed().as_secs_f64();
        if secs < 0.5 || self.started.elapsed().as_secs_f64() < 0.5 {
            return 0;
        }
        (self.done().saturating_sub(*from) as f64 / secs) as u64
    }

    /// Seconds left at that rate; `None` before a rate is known.
    pub fn eta_seconds(&self) -> Option<u64> {
        let rate = self.rate();
        (rate > 0).then(|| self.total.saturating_sub(self.done()).div_ceil(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_reports_percent_and_no_rate_at_first() {
        let m = Meter::new(200);
        assert_eq!(m.percent(), 0.0);
        m.set(50);
        assert_eq!(m.percent(), 25.0);
        assert_eq!(m.rate(), 0, "no rate in the first half second");
        assert_eq!(m.eta_seconds(), None);
        m.set(900);
        assert_eq!(m.done(), 200, "never past the total");
        assert_eq!(Meter::new(0).percent(), 100.0);
    }
}
