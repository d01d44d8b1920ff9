//! The load history behind the console's charts: every [`SAMPLE_EVERY`] the
//! node reads its own Prometheus exposition and keeps one sample (calls/s
//! by class, refusals/s by reason, p50/p99 latency, connections,
//! handshakes/s) in a ring holding the last hour. Reading the exposition
//! rather than the metric handles means the charts show exactly what
//! Prometheus would, and pick up metrics added later without code here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// One sample per this interval.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: one hour. Memory stays bounded: about 1 KiB a sample,
/// 2 MiB in all.
pub const SAMPLES_KEPT: usize = 3600 / 2;

/// One point of every chart.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// When it was taken, unix ms.
    pub t: i64,
    /// Series name (`calls/serving`, `refused/queue_timeout`, `p99_ms`, …) to value.
    pub v: BTreeMap<String, f64>,
}

/// Series name to its cumulative value (counters and histogram buckets).
type Totals = HashMap<String, f64>;

/// The ring of samples and the counter totals of the previous reading.
#[derive(Default)]
pub struct LoadHistory {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    previous: Option<(i64, Totals)>,
}

impl LoadHistory {
    /// Takes a sample from the exposition `text`, read at `now_ms`.
    pub fn record(&self, text: &str, now_ms: i64) {
        let reading = Reading::parse(text);
        let mut inner = self.inner.lock().expect("load history lock");
        let mut v = reading.gauges;
        if let Some((then, previous)) = &inner.previous {
            let dt = (now_ms - then) as f64 / 1000.0;
            if dt > 0.0 {
                for (name, total) in &reading.counters {
                    let before = previous.get(name).copied().unwrap_or(0.0);
                    if let Some(series) = name.strip_prefix("rate:") {
                        v.insert(series.to_owned(), ((total - before) / dt).max(0.0));
                    }
                }
                let buckets = bucket_deltas(&reading.counters, previous);
                for (q, series) in [(0.5, "p50_ms"), (0.99, "p99_ms")] {
                    if let Some(seconds) = quantile(&buckets, q) {
                        v.insert(series.to_owned(), seconds * 1000.0);
                    }
                }
            }
        }
        inner.previous = Some((now_ms, reading.counters));
        if inner.samples.len() == SAMPLES_KEPT {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample { t: now_ms, v });
    }

    /// Samples taken after `since` (unix ms), oldest first.
    pub fn since(&self, since: i64) -> Vec<Sample> {
        let inner = self.inner.lock().expect("load history lock");
        inner
            .samples
            .iter()
            .filter(|s| s.t > since)
            .cloned()
            .collect()
    }
}

/// What one reading of the exposition yields: gauges as they are, counters
/// and buckets as totals to difference with the next reading.
#[derive(Default)]
struct Reading {
    gauges: BTreeMap<String, f64>,
    /// `rate:<series>` for counters charted as rates, `le:<bound>` for the
    /// request latency histogram summed over methods.
    counters: Totals,
}

impl Reading {
    fn parse(text: &str) -> Reading {
        let mut r = Reading::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = split_line(line) else {
                continue;
            };
            let label = |key: &str| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
            let series = match name {
                "hufu_admitted_total" => label("class").map(|c| format!("rate:calls/{c}")),
                // Refusals by reason where the node labels them so, else by class.
                "hufu_shed_total" => label("reason")
                    .or(label("class"))
                    .map(|r| format!("rate:refused/{r}")),
                "hufu_tls_handshakes_total" => {
                    label("kind").map(|k| format!("rate:handshakes/{k}"))
                }
                "hufu_handshake_failures_total" => Some("rate:handshakes/failed".to_owned()),
                "hufu_request_duration_seconds_bucket" => label("le").map(|le| format!("le:{le}")),
                "hufu_connections" => {
                    r.gauges.insert("connections".into(), value);
                    None
                }
                "hufu_in_flight" => {
                    r.gauges.insert("in_flight".into(), value);
                    None
                }
                "hufu_admission_queued" => {
                    r.gauges.insert("queued".into(), value);
                    None
                }
                _ => None,
            };
            if let Some(series) = series {
                *r.counters.entry(series).or_default() += value;
            }
        }
        r
    }
}

/// A sample line's metric name, labels and value.
type SampleLine<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// `name{k="v",…} value` → its parts; None for anything else.
fn split_line(line: &str) -> Option<SampleLine<'_>> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let labels = rest
        .strip_suffix('}')?
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.trim_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

/// Requests per latency bucket upper bound (cumulative) since the previous reading.
fn bucket_deltas(now: &Totals, before: &Totals) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = now
        .iter()
        .filter_map(|(name, total)| {
            let le = name.strip_prefix("le:")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let delta = total - before.get(name).copied().unwrap_or(0.0);
            Some((bound, delta.max(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative `buckets`, interpolated within its
/// bucket; None when no request finished.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP hufu_admitted requests admitted
hufu_admitted_total{class="serving"} 100
hufu_shed_total{class="serving",reason="queue_timeout"} 0
hufu_in_flight 3
hufu_request_duration_seconds_bucket{le="0.001",method="Verify"} 0
hufu_request_duration_seconds_bucket{le="0.01",method="Verify"} 0
hufu_request_duration_seconds_bucket{le="+Inf",method="Verify"} 0
"#;
    const AFTER: &str = r#"hufu_admitted_total{class="serving"} 300
hufu_shed_total{class="serving",reason="queue_timeout"} 20
hufu_in_flight 5
hufu_request_duration_seconds_bucket{le="0.001",method="Verify"} 100
hufu_request_duration_seconds_bucket{le="0.01",method="Verify"} 200
hufu_request_duration_seconds_bucket{le="+Inf",method="Verify"} 200
"#;

    #[test]
    fn rates_and_latency_come_from_two_readings() {
        let history = LoadHistory::default();
        history.record(BEFORE, 0);
        history.record(AFTER, 2000);
        let samples = history.since(0);
        assert_eq!(samples.len(), 1, "only samples after t=0");
        let v = &samples[0].v;
        assert_eq!(v["calls/serving"], 100.0);
        assert_eq!(v["refused/queue_timeout"], 10.0);
        assert_eq!(v["in_flight"], 5.0);
        // Half the requests within 1 ms, all within 10 ms.
        assert!((v["p50_ms"] - 1.0).abs() < 1e-9, "{}", v["p50_ms"]);
        assert!((v["p99_ms"] - 9.82).abs() < 1e-6, "{}", v["p99_ms"]);
    }

    #[test]
    fn the_ring_keeps_one_hour() {
        let history = LoadHistory::default();
        for i in 0..SAMPLES_KEPT as i64 + 10 {
            history.record(BEFORE, i * 2000);
        }
        let samples = history.since(i64::MIN);
        assert_eq!(samples.len(), SAMPLES_KEPT);
        assert_eq!(samples[0].t, 10 * 2000);
    }
}
