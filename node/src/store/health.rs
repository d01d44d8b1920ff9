//! Whether the store can write, and getting back to writing after a full
//! or failing disk: the failed write's database is dropped (sled keeps the
//! refused write in its cache and fails every later write), a probe file
//! beside it is written until the disk takes it, and the database is opened
//! again from disk. A store that cannot even be opened because its disk is
//! full says so ([`full_disk`]).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Open, Store};
use crate::error::{NodeError, NodeResult};

/// How often a store that cannot write tries again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Bytes a probe writes: room for a few batches of writes.
const PROBE_BYTES: usize = 256 * 1024;

/// The error for a read while the database is being reopened.
pub(super) fn reopening() -> NodeError {
    NodeError::Unavailable(
        "storage is being reopened after a failed write: retry in a moment".into(),
    )
}

impl Store {
    /// Whether writes are accepted now: the disk takes them, and statuses
    /// written are merged into their buckets.
    pub fn writable(&self) -> bool {
        *self.writable.borrow() && !self.unmerged.is_failing()
    }

    /// Follows whether the disk takes writes (see [`writable`](Self::writable)).
    pub fn watch_writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// Follows why merging statuses into their buckets keeps failing, if it
    /// does: writes are refused meanwhile (see [`writable`](Self::writable)).
    pub fn watch_merge_failing(&self) -> watch::Receiver<Option<String>> {
        self.unmerged.watch_failing()
    }

    /// The error for a write refused because [`writable`](Self::writable)
    /// is false, saying why.
    pub(super) fn refusal(&self) -> NodeError {
        match self.unmerged.failing() {
            Some(error) if *self.writable.borrow() => NodeError::Unavailable(format!(
                "the node cannot merge statuses into its storage ({error}): writes are refused until it can; it retries every second by itself, so see the node's log, then send the write again"
            )),
            _ => Self::refused(),
        }
    }

    /// The error for a write while the store cannot write.
    pub(super) fn refused() -> NodeError {
        NodeError::Unavailable(
            "the node cannot write to its disk (full or failing): writes are refused until it can; it retries every second by itself, so free disk space and send the write again".into(),
        )
    }

    /// Refuses writes until a probe finds room on the disk again: for
    /// another component whose write failed on the same disk (the audit
    /// log). The store's own database is untouched and keeps serving reads.
    pub fn refuse_writes(&self, error: &dyn std::fmt::Display) {
        if self.writable.send_replace(false) {
            tracing::error!(%error, "a write failed: writes are refused until the disk can be written again");
        }
        self.failed.notify_one();
    }

    /// Refuses writes until a probe succeeds, and forgets what the failed
    /// write left in sled's cache by dropping the database (reopened by
    /// [`keep_writable`](Self::keep_writable); reads answer `UNAVAILABLE`
    /// until it is).
    pub(super) fn write_failed(&self, error: &dyn std::fmt::Display) {
        if self.writable.send_replace(false) {
            tracing::error!(%error, "storage write failed: writes are refused until the disk can be written again");
        }
        self.poisoned.store(true, Ordering::SeqCst);
        let old = self.open.write().expect("store lock").take();
        // Dropping a database flushes: on the blocking pool, when there is one.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(old))),
            Err(_) => drop(old),
        }
        self.failed.notify_one();
    }

    /// Watches the store until `stop`: after a failed write, reopens the
    /// database from disk and probes it every second until a write succeeds,
    /// then accepts writes again. The change log's tail is read back from
    /// disk, where the refused write never was.
    pub async fn keep_writable(&self, stop: CancellationToken) {
        loop {
            if self.writable() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.failed.notified() => {}
                }
            }
            let mut tail = self.own_writer.lock().await;
            match self.probe().await {
                Ok(()) => match self.tail_from_disk(self.own) {
                    Ok(read) => {
                        *tail = read;
                        drop(tail);
                        self.notify(self.own, read.sequence);
                        self.writable.send_replace(true);
                        tracing::info!("storage writable again: writes are accepted");
                        continue;
                    }
                    Err(err) => tracing::warn!(error = %err, "storage reopened but unreadable"),
                },
                Err(err) => tracing::debug!(error = %err, "storage still cannot write"),
            }
            drop(tail);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    }

    /// Writes and syncs a probe file beside the database (not in sled: a
    /// failed sled write would poison a database that still serves reads),
    /// then reopens the database if a write failed on it.
    async fn probe(&self) -> NodeResult<()> {
        let probe = self.path.join("hufu-probe");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&probe)?;
            let written = file
                .write_all(&[0; PROBE_BYTES])
                .and_then(|()| file.sync_all());
            drop(file);
            std::fs::remove_file(&probe)?;
            written
        })
        .await
        .map_err(|e| NodeError::Internal(format!("probe task: {e}")))?
        .map_err(|e| NodeError::Unavailable(format!("probe write: {e}")))?;
        if self.poisoned.load(Ordering::SeqCst) || self.open.read().expect("store lock").is_none() {
            let old = self.open.write().expect("store lock").take();
            let path = self.path.clone();
            let cache = self.cache_bytes;
            let reopened = tokio::task::spawn_blocking(move || {
                drop(old);
                Open::at(&path, cache)
            })
            .await
            .map_err(|e| NodeError::Internal(format!("reopen task: {e}")))??;
            *self.open.write().expect("store lock") = Some(reopened);
            self.poisoned.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// `err`, from opening a store at `path`, said plainly if the disk holding
/// it is full: how much is free there and what to do, instead of sled's
/// bare "No space left on device".
pub fn full_disk(err: anyhow::Error, path: &Path) -> anyhow::Error {
    let full = err.chain().any(|cause| {
        let io =
            cause
                .downcast_ref::<std::io::Error>()
                .or(match cause.downcast_ref::<sled::Error>() {
                    Some(sled::Error::Io(io)) => Some(io),
                    _ => None,
                });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    if !full {
        return err;
    }
    // The store's directory may not exist yet: ask about its nearest
    // existing ancestor, on the same disk.
    let free = path
        .ancestors()
        .find(|dir| dir.exists())
        .and_then(|dir| fs2::available_space(dir).ok());
    let free = match free {
        Some(bytes) => format!("{} KiB free", bytes / 1024),
        None => "free space unknown".to_string(),
    };
    err.context(format!(
        "the disk holding {} is full ({free}): free space on it, or move the store to a larger disk, then start the node again",
        path.display()
    ))
}
