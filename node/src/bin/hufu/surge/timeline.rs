//! `--timeline`: the node's places, read from its metrics every 250 ms
//! through a table, so that what a step's row sums up can be seen as it
//! happened: when places were cut and given back, how late the node ran,
//! how many calls reached it and how many of those their callers had
//! already given up on.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::table::{sample, scrape};

const EVERY: Duration = Duration::from_millis(250);

/// The file's header: one row every [`EVERY`].
pub(super) const HEADER: &str = "table\tphase\tsecs\tplaces\tserved\tpaused\twaiting\tdelay_ms\tarrived_per_s\tcancelled_per_s\tlimit_frames_per_s";

/// Gauges as they are, counters as rates between two scrapes.
const GAUGES: [&str; 4] = [
    "hufu_caller_places ",
    "hufu_caller_places_held ",
    "hufu_caller_places_paused ",
    "hufu_caller_places_waiting ",
];
const COUNTERS: [&str; 3] = [
    "hufu_requests_arrived_total ",
    "hufu_requests_cancelled_total ",
    "hufu_stream_limits_sent_total ",
];

/// One row from two scrapes of the node's metrics `secs` apart.
pub(super) fn row(table: &str, phase: &str, at: f64, before: &str, now: &str, secs: f64) -> String {
    let mut row = format!("{table}\t{phase}\t{at:.2}");
    for gauge in GAUGES {
        row.push_str(&format!("\t{:.0}", sample(now, gauge)));
    }
    row.push_str(&format!(
        "\t{:.1}",
        sample(now, "hufu_scheduling_delay_seconds ") * 1e3
    ));
    for counter in COUNTERS {
        let rate = (sample(now, counter) - sample(before, counter)).max(0.0) / secs.max(1e-3);
        row.push_str(&format!("\t{rate:.0}"));
    }
    row
}

/// Writes rows until dropped; [`Timeline::phase`] names the rows that follow.
pub(super) struct Timeline {
    phase: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Timeline {
    /// Appends to `path` (with the header if it is new) the rows of
    /// `table`, from the node whose metrics listen on `metrics`.
    pub(super) fn start(path: &Path, table: &str, metrics: SocketAddr) -> anyhow::Result<Timeline> {
        let fresh = !std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if fresh {
            writeln!(file, "{HEADER}")?;
        }
        let phase = Arc::new(Mutex::new(String::from("start")));
        let task = tokio::spawn({
            let (phase, table) = (phase.clone(), table.to_owned());
            async move {
                let started = Instant::now();
                let mut last: Option<(Instant, String)> = None;
                let mut tick = tokio::time::interval(EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    // A node too busy to answer within a second leaves a
                    // gap in the rows, which is itself a reading.
                    let Ok(Ok(now)) = tokio::time::timeout(EVERY * 4, scrape(metrics)).await else {
                        continue;
                    };
                    let at = Instant::now();
                    if let Some((then, before)) = &last {
                        let phase = phase.lock().map(|p| p.clone()).unwrap_or_default();
                        let secs = at.duration_since(*then).as_secs_f64();
                        let line = row(
                            &table,
                            &phase,
                            (at - started).as_secs_f64(),
                            before,
                            &now,
                            secs,
                        );
                        if writeln!(file, "{line}").is_err() {
                            return;
                        }
                    }
                    last = Some((at, now));
                }
            }
        });
        Ok(Timeline { phase, task })
    }

    /// Names the rows from now on (`capacity`, `step 3 (2x)`, ...).
    pub(super) fn phase(&self, name: &str) {
        if let Ok(mut phase) = self.phase.lock() {
            *phase = name.to_owned();
        }
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{HEADER, row};

    #[test]
    fn a_row_has_the_gauges_as_read_and_the_counters_as_rates() {
        let before = "hufu_requests_arrived_total 100\nhufu_requests_cancelled_total 10\nhufu_stream_limits_sent_total 0\n";
        let now = "hufu_caller_places 120\nhufu_caller_places_held 1000\nhufu_caller_places_paused 880\n\
                   hufu_caller_places_waiting 3\nhufu_scheduling_delay_seconds 0.0625\n\
                   hufu_requests_arrived_total 600\nhufu_requests_cancelled_total 60\nhufu_stream_limits_sent_total 250\n";
        let line = row("naive", "5x", 12.5, before, now, 0.25);
        assert_eq!(
            line,
            "naive\t5x\t12.50\t120\t1000\t880\t3\t62.5\t2000\t200\t1000"
        );
        assert_eq!(
            line.split('\t').count(),
            HEADER.split('\t').count(),
            "a value for every column"
        );
    }
}
