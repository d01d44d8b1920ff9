//! The control lane: a runtime of its own for the connections of admins,
//! auditors and other provinces' nodes, beside the one that serves
//! terminals.
//!
//! In a surge the terminals' runtime is saturated by design: it serves as
//! many calls as the node's CPU allows and sheds the rest. Every call on it
//! then waits its turn behind a thousand connections' work at each of its
//! steps (reading its request, each hop back from a blocking thread, its
//! answer), and a status write, which makes several such hops through the
//! audit log and the store, took longer than its caller's deadline (at 5x,
//! no write in 101 was acknowledged within 1 s). On a runtime of its own,
//! a control call competes with the terminals' runtime only as one thread
//! beside its threads, in the kernel's scheduler, which shares the node's
//! CPU between runnable threads; and its socket is watched by its own
//! runtime's reactor, not by one polled between terminals' work.
//!
//! The judge of terminals' places (the places module's `watch`) runs here too:
//! it must see the terminals' runtime fall behind while it is behind.

use std::io;

use tokio::runtime::{Builder, Handle, Runtime};

/// The name of the threads of the runtime that serves terminals (the
/// `hufu` command's own): [`lower_terminals`] finds them by it.
pub const TERMINALS_THREAD: &str = "hufu-rt";

/// Lowers the kernel's priority of the terminals' runtime's threads (named
/// [`TERMINALS_THREAD`]): their nice value becomes the process's own plus
/// `by` (at most 19), leaving the control lane's, the audit log's and the
/// store's at the node's own. Within the node's CPU share the kernel then
/// runs a runnable status write, feed or witness call before the
/// terminals' work (CFS weights, about three to one at 5 apart), while
/// terminals get every moment the control side does not use. A write makes
/// several hops between threads (the lane, the audit log's writer, the
/// store's log threads) and waited at each behind the terminals' runtime,
/// which a surge keeps busy by design. Threads the terminals' runtime
/// starts later (its blocking threads) take the priority of the thread
/// that starts them. Returns how many threads were changed; Linux only
/// (elsewhere, none).
pub fn lower_terminals(by: i32) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        // Relative to the process's main thread, which is never lowered: a
        // process that starts several nodes (the demo) sets the same value
        // each time, and a node started at a lower priority keeps its
        // terminals below its control side.
        let base = rustix::process::getpriority_process(Some(rustix::process::getpid()))?;
        let mut changed = 0;
        for task in std::fs::read_dir("/proc/self/task")? {
            let task = task?;
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != TERMINALS_THREAD {
                continue;
            }
            let tid = task.file_name().to_string_lossy().parse::<i32>().ok();
            let Some(tid) = tid.and_then(rustix::process::Pid::from_raw) else {
                continue;
            };
            // Linux keeps a nice value per thread: a thread's id names that
            // thread alone.
            rustix::process::setpriority_process(Some(tid), (base + by).min(19))?;
            changed += 1;
        }
        Ok(changed)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = by;
        Ok(0)
    }
}

/// A runtime for control connections. Dropping it stops its tasks without
/// waiting for them; a node drops it last, once its connections and tasks
/// have ended.
pub struct ControlLane {
    runtime: Option<Runtime>,
}

impl ControlLane {
    /// A lane of `threads` threads; 0: one per core the node may use.
    /// One thread held an import at 10,000,000 holders to what that thread
    /// could decode and stage, and replication below its rate on the
    /// terminals' runtime.
    pub fn new(threads: usize) -> io::Result<ControlLane> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("hufu-control")
            .enable_all()
            .build()?;
        Ok(ControlLane {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> Handle {
        self.runtime
            .as_ref()
            .expect("the control lane runs until dropped")
            .handle()
            .clone()
    }
}

impl Drop for ControlLane {
    fn drop(&mut self) {
        // A runtime dropped from within another waits for its tasks and
        // panics there; this one's work is over or abandoned by then.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The nice value of the calling thread.
    fn own_nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("thread stat");
        // Fields after the command's closing parenthesis; nice is the 19th
        // field of the line, the 17th after it.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        after
            .split(' ')
            .nth(16)
            .expect("nice")
            .parse()
            .expect("a number")
    }

    #[test]
    fn only_the_terminals_threads_are_lowered() {
        let terminals = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(TERMINALS_THREAD)
            .build()
            .unwrap();
        let lane = ControlLane::new(1).unwrap();
        let terminal_nice =
            || terminals.block_on(async { tokio::spawn(async { own_nice() }).await.unwrap() });
        let lane_nice = || {
            terminals.block_on(async { lane.handle().spawn(async { own_nice() }).await.unwrap() })
        };
        let base = rustix::process::getpriority_process(Some(rustix::process::getpid())).unwrap();
        let lane_before = lane_nice();
        assert!(
            lower_terminals(3).unwrap() >= 1,
            "the terminals' worker is found"
        );
        assert_eq!(terminal_nice(), (base + 3).min(19));
        // Twice, as a process with several nodes does: the same value.
        lower_terminals(3).unwrap();
        assert_eq!(terminal_nice(), (base + 3).min(19));
        assert_eq!(lane_nice(), lane_before, "the lane keeps its priority");
    }
}
