//! Snapshots of a province's feed, one format for two uses: a member (or a
//! relay) catching up on a province whose change log was compacted
//! (`GetSnapshot`), and a replica of this province catching up past what
//! the write log keeps (`GetReplicaSnapshot`, which adds the write log
//! position and the keyring).
//!
//! A snapshot is a stream of [`SnapshotPart`]s: the first carries the head
//! it ends at (signed by the issuer) and, when the caller is behind the
//! compacted part, that part's signed statement; then the kept changes of
//! the compacted part; then the changes after it (or after the caller's
//! position), in bounded messages. The receiver checks both signatures
//! against the issuer's log key, the kept changes against the statement's
//! digest and the rest against the head's chain hash ([`install`]).

use std::time::Duration;

use anyhow::Context;
use hufu_certs::Province;
use hufu_federation::feed::Change;
use hufu_proto::v1::{FeedHead, SnapshotPart, StatusChange};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::NodeResult;
use crate::store::install::statement_of;
use crate::store::{Store, Tail, head_of};

/// Changes in one message of a snapshot at most (about 100 bytes each).
pub const CHUNK_CHANGES: usize = 4096;

/// Streams a snapshot of `p`'s feed after `after`, ending at `head` (held
/// here up to it), into messages made by `wrap` (the first part, then the
/// others, each with `true` for the first).
pub fn spawn_parts<M: Send + 'static>(
    store: std::sync::Arc<Store>,
    p: Province,
    after: u64,
    head: FeedHead,
    tasks: &TaskTracker,
    stop: CancellationToken,
    wrap: impl Fn(SnapshotPart, bool) -> M + Send + Sync + 'static,
) -> NodeResult<mpsc::Receiver<Result<M, tonic::Status>>> {
    let base = store.base(p)?.filter(|b| after < b.through());
    let end = head.sequence;
    let (tx, rx) = mpsc::channel(2);
    tasks.spawn(async move {
        let first = SnapshotPart {
            head: Some(head),
            base: base.as_ref().map(|b| b.snapshot.clone()),
            ..SnapshotPart::default()
        };
        let send = |part: SnapshotPart, first: bool| {
            let tx = tx.clone();
            let stop = stop.clone();
            let message = wrap(part, first);
            async move {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    sent = tx.send(Ok(message)) => sent.is_ok(),
                }
            }
        };
        let fail = |err: crate::error::NodeError| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Err(err.into())).await;
            }
        };
        if !send(first, true).await {
            return;
        }
        let mut at = after;
        if let Some(base) = &base {
            let mut kept_after = 0;
            loop {
                let kept = match store.kept_changes(p, base, kept_after, CHUNK_CHANGES) {
                    Ok(kept) => kept,
                    Err(err) => return fail(err).await,
                };
                let Some((last, _)) = kept.last() else { break };
                kept_after = *last;
                let part = SnapshotPart {
                    kept: to_messages(kept),
                    ..SnapshotPart::default()
                };
                if !send(part, false).await {
                    return;
                }
            }
            at = base.through();
        }
        while at < end {
            let changes = match store.changes(p, at, end, CHUNK_CHANGES) {
                Ok(changes) => changes,
                Err(err) => return fail(err).await,
            };
            let Some((last, _, _)) = changes.last() else {
                return fail(crate::error::NodeError::Internal(format!(
                    "changes of {p} after {at} are not held here"
                )))
                .await;
            };
            at = *last;
            let part = SnapshotPart {
                changes: changes
                    .into_iter()
                    .map(|(sequence, _, record)| StatusChange { sequence, record })
                    .collect(),
                ..SnapshotPart::default()
            };
            if !send(part, false).await {
                return;
            }
        }
    });
    Ok(rx)
}

fn to_messages(changes: Vec<(u64, Vec<u8>)>) -> Vec<StatusChange> {
    changes
        .into_iter()
        .map(|(sequence, record)| StatusChange { sequence, record })
        .collect()
}

fn as_changes(messages: &[StatusChange]) -> Vec<Change<'_>> {
    messages
        .iter()
        .map(|c| Change {
            sequence: c.sequence,
            record: &c.record,
        })
        .collect()
}

/// How long a snapshot's next message may take to arrive.
const MESSAGE_WITHIN: Duration = Duration::from_secs(30);

/// The next message of a snapshot, within [`MESSAGE_WITHIN`].
pub async fn next_message<M>(messages: &mut tonic::Streaming<M>) -> anyhow::Result<Option<M>> {
    match tokio::time::timeout(MESSAGE_WITHIN, messages.message()).await {
        Err(_) => anyhow::bail!("no snapshot message within {MESSAGE_WITHIN:?}"),
        Ok(message) => Ok(message?),
    }
}

/// Installs the snapshot of `p`'s feed whose first part is `first` and
/// whose other parts come from `messages` (each read with `part_of`),
/// checked against `log_key` (the issuer's log key). Without a compacted
/// part, the changes continue what this province holds here (own only);
/// with one, they replace it. Returns the end installed.
pub async fn install<M>(
    store: &Store,
    p: Province,
    log_key: &str,
    first: SnapshotPart,
    messages: &mut tonic::Streaming<M>,
    part_of: impl Fn(M) -> SnapshotPart,
) -> anyhow::Result<Tail> {
    let proto_head = first.head.clone().context("the snapshot has no head")?;
    let head = head_of(&proto_head)?;
    anyhow::ensure!(
        head.issuer == p,
        "the snapshot is of province {}",
        head.issuer
    );
    head.verify(&proto_head.signature, log_key)?;
    let Some(base) = first.base.clone() else {
        anyhow::ensure!(
            p == store.own_province(),
            "the snapshot of {p} has no compacted part: follow its feed instead"
        );
        // Only the changes after those held: through the seam that checks
        // them against what is held.
        let mut part = first;
        loop {
            if !part.changes.is_empty() {
                store.apply_own(&as_changes(&part.changes)).await?;
            }
            match next_message(messages).await? {
                Some(more) => part = part_of(more),
                None => break,
            }
        }
        let end = store.tail(p).await?;
        anyhow::ensure!(
            end.sequence == head.sequence && end.hash == head.chain_hash,
            "the snapshot's changes end at change {} but its signed head is at {} (or the chain differs)",
            end.sequence,
            head.sequence
        );
        return Ok(end);
    };
    let statement = statement_of(&base)?;
    anyhow::ensure!(
        statement.issuer == p,
        "the snapshot's statement is of province {}",
        statement.issuer
    );
    statement.verify(&base.signature, log_key)?;
    let mut installing = store.install(p).await?;
    let mut part = first;
    let mut base_ended = false;
    loop {
        if !part.kept.is_empty() {
            anyhow::ensure!(!base_ended, "kept changes after the compacted part's end");
            installing.kept(&as_changes(&part.kept))?;
        }
        if !part.changes.is_empty() {
            if !base_ended {
                installing.end_base(&base)?;
                base_ended = true;
            }
            installing.changes(&as_changes(&part.changes))?;
        }
        match next_message(messages).await? {
            Some(more) => part = part_of(more),
            None => break,
        }
    }
    if !base_ended {
        installing.end_base(&base)?;
    }
    Ok(installing.finish(&proto_head).await?)
}

/// Compacts this province's change log behind `window` until `stop`,
/// looking every quarter of the window (between a second and a minute).
pub async fn compact_periodically(
    store: std::sync::Arc<Store>,
    signer: std::sync::Arc<hufu_federation::audit::LogSigner>,
    window: Duration,
    stop: CancellationToken,
) {
    let every = (window / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let cutoff = crate::status::now_millis().saturating_sub(window_ms);
        match store.compact_own(cutoff, &signer).await {
            Ok(Some(through)) => {
                tracing::info!(
                    through,
                    "compacted the change log: older changes superseded by a holder's later one are gone"
                );
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(error = %err, "compacting the change log failed; trying again later")
            }
        }
    }
}
