//! A process held to a share of the machine, so that one 2-core machine can
//! offer a node ten times what it can serve: pinned to the last core with
//! `taskset`, and limited to a percentage of that core by a cgroup v1 `cpu`
//! quota where the cgroup hierarchy is writable (root). The load generator
//! gets the rest ([`GeneratorCores`]): by default the other cores and what
//! the quota leaves of the node's core. The node's cgroup has the highest
//! CPU weight there is, so that on its core it runs whenever it has work
//! and quota left, and the generator only fills the gaps. Kept to one core,
//! the generator ran out of CPU at 10x of a fast node on one machine (its
//! core full through the whole step in one run, which served 0.03 of
//! capacity) and measured itself, not the node; on another it did not, and
//! the node served as much either way, within the machine's spread
//! (`docs/surge.md`, *The generator's cores, on the Intel machine*).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where the load generator runs beside a confined process pinned to a
/// core (`--generator-cores`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GeneratorCores {
    /// Every core, the confined process's too, where it runs only in what
    /// that process leaves (the top CPU weight): the most CPU the machine
    /// can give the generator. Without a cgroup (no quota, no weight) the
    /// other cores, as with `others`: the process may use all of its own.
    All,
    /// Every core but the confined process's, so that none of the bench's
    /// other processes runs there; on two cores the generator has one,
    /// which at 10x of a fast node may not be enough (the table's `full s`
    /// says when).
    Others,
}

/// The core a confined process is pinned to: the last, when there are two
/// or more and `taskset` exists.
fn pinned_core() -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    (cores >= 2 && taskset).then_some(cores - 1)
}

/// Worker threads for the generator's runtime, which starts before the
/// bench places itself: with `others`, one per core it will keep, the
/// cores below the node's (a runtime sized to the whole machine put two
/// threads on the one core left of two, where they could only take
/// turns); otherwise tokio's default, one per core.
pub fn generator_threads(cores: GeneratorCores) -> Option<usize> {
    if cores == GeneratorCores::Others {
        pinned_core()
    } else {
        None
    }
}

/// `[0, 1, 2]` as "cores 0-2", `[0]` as "core 0", `[0, 2]` as "cores 0,2".
/// An empty list (`/proc` unreadable) as "unknown cores".
fn list(cores: &[usize]) -> String {
    let (Some(&a), Some(&b)) = (cores.first(), cores.last()) else {
        return "unknown cores".into();
    };
    if a == b {
        format!("core {a}")
    } else if b > a && b - a + 1 == cores.len() {
        format!("cores {a}-{b}")
    } else {
        let each: Vec<String> = cores.iter().map(|c| c.to_string()).collect();
        format!("cores {}", each.join(","))
    }
}

/// Where and how hard a confined process may run.
#[derive(Clone, Debug)]
pub struct Confinement {
    /// The core the process is pinned to (`None`: not pinned).
    pub core: Option<usize>,
    /// The cgroup limiting it, with its quota in percent of one core.
    pub cgroup: Option<(PathBuf, u32)>,
    /// What was asked for and could not be done, to print.
    pub notes: Vec<String>,
}

const CGROUP_CPU: &str = "/sys/fs/cgroup/cpu";
/// The CFS period: short, so that a 10% share is 1 ms in every 10 ms and
/// the node is never off the CPU for long stretches.
const PERIOD_US: u32 = 10_000;
/// The largest `cpu.shares` cgroup v1 accepts.
const TOP_SHARES: u32 = 262_144;

impl Confinement {
    /// Pins to the last core (when there are two or more and `taskset`
    /// exists) and, for `cpu_percent` below 100, makes a cgroup named
    /// `name` with that quota.
    pub fn new(name: &str, cpu_percent: Option<u32>) -> Confinement {
        let mut notes = Vec::new();
        let core = pinned_core();
        if core.is_none() {
            notes.push("not pinned: needs two or more cores and taskset".into());
        }
        let cgroup = match cpu_percent {
            Some(p) if p < 100 => match make_cgroup(name, p) {
                Ok(dir) => Some((dir, p)),
                Err(why) => {
                    notes.push(format!(
                        "cannot limit the node to {p}% of a core: {why}; it runs unlimited (the limit needs root and the cgroup v1 cpu controller at {CGROUP_CPU})"
                    ));
                    None
                }
            },
            _ => None,
        };
        Confinement {
            core,
            cgroup,
            notes,
        }
    }

    /// No pinning, no limit: a process that shares the caller's cores.
    pub fn unconfined() -> Confinement {
        Confinement {
            core: None,
            cgroup: None,
            notes: Vec::new(),
        }
    }

    /// Places the calling process (the load generator) and says where it
    /// runs. [`GeneratorCores::All`]: on every core when the confined
    /// process has a quota and the top weight on its own (the generator
    /// then has the rest of that core), else on every other core, away
    /// from a process that may use all of its core.
    /// [`GeneratorCores::Others`]: on every other core in any case, so
    /// that nothing but the confined process runs on its core.
    pub fn place_self(&self, cores: GeneratorCores) -> String {
        let Some(core) = self.core else {
            return "load generator on every core".into();
        };
        let away = cores == GeneratorCores::Others || self.cgroup.is_none();
        if away && core > 0 {
            let _ = Command::new("taskset")
                .args([
                    "-a",
                    "-p",
                    "-c",
                    &format!("0-{}", core - 1),
                    &std::process::id().to_string(),
                ])
                .stdout(Stdio::null())
                .status();
        }
        // Read back, not assumed: `taskset` may be refused, and the bench
        // itself may have been started on fewer cores.
        let own = super::cores::own();
        match (own.contains(&core), &self.cgroup) {
            (true, Some(_)) => format!(
                "load generator on {}, with what the node leaves of its own",
                list(&own)
            ),
            (true, None) => format!("load generator on {}, the node's among them", list(&own)),
            (false, _) => format!("load generator on {}, off the node's", list(&own)),
        }
    }

    pub fn describe(&self) -> String {
        let cpu = match &self.cgroup {
            Some((_, p)) => format!("{p}% of one core (cgroup cpu quota)"),
            None => "unlimited CPU".into(),
        };
        match (self.core, &self.cgroup) {
            (Some(c), Some(_)) => format!(
                "pinned to core {c}, {cpu}, first call on that core (the highest cgroup cpu weight)"
            ),
            (Some(c), None) => format!("pinned to core {c}, {cpu}"),
            (None, _) => cpu,
        }
    }

    /// Starts `exe args` inside the confinement, with stderr to `log`. The
    /// process joins its cgroup before it execs, so every thread it ever
    /// starts is limited.
    pub fn spawn(&self, exe: &Path, args: &[&str], log: &Path) -> anyhow::Result<Confined> {
        let mut script = String::from("set -e; ");
        if let Some((dir, _)) = &self.cgroup {
            script.push_str(&format!("echo $$ > '{}/cgroup.procs'; ", dir.display()));
        }
        script.push_str("exec \"$@\"");
        let mut command = Command::new("sh");
        command.arg("-c").arg(script).arg("sh");
        if let Some(core) = self.core {
            command.args(["taskset", "-c", &core.to_string()]);
        }
        let child = command
            .arg(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        Ok(Confined(child))
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if let Some((dir, _)) = &self.cgroup {
            // Empty once its processes have exited.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn make_cgroup(name: &str, percent: u32) -> Result<PathBuf, String> {
    let dir = Path::new(CGROUP_CPU).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), value).map_err(|e| format!("{file}: {e}"))
    };
    let settings = write("cpu.cfs_period_us", PERIOD_US.to_string())
        // The highest weight cgroup v1 takes: the process runs whenever it
        // has work and quota left, ahead of the load generator on its core.
        .and_then(|()| write("cpu.shares", TOP_SHARES.to_string()))
        .and_then(|()| {
            write(
                "cpu.cfs_quota_us",
                (PERIOD_US * percent.max(1) / 100).max(1000).to_string(),
            )
        });
    match settings {
        Ok(()) => Ok(dir),
        Err(why) => {
            // Not left behind half set: the caller runs unconfined.
            let _ = std::fs::remove_dir(&dir);
            Err(why)
        }
    }
}

/// A confined child process; killed when dropped.
pub struct Confined(Child);

impl Drop for Confined {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time and memory of a process, from procfs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_secs: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

impl Confined {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn usage(&self) -> Usage {
        usage(self.pid())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

/// CPU time and memory of process `pid`.
pub fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, fields 14 and 15, in clock ticks (USER_HZ, 100 on
    // Linux); the command name before them may contain spaces.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    Usage {
        cpu_secs: ticks / 100.0,
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
    }
}

#[cfg(test)]
mod tests {
    use super::list;

    #[test]
    fn cores_are_listed_as_taskset_would_take_them() {
        assert_eq!(list(&[0]), "core 0");
        assert_eq!(list(&[0, 1, 2]), "cores 0-2");
        assert_eq!(list(&[0, 2]), "cores 0,2");
        assert_eq!(list(&[]), "unknown cores");
    }
}
