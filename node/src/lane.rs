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
