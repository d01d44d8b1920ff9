//! The surge's load: an open-loop schedule over many connections, as a
//! crowd of terminals and phones would send it. Each connection offers its
//! share of the rate on a fixed schedule whether or not earlier calls have
//! returned; every call carries a deadline counted from its scheduled time,
//! and its latency is measured from that time too, so that waiting in the
//! caller is not hidden.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use tonic::Code;
use tonic::transport::Channel;

use crate::loadgen::histogram;
use hufu_node::peers::{AdaptiveThrottle, draw};

/// How a caller behaves under refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// Never backs off; gives up at its deadline; its channel reconnects
    /// after a connection error. Most callers in a real surge.
    Naive,
    /// Hufu's own client: honours `grpc-retry-pushback-ms` and throttles
    /// itself adaptively (SRE book) when most calls are refused.
    Hufu,
}

/// One call: given a channel and the time left, the call's outcome.
pub type Call = Arc<
    dyn Fn(Channel, u64, Duration) -> BoxFuture<'static, Result<(), tonic::Status>> + Send + Sync,
>;

/// What one step of load saw, from the callers' side.
pub struct StepLoad {
    pub offered: u64,
    pub sent: u64,
    /// Calls a Hufu client did not send (push-back, throttling).
    pub held_back: u64,
    /// OK within the deadline.
    pub good: u64,
    pub codes: BTreeMap<String, u64>,
    /// The first message seen with each code, to say what it was.
    pub messages: BTreeMap<String, String>,
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
    /// Per [`SLICE`] of the step, by scheduled time: calls offered, and
    /// calls answered OK within the step's prompt latency.
    pub slices: Vec<Slice>,
}

/// The share of the step whose calls [`StepLoad::slices`] counts together.
pub const SLICE: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, Default)]
pub struct Slice {
    pub offered: u64,
    pub prompt: u64,
}

impl StepLoad {
    fn new(elapsed: Duration) -> StepLoad {
        StepLoad {
            offered: 0,
            sent: 0,
            held_back: 0,
            good: 0,
            codes: BTreeMap::new(),
            messages: BTreeMap::new(),
            latency: histogram(),
            elapsed,
            slices: vec![Slice::default(); slices_in(elapsed)],
        }
    }

    /// How long after the step's start its callers were served as usual
    /// again for good: the start of the first slice from which every slice
    /// had at least 99% of its calls answered OK within the prompt latency.
    /// None if the step's last slice was still not.
    pub fn recovered_after(&self) -> Option<Duration> {
        let normal = |s: &Slice| s.offered > 0 && s.prompt * 100 >= s.offered * 99;
        let from = self
            .slices
            .iter()
            .rposition(|s| !normal(s))
            .map_or(0, |last_bad| last_bad + 1);
        (from < self.slices.len()).then(|| SLICE * from as u32)
    }

    /// Calls that came due a whole deadline late in the generator, which
    /// therefore never sent them.
    pub fn late_at_caller(&self) -> u64 {
        self.codes.get(LATE_AT_CALLER).copied().unwrap_or(0)
    }

    /// Whether the generator fell behind its own schedule in this step:
    /// more than 1% of the calls offered came due a whole deadline late.
    /// Such a step measures the generator as much as the server.
    pub fn generator_fell_behind(&self) -> bool {
        self.late_at_caller() * 100 > self.offered
    }
}

fn slices_in(duration: Duration) -> usize {
    duration.as_millis().div_ceil(SLICE.as_millis()).max(1) as usize
}

fn slice_of(started: Instant, scheduled: Instant, slices: usize) -> usize {
    ((scheduled.saturating_duration_since(started).as_millis() / SLICE.as_millis()) as usize)
        .min(slices - 1)
}

/// When calls count as answered promptly ([`StepLoad::slices`]).
#[derive(Clone, Copy, Debug)]
pub struct Callers {
    pub deadline: Duration,
    pub prompt: Duration,
    pub behaviour: Behaviour,
}

/// What a call that came due a whole deadline late in its caller counts
/// as: the generator fell behind its own schedule, and never sent it.
const LATE_AT_CALLER: &str = "late at caller";

/// Offers `rate` calls a second for `duration` over `conns`, one worker per
/// connection (no task per call: the generator must stay cheaper than the
/// node it loads).
pub async fn open_loop(
    rate: f64,
    duration: Duration,
    callers: Callers,
    conns: &[Channel],
    call: Call,
) -> StepLoad {
    let workers = conns.len().max(1);
    // The step's calls, shared out whole: a connection's share rounded on
    // its own (one call or two in 5 s at a few hundred a second over a
    // thousand connections) offered up to a third more or less than asked.
    let calls = (rate * duration.as_secs_f64()).round() as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, channel) in conns.iter().enumerate() {
        let channel = channel.clone();
        let call = call.clone();
        let share = share(calls, workers, w);
        tasks.push(tokio::spawn(worker(
            channel,
            call,
            w,
            workers,
            share,
            phase(w),
            started,
            duration,
            callers,
        )));
    }
    let mut total = StepLoad::new(duration);
    for task in tasks {
        if let Ok(step) = task.await {
            total.offered += step.offered;
            total.sent += step.sent;
            total.held_back += step.held_back;
            total.good += step.good;
            for (code, message) in step.messages {
                total.messages.entry(code).or_insert(message);
            }
            for (code, n) in step.codes {
                *total.codes.entry(code).or_default() += n;
            }
            let _ = total.latency.add(step.latency);
            for (sum, slice) in total.slices.iter_mut().zip(step.slices) {
                sum.offered += slice.offered;
                sum.prompt += slice.prompt;
            }
        }
    }
    total
}

/// Worker `w`'s part of `calls` shared out whole among `workers`.
fn share(calls: u64, workers: usize, w: usize) -> u64 {
    let workers = workers as u64;
    calls / workers + u64::from((w as u64) < calls % workers)
}

/// Where in its own interval between calls worker `w` sends, from 0 to 1:
/// multiples of the golden ratio's fraction, so that the workers of any
/// consecutive run, such as those [`share`] gives one call more (the
/// first ones), are spread evenly over their interval. Spread by `w` over
/// the number of workers, as until 2026-12-05, the workers with one call
/// more all sent in the first part of their shorter interval and the
/// others in the rest of their longer one, so that the two groups drifted
/// through each other and a step whose calls do not divide evenly among
/// the connections (almost every step) offered between none and twice its
/// rate in turns of a fraction of a second: at 1x of 1,729 calls a second
/// over 1,000 connections, 0 to 3,420 a second in 50 ms windows.
fn phase(w: usize) -> f64 {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    (w as f64 * GOLDEN).fract()
}

/// When, after a step of `duration` began, a worker with `phase` sends
/// call `k` of its `total`, spaced evenly through the step.
fn scheduled_after(k: u64, total: u64, duration: Duration, phase: f64) -> Duration {
    let spacing = duration.as_secs_f64() / total.max(1) as f64;
    Duration::from_secs_f64((k as f64 + phase) * spacing)
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    channel: Channel,
    call: Call,
    w: usize,
    workers: usize,
    total: u64,
    phase: f64,
    started: Instant,
    duration: Duration,
    callers: Callers,
) -> StepLoad {
    let Callers {
        deadline,
        prompt,
        behaviour,
    } = callers;
    let mut step = StepLoad::new(duration);
    let slices = step.slices.len();
    let end = started + duration;
    let at = |k: u64| started + scheduled_after(k, total, duration, phase);
    let mut throttle = AdaptiveThrottle::new(Duration::from_secs(2));
    let mut pushback_until = started;
    let mut inflight = FuturesUnordered::new();
    let mut k = 0u64;
    loop {
        let now = Instant::now();
        while k < total && at(k) <= now {
            let scheduled = at(k);
            k += 1;
            step.offered += 1;
            let slice = slice_of(started, scheduled, slices);
            step.slices[slice].offered += 1;
            if behaviour == Behaviour::Hufu
                && (now < pushback_until || !throttle.allows(now, draw()))
            {
                step.held_back += 1;
                continue;
            }
            let left = deadline.saturating_sub(now - scheduled);
            if left.is_zero() {
                *step.codes.entry(LATE_AT_CALLER.into()).or_default() += 1;
                continue;
            }
            step.sent += 1;
            let call = call(channel.clone(), k * workers as u64 + w as u64, left);
            inflight.push(async move {
                let result = match tokio::time::timeout(left, call).await {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::deadline_exceeded("deadline at caller")),
                };
                (result, scheduled.elapsed(), slice)
            });
        }
        if k >= total && inflight.is_empty() {
            break;
        }
        let next = if k < total { at(k) } else { end + deadline * 2 };
        tokio::select! {
            Some((result, latency, slice)) = inflight.next(), if !inflight.is_empty() => {
                match result {
                    Ok(()) if latency <= deadline => {
                        step.good += 1;
                        if latency <= prompt {
                            step.slices[slice].prompt += 1;
                        }
                        throttle.accepted();
                        let _ = step.latency.record(latency.as_micros().max(1) as u64);
                        *step.codes.entry("OK".into()).or_default() += 1;
                    }
                    Ok(()) => *step.codes.entry("OK, late".into()).or_default() += 1,
                    Err(status) => {
                        if status.code() == Code::ResourceExhausted
                            && let Some(ms) = status
                                .metadata()
                                .get("grpc-retry-pushback-ms")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok())
                        {
                            pushback_until = Instant::now() + Duration::from_millis(ms);
                        }
                        let code = code_name(&status);
                        step.messages
                            .entry(code.clone())
                            .or_insert_with(|| status.message().to_owned());
                        *step.codes.entry(code).or_default() += 1;
                    }
                }
            }
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
    step
}

fn code_name(status: &tonic::Status) -> String {
    match status.code() {
        // tonic's own client timer, at the call's deadline.
        Code::Cancelled if status.message() == "Timeout expired" => "DEADLINE_EXCEEDED".into(),
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED".into(),
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED".into(),
        Code::Unavailable => "UNAVAILABLE".into(),
        Code::Cancelled => "CANCELLED".into(),
        Code::Unknown => "UNKNOWN".into(),
        Code::Internal => "INTERNAL".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{LATE_AT_CALLER, StepLoad, phase, scheduled_after, share};
    use std::time::Duration;

    #[test]
    fn a_step_with_more_than_one_percent_of_its_calls_never_sent_fell_behind() {
        let mut step = StepLoad::new(Duration::from_secs(5));
        step.offered = 1_000;
        assert!(!step.generator_fell_behind(), "none late");
        step.codes.insert(LATE_AT_CALLER.into(), 10);
        assert!(!step.generator_fell_behind(), "1% is within");
        step.codes.insert(LATE_AT_CALLER.into(), 11);
        assert!(step.generator_fell_behind());
        assert_eq!(step.late_at_caller(), 11);
    }

    #[test]
    fn a_steps_calls_are_shared_out_whole_and_all_offered() {
        // 344 calls a second for 5 s over 1,000 connections: 1.72 each,
        // which rounded one by one offered 2,000.
        let parts: Vec<u64> = (0..1000).map(|w| share(1720, 1000, w)).collect();
        assert_eq!(parts.iter().sum::<u64>(), 1720);
        assert!(parts.iter().all(|&p| p == 1 || p == 2));
        assert_eq!((0..7).map(|w| share(3, 7, w)).sum::<u64>(), 3);
    }

    /// The calls a step offers over 1,000 connections, counted in 50 ms
    /// windows: each window within a tenth of the step's rate, whether
    /// or not the calls divide evenly among the connections.
    #[test]
    fn a_steps_calls_are_offered_evenly_through_the_step() {
        let (workers, duration) = (1000usize, Duration::from_secs(5));
        for rate in [1000.0, 1729.0, 3458.0, 1142.0, 21_413.0] {
            let calls = (rate * duration.as_secs_f64()).round() as u64;
            let mut windows = vec![0u32; 100];
            for w in 0..workers {
                let total = share(calls, workers, w);
                for k in 0..total {
                    let at = scheduled_after(k, total, duration, phase(w));
                    windows[(at.as_millis() / 50) as usize] += 1;
                }
            }
            // The first and last windows hold the ends of the intervals.
            for (i, &n) in windows.iter().enumerate().take(98).skip(2) {
                let per_sec = f64::from(n) * 20.0;
                assert!(
                    (per_sec - rate).abs() <= rate / 10.0,
                    "{rate}/s: window {i} offered {per_sec}/s"
                );
            }
        }
    }
}
