//! `hufu.v1.AdminService`: a province's own administration (statuses, codes, keys),
//! for admins of the node's province only.

use std::sync::Arc;

use futures::StreamExt;
use hufu_certs::Identity;
use hufu_federation::audit::EntryKind;
use hufu_federation::codes::{CodeAlg, CodeClaims, HealthClaim, display};
use hufu_federation::holder::NationalId;
use hufu_proto::v1::admin_service_server;
use hufu_proto::v1::{
    Colour, GetStatusRequest, GetStatusResponse, ImportRejection, ImportStatusesRequest,
    ImportStatusesResponse, IssueCodeRequest, IssueCodeResponse, PutStatusRequest,
    PutStatusResponse, Reason, RevokeKeyRequest, RevokeKeyResponse, RotateKeyRequest,
    RotateKeyResponse, StatusInput, StatusRecord, get_status_request, issue_code_request,
    status_input,
};
use tonic::{Request, Response, Status, Streaming};

use crate::audit;
use crate::auth::{Access, check};
use crate::error::{NodeError, NodeResult};
use crate::metrics::metered;
use crate::state::NodeState;
use crate::status::{format_time, now_unix, reason_name, seconds, timestamp};
use crate::store::PutOutcome;

/// Import rows stored per transaction (and per flush).
const IMPORT_CHUNK: usize = 1000;

/// How far in the future an `as_of` may lie (clock skew between systems).
const MAX_FUTURE_SKEW_SECS: i64 = 300;

pub struct AdminService {
    state: Arc<NodeState>,
}

impl AdminService {
    pub fn new(state: Arc<NodeState>) -> Self {
        AdminService { state }
    }

    /// Validates operator input and turns it into a record keyed by pseudonym.
    fn record_from(&self, input: &StatusInput, now: i64) -> NodeResult<StatusRecord> {
        let holder = match &input.subject {
            Some(status_input::Subject::NationalId(id)) => {
                self.state.holder_from(Some(id), None)?
            }
            Some(status_input::Subject::Holder(h)) => self.state.holder_from(None, Some(h))?,
            None => self.state.holder_from(None, None)?,
        };
        let colour = Colour::try_from(input.colour).unwrap_or(Colour::Unspecified);
        if colour == Colour::Unspecified {
            return Err(NodeError::invalid_field(
                "colour",
                "colour is required: green, yellow or red",
            ));
        }
        let reason = match Reason::try_from(input.reason) {
            Ok(Reason::Unspecified) => Reason::None,
            Ok(r) => r,
            Err(_) => {
                return Err(NodeError::invalid_field(
                    "reason",
                    format!("unknown reason {}", input.reason),
                ));
            }
        };
        let as_of = seconds(input.as_of.as_ref()).unwrap_or(now);
        if as_of > now + MAX_FUTURE_SKEW_SECS {
            return Err(NodeError::invalid_field(
                "as_of",
                format!("as_of {} is in the future", format_time(as_of)),
            ));
        }
        if let Some(neg) = seconds(input.last_negative_test.as_ref())
            && neg > now + MAX_FUTURE_SKEW_SECS
        {
            return Err(NodeError::invalid_field(
                "last_negative_test",
                format!("last_negative_test {} is in the future", format_time(neg)),
            ));
        }
        Ok(StatusRecord {
            issuer: self.state.province.to_string(),
            holder: holder.to_string(),
            colour: colour as i32,
            as_of: Some(timestamp(as_of)),
            last_negative_test: input.last_negative_test,
            reason: reason as i32,
        })
    }

    /// Audits a stored status change: who, which holder, which colour.
    fn audit_change(&self, caller: &Identity, record: &StatusRecord) {
        self.state.audit.record(|| {
            let reason = Reason::try_from(record.reason).unwrap_or(Reason::Unspecified);
            audit::about(
                audit::entry(EntryKind::StatusChanged, caller, self.state.province),
                &record.holder,
            )
            .with_answer(audit::answer(Some(record)))
            .with_detail(format!("reason {}", reason_name(reason)))
        });
    }

    async fn put_status(
        &self,
        request: Request<PutStatusRequest>,
    ) -> NodeResult<PutStatusResponse> {
        let caller = check(&self.state, &request, "PutStatus", Access::Admin)?;
        let input = request
            .into_inner()
            .status
            .ok_or_else(|| NodeError::invalid_field("status", "status is required"))?;
        let record = self
            .record_from(&input, now_unix())
            .map_err(|e| e.within("status"))?;
        let outcome = self
            .state
            .store
            .put_many(std::slice::from_ref(&record))
            .await?;
        let sequence = match outcome.first() {
            Some(PutOutcome::Applied { sequence }) => {
                self.state.metrics.status_writes.inc();
                self.state.metrics.last_sequence.set(*sequence as i64);
                self.audit_change(&caller, &record);
                *sequence
            }
            Some(PutOutcome::Unchanged) => 0,
            Some(PutOutcome::Stale { stored_as_of }) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "stored status is newer (as_of {}); send a later as_of to change it",
                    format_time(*stored_as_of)
                )));
            }
            None => return Err(NodeError::Internal("no outcome for one write".into())),
        };
        tracing::info!(holder = %record.holder, sequence, "status set");
        Ok(PutStatusResponse {
            record: Some(record),
            sequence,
        })
    }

    async fn import(
        &self,
        request: Request<Streaming<ImportStatusesRequest>>,
    ) -> NodeResult<ImportStatusesResponse> {
        let caller = check(&self.state, &request, "ImportStatuses", Access::Admin)?;
        let mut rows = request.into_inner();
        let mut summary = ImportStatusesResponse::default();
        let mut chunk: Vec<(u64, StatusRecord)> = Vec::with_capacity(IMPORT_CHUNK);
        let now = now_unix();
        while let Some(row) = rows.next().await {
            // A broken stream ends the import; what was stored so far stays
            // stored and durable, and the caller sees the error.
            let row =
                row.map_err(|s| NodeError::invalid(format!("import stream: {}", s.message())))?;
            let Some(input) = row.status else {
                summary.rejected.push(ImportRejection {
                    line: row.line,
                    reason: "empty row".into(),
                });
                continue;
            };
            match self.record_from(&input, now) {
                Ok(record) => chunk.push((row.line, record)),
                Err(e) => summary.rejected.push(ImportRejection {
                    line: row.line,
                    reason: e.to_string(),
                }),
            }
            if chunk.len() >= IMPORT_CHUNK {
                self.store_chunk(&caller, &mut chunk, &mut summary).await?;
            }
        }
        self.store_chunk(&caller, &mut chunk, &mut summary).await?;
        summary.rejected.sort_by_key(|r| r.line);
        tracing::info!(
            accepted = summary.accepted,
            rejected = summary.rejected.len(),
            "import finished"
        );
        Ok(summary)
    }

    async fn store_chunk(
        &self,
        caller: &Identity,
        chunk: &mut Vec<(u64, StatusRecord)>,
        summary: &mut ImportStatusesResponse,
    ) -> NodeResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let records: Vec<StatusRecord> = chunk.iter().map(|(_, r)| r.clone()).collect();
        let outcomes = self.state.store.put_many(&records).await?;
        for ((line, record), outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                PutOutcome::Applied { sequence } => {
                    self.audit_change(caller, record);
                    summary.accepted += 1;
                    self.state.metrics.status_writes.inc();
                    self.state.metrics.last_sequence.set(sequence as i64);
                }
                PutOutcome::Unchanged => summary.accepted += 1,
                PutOutcome::Stale { stored_as_of } => summary.rejected.push(ImportRejection {
                    line: *line,
                    reason: format!(
                        "stored status is newer (as_of {})",
                        format_time(stored_as_of)
                    ),
                }),
            }
        }
        chunk.clear();
        Ok(())
    }

    fn get_status(&self, request: Request<GetStatusRequest>) -> NodeResult<GetStatusResponse> {
        check(&self.state, &request, "GetStatus", Access::Admin)?;
        let holder = match &request.get_ref().subject {
            Some(get_status_request::Subject::NationalId(id)) => {
                self.state.holder_from(Some(id), None)?
            }
            Some(get_status_request::Subject::Holder(h)) => {
                self.state.holder_from(None, Some(h))?
            }
            None => self.state.holder_from(None, None)?,
        };
        let record = self
            .state
            .store
            .get(self.state.province, holder.as_str())?
            .ok_or_else(|| NodeError::HolderNotFound {
                issuer: self.state.province,
                holder: holder.to_string(),
            })?;
        Ok(GetStatusResponse {
            record: Some(record),
        })
    }

    fn issue_code(&self, request: Request<IssueCodeRequest>) -> NodeResult<IssueCodeResponse> {
        check(&self.state, &request, "IssueCode", Access::Admin)?;
        let req = request.get_ref();
        // The display data is worked out here and signed into the code; the
        // name and id themselves go no further than this function.
        let masked_name = match req.name.trim() {
            "" => None,
            name => Some(
                display::mask_name(name)
                    .map_err(|e| NodeError::invalid_field("name", e.to_string()))?,
            ),
        };
        let (holder, masked_id) = match &req.subject {
            Some(issue_code_request::Subject::NationalId(id)) => {
                let id = NationalId::parse(id)
                    .map_err(|e| NodeError::invalid_field("national_id", e.to_string()))?;
                (
                    self.state.secret.pseudonym(&id),
                    Some(display::mask_national_id(&id)),
                )
            }
            Some(issue_code_request::Subject::Holder(h)) => {
                (self.state.holder_from(None, Some(h))?, None)
            }
            None => (self.state.holder_from(None, None)?, None),
        };
        let record = self
            .state
            .store
            .get(self.state.province, holder.as_str())?
            .ok_or_else(|| {
                NodeError::FailedPrecondition(format!(
                    "no status for holder {holder}: set one before issuing a code"
                ))
            })?;
        let colour = match Colour::try_from(record.colour) {
            Ok(Colour::Green) => hufu_federation::codes::Colour::Green,
            Ok(Colour::Yellow) => hufu_federation::codes::Colour::Yellow,
            _ => hufu_federation::codes::Colour::Red,
        };
        let now = now_unix();
        let exp = now + self.state.code_lifetime.as_secs() as i64;
        let claims = CodeClaims {
            iss: format!("hufu:{}", self.state.province),
            sub: holder.to_string(),
            iat: now,
            nbf: now,
            exp,
            hc: HealthClaim {
                colour,
                as_of: seconds(record.as_of.as_ref()).unwrap_or(now),
                neg_test: seconds(record.last_negative_test.as_ref()),
            },
            hn: masked_name,
            hi: masked_id,
        };
        let keyring = self.state.keyring.read().expect("keyring lock");
        let token = keyring
            .sign(&claims)
            .map_err(|e| NodeError::Internal(format!("signing: {e}")))?;
        Ok(IssueCodeResponse {
            token,
            kid: keyring.active_kid().to_owned(),
            expires: Some(timestamp(exp)),
            status: Some(record),
        })
    }

    fn rotate(&self, request: Request<RotateKeyRequest>) -> NodeResult<RotateKeyResponse> {
        let caller = check(&self.state, &request, "RotateKey", Access::Admin)?;
        let alg = request.get_ref().algorithm.trim();
        let alg: CodeAlg = if alg.is_empty() { "es256" } else { alg }
            .parse()
            .map_err(|e| NodeError::invalid_field("algorithm", format!("{e}")))?;
        let (kid, previous) = {
            let mut keyring = self.state.keyring.write().expect("keyring lock");
            let previous = keyring.active_kid().to_owned();
            let kid = keyring
                .rotate(alg)
                .map_err(|e| NodeError::Internal(format!("rotating keys: {e}")))?;
            (kid, previous)
        };
        self.state.publish_own_keys();
        tracing::info!(%kid, %previous, "code-signing key rotated");
        self.state.audit.record(|| {
            audit::entry(EntryKind::KeyRotated, &caller, self.state.province)
                .with_detail(format!("new kid {kid}, previous kid {previous}"))
        });
        Ok(RotateKeyResponse {
            kid,
            previous_kid: previous,
        })
    }

    fn revoke(&self, request: Request<RevokeKeyRequest>) -> NodeResult<RevokeKeyResponse> {
        let caller = check(&self.state, &request, "RevokeKey", Access::Admin)?;
        let kid = request.into_inner().kid;
        self.state
            .keyring
            .write()
            .expect("keyring lock")
            .revoke(&kid)
            .map_err(|e| NodeError::FailedPrecondition(e.to_string()))?;
        self.state.publish_own_keys();
        tracing::warn!(%kid, "code-signing key revoked");
        self.state.audit.record(|| {
            audit::entry(EntryKind::KeyRevoked, &caller, self.state.province)
                .with_detail(format!("kid {kid}"))
        });
        Ok(RevokeKeyResponse {})
    }
}

#[tonic::async_trait]
impl admin_service_server::AdminService for AdminService {
    async fn put_status(
        &self,
        request: Request<PutStatusRequest>,
    ) -> Result<Response<PutStatusResponse>, Status> {
        metered(&self.state.metrics, "PutStatus", async {
            Ok(Response::new(self.put_status(request).await?))
        })
        .await
    }

    async fn import_statuses(
        &self,
        request: Request<Streaming<ImportStatusesRequest>>,
    ) -> Result<Response<ImportStatusesResponse>, Status> {
        metered(&self.state.metrics, "ImportStatuses", async {
            Ok(Response::new(self.import(request).await?))
        })
        .await
    }

    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        metered(&self.state.metrics, "GetStatus", async {
            Ok(Response::new(self.get_status(request)?))
        })
        .await
    }

    async fn issue_code(
        &self,
        request: Request<IssueCodeRequest>,
    ) -> Result<Response<IssueCodeResponse>, Status> {
        metered(&self.state.metrics, "IssueCode", async {
            Ok(Response::new(self.issue_code(request)?))
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        metered(&self.state.metrics, "RotateKey", async {
            Ok(Response::new(self.rotate(request)?))
        })
        .await
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<RevokeKeyResponse>, Status> {
        metered(&self.state.metrics, "RevokeKey", async {
            Ok(Response::new(self.revoke(request)?))
        })
        .await
    }
}
