//! How late the node's own work runs: a probe on the terminals' runtime,
//! and the judge that reads it and moves the places.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Places;

/// How often the node measures its scheduling delay, and the shortest
/// span of measurements that makes one reading.
const PROBE: Duration = Duration::from_millis(10);
pub(super) const READING: Duration = Duration::from_millis(100);

/// Measures the node's scheduling delay (how late a 10 ms timer fires: how
/// long every task waits for the CPU) and feeds it to `places` every 100
/// ms, until `stop`. The probe runs on the runtime this is called on (the
/// terminals'); the judge that reads it and cuts or gives back places on
/// `judge_on` if given (the control lane), else beside the probe. Both are
/// `tasks`'s.
///
/// A reading is the *least* delay of its probes: a node held to a CPU
/// quota is stopped for most of every quota period, and a probe that falls
/// in such a gap is late even when nothing waits; only when every probe of
/// a reading is late do tasks queue for the CPU (as CoDel judges a queue by
/// its minimum delay over an interval). A reading in which no probe came
/// back is the lateness of the probe still out: places must follow an
/// overload within its first moments. A judge on the terminals' own runtime
/// could not: when a crowd's calls all arrive at once (a step from 0.5x to
/// 10x of capacity, every connection with its full stream limit) that
/// runtime fell seconds behind, the judge with it, and its first reading
/// came 7 s into the surge, while memory grew by 220 MiB.
pub fn watch(
    places: Arc<Places>,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
    judge_on: Option<&tokio::runtime::Handle>,
) {
    let pulse = Arc::new(Pulse::new());
    tasks.spawn(probe(pulse.clone(), stop.clone()));
    let judge = judge(pulse, places, waiting, metrics, stop);
    match judge_on {
        Some(lane) => drop(tasks.spawn_on(judge, lane)),
        None => drop(tasks.spawn(judge)),
    }
}

/// What the probes found since the judge last looked.
struct Pulse {
    base: Instant,
    /// Least lateness of the probes back since, in ns; `u64::MAX`: none.
    least: AtomicU64,
    /// When the latest probe was sent, in ns since `base`.
    sent: AtomicU64,
}

impl Pulse {
    fn new() -> Pulse {
        Pulse {
            base: Instant::now(),
            least: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
        }
    }

    fn since_base(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The reading now: the least lateness of the probes back since the
    /// last reading, or, if none came back, that of the probe still out.
    fn reading(&self) -> Duration {
        match self.least.swap(u64::MAX, Ordering::Relaxed) {
            u64::MAX => {
                let out = self
                    .since_base()
                    .saturating_sub(self.sent.load(Ordering::Relaxed));
                Duration::from_nanos(out).saturating_sub(PROBE)
            }
            least => Duration::from_nanos(least),
        }
    }
}

/// Times 10 ms timers on the runtime it runs on, until `stop`.
async fn probe(pulse: Arc<Pulse>, stop: CancellationToken) {
    loop {
        let sent = Instant::now();
        pulse.sent.store(pulse.since_base(), Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE) => {}
        }
        let late = sent.elapsed().saturating_sub(PROBE).as_nanos() as u64;
        pulse.least.fetch_min(late, Ordering::Relaxed);
    }
}

/// Feeds a reading of `pulse` to `places` every 100 ms, until `stop`.
async fn judge(
    pulse: Arc<Pulse>,
    places: Arc<Places>,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(READING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once, before any probe.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lag = pulse.reading();
        let waiters = waiting.load(Ordering::Relaxed);
        places.observe(Instant::now(), lag, waiters);
        let (serving, paused, limit) = places.snapshot();
        metrics.scheduling_delay.set(lag.as_secs_f64());
        metrics.caller_places.set(limit as i64);
        metrics.caller_places_held.set(serving as i64);
        metrics.caller_places_paused.set(paused as i64);
        metrics.caller_places_waiting.set(waiters as i64);
    }
}
