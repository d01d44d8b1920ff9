//! Installing a snapshot of a province's feed whose older part was
//! compacted ([`super::compact`]): the province's state here is replaced by
//! the snapshot's kept changes, checked against the issuer's signed
//! statement, then by the changes after them up to a signed head, in
//! bounded batches.
//!
//! A marker (`I` province) is written first and removed in the batch that
//! ends the install: a node that stops halfway finds the marker when its
//! store opens, wipes the province's partial state and starts with none
//! of it, to ask for a snapshot again. Meanwhile the province's writer
//! lock is held, so that no own write or replicated batch interleaves.

use hufu_certs::Province;
use hufu_federation::feed::{Change, FeedError};
use hufu_federation::snapshot::{KeptDigest, SnapshotStatement};
use hufu_proto::v1::{FeedHead, FeedSnapshot};
use prost::Message;

use super::bucket::{BUCKET, Holder, Staged};
use super::codec::{self, BINDING, CHANGES, HEAD_AT, LATEST_HEAD, STATUS};
use super::compact::{BASE, Base, KEPT, KeptWriter};
use super::merge::{MERGED, stage_mark};
use super::{ApplyError, GENESIS, Store, Tail};
use crate::error::NodeResult;

/// Key kind of the marker of an install in progress.
pub const INSTALLING: u8 = b'I';

/// Kinds of key that make up a province's feed state here (`S`: statuses
/// of the format before buckets).
const FEED_STATE: [u8; 9] = [
    BUCKET,
    MERGED,
    STATUS,
    BINDING,
    CHANGES,
    KEPT,
    BASE,
    HEAD_AT,
    LATEST_HEAD,
];

/// Keys removed in one batch while wiping.
const WIPE_BATCH: usize = 4096;

/// Removes `p`'s feed state from `tree`, a bounded batch at a time.
fn wipe(tree: &sled::Tree, p: Province) -> sled::Result<()> {
    for kind in FEED_STATE {
        loop {
            let keys: Vec<_> = tree
                .scan_prefix(codec::key(kind, p, &[]))
                .keys()
                .take(WIPE_BATCH)
                .collect::<Result<_, _>>()?;
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            tree.apply_batch(batch)?;
        }
    }
    Ok(())
}

/// Wipes every province whose install was interrupted (when the store
/// opens).
pub(super) fn recover(tree: &sled::Tree) -> sled::Result<()> {
    for item in tree.scan_prefix([INSTALLING]) {
        let (k, _) = item?;
        let Some(p) = k
            .get(1..5)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .and_then(|b| Province::from_code(u32::from_be_bytes(b)).ok())
        else {
            continue;
        };
        tracing::warn!(province = %p, "a snapshot install was interrupted: its partial state is removed, and the province's feed is taken again");
        wipe(tree, p)?;
        tree.remove(k)?;
    }
    tree.flush()?;
    Ok(())
}

/// The lock an install holds on its province.
enum Guard<'a> {
    Own(tokio::sync::MutexGuard<'a, Tail>),
    Replica {
        _held: tokio::sync::OwnedMutexGuard<()>,
    },
}

/// A snapshot being installed; see the module docs.
pub struct Installing<'a> {
    store: &'a Store,
    p: Province,
    guard: Guard<'a>,
    digest: KeptDigest,
    writer: KeptWriter,
    tail: Tail,
}

impl Store {
    /// Starts replacing `p`'s state here by a snapshot whose compacted part
    /// is `snapshot` (its signature checked by the caller): `p`'s state is
    /// wiped. Feed it the kept changes ([`Installing::kept`]), then end the
    /// compacted part ([`Installing::end_base`]), the changes after it
    /// ([`Installing::changes`]) and the head ([`Installing::finish`]).
    pub async fn install(&self, p: Province) -> NodeResult<Installing<'_>> {
        let guard = if p == self.own {
            let mut tail = self.own_writer.lock().await;
            *tail = GENESIS;
            Guard::Own(tail)
        } else {
            let writer = {
                let mut writers = self.replica_writers.lock().expect("writer lock");
                writers.entry(p).or_default().clone()
            };
            Guard::Replica {
                _held: writer.lock_owned().await,
            }
        };
        // Nothing of `p` stays unmerged to be written over what the
        // install writes (its statuses go straight to their buckets).
        let unmerged = self.unmerged.clone();
        tokio::task::spawn_blocking(move || unmerged.forget(p))
            .await
            .map_err(|e| crate::error::NodeError::Internal(format!("install task: {e}")))?;
        let tree = self.tree()?;
        tree.insert(codec::key(INSTALLING, p, &[]), &[][..])?;
        self.flush().await?;
        wipe(&tree, p)?;
        Ok(Installing {
            store: self,
            p,
            guard,
            digest: KeptDigest::default(),
            writer: KeptWriter::new(),
            tail: GENESIS,
        })
    }
}

impl Installing<'_> {
    /// Takes kept changes of the compacted part, in order.
    pub fn kept(&mut self, changes: &[Change<'_>]) -> Result<(), ApplyError> {
        let mut batch = sled::Batch::default();
        let mut statuses = Vec::with_capacity(changes.len());
        for change in changes {
            self.digest.add(change.sequence, change.record)?;
            let entry = super::log::stage_effect(self.p, change, &mut batch, &mut statuses)?;
            self.writer.push(change.sequence, &entry);
            if self.writer.is_full() {
                self.writer.stage(self.p, 1, &mut batch);
            }
        }
        self.apply_through(batch, statuses)
    }

    /// Applies `batch` with `statuses` written straight into their buckets.
    fn apply_through(
        &self,
        batch: sled::Batch,
        statuses: Vec<(Holder, Vec<u8>)>,
    ) -> Result<(), ApplyError> {
        if self.p == self.store.own {
            self.store.presence.add(statuses.iter().map(|(h, _)| h));
        }
        let tree = self.store.tree()?;
        let mut staged = Staged::on(batch);
        for (holder, value) in statuses {
            staged.put_status(&tree, self.p, holder, value)?;
        }
        self.store.apply(staged.finish())?;
        Ok(())
    }

    /// Ends the compacted part: its kept changes must be those `snapshot`
    /// states.
    pub fn end_base(&mut self, snapshot: &FeedSnapshot) -> Result<(), ApplyError> {
        let statement = statement_of(snapshot)?;
        std::mem::take(&mut self.digest).check(&statement)?;
        let mut batch = sled::Batch::default();
        self.writer.stage(self.p, 1, &mut batch);
        let mut value = 1u64.to_be_bytes().to_vec();
        value.extend_from_slice(&snapshot.encode_to_vec());
        batch.insert(codec::key(BASE, self.p, &[]), value);
        self.store.apply(batch)?;
        self.tail = Base {
            generation: 1,
            snapshot: snapshot.clone(),
        }
        .tail()?;
        Ok(())
    }

    /// Takes the changes after the compacted part, in order, without a gap.
    pub fn changes(&mut self, changes: &[Change<'_>]) -> Result<(), ApplyError> {
        let mut batch = sled::Batch::default();
        let mut statuses = Vec::with_capacity(changes.len());
        self.tail = self
            .store
            .stage(self.p, self.tail, changes, &mut batch, &mut statuses)?;
        self.apply_through(batch, statuses)
    }

    /// Ends the install at `head` (its signature checked by the caller):
    /// the changes taken must end there. Durable on return.
    pub async fn finish(mut self, head: &FeedHead) -> Result<Tail, ApplyError> {
        if head.sequence != self.tail.sequence || head.chain_hash != self.tail.hash {
            return Err(FeedError::ChainMismatch {
                sequence: head.sequence,
            }
            .into());
        }
        let mut batch = sled::Batch::default();
        if self.p != self.store.own {
            let bytes = head.encode_to_vec();
            batch.insert(codec::key(LATEST_HEAD, self.p, &[]), bytes.clone());
            batch.insert(
                codec::key(HEAD_AT, self.p, &head.sequence.to_be_bytes()),
                bytes,
            );
        }
        // Every status installed is in its bucket already.
        stage_mark(&mut batch, self.p, self.tail.sequence);
        batch.remove(codec::key(INSTALLING, self.p, &[]));
        self.store.write(batch, 1).await?;
        if let Guard::Own(tail) = &mut self.guard {
            **tail = self.tail;
        }
        self.store.notify(self.p, self.tail.sequence);
        Ok(self.tail)
    }
}

/// The statement a received `FeedSnapshot` makes.
pub fn statement_of(s: &FeedSnapshot) -> Result<SnapshotStatement, FeedError> {
    let hash = |b: &[u8]| -> Result<[u8; 32], FeedError> {
        b.try_into()
            .map_err(|_| FeedError::Malformed(format!("hash of {} bytes, expected 32", b.len())))
    };
    Ok(SnapshotStatement {
        issuer: Province::parse(&s.issuer).map_err(|e| FeedError::Malformed(e.to_string()))?,
        through: s.through,
        chain_hash: hash(&s.chain_hash)?,
        kept: s.kept,
        digest: hash(&s.digest)?,
    })
}
