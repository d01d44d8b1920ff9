//! Places for callers' connections: under a surge the node serves fewer
//! terminals well instead of every terminal badly.
//!
//! A caller that never backs off keeps its connection's streams full; when
//! its calls expire it cancels them, and every cancellation frees a stream
//! for its next (already stale) call. So whatever a stream limit holds back
//! still reaches the node, one stale call at a time, and the node spends
//! itself reading, decrypting and cancelling calls nobody will wait for.
//! Waiting costs the node nothing only where it does not look: in sockets
//! it does not read, in callers that have no connection, and in the
//! kernel's queue of connections not yet accepted.
//!
//! So terminals' connections hold a *place*, and the number of places
//! follows how late the node's own work runs (its scheduling delay). When
//! the delay passes its target, the newest connections are *paused*: the
//! node stops reading them, and their calls wait in their sockets. A pause
//! is cheap to undo, so places come back first to paused connections while
//! the delay is low. A connection paused for long is closed, its unread
//! (by then stale) calls dropped unread, and its caller's reconnection waits
//! unhandshaken until the node has room for new connections again. Nodes,
//! admins and auditors need no place.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How places are sized.
#[derive(Clone, Copy, Debug)]
pub struct PlaceConfig {
    /// Places never fall below this.
    pub min: usize,
    /// Places at most (and at start).
    pub max: usize,
    /// Scheduling delay above which places are cut; zero: places off.
    pub target_lag: Duration,
}

/// After a cut, how long the node waits before judging again: the work
/// queued before the cut takes a moment to drain.
const COOL_DOWN: Duration = Duration::from_millis(300);
/// Share of places kept at a cut.
const CUT: f64 = 0.85;
/// Growth per reading while the node keeps up.
const GROWTH: f64 = 1.1;
/// How long after a cut new connections may be let in: each costs a full
/// handshake, so the node does not let in connections it may have to shut
/// out again at once.
const SETTLE: Duration = Duration::from_secs(1);
/// A connection paused this long is closed: what waits in its socket is
/// stale by then, and cheaper to drop than to read.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);

/// What the node lets a connection with a place do now.
pub struct Seat {
    paused: AtomicBool,
    resumed: AtomicWaker,
    /// Cancelled when the node closes the connection.
    pub closed: CancellationToken,
}

impl Seat {
    /// Ready while the connection may be read; while it is paused, Pending
    /// until it is resumed.
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.paused.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.resumed.register(cx.waker());
        if self.paused.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.resumed.wake();
    }
}

pub struct Places {
    inner: Mutex<Inner>,
    room: Notify,
    config: PlaceConfig,
    /// Connections closed after a long pause, ever.
    closed: AtomicUsize,
}

struct Inner {
    limit: f64,
    /// Connections being read, by when they took their place: the newest
    /// is paused first.
    serving: BTreeMap<u64, Arc<Seat>>,
    /// Paused connections by when paused (the newest resumed first), with
    /// their ids and the instant of the pause.
    paused: BTreeMap<u64, (u64, Instant, Arc<Seat>)>,
    /// Pause order of each paused id.
    pause_of: HashMap<u64, u64>,
    next: u64,
    last_cut: Option<Instant>,
}

/// A terminal connection's place; dropping it (the connection closed)
/// frees the place.
pub struct Place {
    places: Arc<Places>,
    id: u64,
    pub seat: Arc<Seat>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.places.lock();
        if inner.serving.remove(&self.id).is_none()
            && let Some(order) = inner.pause_of.remove(&self.id)
        {
            inner.paused.remove(&order);
        }
        if inner.serving.len() < inner.limit() && inner.paused.is_empty() {
            // The newest waiter is the one most likely still there.
            self.places.room.notify_last();
        }
    }
}

impl Inner {
    fn limit(&self) -> usize {
        self.limit.round() as usize
    }

    fn pause_newest(&mut self, now: Instant) {
        if let Some((id, seat)) = self.serving.pop_last() {
            seat.pause();
            let order = self.next;
            self.next += 1;
            self.pause_of.insert(id, order);
            self.paused.insert(order, (id, now, seat));
        }
    }

    fn resume_newest(&mut self) -> bool {
        let Some((_, (id, _, seat))) = self.paused.pop_last() else {
            return false;
        };
        self.pause_of.remove(&id);
        seat.resume();
        self.serving.insert(id, seat);
        true
    }
}

impl Places {
    pub fn new(config: PlaceConfig) -> Arc<Places> {
        let config = PlaceConfig {
            min: config.min.max(1),
            max: config.max.max(config.min.max(1)),
            ..config
        };
        Arc::new(Places {
            inner: Mutex::new(Inner {
                limit: config.max as f64,
                serving: BTreeMap::new(),
                paused: BTreeMap::new(),
                pause_of: HashMap::new(),
                next: 0,
                last_cut: None,
            }),
            room: Notify::new(),
            config,
            closed: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether places are in force at all.
    pub fn enabled(&self) -> bool {
        !self.config.target_lag.is_zero()
    }

    /// Connections closed after a long pause since the node started.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::Relaxed)
    }

    /// (serving, paused, limit) now.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.serving.len(), inner.paused.len(), inner.limit())
    }

    /// A place for a new connection, if one is free and no paused
    /// connection is waiting to be resumed.
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        let mut inner = self.lock();
        if inner.serving.len() >= inner.limit() || !inner.paused.is_empty() {
            return None;
        }
        let id = inner.next;
        inner.next += 1;
        let seat = Arc::new(Seat {
            paused: AtomicBool::new(false),
            resumed: AtomicWaker::new(),
            closed: CancellationToken::new(),
        });
        inner.serving.insert(id, seat.clone());
        Some(Place {
            places: self.clone(),
            id,
            seat,
        })
    }

    /// Waits until a place may be free (another waiter may take it first).
    pub async fn room(&self) {
        let notified = self.room.notified();
        {
            let inner = self.lock();
            if inner.serving.len() < inner.limit() && inner.paused.is_empty() {
                return;
            }
        }
        notified.await;
    }

    /// One reading of the node's scheduling delay, with `waiting` new
    /// connections waiting for a place: closes connections paused too long,
    /// then cuts places (pausing the newest connections) or gives them back
    /// (resuming the most recently paused first, then letting new ones in).
    pub fn observe(&self, now: Instant, lag: Duration, waiting: usize) {
        let target = self.config.target_lag;
        if target.is_zero() {
            return;
        }
        let mut inner = self.lock();
        while let Some((_, (_, since, _))) = inner.paused.first_key_value()
            && now.saturating_duration_since(*since) >= PAUSE_LIMIT
        {
            if let Some((_, (id, _, seat))) = inner.paused.pop_first() {
                inner.pause_of.remove(&id);
                seat.closed.cancel();
                self.closed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let since_cut = inner.last_cut.map(|at| now.saturating_duration_since(at));
        if since_cut.is_some_and(|d| d < COOL_DOWN) {
            return;
        }
        if lag > target {
            // Cut from what is in use, not from a limit nobody reached.
            let base = inner.limit.min(inner.serving.len() as f64);
            inner.limit = (base * CUT).max(self.config.min as f64);
            inner.last_cut = Some(now);
            while inner.serving.len() > inner.limit() {
                inner.pause_newest(now);
            }
            return;
        }
        let admit_new = waiting > 0 && lag < target / 5 && since_cut.is_none_or(|d| d >= SETTLE);
        if lag >= target / 2 || (inner.paused.is_empty() && !admit_new) {
            return;
        }
        let grown = (inner.limit * GROWTH).max(inner.limit + 1.0);
        inner.limit = grown.min(self.config.max as f64);
        while inner.serving.len() < inner.limit() && inner.resume_newest() {}
        if !admit_new || !inner.paused.is_empty() {
            return;
        }
        let free = inner.limit().saturating_sub(inner.serving.len());
        drop(inner);
        // One wake-up per new place, not a stampede of every waiter.
        for _ in 0..free.min(waiting) {
            self.room.notify_last();
        }
    }
}

/// How often the node measures its scheduling delay, and how many
/// measurements make one reading.
const PROBE: Duration = Duration::from_millis(10);
const PROBES_PER_READING: u32 = 10;

/// Measures the node's scheduling delay (how late a 10 ms timer fires: how
/// long every task waits for the CPU) and feeds its mean to `places` every
/// 100 ms, until `stop`.
pub async fn watch(
    places: Arc<Places>,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    let mut total = Duration::ZERO;
    let mut probes = 0;
    let mut closed = 0;
    loop {
        let asked = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE) => {}
        }
        total += asked.elapsed().saturating_sub(PROBE);
        probes += 1;
        if probes < PROBES_PER_READING {
            continue;
        }
        let lag = total / probes;
        let waiters = waiting.load(Ordering::Relaxed);
        places.observe(Instant::now(), lag, waiters);
        let (serving, paused, limit) = places.snapshot();
        metrics.scheduling_delay.set(lag.as_secs_f64());
        metrics.caller_places.set(limit as i64);
        metrics.caller_places_held.set(serving as i64);
        metrics.caller_places_paused.set(paused as i64);
        metrics.caller_places_waiting.set(waiters as i64);
        let now_closed = places.closed();
        metrics
            .connections_taken_back
            .inc_by((now_closed - closed) as u64);
        closed = now_closed;
        (total, probes) = (Duration::ZERO, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places(max: usize) -> Arc<Places> {
        Places::new(PlaceConfig {
            min: 2,
            max,
            target_lag: Duration::from_millis(20),
        })
    }

    const CALM: Duration = Duration::from_millis(1);
    const LATE: Duration = Duration::from_millis(100);

    fn open(place: &Place) -> bool {
        let waker = futures::task::noop_waker();
        place
            .seat
            .poll_open(&mut Context::from_waker(&waker))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_connections_are_paused_when_the_node_runs_late() {
        let p = places(100);
        let held: Vec<Place> = (0..10).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        // Cut from the 10 in use, not from the limit of 100.
        assert_eq!(p.snapshot(), (9, 1, 9));
        let open_now: Vec<bool> = held.iter().map(open).collect();
        assert_eq!(open_now, [vec![true; 9], vec![false; 1]].concat());
        assert!(p.try_take().is_none(), "no new place above the limit");
        // A closed connection frees its place, paused or not.
        drop(held);
        assert_eq!(p.snapshot(), (0, 0, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_connection_is_resumed_before_new_ones_are_let_in() {
        let p = places(100);
        let held: Vec<Place> = (0..20).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        assert_eq!(p.snapshot(), (17, 3, 17));
        let resumed = tokio::spawn({
            let seat = held[17].seat.clone();
            futures::future::poll_fn(move |cx| seat.poll_open(cx))
        });
        tokio::time::advance(COOL_DOWN).await;
        p.observe(Instant::now(), CALM, 5);
        // 17 * 1.1: two resumed, the newest paused first; nobody new yet.
        assert_eq!(p.snapshot(), (19, 1, 19));
        assert!(open(&held[17]) && open(&held[18]) && !open(&held[19]));
        resumed.await.unwrap();
        assert!(p.try_take().is_none(), "a paused connection comes first");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_paused_too_long_is_closed() {
        let p = places(100);
        let held: Vec<Place> = (0..10).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        assert!(!held[9].seat.closed.is_cancelled());
        tokio::time::advance(PAUSE_LIMIT).await;
        p.observe(Instant::now(), LATE, 0);
        assert!(held[9].seat.closed.is_cancelled());
        assert_eq!(p.closed(), 1);
        assert!(!held[0].seat.closed.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_waits_for_the_queued_work_to_drain_before_the_next() {
        let p = places(1000);
        let _held: Vec<Place> = (0..100).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        assert_eq!(p.snapshot().2, 85);
        p.observe(Instant::now(), LATE, 0);
        assert_eq!(p.snapshot().2, 85, "still cooling down");
        tokio::time::advance(COOL_DOWN).await;
        p.observe(Instant::now(), LATE, 0);
        assert_eq!(p.snapshot().2, 72);
    }

    #[tokio::test(start_paused = true)]
    async fn places_never_fall_below_the_minimum() {
        let p = places(100);
        let _held: Vec<Place> = (0..3).map(|_| p.try_take().unwrap()).collect();
        for _ in 0..10 {
            tokio::time::advance(COOL_DOWN).await;
            p.observe(Instant::now(), LATE, 0);
        }
        assert_eq!(p.snapshot().2, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn new_connections_are_let_in_only_while_they_wait_and_the_node_has_headroom() {
        let p = places(100);
        let held: Vec<Place> = (0..20).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        drop(held);
        assert_eq!(p.snapshot(), (0, 0, 17));
        tokio::time::advance(COOL_DOWN).await;
        let _held: Vec<Place> = (0..17).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), CALM, 1);
        assert_eq!(p.snapshot().2, 17, "too soon after a cut");
        tokio::time::advance(SETTLE).await;
        p.observe(Instant::now(), CALM, 0);
        assert_eq!(p.snapshot().2, 17, "nobody waits");
        p.observe(Instant::now(), Duration::from_millis(5), 1);
        assert_eq!(p.snapshot().2, 17, "the node is near its target");
        // As the front door waits: a wake-up is a chance, not a promise.
        let waiter = tokio::spawn({
            let p = p.clone();
            async move {
                loop {
                    p.room().await;
                    if let Some(place) = p.try_take() {
                        return place;
                    }
                }
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.observe(Instant::now(), CALM, 1);
        assert_eq!(p.snapshot().2, 19);
        let _new = waiter.await.expect("a waiter takes a new place");
        for _ in 0..100 {
            p.observe(Instant::now(), CALM, 1);
        }
        assert_eq!(p.snapshot().2, 100, "up to the maximum");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_target_places_are_off() {
        let p = Places::new(PlaceConfig {
            min: 1,
            max: 10,
            target_lag: Duration::ZERO,
        });
        let _held: Vec<Place> = (0..10).map(|_| p.try_take().unwrap()).collect();
        p.observe(Instant::now(), LATE, 0);
        assert_eq!(p.snapshot(), (10, 0, 10));
        assert!(!p.enabled());
    }
}
