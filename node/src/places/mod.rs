//! Places for callers' connections: under a surge the node serves fewer
//! terminals well instead of every terminal badly.
//!
//! A caller that never backs off keeps its connection's streams full; when
//! its calls expire it cancels them, and every cancellation frees a stream
//! for its next (already stale) call. So whatever a stream limit holds back
//! still reaches the node, one stale call at a time, and the node spends
//! itself reading, decrypting and cancelling calls nobody will wait for.
//! Waiting costs the node nothing only where it does not look: in callers
//! that may not open a stream, in callers that have no connection, and in
//! the kernel's queue of connections not yet accepted.
//!
//! So terminals' connections hold a *place*, and the number of busy
//! connections the node serves follows how late its own work runs (its
//! scheduling delay). When the delay passes its target, the newest busy
//! connections are *paused*, more of them the later the node runs: the node
//! tells their callers that they may open no new stream (an HTTP/2 stream
//! limit of zero, [`wire`]), the calls they have open finish, and their next
//! calls wait in their own processes. The connection may have the judge
//! that decides write a pause itself ([`Seat::on_pause`]): the
//! connection's own task would write it only when the terminals' runtime
//! next runs it, and a runtime that runs late holds every pause back while
//! the callers go on sending. Resumes and other limits are left to the
//! connection's task: a caller given its streams back sends at once every
//! call it queued meanwhile, and callers resumed all at the moment the
//! judge decided brought the surge straight back. Idle connections are
//! never paused:
//! that would relieve nothing. A pause closes nothing and leaves nothing
//! unread, so undoing it costs one frame: places come back first to paused
//! connections, the most recently paused first, then to new connections,
//! whose handshakes wait until the node has room for them (a terminal let
//! through before, to learn who was calling, is paused at once); slowly
//! while the node reads nearly as much from its callers as when it last
//! fell behind, faster while it reads less. A caller that opens streams
//! its limit does not allow is closed. Nodes, admins and auditors need no
//! place.
//!
//! While places are cut, the connections still served may open fewer
//! streams (`surge_concurrent_streams`): a caller that never backs off
//! queues its calls in order, and a caller that may keep many open at the
//! node keeps the node's own queue long, so that what the node answers
//! comes back late, and the caller's next calls wait longer still. With few
//! open, the node's queue stays short and the rest expire in the callers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

mod pulse;
pub mod wire;

pub use pulse::watch;

/// How places are sized.
#[derive(Clone, Copy, Debug)]
pub struct PlaceConfig {
    /// Places never fall below this.
    pub min: usize,
    /// Places at most (and at start).
    pub max: usize,
    /// Scheduling delay above which places are cut; zero: places off.
    pub target_lag: Duration,
    /// Streams a terminal may open at once on a connection that is not
    /// paused (`limits.max_concurrent_streams`).
    pub streams: u32,
    /// The same while places are cut (`limits.surge_concurrent_streams`):
    /// a caller that may have few calls open at the node queues the rest
    /// in its own process, where they expire at no cost to the node, so
    /// the node's own queue, and every call's wait in it, stays short.
    pub surge_streams: u32,
}

/// After a cut, how long the node waits before judging again: the work
/// queued before the cut takes a moment to drain.
const COOL_DOWN: Duration = Duration::from_millis(300);
/// Share of places kept at a cut when the delay is just above its target;
/// the further above, the deeper the cut, down to [`DEEPEST_CUT`].
const CUT: f64 = 0.9;
/// Share of places kept at a cut however late the node runs: a surge of
/// ten times its capacity is cut to its size in a few readings.
const DEEPEST_CUT: f64 = 0.5;
/// Growth per reading while the node keeps up, and while it is nearly idle.
/// Slow: a paused caller given its streams back sends at once every call
/// it queued meanwhile (up to its deadline's worth), so places given back
/// too fast would bring the surge straight back.
const GROWTH: f64 = 1.02;
const FAST_GROWTH: f64 = 1.1;
/// Growth per reading, however idle the node, while it reads from its
/// callers nearly as much as when it last fell behind (from [`NEAR_BELOW`]
/// to [`NEAR_ABOVE`] of the bytes a second it read then): it fell behind
/// there once, and the callers resumed on the way back send what they
/// queued meanwhile, so that the node's delay shows the surplus only
/// readings after it was let in. Growing there as fast as far below it
/// overshot it within a second and the next cut halved places again, at 2x
/// and 5x of capacity every two or three seconds. Judged by the number of
/// busy connections instead, the slow zone fell with every cut (each
/// connection sends a few calls a second, so a cut from few busy
/// connections set it lower still), and the node grew back by 1% a reading
/// while it served half its capacity.
const NEAR_GROWTH: f64 = 1.01;
const NEAR_BELOW: f64 = 0.85;
const NEAR_ABOVE: f64 = 1.1;
/// How long after a cut new connections may be let in: each costs a full
/// handshake, so the node does not let in connections it may have to shut
/// out again at once.
const SETTLE: Duration = Duration::from_secs(1);
/// A connection whose caller sends less than this (bytes a second) is idle:
/// pausing it would relieve nothing.
const BUSY_BYTES_PER_SEC: f64 = 64.0;
/// How long after the last cut, with no connection paused, the surge counts
/// as over and connections get their full stream limit back.
const SURGE_OVER: Duration = Duration::from_secs(5);

/// What the node lets a connection with a place do now.
pub struct Seat {
    /// Streams its caller may open at once: zero while paused.
    streams: AtomicU32,
    /// The connection's task, woken when `streams` changes.
    changed: AtomicWaker,
    /// Bytes read from the connection, ever: how busy its caller is.
    read: AtomicU64,
    /// Tells the caller it is paused without waiting for the connection's
    /// task, if the connection can.
    announcer: std::sync::OnceLock<Announcer>,
}

/// Writes a pause (a stream limit of zero) to a connection's caller.
pub type Announcer = Box<dyn Fn() + Send + Sync>;

impl Seat {
    fn new(streams: u32) -> Arc<Seat> {
        Arc::new(Seat {
            streams: AtomicU32::new(streams),
            changed: AtomicWaker::new(),
            read: AtomicU64::new(0),
            announcer: std::sync::OnceLock::new(),
        })
    }

    /// The stream limit its caller is to have now; `cx` is woken when it
    /// changes.
    pub fn poll_streams(&self, cx: &mut Context<'_>) -> u32 {
        self.changed.register(cx.waker());
        self.streams.load(Ordering::Acquire)
    }

    /// Counts `bytes` read from the connection.
    pub fn note_read(&self, bytes: usize) {
        self.read.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Has `announce` called at each pause, once the judge has let go of
    /// the places: the connection may tell its caller at once.
    pub fn on_pause(&self, announce: Announcer) {
        let _ = self.announcer.set(announce);
    }

    /// Sets the stream limit its caller is to have (zero: paused); true if
    /// it changed.
    fn allow(&self, streams: u32) -> bool {
        let changed = self.streams.swap(streams, Ordering::AcqRel) != streams;
        if changed {
            self.changed.wake();
        }
        changed
    }

    /// Tells the caller it is paused, if the connection can.
    fn announce_pause(&self) {
        if let Some(announce) = self.announcer.get() {
            announce();
        }
    }
}

/// A seat as the places see it: how fast its caller sends.
struct Held {
    seat: Arc<Seat>,
    /// The seat's bytes read at the last reading.
    seen: u64,
    /// Bytes a second its caller sent, averaged over recent readings.
    rate: f64,
}

impl Held {
    fn new(seat: Arc<Seat>) -> Held {
        Held {
            seat,
            seen: 0,
            rate: 0.0,
        }
    }

    /// Whether its caller sends enough to be worth pausing: an idle
    /// connection costs nothing, and pausing it would relieve nothing.
    fn busy(&self) -> bool {
        self.rate >= BUSY_BYTES_PER_SEC
    }
}

pub struct Places {
    inner: Mutex<Inner>,
    room: Notify,
    config: PlaceConfig,
}

struct Inner {
    /// Busy connections the node reads at once.
    limit: f64,
    /// Connections being read, by when they took their place: the newest
    /// is paused first.
    serving: BTreeMap<u64, Held>,
    /// Of `serving`, those busy at the last reading (and new ones).
    busy: usize,
    /// Paused connections by when paused (the newest resumed first), with
    /// their ids.
    paused: BTreeMap<u64, (u64, Held)>,
    /// Pause order of each paused id.
    pause_of: HashMap<u64, u64>,
    next: u64,
    last_cut: Option<Instant>,
    last_reading: Option<Instant>,
    /// Streams a serving connection may open now: fewer during a surge.
    streams: u32,
    /// Bytes a second read from serving connections, over recent
    /// readings.
    read_rate: f64,
    /// `read_rate` when places were last cut (zero: never).
    fell_behind_at: f64,
    /// Seats paused while the lock was held, to announce after it.
    paused_now: Vec<Arc<Seat>>,
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
        match inner.serving.remove(&self.id) {
            Some(held) => {
                if held.busy() || held.seen == 0 {
                    inner.busy = inner.busy.saturating_sub(1);
                }
            }
            None => {
                if let Some(order) = inner.pause_of.remove(&self.id) {
                    inner.paused.remove(&order);
                }
            }
        }
        if inner.has_room() {
            // The newest waiter is the one most likely still there.
            self.places.room.notify_last();
        }
    }
}

impl Inner {
    fn limit(&self) -> usize {
        self.limit.round() as usize
    }

    /// Whether the node reads from its callers nearly as much as when it
    /// last fell behind.
    fn near_last_cut(&self) -> bool {
        let at = self.fell_behind_at;
        at > 0.0 && (NEAR_BELOW * at..=NEAR_ABOVE * at).contains(&self.read_rate)
    }

    /// Whether a new connection may take a place now.
    fn has_room(&self) -> bool {
        self.busy < self.limit() && self.paused.is_empty()
    }

    /// Updates every serving connection's rate from its bytes read since
    /// the last reading, and recounts the busy ones.
    fn measure(&mut self, now: Instant) {
        let elapsed = self
            .last_reading
            .map(|at| now.saturating_duration_since(at).as_secs_f64());
        self.last_reading = Some(now);
        let Some(elapsed) = elapsed.filter(|e| *e > 0.0) else {
            return;
        };
        let mut busy = 0;
        let mut total = 0.0;
        for held in self.serving.values_mut() {
            let read = held.seat.read.load(Ordering::Relaxed);
            let rate = read.saturating_sub(held.seen) as f64 / elapsed;
            // A new connection's first reading is its rate; then an average
            // over a few readings, so that one quiet moment is not idleness.
            held.rate = if held.seen == 0 {
                rate
            } else {
                0.5 * held.rate + 0.5 * rate
            };
            held.seen = read.max(1);
            busy += usize::from(held.busy());
            total += held.rate;
        }
        self.busy = busy;
        self.read_rate = total;
    }

    /// Pauses the newest busy connections until no more than the limit
    /// are busy (in one pass: a cut may pause hundreds).
    fn pause_newest_busy(&mut self) {
        let excess = self.busy.saturating_sub(self.limit());
        let newest: Vec<u64> = self
            .serving
            .iter()
            .rev()
            .filter(|(_, held)| held.busy())
            .take(excess)
            .map(|(id, _)| *id)
            .collect();
        for id in newest {
            let Some(held) = self.serving.remove(&id) else {
                continue;
            };
            self.pause(id, held);
            self.busy = self.busy.saturating_sub(1);
        }
    }

    /// Pauses connection `id`, as the most recently paused.
    fn pause(&mut self, id: u64, held: Held) {
        if held.seat.allow(0) {
            self.paused_now.push(held.seat.clone());
        }
        let order = self.next;
        self.next += 1;
        self.pause_of.insert(id, order);
        self.paused.insert(order, (id, held));
    }

    /// Gives every serving connection `streams` (paused ones get it when
    /// resumed).
    fn set_streams(&mut self, streams: u32) {
        if self.streams == streams {
            return;
        }
        self.streams = streams;
        for held in self.serving.values() {
            held.seat.allow(streams);
        }
    }

    fn resume_newest(&mut self) -> bool {
        let Some((_, (id, held))) = self.paused.pop_last() else {
            return false;
        };
        self.pause_of.remove(&id);
        held.seat.allow(self.streams);
        self.busy += 1;
        self.serving.insert(id, held);
        true
    }
}

impl Places {
    pub fn new(config: PlaceConfig) -> Arc<Places> {
        let config = PlaceConfig {
            min: config.min.max(1),
            max: config.max.max(config.min.max(1)),
            // A surge never allows more streams than calm does.
            surge_streams: config.surge_streams.min(config.streams),
            ..config
        };
        Arc::new(Places {
            inner: Mutex::new(Inner {
                limit: config.max as f64,
                serving: BTreeMap::new(),
                busy: 0,
                paused: BTreeMap::new(),
                pause_of: HashMap::new(),
                next: 0,
                last_cut: None,
                last_reading: None,
                streams: config.streams,
                read_rate: 0.0,
                fell_behind_at: 0.0,
                paused_now: Vec::new(),
            }),
            room: Notify::new(),
            config,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether places are in force at all.
    pub fn enabled(&self) -> bool {
        !self.config.target_lag.is_zero()
    }

    /// (serving, paused, limit) now.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.serving.len(), inner.paused.len(), inner.limit())
    }

    /// A place for a new connection, if one is free and no paused
    /// connection is waiting to be resumed. A new connection counts as busy
    /// until its first reading says otherwise.
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        let mut inner = self.lock();
        if !inner.has_room() {
            return None;
        }
        let id = inner.next;
        inner.next += 1;
        let seat = Seat::new(inner.streams);
        inner.serving.insert(id, Held::new(seat.clone()));
        inner.busy += 1;
        Some(Place {
            places: self.clone(),
            id,
            seat,
        })
    }

    /// A place, paused at once, for a terminal the node let through to its
    /// handshake without one (to learn who was calling: nodes, admins and
    /// auditors need none). The handshake is paid for by then: closing the
    /// connection would only bring its caller back for another, every time
    /// the node lets one through, for as long as places stay cut. Paused,
    /// it costs nothing more, and it is resumed like any paused connection:
    /// as the one paused last, first.
    pub fn take_paused(self: &Arc<Self>) -> Place {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        let seat = Seat::new(0);
        inner.pause(id, Held::new(seat.clone()));
        Place {
            places: self.clone(),
            id,
            seat,
        }
    }

    /// Waits until a place may be free (another waiter may take it first).
    pub async fn room(&self) {
        let notified = self.room.notified();
        {
            if self.lock().has_room() {
                return;
            }
        }
        notified.await;
    }

    /// One reading of the node's scheduling delay, with `waiting` new
    /// connections waiting for a place: cuts places (pausing the newest connections) or gives them back
    /// (resuming the most recently paused first, then letting new ones in).
    pub fn observe(&self, now: Instant, lag: Duration, waiting: usize) {
        let (free, paused) = {
            let mut inner = self.lock();
            let free = self.decide(&mut inner, now, lag, waiting);
            (free, std::mem::take(&mut inner.paused_now))
        };
        for seat in paused {
            seat.announce_pause();
        }
        // One wake-up per new place, not a stampede of every waiter.
        for _ in 0..free {
            self.room.notify_last();
        }
    }

    /// [`Self::observe`] under the lock: how many new connections may be
    /// let in.
    fn decide(&self, inner: &mut Inner, now: Instant, lag: Duration, waiting: usize) -> usize {
        let target = self.config.target_lag;
        if target.is_zero() {
            return 0;
        }
        inner.measure(now);
        let since_cut = inner.last_cut.map(|at| now.saturating_duration_since(at));
        if since_cut.is_some_and(|d| d < COOL_DOWN) {
            return 0;
        }
        if lag > target {
            // Cut from the connections busy now (not from a limit set while
            // fewer callers were sending), in proportion to how late the
            // node runs.
            let base = inner.busy as f64;
            inner.fell_behind_at = inner.read_rate;
            let keep = (target.as_secs_f64() / lag.as_secs_f64()).clamp(DEEPEST_CUT, CUT);
            inner.limit = (base * keep).max(self.config.min as f64);
            inner.last_cut = Some(now);
            inner.pause_newest_busy();
            inner.set_streams(self.config.surge_streams);
            return 0;
        }
        if inner.paused.is_empty() && since_cut.is_some_and(|d| d >= SURGE_OVER) {
            inner.set_streams(self.config.streams);
        }
        if lag < target / 2 {
            // The node keeps up with every connection busy now.
            inner.limit = inner.limit.max(inner.busy as f64);
        }
        let admit_new = waiting > 0 && lag < target / 5 && since_cut.is_none_or(|d| d >= SETTLE);
        if lag >= target / 2 || (inner.paused.is_empty() && !admit_new) {
            return 0;
        }
        let growth = if inner.near_last_cut() {
            NEAR_GROWTH
        } else if lag < target / 5 {
            FAST_GROWTH
        } else {
            GROWTH
        };
        let grown = (inner.limit * growth).max(inner.limit + 1.0);
        inner.limit = grown.min(self.config.max as f64);
        while inner.busy < inner.limit() && inner.resume_newest() {}
        if !admit_new || !inner.paused.is_empty() {
            return 0;
        }
        inner.limit().saturating_sub(inner.busy).min(waiting)
    }
}

#[cfg(test)]
mod tests;
