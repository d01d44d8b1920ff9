//! How full the load generator's own cores were during a step. On a small
//! machine the generator can run out of CPU before the node does (at 10x
//! of a fast node it sends tens of thousands of TLS calls a second, beside
//! the peer province and the admin, from what the node leaves of the
//! machine); its calls then leave late and come back late, and the step
//! measures the generator, not the node. Sampled from `/proc/stat` every
//! 250 ms on a thread of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// A quarter second a core set counts as full in: busy this share of it.
const FULL: f64 = 0.95;
const SAMPLE: Duration = Duration::from_millis(250);

/// The cores this process may run on (`Cpus_allowed_list` of
/// `/proc/self/status`, e.g. `0`, `0-1` or `0,2-3`); empty if unknown.
pub fn own() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(parse_list)
        .unwrap_or_default()
}

fn parse_list(list: &str) -> Vec<usize> {
    let mut cores = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(from), Ok(to)) = (from.trim().parse::<usize>(), to.trim().parse::<usize>()) {
            cores.extend(from..=to);
        }
    }
    cores
}

/// Busy and total clock ticks of `cores`, ever, from `/proc/stat`'s text
/// (idle and iowait count as not busy).
fn ticks(stat: &str, cores: &[usize]) -> (u64, u64) {
    let (mut busy, mut total) = (0, 0);
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(core) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !cores.contains(&core) {
            continue;
        }
        let values: Vec<u64> = fields.filter_map(|v| v.parse().ok()).collect();
        let all: u64 = values.iter().sum();
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        busy += all - idle.min(all);
        total += all;
    }
    (busy, total)
}

/// Whether the cores were full between two readings of [`ticks`]. A
/// reading that failed (all zero) or went backwards counts as not full.
fn full_between(last: (u64, u64), now: (u64, u64)) -> bool {
    let busy = now.0.saturating_sub(last.0);
    let total = now.1.saturating_sub(last.1);
    total > 0 && busy as f64 >= FULL * total as f64
}

/// Counts the quarter seconds in which `cores` were full, until
/// [`Watch::full_secs`] (or until dropped).
pub struct Watch {
    stop: Arc<AtomicBool>,
    /// Quarter seconds found full so far; `None`: no cores to watch.
    full: Option<Arc<AtomicU32>>,
}

impl Watch {
    pub fn start(cores: Vec<usize>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let full = (!cores.is_empty()).then(|| {
            let full = Arc::new(AtomicU32::new(0));
            let (stop, counted) = (stop.clone(), full.clone());
            std::thread::spawn(move || {
                let read = || {
                    ticks(
                        &std::fs::read_to_string("/proc/stat").unwrap_or_default(),
                        &cores,
                    )
                };
                let mut last = read();
                loop {
                    std::thread::sleep(SAMPLE);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = read();
                    if full_between(last, now) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    last = now;
                }
            });
            full
        });
        Watch { stop, full }
    }

    /// Seconds in which the cores were full since the start (whole quarter
    /// seconds); `None` if there were none to watch. Returns at once: the
    /// thread ends at its next wake-up.
    pub fn full_secs(self) -> Option<f64> {
        let quarters = self.full.as_ref()?.load(Ordering::Relaxed);
        Some(f64::from(quarters) * SAMPLE.as_secs_f64())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_list_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_list("0\n"), vec![0]);
        assert_eq!(parse_list("0-1"), vec![0, 1]);
        assert_eq!(parse_list("0,2-3,7"), vec![0, 2, 3, 7]);
        assert_eq!(parse_list(""), Vec::<usize>::new());
    }

    #[test]
    fn only_the_cores_asked_for_count_and_idle_time_is_not_busy() {
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\n\
                    cpu0 50 0 50 300 0 0 0 0 0 0\n\
                    cpu1 50 0 50 400 100 0 0 0 0 0\n\
                    intr 12345\n";
        assert_eq!(ticks(stat, &[0]), (100, 400));
        assert_eq!(ticks(stat, &[1]), (100, 600));
        assert_eq!(ticks(stat, &[0, 1]), (200, 1000));
        assert_eq!(ticks(stat, &[2]), (0, 0));
    }

    #[test]
    fn a_quarter_is_full_at_95_percent_busy_and_a_failed_reading_is_not() {
        assert!(full_between((100, 400), (195, 500)));
        assert!(full_between((100, 400), (200, 500)));
        assert!(!full_between((100, 400), (194, 500)));
        assert!(!full_between((100, 400), (100, 400)), "no time passed");
        assert!(!full_between((100, 400), (0, 0)), "/proc/stat not read");
    }
}
