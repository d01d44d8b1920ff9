//! The places' rules, on a clock the tests move by hand.

use std::task::Poll;

use super::pulse::READING;
use super::*;
use std::sync::atomic::AtomicUsize;
use tokio_util::sync::CancellationToken;

fn places(max: usize) -> Arc<Places> {
    Places::new(PlaceConfig {
        min: 2,
        max,
        target_lag: Duration::from_millis(20),
        streams: STREAMS,
        surge_streams: SURGE_STREAMS,
    })
}

const STREAMS: u32 = 8;
const SURGE_STREAMS: u32 = 2;
const CALM: Duration = Duration::from_millis(1);
/// Five times the target: the deepest cut, to half.
const LATE: Duration = Duration::from_millis(100);
/// Just above the target: a cut of a tenth.
const A_LITTLE_LATE: Duration = Duration::from_millis(21);

/// The stream limit its caller has now.
fn streams(place: &Place) -> u32 {
    let waker = futures::task::noop_waker();
    place.seat.poll_streams(&mut Context::from_waker(&waker))
}

/// Whether its caller may open streams.
fn open(place: &Place) -> bool {
    streams(place) > 0
}

fn take(p: &Arc<Places>, n: usize) -> Vec<Place> {
    (0..n)
        .map(|_| p.try_take().expect("a free place"))
        .collect()
}

/// One reading's worth of time in which every connection of `busy` not
/// paused sends `bytes_per_sec` (the others nothing: a paused caller may
/// open no stream).
async fn send(p: &Arc<Places>, busy: &[Place], bytes_per_sec: usize) {
    if p.lock().last_reading.is_none() {
        p.observe(Instant::now(), CALM, 0);
    }
    tokio::time::advance(READING).await;
    // Read without registering a waker: the connection's task may wait on
    // its seat.
    for place in busy
        .iter()
        .filter(|place| place.seat.streams.load(Ordering::Acquire) > 0)
    {
        place.seat.note_read(bytes_per_sec / 10);
    }
}

/// The readings of a cool-down after a cut, every connection of `busy` not
/// paused sending `bytes_per_sec` meanwhile, but its last: the judge reads
/// the callers every [`READING`] while it waits.
async fn cool_down(p: &Arc<Places>, busy: &[Place], bytes_per_sec: usize) {
    for _ in 1..COOL_DOWN.as_millis() / READING.as_millis() {
        send(p, busy, bytes_per_sec).await;
        p.observe(Instant::now(), CALM, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_newest_busy_connections_are_paused_when_the_node_runs_late() {
    let p = places(100);
    let held = take(&p, 10);
    // The two newest are idle: pausing them would relieve nothing.
    send(&p, &held[..8], 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    // Cut to half of the 8 busy, not of the limit of 100.
    assert_eq!(p.snapshot(), (6, 4, 4));
    let open_now: Vec<bool> = held.iter().map(open).collect();
    assert_eq!(
        open_now,
        [vec![true; 4], vec![false; 4], vec![true; 2]].concat()
    );
    assert!(p.try_take().is_none(), "no new place while some are paused");
    // A closed connection frees its place, paused or not.
    drop(held);
    assert_eq!(p.snapshot(), (0, 0, 4));
}

#[tokio::test(start_paused = true)]
async fn the_cut_is_deeper_the_later_the_node_runs() {
    let p = places(1000);
    let held = take(&p, 100);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    assert_eq!(p.snapshot().2, 90);
    tokio::time::advance(COOL_DOWN).await;
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot().2, 45);
}

/// 200 connections sending 10,000 bytes a second each, cut to half by a
/// late reading; then, each served one sending `bytes_per_sec`, the limit
/// after the cut and after each of `readings` calm readings past its
/// cool-down.
async fn limits_after_a_cut(bytes_per_sec: usize, readings: usize) -> Vec<usize> {
    let p = places(1000);
    let held = take(&p, 200);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot().2, 100, "half of the 200 busy");
    cool_down(&p, &held, bytes_per_sec).await;
    let mut limits = vec![100];
    for _ in 0..readings {
        send(&p, &held, bytes_per_sec).await;
        p.observe(Instant::now(), CALM, 0);
        limits.push(p.snapshot().2);
    }
    limits
}

#[tokio::test(start_paused = true)]
async fn places_grow_back_fast_far_below_where_the_node_fell_behind_and_slowly_near_it() {
    let limits = limits_after_a_cut(10_000, 20).await;
    for pair in limits.windows(2) {
        let (before, after) = (pair[0] as f64, pair[1] as f64);
        if before >= 200.0 {
            // Every paused connection is back.
            continue;
        }
        if before < 170.0 {
            // Far below: a tenth a reading.
            assert!(after >= before * 1.09, "{limits:?}");
        } else if before <= 220.0 {
            // Reading from 0.85 to 1.1 of what the node read when it fell
            // behind: a hundredth, at least one.
            assert!(after <= before * 1.01 + 1.0, "{limits:?}");
            assert!(after > before, "{limits:?}");
        }
    }
    assert!(limits.iter().any(|&l| l >= 170), "{limits:?}");
}

#[tokio::test(start_paused = true)]
async fn places_grow_back_fast_while_callers_send_less_than_when_the_node_fell_behind() {
    // Each caller now sends a fifth as much (a surge of fewer calls a
    // connection): near the 200 busy connections of the cut the node
    // reads far less than it did then, so places still grow by a tenth.
    let limits = limits_after_a_cut(2_000, 8).await;
    for pair in limits.windows(2) {
        assert!(pair[1] as f64 >= pair[0] as f64 * 1.09, "{limits:?}");
    }
    assert!(limits.iter().any(|&l| l >= 200), "{limits:?}");
}

#[tokio::test(start_paused = true)]
async fn a_paused_connection_is_resumed_before_new_ones_are_let_in() {
    let p = places(100);
    let held = take(&p, 20);
    // Callers that send slowly: pausing them is cheap, and undone first.
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    assert_eq!(p.snapshot(), (18, 2, 18));
    // The connection's task learns of its resumption.
    let resumed = tokio::spawn({
        let seat = held[18].seat.clone();
        futures::future::poll_fn(move |cx| match seat.poll_streams(cx) {
            0 => Poll::Pending,
            _ => Poll::Ready(()),
        })
    });
    tokio::task::yield_now().await;
    cool_down(&p, &held, 1_000).await;
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), CALM, 5);
    // The 18 served send nine tenths of what the 20 sent when the node fell
    // behind: places grow by one a reading, the newest paused is resumed
    // first; nobody new yet.
    assert_eq!(p.snapshot(), (19, 1, 19));
    assert!(open(&held[18]) && !open(&held[19]));
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), CALM, 5);
    assert_eq!(p.snapshot(), (20, 0, 20));
    assert!(held.iter().all(open));
    resumed.await.unwrap();
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_terminal_let_through_without_a_place_waits_paused_and_is_resumed_first() {
    let p = places(100);
    let held = take(&p, 20);
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    assert_eq!(p.snapshot(), (18, 2, 18));
    // Let through to its handshake while places are cut: it is a terminal.
    let late = p.take_paused();
    assert!(!open(&late), "it may open no stream yet");
    assert_eq!(p.snapshot(), (18, 3, 18));
    assert!(p.try_take().is_none(), "still no room for new connections");
    cool_down(&p, &held, 1_000).await;
    send(&p, &held, 1_000).await;
    // The node reads nine tenths of what it read when it fell behind: one
    // place a reading, to the one paused last.
    p.observe(Instant::now(), CALM, 0);
    assert_eq!(p.snapshot(), (19, 2, 19));
    assert!(open(&late), "the one paused last is resumed first");
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), CALM, 0);
    // The terminal resumed sent nothing, so it is not busy: places (for
    // busy connections) grow to 20, and both paused holders are resumed.
    assert_eq!(p.snapshot(), (21, 0, 20));
    assert!(held.iter().all(open));
    assert_eq!(streams(&late), SURGE_STREAMS);
    // Closed while paused, or while served: either frees its place.
    drop(late);
    drop(held);
    assert_eq!(p.snapshot(), (0, 0, 20));
}

#[tokio::test(start_paused = true)]
async fn a_cut_waits_for_the_queued_work_to_drain_before_the_next() {
    let p = places(1000);
    let held = take(&p, 100);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot().2, 50);
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot().2, 50, "still cooling down");
    tokio::time::advance(COOL_DOWN).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot().2, 25);
}

#[tokio::test(start_paused = true)]
async fn places_never_fall_below_the_minimum() {
    let p = places(100);
    let held = take(&p, 3);
    for _ in 0..10 {
        send(&p, &held, 10_000).await;
        tokio::time::advance(COOL_DOWN).await;
        p.observe(Instant::now(), LATE, 0);
    }
    assert_eq!(p.snapshot().2, 2);
}

#[tokio::test(start_paused = true)]
async fn new_connections_are_let_in_only_while_they_wait_and_the_node_has_headroom() {
    let p = places(100);
    let held = take(&p, 20);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    drop(held);
    assert_eq!(p.snapshot(), (0, 0, 18));
    tokio::time::advance(COOL_DOWN).await;
    let held = take(&p, 18);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), CALM, 1);
    assert_eq!(p.snapshot().2, 18, "too soon after a cut");
    tokio::time::advance(SETTLE).await;
    p.observe(Instant::now(), CALM, 0);
    assert_eq!(p.snapshot().2, 18, "nobody waits");
    p.observe(Instant::now(), Duration::from_millis(5), 1);
    assert_eq!(p.snapshot().2, 18, "the node is near its target");
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
    // The node reads far less than when it fell behind: a tenth more.
    assert_eq!(p.snapshot().2, 20);
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
        streams: STREAMS,
        surge_streams: SURGE_STREAMS,
    });
    let held = take(&p, 10);
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot(), (10, 0, 10));
    assert!(!p.enabled());
}

#[tokio::test(start_paused = true)]
async fn callers_that_start_sending_while_the_node_keeps_up_are_not_cut_for_an_old_limit() {
    let p = places(1000);
    let held = take(&p, 100);
    // A few callers overload the node; then all of them send, calmly.
    send(&p, &held[..10], 3_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(p.snapshot(), (95, 5, 5));
    tokio::time::advance(COOL_DOWN).await;
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), CALM, 0);
    assert!(held.iter().all(open), "the paused are resumed");
    assert!(p.snapshot().2 >= 100, "the limit follows the busy callers");
    // A slight overload now cuts a tenth of them, not all but five.
    tokio::time::advance(COOL_DOWN).await;
    send(&p, &held, 1_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    assert_eq!(p.snapshot(), (90, 10, 90));
}

#[tokio::test(start_paused = true)]
async fn during_a_surge_connections_may_open_fewer_streams_until_it_is_over() {
    let p = places(100);
    let held = take(&p, 10);
    assert!(held.iter().all(|place| streams(place) == STREAMS));
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), A_LITTLE_LATE, 0);
    // Those still served, and a connection that comes in now, get the
    // surge's limit; the paused none.
    let limits: Vec<u32> = held.iter().map(streams).collect();
    assert_eq!(limits, [vec![SURGE_STREAMS; 9], vec![0]].concat());
    // Given back while the surge lasts: the surge's limit.
    tokio::time::advance(COOL_DOWN).await;
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), CALM, 0);
    assert!(held.iter().all(|place| streams(place) == SURGE_STREAMS));
    tokio::time::advance(SETTLE).await;
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), CALM, 1);
    assert!(
        held.iter().all(|place| streams(place) == SURGE_STREAMS),
        "too soon"
    );
    let newcomer = p.try_take().expect("a free place");
    assert_eq!(streams(&newcomer), SURGE_STREAMS);
    // Calm, with nobody paused, long enough after the last cut: the full
    // limit again, for everyone.
    tokio::time::advance(SURGE_OVER).await;
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), CALM, 0);
    assert!(held.iter().all(|place| streams(place) == STREAMS));
    assert_eq!(streams(&newcomer), STREAMS);
    assert_eq!(streams(&p.try_take().expect("a free place")), STREAMS);
}

/// The scheduling delay the judge last read, 500 ms into a hold of 800 ms
/// of the probe's runtime (its only thread blocked), with the judge on a
/// runtime of its own or beside the probe.
fn reading_while_held(judge_apart: bool) -> Duration {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let (terminals, lane) = (runtime(), runtime());
    let metrics = crate::metrics::Metrics::new();
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    {
        let _inside = terminals.enter();
        watch(
            places(100),
            Arc::new(AtomicUsize::new(0)),
            metrics.clone(),
            stop.clone(),
            &tasks,
            judge_apart.then(|| lane.handle()),
        );
    }
    // Readings of a runtime at ease first.
    std::thread::sleep(Duration::from_millis(300));
    terminals.spawn(async { std::thread::sleep(Duration::from_millis(800)) });
    std::thread::sleep(Duration::from_millis(500));
    let read = Duration::from_secs_f64(metrics.scheduling_delay.get());
    stop.cancel();
    std::thread::sleep(Duration::from_millis(400));
    read
}

#[test]
fn a_judge_apart_reads_a_held_runtime_as_late_while_it_is_held() {
    let apart = reading_while_held(true);
    assert!(
        apart >= Duration::from_millis(200),
        "the judge on its own runtime read {apart:?} into a hold of the probe's"
    );
    // Beside the probe, the judge is held too: its last reading is from
    // before the hold.
    let beside = reading_while_held(false);
    assert!(
        beside < Duration::from_millis(100),
        "the judge beside the probe read {beside:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn every_pause_is_announced_once_the_judge_has_let_go_of_the_places() {
    let p = places(100);
    let held = take(&p, 4);
    let heard: Vec<Arc<AtomicUsize>> = held
        .iter()
        .map(|place| {
            let heard = Arc::new(AtomicUsize::new(0));
            let (count, places) = (heard.clone(), Arc::downgrade(&p));
            place.seat.on_pause(Box::new(move || {
                // Called with the places free: a connection's writer may
                // take whatever lock it needs.
                let places = places.upgrade().expect("the places");
                assert!(places.inner.try_lock().is_ok());
                count.fetch_add(1, Ordering::SeqCst);
            }));
            heard
        })
        .collect();
    let said = || -> Vec<usize> { heard.iter().map(|h| h.load(Ordering::SeqCst)).collect() };
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    // Half of the four paused, each announced once; the other two given
    // the surge's limit, which their own tasks write.
    assert_eq!(said(), vec![0, 0, 1, 1]);
    assert_eq!(streams(&held[0]), SURGE_STREAMS);
    // In the cool-down nothing changes, nothing is said.
    send(&p, &held, 10_000).await;
    p.observe(Instant::now(), LATE, 0);
    assert_eq!(said(), vec![0, 0, 1, 1]);
    // Calm: the paused come back, left to their own tasks to say.
    cool_down(&p, &held, 10_000).await;
    for _ in 0..3 {
        send(&p, &held, 10_000).await;
        p.observe(Instant::now(), CALM, 0);
    }
    assert!(held.iter().all(open));
    assert_eq!(said(), vec![0, 0, 1, 1]);
}
