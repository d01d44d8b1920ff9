//! Opening a sled database whose file lock may still be held for a moment.
//!
//! sled locks its database file while any of its parts is alive, and its
//! IO threads (shared by every database in the process) finish the last
//! writes of a database after the database itself was dropped. A node
//! restarted in the same process, or a store reopened after a failed write,
//! could then find its own database locked; so could a node whose
//! predecessor process is still exiting. Opening waits a little for the
//! lock before it says that another process holds the database.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long opening waits for a database's file lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// How often opening tries the lock again meanwhile.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Opens the node's database at `path` (the store's or the audit log's),
/// caching up to `cache_bytes`, waiting up to [`LOCK_WAIT`] for its lock.
/// Blocks the calling thread meanwhile.
pub fn open_db(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(cache_bytes);
    open_waiting(&config, LOCK_WAIT)
}

fn open_waiting(config: &sled::Config, wait: Duration) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + wait;
    loop {
        match config.open() {
            Err(sled::Error::Io(err)) if is_locked(&err) => {
                if Instant::now() >= deadline {
                    return Err(sled::Error::Io(std::io::Error::new(
                        err.kind(),
                        format!(
                            "{err}: another process still holds this database after {wait:?} (is a node already running on this data directory?)"
                        ),
                    )));
                }
                std::thread::sleep(RETRY_EVERY);
            }
            other => return other,
        }
    }
}

/// Whether `err` is sled's refusal to open a database locked by another
/// open file (sled 0.34 says so only in the message).
fn is_locked(err: &std::io::Error) -> bool {
    err.to_string().starts_with("could not acquire lock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use fs2::FileExt;

    const CACHE: u64 = 1 << 20;

    /// The lock sled takes on a database at `dir`, held by another open
    /// file as a database not yet let go of holds it.
    fn hold_lock(dir: &std::path::Path) -> std::fs::File {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("db"))
            .unwrap();
        file.try_lock_exclusive().unwrap();
        file
    }

    #[test]
    fn a_database_opens_once_its_lock_is_let_go_of_a_moment_later() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path());
        let db = open_db(dir.path(), CACHE).unwrap();
        db.insert("kept", "yes").unwrap();
        db.flush().unwrap();
        drop(db);

        let held = hold_lock(dir.path());
        assert!(config.open().is_err(), "sled alone refuses a held lock");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let db = open_db(dir.path(), CACHE).expect("opened once the lock was let go of");
        assert_eq!(db.get("kept").unwrap().as_deref(), Some(&b"yes"[..]));
        releaser.join().unwrap();
    }

    #[test]
    fn a_lock_held_on_says_another_process_holds_the_database() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_db(dir.path(), CACHE).unwrap());
        let config = sled::Config::new().path(dir.path());
        let _held = hold_lock(dir.path());
        let err = open_waiting(&config, Duration::from_millis(200)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("could not acquire lock"), "{message}");
        assert!(
            message.contains("is a node already running on this data directory?"),
            "{message}"
        );
    }
}
