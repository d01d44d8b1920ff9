//! The manners that keep a struggling province from being hammered by its
//! neighbours, kept per province by the peer client: a circuit breaker,
//! gRFC A6 retry throttling and client-side adaptive throttling. Pure state
//! machines over the time they are given, so they are tested without
//! waiting.

use std::time::{Duration, Instant};

/// Consecutive failures that open a province's circuit.
pub(super) const OPEN_AFTER: u32 = 3;
/// How long an open circuit refuses calls before letting one probe through.
pub(super) const OPEN_FOR: Duration = Duration::from_secs(2);

/// A circuit breaker: after repeated failures, calls fail fast for a while
/// instead of waiting out deadlines against a province that is down.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    failures: u32,
    pub(super) open_until: Option<Instant>,
}

impl Breaker {
    pub(super) fn allows(&mut self, now: Instant) -> bool {
        match self.open_until {
            Some(until) if now < until => false,
            // Half-open: let one call probe; a failure re-opens at once.
            Some(_) => {
                self.open_until = Some(now + OPEN_FOR);
                true
            }
            None => true,
        }
    }

    pub(super) fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    pub(super) fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.failures >= OPEN_AFTER {
            self.open_until = Some(now + OPEN_FOR);
        }
    }
}

/// gRFC A6 retry throttling: every failure costs a token, every success
/// earns a tenth of one; retries are allowed only while more than half the
/// tokens remain.
#[derive(Debug)]
pub(super) struct RetryThrottle {
    tokens: f64,
}

const MAX_TOKENS: f64 = 10.0;
const TOKEN_RATIO: f64 = 0.1;

impl Default for RetryThrottle {
    fn default() -> Self {
        RetryThrottle { tokens: MAX_TOKENS }
    }
}

impl RetryThrottle {
    pub(super) fn success(&mut self) {
        self.tokens = (self.tokens + TOKEN_RATIO).min(MAX_TOKENS);
    }

    pub(super) fn failure(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    pub(super) fn may_retry(&self) -> bool {
        self.tokens > MAX_TOKENS / 2.0
    }
}

/// Client-side adaptive throttling (Google SRE book, "Handling Overload"):
/// once a province accepts fewer than 1/K of the calls made to it, calls are
/// dropped locally with probability (requests − K·accepts) / (requests + 1),
/// so a struggling province sees its load fall instead of its neighbours'
/// retries pile up. Counts halve every half minute to follow recovery.
#[derive(Debug)]
pub struct AdaptiveThrottle {
    requests: f64,
    accepts: f64,
    since: Instant,
    half_life: Duration,
}

const K: f64 = 2.0;
const MIN_HISTORY: f64 = 10.0;
const HALF_LIFE: Duration = Duration::from_secs(30);

impl Default for AdaptiveThrottle {
    fn default() -> Self {
        AdaptiveThrottle::new(HALF_LIFE)
    }
}

impl AdaptiveThrottle {
    /// A throttle whose counts halve every `half_life`.
    pub fn new(half_life: Duration) -> AdaptiveThrottle {
        AdaptiveThrottle {
            requests: 0.0,
            accepts: 0.0,
            since: Instant::now(),
            half_life,
        }
    }

    fn decay(&mut self, now: Instant) {
        let halvings =
            (now.duration_since(self.since).as_secs_f64() / self.half_life.as_secs_f64()).floor();
        if halvings >= 1.0 {
            let factor = 0.5f64.powf(halvings);
            self.requests *= factor;
            self.accepts *= factor;
            self.since = now;
        }
    }

    fn reject_probability(&self) -> f64 {
        // Too little history says nothing about the peer.
        if self.requests < MIN_HISTORY {
            return 0.0;
        }
        ((self.requests - K * self.accepts) / (self.requests + 1.0)).max(0.0)
    }

    /// Decides whether to make a call and counts it; `draw` is uniform in [0, 1).
    pub fn allows(&mut self, now: Instant, draw: f64) -> bool {
        self.decay(now);
        let allowed = draw >= self.reject_probability();
        self.requests += 1.0;
        allowed
    }

    pub fn accepted(&mut self) {
        self.accepts += 1.0;
    }
}

/// A uniform draw in [0, 1) from the system's randomness.
pub fn draw() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Everything the peer client remembers of one province.
#[derive(Debug, Default)]
pub(super) struct PeerHealth {
    pub(super) breaker: Breaker,
    pub(super) throttle: RetryThrottle,
    pub(super) adaptive: AdaptiveThrottle,
    /// The last failure's reason and when (unix ms), for operators.
    pub(super) last_error: Option<(String, i64)>,
}

impl PeerHealth {
    /// What an operator sees of it at `now`.
    pub(super) fn view(&self, now: Instant) -> PeerView {
        let breaker = match self.breaker.open_until {
            None => "closed",
            Some(until) if now < until => "open",
            Some(_) => "half-open",
        };
        PeerView {
            breaker: breaker.into(),
            failures: self.breaker.failures,
            last_error: self.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_ms: self.last_error.as_ref().map(|(_, t)| *t),
        }
    }
}

/// What an operator sees of one peer's health (the console, `hufu
/// federation status`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerView {
    /// `closed` (calls go through), `open` (calls fail fast) or `half-open`
    /// (the next call probes).
    pub breaker: String,
    /// Consecutive failures.
    pub failures: u32,
    pub last_error: Option<String>,
    /// When the last error happened, unix ms.
    pub last_error_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_then_probes() {
        let mut b = Breaker::default();
        let t = Instant::now();
        for _ in 0..OPEN_AFTER {
            assert!(b.allows(t));
            b.failure(t);
        }
        assert!(!b.allows(t));
        assert!(!b.allows(t + OPEN_FOR / 2));
        // One probe after the pause; a failed probe re-opens.
        assert!(b.allows(t + OPEN_FOR));
        assert!(!b.allows(t + OPEN_FOR));
        b.failure(t + OPEN_FOR);
        assert!(!b.allows(t + OPEN_FOR + OPEN_FOR / 2));
        b.success();
        assert!(b.allows(t));
    }

    #[test]
    fn adaptive_throttling_follows_the_accept_rate() {
        let t = Instant::now();
        let mut a = AdaptiveThrottle::default();
        // All accepted: never drops.
        for _ in 0..100 {
            assert!(a.allows(t, 0.0));
            a.accepted();
        }
        // Now nothing is accepted: the drop probability climbs towards 1.
        for _ in 0..1000 {
            a.allows(t, 0.5);
        }
        assert!(a.reject_probability() > 0.8, "{}", a.reject_probability());
        assert!(!a.allows(t, 0.5));
        // Counts halve with time, so recovery is noticed.
        let later = t + HALF_LIFE * 8;
        a.decay(later);
        assert!(a.requests < 10.0);
    }

    #[test]
    fn retries_stop_when_most_calls_fail() {
        let mut r = RetryThrottle::default();
        for _ in 0..4 {
            r.failure();
        }
        assert!(r.may_retry());
        r.failure();
        assert!(!r.may_retry());
        for _ in 0..10 {
            r.success();
        }
        assert!(r.may_retry());
    }
}
