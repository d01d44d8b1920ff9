//! An adaptive concurrency limit (the gradient algorithm of Netflix's
//! concurrency-limits, as Envoy's adaptive concurrency filter uses it): the
//! node learns how long a call takes when it is not queueing for CPU (a
//! slow, long-term average), compares it with how long calls take now (a
//! fast average), and shrinks the number of calls it runs at once while the
//! two diverge. Calls beyond the limit wait in the admission queue, where
//! they cost nothing, instead of inflating the latency of every call.

use std::time::Duration;

/// Bounds and tuning of a [`Gradient`] limit.
#[derive(Clone, Copy, Debug)]
pub struct LimitBounds {
    pub initial: usize,
    pub min: usize,
    pub max: usize,
}

/// The limit itself: fed one sample per finished call.
#[derive(Debug)]
pub struct Gradient {
    bounds: LimitBounds,
    limit: f64,
    /// Latency now: an exponential average over about ten calls.
    short: Option<f64>,
    /// Latency without queueing: an average over about 600 calls.
    long: Option<f64>,
}

/// How much slower than the long-term latency calls may run before the
/// limit shrinks: some jitter is normal.
const TOLERANCE: f64 = 2.0;
/// How fast the limit follows its target.
const SMOOTHING: f64 = 0.2;

impl Gradient {
    pub fn new(bounds: LimitBounds) -> Gradient {
        let bounds = LimitBounds {
            min: bounds.min.max(1),
            max: bounds.max.max(bounds.min.max(1)),
            initial: bounds.initial,
        };
        Gradient {
            limit: bounds.initial.clamp(bounds.min, bounds.max) as f64,
            bounds,
            short: None,
            long: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.round() as usize
    }

    /// Records a finished call: `latency` from admission to answer, with
    /// `in_flight` calls running when it was admitted.
    pub fn record(&mut self, latency: Duration, in_flight: usize) {
        let sample = latency.as_secs_f64().max(1e-6);
        let short = ewma(self.short, sample, 10.0);
        let mut long = ewma(self.long, sample, 600.0);
        // After a surge the long average has learned the surge's latency:
        // let it come back down quickly once calls are fast again.
        if long / short > 2.0 {
            long *= 0.95;
        }
        self.short = Some(short);
        self.long = Some(long);

        // A limit that is not being used says nothing about the right
        // limit: grow only when calls actually press against it.
        if (in_flight as f64) < self.limit / 2.0 {
            return;
        }
        let gradient = (TOLERANCE * long / short).clamp(0.5, 1.0);
        let headroom = self.limit.sqrt();
        let target = self.limit * gradient + headroom;
        self.limit = (self.limit * (1.0 - SMOOTHING) + target * SMOOTHING)
            .clamp(self.bounds.min as f64, self.bounds.max as f64);
    }
}

fn ewma(previous: Option<f64>, sample: f64, window: f64) -> f64 {
    match previous {
        None => sample,
        Some(p) => p + (sample - p) / window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient() -> Gradient {
        Gradient::new(LimitBounds {
            initial: 64,
            min: 4,
            max: 1000,
        })
    }

    fn feed(g: &mut Gradient, latency_ms: u64, calls: usize) {
        for _ in 0..calls {
            let in_flight = g.limit();
            g.record(Duration::from_millis(latency_ms), in_flight);
        }
    }

    #[test]
    fn the_limit_grows_while_latency_holds_steady() {
        let mut g = gradient();
        feed(&mut g, 2, 200);
        assert!(g.limit() > 64, "limit {}", g.limit());
        assert!(g.limit() <= 1000);
    }

    #[test]
    fn the_limit_shrinks_under_rising_latency_and_grows_back() {
        let mut g = gradient();
        feed(&mut g, 2, 2000);
        let steady = g.limit();
        feed(&mut g, 40, 300);
        let loaded = g.limit();
        assert!(
            loaded < steady / 2,
            "limit {loaded} under 20x latency, {steady} before"
        );
        assert!(loaded >= 4, "never below the minimum: {loaded}");
        feed(&mut g, 2, 2000);
        assert!(
            g.limit() > loaded * 2,
            "limit {} after recovery, {loaded} under load",
            g.limit()
        );
    }

    #[test]
    fn an_idle_node_does_not_inflate_its_limit() {
        let mut g = gradient();
        for _ in 0..1000 {
            g.record(Duration::from_millis(2), 1);
        }
        assert_eq!(g.limit(), 64);
    }
}
