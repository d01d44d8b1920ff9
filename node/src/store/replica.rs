//! Replicas of other provinces' feeds: signed batches checked against the
//! issuer's log key and chain, then staged through the change log like own
//! writes, with the heads kept for relaying and for freshness.

use hufu_certs::Province;
use hufu_federation::feed::{self, Change, FeedError, Head};
use hufu_proto::v1::{FeedHead, SubscribeChangesResponse};
use prost::Message;

use super::codec::{self, CONFIRMED, HEAD_AT, LATEST_HEAD, REVOKED};
use super::{Applied, ApplyError, GENESIS, Store, Tail};
use crate::error::{NodeError, NodeResult};

fn to_hash(bytes: &[u8]) -> Result<[u8; 32], FeedError> {
    bytes
        .try_into()
        .map_err(|_| FeedError::Malformed(format!("hash of {} bytes, expected 32", bytes.len())))
}

/// The feed crate's view of a protobuf head.
pub fn head_of(h: &FeedHead) -> Result<Head, FeedError> {
    Ok(Head {
        issuer: Province::parse(&h.issuer).map_err(|e| FeedError::Malformed(e.to_string()))?,
        sequence: h.sequence,
        chain_hash: to_hash(&h.chain_hash)?,
        time_ms: h.time_ms,
        keys_digest: to_hash(&h.keys_digest)?,
    })
}

impl Store {
    /// The chain end of a replicated province: its newest signed head.
    pub(super) fn replica_tail(&self, p: Province) -> NodeResult<Tail> {
        Ok(match self.latest_head(p)? {
            Some(h) => Tail {
                sequence: h.sequence,
                hash: to_hash(&h.chain_hash).map_err(|e| NodeError::Internal(e.to_string()))?,
            },
            None => GENESIS,
        })
    }

    /// The newest signed head held for a replicated province.
    pub fn latest_head(&self, p: Province) -> NodeResult<Option<FeedHead>> {
        match self.tree()?.get(codec::key(LATEST_HEAD, p, &[]))? {
            Some(bytes) => Ok(Some(FeedHead::decode(bytes.as_ref())?)),
            None => Ok(None),
        }
    }

    /// The first stored head of `p` after `after`: where a relayed batch
    /// starting after `after` may end.
    pub fn head_after(&self, p: Province, after: u64) -> NodeResult<Option<FeedHead>> {
        let start = codec::key(HEAD_AT, p, &(after + 1).to_be_bytes());
        let end = codec::key(HEAD_AT, p, &u64::MAX.to_be_bytes());
        match self.tree()?.range(start..=end).next() {
            Some(item) => Ok(Some(FeedHead::decode(item?.1.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Keeps `p`'s revoked certificate serials, so a restart does not
    /// forget them while `p` cannot be reached.
    pub fn put_revoked(&self, p: Province, serials: &[String]) -> NodeResult<()> {
        let json = serde_json::to_vec(serials).map_err(|e| NodeError::Internal(e.to_string()))?;
        self.tree()?.insert(codec::key(REVOKED, p, &[]), json)?;
        Ok(())
    }

    /// Every province's revoked certificate serials kept by [`put_revoked`](Self::put_revoked).
    pub fn revoked(&self) -> NodeResult<Vec<(Province, Vec<String>)>> {
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix([REVOKED]) {
            let (k, v) = item?;
            let code = <[u8; 4]>::try_from(&k[1..5])
                .map_err(|_| NodeError::Internal("revocation key without a province".into()))?;
            let p = Province::from_code(u32::from_be_bytes(code))
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            let serials: Vec<String> =
                serde_json::from_slice(&v).map_err(|e| NodeError::Internal(e.to_string()))?;
            out.push((p, serials));
        }
        Ok(out)
    }

    /// When the replica of `p` was last confirmed by a signed head, in unix
    /// ms by this node's clock (None: never, or held by an older version).
    /// A replica's age is measured from here, not from the head's own time.
    pub fn replica_confirmed(&self, p: Province) -> NodeResult<Option<i64>> {
        Ok(self
            .tree()?
            .get(codec::key(CONFIRMED, p, &[]))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// The new confirmation time a head dated `head_ms` and received at
    /// `received_ms` gives `p`'s replica, if later than the one held: the
    /// head's time, capped at its arrival.
    fn confirmation(&self, p: Province, head_ms: i64, received_ms: i64) -> NodeResult<Option<i64>> {
        let at = head_ms.min(received_ms);
        let held = self.replica_confirmed(p)?;
        Ok(held.is_none_or(|h| h < at).then_some(at))
    }

    /// Verifies and stores a batch of province `p`'s feed, received (now)
    /// from `p` itself or relayed by a peer. `log_key` is `p`'s log key from
    /// the trust list. New changes are durable when this returns.
    pub async fn apply_batch(
        &self,
        p: Province,
        batch: &SubscribeChangesResponse,
        log_key: &str,
    ) -> Result<Applied, ApplyError> {
        let received_ms = crate::status::now_millis();
        if p == self.own {
            return Err(FeedError::Malformed(format!(
                "{p} is this node's own province: it is not replicated"
            ))
            .into());
        }
        let proto_head = batch
            .head
            .as_ref()
            .ok_or_else(|| FeedError::Malformed("batch without a head".into()))?;
        let head = head_of(proto_head)?;
        if head.issuer != p {
            return Err(FeedError::WrongIssuer {
                want: p,
                got: head.issuer,
            }
            .into());
        }
        head.verify(&proto_head.signature, log_key)?;

        let writer = {
            let mut writers = self.replica_writers.lock().expect("writer lock");
            writers.entry(p).or_default().clone()
        };
        let _guard = writer.lock().await;
        let held = self.latest_head(p)?;
        let tail = self.replica_tail(p)?;
        let changes: Vec<Change<'_>> = batch
            .changes
            .iter()
            .map(|c| Change {
                sequence: c.sequence,
                record: &c.record,
            })
            .collect();
        let new = feed::check_batch(tail.sequence, &tail.hash, &changes, &head, |s| {
            self.held_hash(p, s)
        })?;

        let head_bytes = proto_head.encode_to_vec();
        let confirmed = self.confirmation(p, proto_head.time_ms, received_ms)?;
        let mut b = sled::Batch::default();
        if let Some(at) = confirmed {
            b.insert(codec::key(CONFIRMED, p, &[]), &at.to_be_bytes()[..]);
        }
        if new.is_empty() {
            // A heartbeat: only a newer statement about the same head counts.
            if held.as_ref().is_none_or(|h| h.time_ms < proto_head.time_ms) {
                b.insert(codec::key(LATEST_HEAD, p, &[]), head_bytes.clone());
                b.insert(
                    codec::key(HEAD_AT, p, &head.sequence.to_be_bytes()),
                    head_bytes,
                );
            }
            // Not flushed: a heartbeat acknowledges nothing.
            self.apply(b)?;
            return Ok(Applied {
                new_changes: 0,
                sequence: tail.sequence,
            });
        }
        let first_new = new[0].0;
        let fresh: Vec<Change<'_>> = changes
            .into_iter()
            .filter(|c| c.sequence >= first_new)
            .collect();
        let mut statuses = Vec::with_capacity(fresh.len());
        let end = self.stage(p, tail, &fresh, &mut b, &mut statuses)?;
        if end.hash != head.chain_hash {
            // check_batch saw the same chain: only a bug gets here.
            return Err(FeedError::ChainMismatch {
                sequence: head.sequence,
            }
            .into());
        }
        b.insert(codec::key(LATEST_HEAD, p, &[]), head_bytes.clone());
        b.insert(
            codec::key(HEAD_AT, p, &head.sequence.to_be_bytes()),
            head_bytes,
        );
        self.write(b, fresh.len()).await?;
        self.unmerged.put(p, head.sequence, statuses);
        self.notify(p, head.sequence);
        self.unmerged.make_room().await;
        Ok(Applied {
            new_changes: new.len(),
            sequence: head.sequence,
        })
    }
}
