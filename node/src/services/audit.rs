//! `hufu.v1.AuditService`, the read-only audit API for auditors, and
//! `hufu.v1.WitnessService`, through which the other members' nodes have this
//! province witness their audit logs.

use crate::audit::NodeAudit;
use crate::metrics::Metrics;
use crate::peers::PeerClient;
use hufu_federation::audit::LogSigner;
use std::sync::Arc;

use hufu_certs::Role;
use hufu_federation::audit::{AuditError, SignedCheckpoint, TreeHash, WitnessError};
use hufu_proto::v1::{
    AddCheckpointRequest, AddCheckpointResponse, AuditLogEntry, GetCheckpointsRequest,
    GetCheckpointsResponse, GetConsistencyProofRequest, GetConsistencyProofResponse,
    GetEntriesRequest, GetEntriesResponse, GetInclusionProofRequest, GetInclusionProofResponse,
    add_checkpoint_response,
};
use hufu_proto::v1::{audit_service_server, witness_service_server};
use tonic::{Request, Response, Status};

use crate::auth::caller;
use crate::error::NodeError;
use crate::services::error::{AuditServiceError, WitnessServiceError};
use crate::state::NodeState;

/// Most checkpoints one `GetCheckpoints` returns.
pub const MAX_CHECKPOINTS: usize = 1000;
/// Most entries one `GetEntries` returns.
pub const MAX_ENTRIES: u64 = 10_000;

/// `hufu.v1.AuditService`: this node's audit log for auditors.
pub struct AuditService {
    audit: Arc<NodeAudit>,
    log_signer: Arc<LogSigner>,
}

impl AuditService {
    /// The service, holding the parts of `state` it uses.
    pub fn new(state: &NodeState) -> Self {
        AuditService {
            audit: state.audit.clone(),
            log_signer: state.log_signer.clone(),
        }
    }
}

/// Proof hashes as the wire carries them.
fn proof(hashes: Vec<TreeHash>) -> Vec<Vec<u8>> {
    hashes.iter().map(|h| h.as_bytes().to_vec()).collect()
}

#[tonic::async_trait]
impl audit_service_server::AuditService for AuditService {
    async fn get_checkpoints(
        &self,
        request: Request<GetCheckpointsRequest>,
    ) -> Result<Response<GetCheckpointsResponse>, Status> {
        caller(&request)?;
        let after = request.into_inner().after_size;
        let log = self.audit.log().map_err(AuditServiceError::from)?;
        let mut checkpoints: Vec<String> = log
            .published()
            .map_err(AuditServiceError::from)?
            .into_iter()
            .filter(|cp| cp.checkpoint().size > after)
            .take(MAX_CHECKPOINTS + 1)
            .map(|cp| cp.note())
            .collect();
        let more = checkpoints.len() > MAX_CHECKPOINTS;
        checkpoints.truncate(MAX_CHECKPOINTS);
        Ok(Response::new(GetCheckpointsResponse {
            origin: self.log_signer.origin().to_owned(),
            log_size: log.size().map_err(AuditServiceError::from)?,
            checkpoints,
            more,
        }))
    }

    async fn get_entries(
        &self,
        request: Request<GetEntriesRequest>,
    ) -> Result<Response<GetEntriesResponse>, Status> {
        caller(&request)?;
        let req = request.into_inner();
        let end = req.end.min(req.start.saturating_add(MAX_ENTRIES));
        let entries = self
            .audit
            .log()
            .and_then(|log| log.entries(req.start, end))
            .map_err(AuditServiceError::from)?
            .into_iter()
            .map(|(index, entry)| AuditLogEntry { index, entry })
            .collect();
        Ok(Response::new(GetEntriesResponse { entries }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        caller(&request)?;
        let req = request.into_inner();
        let hashes = self
            .audit
            .log()
            .and_then(|log| log.inclusion_proof(req.index, req.tree_size))
            .map_err(AuditServiceError::from)?;
        Ok(Response::new(GetInclusionProofResponse {
            hashes: proof(hashes),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        caller(&request)?;
        let req = request.into_inner();
        let hashes = self
            .audit
            .log()
            .and_then(|log| log.consistency_proof(req.old_size, req.new_size))
            .map_err(AuditServiceError::from)?;
        Ok(Response::new(GetConsistencyProofResponse {
            hashes: proof(hashes),
        }))
    }
}

/// `hufu.v1.WitnessService`: this node's witness for the other members' logs.
pub struct WitnessService {
    audit: Arc<NodeAudit>,
    peers: Arc<PeerClient>,
    metrics: Arc<Metrics>,
}

impl WitnessService {
    /// The service, holding the parts of `state` it uses.
    pub fn new(state: &NodeState) -> Self {
        WitnessService {
            audit: state.audit.clone(),
            peers: state.peers.clone(),
            metrics: state.metrics.clone(),
        }
    }

    async fn add_checkpoint(
        &self,
        request: Request<AddCheckpointRequest>,
    ) -> Result<AddCheckpointResponse, WitnessServiceError> {
        let caller = caller(&request)?;
        let membership = self.peers.members();
        let denied = |why: String| NodeError::denied(&caller, "AddCheckpoint", &why);
        if membership.member(caller.province).is_none() {
            return Err(denied(format!(
                "province {} is not a member of trust list v{}: only members' logs are witnessed",
                caller.province,
                membership.version()
            ))
            .into());
        }
        let req = request.into_inner();
        let offered =
            SignedCheckpoint::parse(&req.checkpoint).map_err(WitnessServiceError::Checkpoint)?;
        let origin = offered
            .checkpoint()
            .province()
            .map_err(WitnessServiceError::Checkpoint)?;
        if origin != caller.province || caller.role != Role::Node {
            return Err(denied(format!(
                "the checkpoint is of {}, a log of province {origin}: a node may only have its own province's log witnessed",
                offered.checkpoint().origin
            ))
            .into());
        }
        let log_key = membership
            .member(origin)
            .map(|m| m.log_key.clone())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                NodeError::FailedPrecondition(format!(
                    "province {origin} has no log key in trust list v{}",
                    membership.version()
                ))
            })?;
        let proof = req
            .proof
            .iter()
            .map(|h| TreeHash::from_slice(h).ok_or(WitnessServiceError::ProofHash(h.len())))
            .collect::<Result<Vec<_>, _>>()?;

        // The witness flushes its state before cosigning: off the runtime.
        let audit = self.audit.clone();
        let note = req.checkpoint;
        let old_size = req.old_size;
        let result = tokio::task::spawn_blocking(move || {
            Ok::<_, AuditError>(audit.witness()?.witness(&note, &log_key, old_size, &proof))
        })
        .await??;

        let outcome = match result {
            Ok(cosignature) => add_checkpoint_response::Outcome::Cosignature(cosignature.line()),
            Err(WitnessError::OldSize { have, .. }) => {
                add_checkpoint_response::Outcome::WitnessSize(have)
            }
            Err(err) if err.is_conflict() => {
                let conflicts = self
                    .audit
                    .witness()
                    .ok()
                    .and_then(|w| w.conflicts().ok())
                    .unwrap_or(u64::MAX);
                self.metrics.audit_conflicts.set(conflicts as i64);
                tracing::error!(
                    %caller,
                    origin = %offered.checkpoint().origin,
                    error = %err,
                    "AUDIT LOG CONFLICT: a province signed two checkpoints that cannot both be true; cosignature refused, evidence kept in this node's witness tree"
                );
                return Err(WitnessServiceError::Conflict(err));
            }
            Err(source) => {
                return Err(WitnessServiceError::Refused {
                    caller: caller.uri(),
                    source,
                });
            }
        };
        Ok(AddCheckpointResponse {
            outcome: Some(outcome),
        })
    }
}

#[tonic::async_trait]
impl witness_service_server::WitnessService for WitnessService {
    async fn add_checkpoint(
        &self,
        request: Request<AddCheckpointRequest>,
    ) -> Result<Response<AddCheckpointResponse>, Status> {
        Ok(Response::new(self.add_checkpoint(request).await?))
    }
}
