//! `hufu.v1.FederationService`: status-change feeds and trust-list gossip, for
//! nodes of member provinces.

use crate::audit::NodeAudit;
use crate::codes::Codes;
use crate::federation::Federation;
use crate::metrics::Metrics;
use crate::peers::PeerClient;
use crate::store::{Store, Tail};
use hufu_federation::audit::LogSigner;
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use futures::Stream;
use hufu_certs::Province;
use hufu_federation::audit::{AnswerSource, EntryKind};
use hufu_federation::holder::{HolderId, NationalId};
use hufu_proto::v1::federation_service_server;
use hufu_proto::v1::{
    FeedHead, GetReplicaSnapshotRequest, GetReplicaSnapshotResponse, GetSnapshotRequest,
    GetSnapshotResponse, GetTrustListRequest, GetTrustListResponse, MatchHolderRequest,
    MatchHolderResponse, OfferTrustListRequest, OfferTrustListResponse, ReplicaState,
    ResolveCodeRequest, ResolveCodeResponse, StatusChange, SubscribeChangesRequest,
    SubscribeChangesResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::auth::caller;
use crate::error::{NodeError, NodeResult};
use crate::federation::holder_match;
use crate::federation::snapshot;
use crate::legacy::LegacyCodes;
use crate::replication::WriteLog;
use crate::services::error::FederationServiceError;
use crate::state::NodeState;
use crate::status::now_millis;

/// `hufu.v1.FederationService`: feeds, trust lists and holder matches for
/// the other members. Cheap to clone: a feed being served holds a copy.
#[derive(Clone)]
pub struct FederationService {
    province: Province,
    store: Arc<Store>,
    codes: Arc<Codes>,
    audit: Arc<NodeAudit>,
    peers: Arc<PeerClient>,
    federation: Arc<Federation>,
    metrics: Arc<Metrics>,
    log_signer: Arc<LogSigner>,
    batch_changes: usize,
    clock_offset_ms: i64,
    stop: CancellationToken,
    tasks: TaskTracker,
    legacy: LegacyCodes,
    write_log: Option<Arc<WriteLog>>,
}

impl FederationService {
    /// The service, holding the parts of `state` it uses.
    pub fn new(state: &NodeState) -> Self {
        FederationService {
            province: state.province,
            store: state.store.clone(),
            codes: state.codes.clone(),
            audit: state.audit.clone(),
            peers: state.peers.clone(),
            federation: state.federation.clone(),
            metrics: state.metrics.clone(),
            log_signer: state.log_signer.clone(),
            batch_changes: state.batch_changes,
            clock_offset_ms: state.clock_offset_ms,
            stop: state.stop.clone(),
            tasks: state.tasks.clone(),
            legacy: LegacyCodes::new(state),
            write_log: state.write_log.clone(),
        }
    }

    /// Answers whether a national id is one of this province's holders'.
    /// The id is pseudonymised at once and goes nowhere else; the audit
    /// entry names the holder by pseudonym and the answer only.
    async fn match_holder(
        &self,
        request: Request<MatchHolderRequest>,
    ) -> Result<MatchHolderResponse, FederationServiceError> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let holder: HolderId = req.holder.parse().map_err(FederationServiceError::Holder)?;
        let id = NationalId::parse(&req.national_id).map_err(FederationServiceError::NationalId)?;
        let matches = self.codes.is_own_holder(&id, holder.as_str());
        if caller.province != self.province {
            self.audit
                .record(|| {
                    audit::entry(EntryKind::LookupServed, &caller, self.province)
                        .with_holder(holder.clone())
                        .with_answer(holder_match::answer_word(matches))
                        .with_source(AnswerSource::Authoritative)
                        .with_detail(holder_match::DETAIL)
                })
                .await;
        }
        Ok(MatchHolderResponse { matches })
    }
}

type FeedStream = Pin<Box<dyn Stream<Item = Result<SubscribeChangesResponse, Status>> + Send>>;
type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<GetReplicaSnapshotResponse, Status>> + Send>>;
type FeedSnapshotStream = Pin<Box<dyn Stream<Item = Result<GetSnapshotResponse, Status>> + Send>>;

impl FederationService {
    /// A snapshot of this province for another replica of it: the head,
    /// stream position and keyring of one moment, then the changes after
    /// `after` up to that head, in bounded messages.
    async fn replica_snapshot(
        &self,
        req: GetReplicaSnapshotRequest,
    ) -> Result<mpsc::Receiver<Result<GetReplicaSnapshotResponse, Status>>, FederationServiceError>
    {
        let p = Province::parse(&req.issuer).map_err(FederationServiceError::Issuer)?;
        if p != self.province {
            return Err(NodeError::invalid_field(
                "issuer",
                format!("this node is a replica of {}, not of {p}", self.province),
            )
            .into());
        }
        let log = self.write_log.as_ref().ok_or_else(|| {
            NodeError::FailedPrecondition(
                "this node does not share a write log with other replicas (no [replication] in its configuration): take a snapshot from a replica that does".into(),
            )
        })?;
        let capture = log.capture(&self.store, &self.codes.keyring).await?;
        let after = req.after_sequence;
        let end = capture.tail.sequence;
        if after > end {
            return Err(NodeError::invalid_field(
                "after_sequence",
                format!(
                    "the caller holds changes up to {after}, but this replica only up to {end}: a different history"
                ),
            )
            .into());
        }
        let head = own_head(self, capture.tail, end)
            .await?
            .ok_or_else(|| NodeError::Internal(format!("change {end} is not held")))?;
        let replica = ReplicaState {
            stream_position: capture.position,
            keys: capture.keys,
        };
        Ok(snapshot::spawn_parts(
            self.store.clone(),
            self.province,
            after,
            head,
            &self.tasks,
            self.stop.clone(),
            move |part, first| GetReplicaSnapshotResponse {
                part: Some(part),
                replica: first.then(|| replica.clone()),
            },
        )?)
    }

    /// A snapshot of province `p`'s feed (own, or relayed): its compacted
    /// part if the caller is behind it, then the changes up to the head
    /// held here.
    async fn feed_snapshot(
        &self,
        req: GetSnapshotRequest,
    ) -> Result<mpsc::Receiver<Result<GetSnapshotResponse, Status>>, FederationServiceError> {
        let p = Province::parse(&req.issuer).map_err(FederationServiceError::Issuer)?;
        let head = if p == self.province {
            let tail = self.store.tail(p).await?;
            own_head(self, tail, tail.sequence).await?
        } else {
            self.store.latest_head(p)?
        }
        .ok_or_else(|| NodeError::NotFound(format!("no replica of province {p} here")))?;
        if req.after_sequence > head.sequence {
            return Err(NodeError::invalid_field(
                "after_sequence",
                format!(
                    "the caller holds changes of {p} up to {}, but this node only up to {}: a different history",
                    req.after_sequence, head.sequence
                ),
            )
            .into());
        }
        Ok(snapshot::spawn_parts(
            self.store.clone(),
            p,
            req.after_sequence,
            head,
            &self.tasks,
            self.stop.clone(),
            |part, _| GetSnapshotResponse { part: Some(part) },
        )?)
    }
}

/// Streams one province's feed to one subscriber until it goes away. (The
/// admission layer ends the stream when the subscriber loses its standing.)
async fn serve_feed(
    state: FederationService,
    p: Province,
    mut after: u64,
    tx: mpsc::Sender<Result<SubscribeChangesResponse, Status>>,
) {
    let own = p == state.province;
    let mut watch = state.store.watch(p);
    let max = state.batch_changes;
    let mut heartbeat = tokio::time::interval(state.federation.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = if own {
            own_batch(&state, after, max).await
        } else {
            relay_batch(&state, p, after).map_err(FederationServiceError::from)
        };
        let batch = match batch {
            Ok(b) => b,
            Err(err) => {
                let _ = tx.send(Err(err.into())).await;
                return;
            }
        };
        if let Some(batch) = batch {
            after = batch.head.as_ref().map(|h| h.sequence).unwrap_or(after);
            let sent = batch.changes.len() as u64;
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
            state.metrics.feed_served.inc_by(sent);
            heartbeat.reset();
            continue;
        }
        // Caught up: wait for a change, or restate the head as a heartbeat.
        tokio::select! {
            _ = tx.closed() => return,
            _ = state.stop.cancelled() => return,
            changed = watch.changed() => if changed.is_err() { return },
            _ = heartbeat.tick() => {
                let head = if own {
                    match state.store.tail(p).await {
                        Ok(tail) => own_head(&state, tail, after).await,
                        Err(err) => Err(err),
                    }
                } else {
                    state.store.latest_head(p)
                };
                match head {
                    Ok(Some(head)) if head.sequence == after => {
                        let hb = SubscribeChangesResponse { changes: vec![], head: Some(head) };
                        if tx.send(Ok(hb)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                }
            }
        }
    }
}

/// A signed head for this province at `sequence`.
///
/// At `tail` (a heartbeat, the last change of a batch) its hash is the
/// writer's; only an older head decodes its change-log block for it.
async fn own_head(
    state: &FederationService,
    tail: Tail,
    sequence: u64,
) -> NodeResult<Option<FeedHead>> {
    let hash = if sequence == 0 {
        hufu_federation::feed::GENESIS_HASH
    } else if sequence == tail.sequence {
        tail.hash
    } else {
        match state.store.held_hash(state.province, sequence) {
            Some(hash) => hash,
            None => return Ok(None),
        }
    };
    let head = hufu_federation::feed::Head {
        issuer: state.province,
        sequence,
        chain_hash: hash,
        time_ms: now_millis().saturating_add(state.clock_offset_ms),
        keys_digest: state.codes.own_keys_digest(),
    };
    let signature = head.sign(&state.log_signer);
    Ok(Some(FeedHead {
        issuer: state.province.to_string(),
        sequence,
        chain_hash: hash.to_vec(),
        time_ms: head.time_ms,
        keys_digest: head.keys_digest.to_vec(),
        signature,
    }))
}

/// The next batch of this province's own changes after `after`, signed now.
async fn own_batch(
    state: &FederationService,
    after: u64,
    max: usize,
) -> Result<Option<SubscribeChangesResponse>, FederationServiceError> {
    let tail = state.store.tail(state.province).await?;
    if tail.sequence <= after {
        if tail.sequence < after {
            return Err(FederationServiceError::AheadOfFeed {
                after,
                province: state.province,
                tail: tail.sequence,
            });
        }
        return Ok(None);
    }
    let changes = state
        .store
        .changes(state.province, after, tail.sequence, max)?;
    let Some((last, _, _)) = changes.last() else {
        return Ok(None);
    };
    let head = own_head(state, tail, *last).await?;
    Ok(Some(SubscribeChangesResponse {
        changes: changes
            .into_iter()
            .map(|(sequence, _, record)| StatusChange { sequence, record })
            .collect(),
        head,
    }))
}

/// The next relayed batch of province `p` after `after`: the changes up to
/// the next head the issuer signed.
fn relay_batch(
    state: &FederationService,
    p: Province,
    after: u64,
) -> NodeResult<Option<SubscribeChangesResponse>> {
    let Some(head) = state.store.head_after(p, after)? else {
        return Ok(None);
    };
    let changes = state.store.changes(p, after, head.sequence, usize::MAX)?;
    if changes.len() as u64 != head.sequence - after {
        // Older changes were never held here (this node joined late):
        // nothing to relay from this point.
        return Ok(None);
    }
    Ok(Some(SubscribeChangesResponse {
        changes: changes
            .into_iter()
            .map(|(sequence, _, record)| StatusChange { sequence, record })
            .collect(),
        head: Some(head),
    }))
}

#[tonic::async_trait]
impl federation_service_server::FederationService for FederationService {
    type SubscribeChangesStream = FeedStream;

    async fn subscribe_changes(
        &self,
        request: Request<SubscribeChangesRequest>,
    ) -> Result<Response<FeedStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let p = Province::parse(&req.issuer).map_err(FederationServiceError::Issuer)?;
        if p != self.province {
            if self.peers.members().member(p).is_none() {
                return Err(NodeError::NotFound(format!(
                    "province {p} is not a member of trust list v{}",
                    self.peers.members().version()
                ))
                .into());
            }
            if self.store.latest_head(p)?.is_none() {
                return Err(
                    NodeError::NotFound(format!("no replica of province {p} here yet")).into(),
                );
            }
        }
        if let Some(base) = self.store.base(p)?
            && req.after_sequence < base.through()
        {
            return Err(crate::store::Store::compacted(p, req.after_sequence, &base).into());
        }
        tracing::debug!(%caller, province = %p, after = req.after_sequence, "feed subscriber");
        let (tx, rx) = mpsc::channel(4);
        self.tasks
            .spawn(serve_feed(self.clone(), p, req.after_sequence, tx));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as FeedStream
        ))
    }

    async fn get_trust_list(
        &self,
        request: Request<GetTrustListRequest>,
    ) -> Result<Response<GetTrustListResponse>, Status> {
        caller(&request)?;
        let after = request.into_inner().after_version;
        let trust = self.federation.trust.lock().await;
        let notes = match trust.as_ref() {
            Some(store) => ((after + 1)..=store.version())
                .filter_map(|v| store.get(v).map(|s| s.note().to_owned()))
                .collect(),
            None => vec![],
        };
        Ok(Response::new(GetTrustListResponse { notes }))
    }

    async fn offer_trust_list(
        &self,
        request: Request<OfferTrustListRequest>,
    ) -> Result<Response<OfferTrustListResponse>, Status> {
        // Peers gossip; this province's admins install what they signed.
        let caller = caller(&request)?;
        let note = request.into_inner().note;
        let applied = self
            .federation
            .offer_trust_list(&note, &caller)
            .await
            .map_err(FederationServiceError::from)?;
        Ok(Response::new(OfferTrustListResponse {
            applied,
            version: self.peers.members().version(),
        }))
    }

    async fn match_holder(
        &self,
        request: Request<MatchHolderRequest>,
    ) -> Result<Response<MatchHolderResponse>, Status> {
        Ok(Response::new(self.match_holder(request).await?))
    }

    type GetReplicaSnapshotStream = SnapshotStream;

    async fn get_replica_snapshot(
        &self,
        request: Request<GetReplicaSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let caller = caller(&request)?;
        let rx = self.replica_snapshot(request.into_inner()).await?;
        tracing::info!(%caller, "serving a replica snapshot");
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as SnapshotStream
        ))
    }

    type GetSnapshotStream = FeedSnapshotStream;

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<FeedSnapshotStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        tracing::info!(%caller, province = %req.issuer, after = req.after_sequence, "serving a feed snapshot");
        let rx = self.feed_snapshot(req).await?;
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as FeedSnapshotStream
        ))
    }

    async fn resolve_code(
        &self,
        request: Request<ResolveCodeRequest>,
    ) -> Result<Response<ResolveCodeResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let reply = self
            .legacy
            .serve_resolve(&caller, &req.format, &req.code_hash)
            .await?;
        Ok(Response::new(reply))
    }
}
