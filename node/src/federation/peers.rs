//! Connections to other provinces' nodes, and the manners that keep a
//! struggling province from being hammered by its neighbours: a deadline on
//! every call, a circuit breaker per province, and gRFC A6 retry throttling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hufu_certs::{Province, TrustAnchors};
use tonic::transport::Channel;

use crate::client::{self, ClientCert, Target};

/// Consecutive failures that open a province's circuit.
const OPEN_AFTER: u32 = 3;
/// How long an open circuit refuses calls before letting one probe through.
const OPEN_FOR: Duration = Duration::from_secs(2);

/// A circuit breaker: after repeated failures, calls fail fast for a while
/// instead of waiting out deadlines against a province that is down.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    fn allows(&mut self, now: Instant) -> bool {
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

    fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    fn failure(&mut self, now: Instant) {
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
struct RetryThrottle {
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
    fn success(&mut self) {
        self.tokens = (self.tokens + TOKEN_RATIO).min(MAX_TOKENS);
    }

    fn failure(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn may_retry(&self) -> bool {
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

#[derive(Debug, Default)]
struct PeerHealth {
    breaker: Breaker,
    throttle: RetryThrottle,
    adaptive: AdaptiveThrottle,
    /// The last failure's reason and when (unix ms), for operators.
    last_error: Option<(String, i64)>,
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

/// The node's view of its peers: lazily connected channels per endpoint,
/// and per-province health.
pub struct Peers {
    own_cert: ClientCert,
    anchors: Arc<TrustAnchors>,
    channels: Mutex<HashMap<(Province, String), Channel>>,
    health: Mutex<HashMap<Province, PeerHealth>>,
    pub deadline: Duration,
}

impl Peers {
    pub fn new(own_cert: ClientCert, anchors: Arc<TrustAnchors>, deadline: Duration) -> Peers {
        Peers {
            own_cert,
            anchors,
            channels: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            deadline,
        }
    }

    /// A channel to a node of `province` at `endpoint`, reconnecting as
    /// needed; the server must prove it is a node of that province.
    pub fn channel(&self, province: Province, endpoint: &str) -> anyhow::Result<Channel> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(&(province, endpoint.to_owned())) {
            return Ok(c.clone());
        }
        let target = Target {
            endpoint: endpoint.to_owned(),
            province,
            anchors: self.anchors.clone(),
        };
        let channel = client::connect_lazy(&target, &self.own_cert)?;
        channels.insert((province, endpoint.to_owned()), channel.clone());
        Ok(channel)
    }

    /// Forgets channels to endpoints no longer listed (after a trust list change).
    pub fn retain(&self, keep: impl Fn(Province, &str) -> bool) {
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|(p, e), _| keep(*p, e));
    }

    /// Whether a call to `province` may be tried now: its circuit is not
    /// open, and adaptive throttling does not drop the call.
    pub fn allows(&self, province: Province) -> bool {
        let now = Instant::now();
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.allows(now) && h.adaptive.allows(now, draw())
    }

    pub fn may_retry(&self, province: Province) -> bool {
        self.health
            .lock()
            .expect("health lock")
            .entry(province)
            .or_default()
            .throttle
            .may_retry()
    }

    pub fn success(&self, province: Province) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.success();
        h.throttle.success();
        h.adaptive.accepted();
    }

    pub fn failure(&self, province: Province) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.failure(Instant::now());
        h.throttle.failure();
    }

    /// Remembers why the last call to `province` failed, for operators.
    pub fn note_error(&self, province: Province, error: &str) {
        let mut health = self.health.lock().expect("health lock");
        health.entry(province).or_default().last_error =
            Some((error.to_owned(), crate::status::now_millis()));
    }

    /// The breaker state and last error of `province`, as an operator sees them.
    pub fn view(&self, province: Province) -> PeerView {
        let health = self.health.lock().expect("health lock");
        let Some(h) = health.get(&province) else {
            return PeerView {
                breaker: "closed".into(),
                failures: 0,
                last_error: None,
                last_error_ms: None,
            };
        };
        let breaker = match h.breaker.open_until {
            None => "closed",
            Some(until) if Instant::now() < until => "open",
            Some(_) => "half-open",
        };
        PeerView {
            breaker: breaker.into(),
            failures: h.breaker.failures,
            last_error: h.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_ms: h.last_error.as_ref().map(|(_, t)| *t),
        }
    }
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
    fn operators_see_the_breaker_and_the_last_error() {
        let cert = ClientCert {
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        let peers = Peers::new(cert, TrustAnchors::new(vec![]).unwrap(), OPEN_FOR);
        let gd = Province::parse("440000").unwrap();
        let view = peers.view(gd);
        assert_eq!((view.breaker.as_str(), view.last_error), ("closed", None));
        for _ in 0..OPEN_AFTER {
            peers.failure(gd);
        }
        peers.note_error(gd, "feed from 127.0.0.1:1: connection refused");
        let view = peers.view(gd);
        assert_eq!(view.breaker, "open");
        assert_eq!(view.failures, OPEN_AFTER);
        assert_eq!(
            view.last_error.as_deref(),
            Some("feed from 127.0.0.1:1: connection refused")
        );
        // After the pause the next call probes; a success closes it and
        // the last error stays visible, with its time.
        peers
            .health
            .lock()
            .unwrap()
            .get_mut(&gd)
            .unwrap()
            .breaker
            .open_until = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(peers.view(gd).breaker, "half-open");
        peers.success(gd);
        let view = peers.view(gd);
        assert_eq!(view.breaker, "closed");
        assert!(view.last_error.is_some() && view.last_error_ms.is_some());
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
