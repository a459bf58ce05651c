//! Exponential backoff with jitter for reconnects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Delays between reconnect attempts: `initial`, doubling up to `max`, each drawn uniformly from
/// its upper half (so many clients dropped at once do not come back in step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The first delay.
    pub(crate) initial: Duration,
    /// The largest delay.
    pub(crate) max: Duration,
}

impl Backoff {
    /// The delay before attempt `attempt` (1-based) of a series.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(31);
        let base = self
            .initial
            .saturating_mul(1u32 << shift)
            .min(self.max)
            .max(Duration::from_millis(1));
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(half + random() % (nanos - half + 1))
    }
}

/// A cheap pseudo-random number (splitmix64 over a clock-seeded counter); jitter needs no more.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if seed == 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let _ = STATE.compare_exchange(
            0x9E37_79B9_7F4A_7C15,
            now | 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        seed = now;
    }
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let d = b.delay(1);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
            seen.insert(d);
        }
        assert!(seen.len() > 10, "jittered");
        let d = b.delay(3);
        assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        for attempt in [6, 40, u32::MAX] {
            let d = b.delay(attempt);
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(2));
        }
    }
}
