//! One backoff policy for tcplake's own retry loops (broker connects, publishes and consumers, an S3
//! answer cut off mid-body; S3 requests themselves are retried by the SDK, `storage::s3_requests`):
//! exponential steps from a first delay up to a cap, each wait a random point between half and all of
//! its step ("equal jitter": processes that failed together do not retry together). How long to keep
//! trying, and what counts as transient, stays with each caller.

use std::time::Duration;

/// The delays of one retry loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    step: Duration,
    max: Duration,
    waits: u32,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            step: first,
            max,
            waits: 0,
        }
    }

    /// Nothing waited yet: the failure at hand is the first (worth a log line; the next ones not).
    pub fn is_first(&self) -> bool {
        self.waits == 0
    }

    /// How long to wait before the next attempt; steps on.
    pub fn next_delay(&mut self) -> Duration {
        let d = jittered(self.step);
        self.step = (self.step * 2).min(self.max);
        self.waits += 1;
        d
    }

    /// Waits [`Self::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

/// A random point between half and all of `d`.
pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_cap_each_jittered_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        assert!(b.is_first());
        for step in [100, 200, 400, 400, 400] {
            let d = b.next_delay();
            let full = Duration::from_millis(step);
            assert!(d >= full / 2 && d <= full, "{d:?} for a step of {full:?}");
        }
        assert!(!b.is_first());
    }
}
