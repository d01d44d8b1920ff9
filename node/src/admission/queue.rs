//! The admission queue: calls beyond the concurrency limit wait here, newest
//! first, for at most as long as their deadline allows, and are refused the
//! moment they cannot finish in time. A waiting call keeps its HTTP/2 stream
//! open, so a caller that has filled its connection's stream limit waits in
//! its own process, at no cost to the node.
//!
//! Newest first (LIFO) because under overload the oldest waiters are the
//! ones whose callers are about to give up: serving them would spend the
//! node on answers nobody reads. A slot freed by a finished call goes to the
//! most important class first (federation, serving, bulk).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Class;
use super::limit::{Gradient, LimitBounds};

/// Why a call was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full.
    QueueFull,
    /// The call waited as long as a call without a deadline may.
    Waited,
    /// The call's deadline passed while it waited (its caller has most
    /// likely cancelled it already, and this answer is never sent).
    Expired,
    /// Its deadline is too close for the call to finish, even if run now.
    Deadline,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::Waited => "waited",
            Refusal::Expired => "expired",
            Refusal::Deadline => "deadline",
        }
    }
}

/// How the queue is sized.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Fixed in-flight limit, or `None` for the adaptive one.
    pub fixed_limit: Option<usize>,
    /// Bounds of the adaptive limit.
    pub bounds: LimitBounds,
    /// Calls waiting at once, across classes.
    pub max_queued: usize,
    /// Longest wait of a call that carries no deadline.
    pub max_wait: Duration,
}

/// How long past its deadline a waiting call is kept for its caller to
/// cancel it.
const EXPIRY_GRACE: Duration = Duration::from_millis(50);

pub struct Queue {
    inner: Mutex<Inner>,
    config: QueueConfig,
}

struct Inner {
    in_flight: usize,
    /// In flight per class.
    running: [usize; 3],
    limit: Limit,
    /// Waiters per class by arrival (the newest has the highest id), so that
    /// the newest is served and a cancelled one leaves, in O(log n).
    waiting: [BTreeMap<u64, oneshot::Sender<()>>; 3],
    queued: usize,
    next_id: u64,
    /// Average time a call takes once admitted, in seconds.
    service_secs: f64,
}

enum Limit {
    Fixed(usize),
    Adaptive(Gradient),
}

impl Limit {
    fn get(&self) -> usize {
        match self {
            Limit::Fixed(n) => *n,
            Limit::Adaptive(g) => g.limit(),
        }
    }
}

fn index(class: Class) -> usize {
    match class {
        Class::Federation => 0,
        Class::Serving => 1,
        Class::Bulk => 2,
    }
}

impl Inner {
    fn cap(&self, class: Class) -> usize {
        (self.limit.get() * class.share() / 100).max(1)
    }

    /// Slots bulk work keeps however busy the node is, so that an
    /// operator's writes go through a surge: a tenth of the limit.
    fn bulk_reserve(&self) -> usize {
        (self.limit.get() / 10).max(1)
    }

    fn take(&mut self, class: Class) {
        self.in_flight += 1;
        self.running[index(class)] += 1;
    }

    /// Hands free slots to waiters, newest waiter first. Federation first;
    /// then bulk work up to its reserve; then serving; then bulk up to its
    /// share. Runs under the lock, so a grant and its slot are one.
    fn grant(&mut self) {
        let reserve = self.bulk_reserve();
        self.grant_class(Class::Federation, usize::MAX);
        self.grant_class(Class::Bulk, reserve);
        self.grant_class(Class::Serving, usize::MAX);
        self.grant_class(Class::Bulk, usize::MAX);
    }

    /// Grants waiters of `class` while the node and the class (below
    /// `running_below` of its own) have room.
    fn grant_class(&mut self, class: Class, running_below: usize) {
        let i = index(class);
        while self.in_flight < self.limit.get().max(1)
            && (self.in_flight < self.cap(class) || self.running[i] < self.bulk_reserve_of(class))
            && self.running[i] < running_below
        {
            let Some((_, grant)) = self.waiting[i].pop_last() else {
                break;
            };
            self.queued -= 1;
            if grant.send(()).is_ok() {
                self.take(class);
            }
        }
    }

    /// The reserve of `class`: only bulk work has one.
    fn bulk_reserve_of(&self, class: Class) -> usize {
        if class == Class::Bulk {
            self.bulk_reserve()
        } else {
            0
        }
    }

    /// Whether a new call of `class` may run now, without waiting.
    fn has_room(&self, class: Class) -> bool {
        let i = index(class);
        self.waiting[i].is_empty()
            && self.in_flight < self.limit.get().max(1)
            && (self.in_flight < self.cap(class) || self.running[i] < self.bulk_reserve_of(class))
    }

    fn remove(&mut self, class: Class, id: u64) -> bool {
        let removed = self.waiting[index(class)].remove(&id).is_some();
        if removed {
            self.queued -= 1;
        }
        removed
    }
}

impl Queue {
    pub fn new(config: QueueConfig) -> Arc<Queue> {
        let limit = match config.fixed_limit {
            Some(n) => Limit::Fixed(n.max(1)),
            None => Limit::Adaptive(Gradient::new(config.bounds)),
        };
        Arc::new(Queue {
            inner: Mutex::new(Inner {
                in_flight: 0,
                running: [0; 3],
                limit,
                waiting: Default::default(),
                queued: 0,
                next_id: 0,
                service_secs: 0.0,
            }),
            config,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (in flight, limit, waiting) now.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.in_flight, inner.limit.get(), inner.queued)
    }

    /// Admits a call of `class` that must be answered by `deadline`,
    /// waiting for a slot if need be.
    pub async fn admit(
        self: &Arc<Self>,
        class: Class,
        deadline: Option<Instant>,
    ) -> Result<Slot, Refusal> {
        let now = Instant::now();
        let (id, rx, give_up) = {
            let mut inner = self.lock();
            let service = Duration::from_secs_f64(inner.service_secs);
            if let Some(deadline) = deadline
                && deadline <= now + service
            {
                return Err(Refusal::Deadline);
            }
            if inner.has_room(class) {
                inner.take(class);
                return Ok(self.slot(class, inner.in_flight));
            }
            if inner.queued >= self.config.max_queued {
                return Err(Refusal::QueueFull);
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let (tx, rx) = oneshot::channel();
            inner.waiting[index(class)].insert(id, tx);
            inner.queued += 1;
            // A waiter whose caller gives up at its deadline is left for the
            // caller to cancel: a cancellation costs the node less than an
            // answer. The grace covers clocks and the caller's own timer.
            let longest = now + self.config.max_wait;
            let give_up = match deadline {
                Some(d) if d + EXPIRY_GRACE < longest => (d + EXPIRY_GRACE, Refusal::Expired),
                _ => (longest, Refusal::Waited),
            };
            (id, rx, give_up)
        };
        let mut wait = Waiting {
            queue: self.clone(),
            class,
            id,
            rx: Some(rx),
        };
        let granted = tokio::select! {
            biased;
            r = wait.rx.as_mut().expect("receiver") => r.is_ok(),
            _ = tokio::time::sleep_until(give_up.0) => {
                let mut inner = self.lock();
                if inner.remove(class, id) {
                    wait.rx = None;
                    return Err(give_up.1);
                }
                // Granted between the timer and the lock: take the slot.
                drop(inner);
                wait.rx.as_mut().expect("receiver").try_recv().is_ok()
            }
        };
        wait.rx = None;
        if granted {
            let in_flight = self.lock().in_flight;
            Ok(self.slot(class, in_flight))
        } else {
            Err(give_up.1)
        }
    }

    fn slot(self: &Arc<Self>, class: Class, in_flight: usize) -> Slot {
        Slot {
            queue: self.clone(),
            class,
            admitted: Instant::now(),
            in_flight,
            measure: true,
        }
    }

    fn release(&self, class: Class, measured: Option<(Duration, usize)>) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        let i = index(class);
        inner.running[i] = inner.running[i].saturating_sub(1);
        if let Some((latency, in_flight)) = measured {
            let secs = latency.as_secs_f64();
            inner.service_secs += (secs - inner.service_secs) / 100.0;
            if let Limit::Adaptive(g) = &mut inner.limit {
                g.record(latency, in_flight);
            }
        }
        inner.grant();
    }
}

/// A call waiting for a slot; if the call is dropped while waiting (its
/// caller cancelled), it leaves the queue, and a slot granted meanwhile is
/// handed on.
struct Waiting {
    queue: Arc<Queue>,
    class: Class,
    id: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut inner = self.queue.lock();
        if !inner.remove(self.class, self.id) && rx.try_recv().is_ok() {
            drop(inner);
            self.queue.release(self.class, None);
        }
    }
}

/// A call's place among those in flight; freed when dropped.
pub struct Slot {
    queue: Arc<Queue>,
    class: Class,
    admitted: Instant,
    in_flight: usize,
    measure: bool,
}

impl Slot {
    /// Long calls (streams) say nothing about the node's latency.
    pub fn unmeasured(mut self) -> Slot {
        self.measure = false;
        self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let measured = self
            .measure
            .then(|| (self.admitted.elapsed(), self.in_flight));
        self.queue.release(self.class, measured);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(limit: usize, max_queued: usize) -> Arc<Queue> {
        Queue::new(QueueConfig {
            fixed_limit: Some(limit),
            bounds: LimitBounds {
                initial: limit,
                min: 1,
                max: limit,
            },
            max_queued,
            max_wait: Duration::from_secs(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_deadline_cannot_be_met_is_refused_before_it_runs() {
        let q = queue(4, 10);
        let past = Instant::now();
        assert_eq!(
            q.admit(Class::Serving, Some(past)).await.err(),
            Some(Refusal::Deadline)
        );
        assert_eq!(q.snapshot().0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_newest_first_and_expire_with_their_deadline() {
        let q = queue(1, 10);
        let held = q.admit(Class::Serving, None).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        let old = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Serving, Some(deadline)).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let new = tokio::spawn({
            let q = q.clone();
            async move {
                q.admit(Class::Serving, None)
                    .await
                    .map(|s| (s, Instant::now()))
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.snapshot().2, 2);
        drop(held);
        let (newest, admitted_at) = new.await.unwrap().unwrap();
        assert!(admitted_at < deadline);
        // The older waiter got nothing and expired with its deadline.
        assert_eq!(old.await.unwrap().err(), Some(Refusal::Expired));
        assert!(Instant::now() <= deadline + EXPIRY_GRACE);
        drop(newest);
        assert_eq!(q.snapshot(), (0, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_a_deadline_waits_at_most_the_longest_wait() {
        let q = queue(1, 10);
        let _held = q.admit(Class::Serving, None).await.unwrap();
        let started = Instant::now();
        assert_eq!(
            q.admit(Class::Serving, None).await.err(),
            Some(Refusal::Waited)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let q = queue(1, 1);
        let _held = q.admit(Class::Serving, None).await.unwrap();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Serving, None).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            q.admit(Class::Serving, None).await.err(),
            Some(Refusal::QueueFull)
        );
        waiter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_and_frees_its_grant() {
        let q = queue(1, 10);
        let held = q.admit(Class::Serving, None).await.unwrap();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Serving, None).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(q.snapshot().2, 0);
        drop(held);
        assert_eq!(q.snapshot().0, 0);
        let _again = q.admit(Class::Serving, None).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_work_waits_while_the_node_is_over_its_share() {
        let q = queue(10, 10);
        let mut held = Vec::new();
        for _ in 0..9 {
            held.push(q.admit(Class::Serving, None).await.unwrap());
        }
        let bulk = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Bulk, None).await.map(drop) }
        });
        // Federation may still use the last slot.
        let fed = q.admit(Class::Federation, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!bulk.is_finished(), "bulk may fill only half the limit");
        drop(fed);
        held.truncate(4);
        assert!(bulk.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_work_keeps_its_reserve_through_a_serving_surge() {
        let q = queue(10, 100);
        let mut held = Vec::new();
        for _ in 0..9 {
            held.push(q.admit(Class::Serving, None).await.unwrap());
        }
        let _federation = q.admit(Class::Federation, None).await.unwrap();
        // Serving callers keep waiting for every freed slot...
        let mut crowd = Vec::new();
        for _ in 0..20 {
            let q = q.clone();
            crowd.push(tokio::spawn(async move {
                q.admit(Class::Serving, None).await.map(drop)
            }));
        }
        let admin = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Bulk, None).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!admin.is_finished(), "the node is full");
        // ...but the first slot freed goes to the admin's write.
        held.pop();
        let slot = admin
            .await
            .unwrap()
            .expect("bulk admitted within its reserve");
        drop(slot);
        for c in crowd {
            c.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_federation_waiters_first() {
        let q = queue(2, 10);
        let first = q.admit(Class::Federation, None).await.unwrap();
        let _second = q.admit(Class::Federation, None).await.unwrap();
        let serving = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Serving, None).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let federation = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Class::Federation, None).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(first);
        assert!(federation.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!serving.is_finished());
        serving.abort();
    }
}
