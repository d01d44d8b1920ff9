//! `hufu.v1.AdminService`: a province's own administration (statuses, codes, keys),
//! for admins of the node's province only.

use crate::audit::NodeAudit;
use crate::codes::Codes;
use crate::metrics::Metrics;
use crate::replication::WriteLog;
use crate::store::Store;
use hufu_certs::Province;
use std::sync::Arc;

use hufu_certs::Identity;
use hufu_federation::audit::EntryKind;
use hufu_federation::codes::{CodeAlg, CodeClaims, HealthClaim, display};
use hufu_federation::holder::NationalId;
use hufu_proto::v1::admin_service_server;
use hufu_proto::v1::{
    Colour, GetStatusRequest, GetStatusResponse, ImportStatusesRequest, ImportStatusesResponse,
    IssueCodeRequest, IssueCodeResponse, LinkCodeRequest, LinkCodeResponse, PutStatusRequest,
    PutStatusResponse, Reason, RevokeKeyRequest, RevokeKeyResponse, RotateKeyRequest,
    RotateKeyResponse, StatusInput, StatusRecord, UnlinkCodeRequest, UnlinkCodeResponse,
    get_status_request, issue_code_request, status_input,
};
use tonic::{Request, Response, Status, Streaming};

mod import;

use crate::audit;
use crate::auth::caller;
use crate::error::{NodeError, NodeResult};
use crate::legacy;
use crate::services::error::AdminError;
use crate::state::NodeState;
use crate::status::{format_time, now_unix, reason_name, seconds, timestamp};
use crate::store::PutOutcome;

/// How far in the future an `as_of` may lie (clock skew between systems).
const MAX_FUTURE_SKEW_SECS: i64 = 300;

/// `hufu.v1.AdminService`: this province's statuses and keys.
#[derive(Clone)]
pub struct AdminService {
    province: Province,
    store: Arc<Store>,
    codes: Arc<Codes>,
    audit: Arc<NodeAudit>,
    metrics: Arc<Metrics>,
    write_log: Option<Arc<WriteLog>>,
    legacy: legacy::LegacyCodes,
}

impl AdminService {
    /// The service, holding the parts of `state` it uses.
    pub fn new(state: &NodeState) -> Self {
        AdminService {
            province: state.province,
            store: state.store.clone(),
            codes: state.codes.clone(),
            audit: state.audit.clone(),
            metrics: state.metrics.clone(),
            write_log: state.write_log.clone(),
            legacy: legacy::LegacyCodes::new(state),
        }
    }

    /// Validates operator input and turns it into a record keyed by pseudonym.
    fn record_from(&self, input: &StatusInput, now: i64) -> NodeResult<StatusRecord> {
        let holder = match &input.subject {
            Some(status_input::Subject::NationalId(id)) => {
                self.codes.holder_from(Some(id), None)?
            }
            Some(status_input::Subject::Holder(h)) => self.codes.holder_from(None, Some(h))?,
            None => self.codes.holder_from(None, None)?,
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
            issuer: self.province.to_string(),
            holder: holder.as_str().to_owned(),
            colour: colour as i32,
            as_of: Some(timestamp(as_of)),
            last_negative_test: input.last_negative_test,
            reason: reason as i32,
        })
    }

    /// Stores own records: their audit entries first, on disk before the
    /// changes are written, so that no stored change ever lacks its entry
    /// (`kill -9` between the two leaves an entry of a change that a
    /// caller saw refused, never the reverse), then the changes. With
    /// replicas, the changes go through the province's write log, where
    /// their change numbers are decided: each entry then names the write,
    /// not its number.
    async fn store(
        &self,
        caller: &Identity,
        records: &[StatusRecord],
    ) -> NodeResult<Vec<PutOutcome>> {
        if let Some(log) = &self.write_log {
            let changed = records.iter().map(|r| (None, r));
            self.audit_changes(caller, changed, || Ok(())).await?;
            return log.put_statuses(records).await;
        }
        let mut pending = self.store.prepare(records).await?;
        let changed = applied(pending.outcomes(), records);
        // The changes are staged while the audit log writes their entries.
        self.audit_changes(caller, changed, || pending.stage())
            .await?;
        pending.commit().await
    }

    /// Audits status changes about to be stored (who, which holder, which
    /// colour) and returns once their entries are on disk, having run
    /// `meanwhile` while the audit log's thread wrote them.
    async fn audit_changes<'a>(
        &self,
        caller: &Identity,
        records: impl IntoIterator<Item = (Option<u64>, &'a StatusRecord)>,
        meanwhile: impl FnOnce() -> NodeResult<()>,
    ) -> NodeResult<()> {
        if !self.audit.enabled() {
            return meanwhile();
        }
        if let Err(err) = self.audit.reopen_if_failed().await {
            return Err(NodeError::Unavailable(format!(
                "the audit log cannot be written ({err:#}): the change was not stored; free disk space on the node, then send it again"
            )));
        }
        let entries: Vec<_> = records
            .into_iter()
            .map(|(sequence, record)| {
                let reason = Reason::try_from(record.reason).unwrap_or(Reason::Unspecified);
                audit::about(
                    audit::entry(EntryKind::StatusChanged, caller, self.province),
                    &record.holder,
                )
                .with_answer(audit::answer(Some(record)))
                .with_detail(match sequence {
                    Some(sequence) => format!("reason {}, change {sequence}", reason_name(reason)),
                    None => format!("reason {}, through the write log", reason_name(reason)),
                })
            })
            .collect();
        self.audit.record_all(entries).await;
        meanwhile()?;
        self.audit.sync().await.map_err(|e| {
            // The audit log shares the disk: refuse writes until it has room.
            self.store.refuse_writes(&e);
            NodeError::Unavailable(format!(
                "the audit entry of the change could not be written ({e}), so the change was not stored: free disk space on the node, then send it again"
            ))
        })
    }

    async fn put_status(
        &self,
        request: Request<PutStatusRequest>,
    ) -> Result<PutStatusResponse, AdminError> {
        let caller = caller(&request)?;
        let input = request
            .into_inner()
            .status
            .ok_or_else(|| NodeError::invalid_field("status", "status is required"))?;
        let record = self
            .record_from(&input, now_unix())
            .map_err(|e| e.within("status"))?;
        let outcome = self.store(&caller, std::slice::from_ref(&record)).await?;
        let sequence = match outcome.first() {
            Some(PutOutcome::Applied { sequence }) => {
                self.metrics.status_writes.inc();
                self.metrics.last_sequence.set(*sequence as i64);
                *sequence
            }
            Some(PutOutcome::Unchanged) => 0,
            Some(PutOutcome::Stale { stored_as_of }) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "stored status is newer (as_of {}); send a later as_of to change it",
                    format_time(*stored_as_of)
                ))
                .into());
            }
            None => return Err(NodeError::Internal("no outcome for one write".into()).into()),
        };
        tracing::info!(holder = %record.holder, sequence, "status set");
        Ok(PutStatusResponse {
            record: Some(record),
            sequence,
        })
    }

    fn get_status(&self, request: Request<GetStatusRequest>) -> NodeResult<GetStatusResponse> {
        caller(&request)?;
        let holder = match &request.get_ref().subject {
            Some(get_status_request::Subject::NationalId(id)) => {
                self.codes.holder_from(Some(id), None)?
            }
            Some(get_status_request::Subject::Holder(h)) => {
                self.codes.holder_from(None, Some(h))?
            }
            None => self.codes.holder_from(None, None)?,
        };
        let record = self
            .store
            .get(self.province, holder.as_str())?
            .ok_or_else(|| NodeError::HolderNotFound {
                issuer: self.province,
                holder: holder.to_string(),
            })?;
        Ok(GetStatusResponse {
            record: Some(record),
        })
    }

    fn issue_code(
        &self,
        request: Request<IssueCodeRequest>,
    ) -> Result<IssueCodeResponse, AdminError> {
        caller(&request)?;
        let req = request.get_ref();
        // The display data is worked out here and signed into the code; the
        // name and id themselves go no further than this function.
        let masked_name = match req.name.trim() {
            "" => None,
            name => Some(display::mask_name(name).map_err(AdminError::Name)?),
        };
        let (holder, masked_id) = match &req.subject {
            Some(issue_code_request::Subject::NationalId(id)) => {
                let id = NationalId::parse(id).map_err(AdminError::NationalId)?;
                (
                    self.codes.secret.pseudonym(&id),
                    Some(display::mask_national_id(&id)),
                )
            }
            Some(issue_code_request::Subject::Holder(h)) => {
                (self.codes.holder_from(None, Some(h))?, None)
            }
            None => (self.codes.holder_from(None, None)?, None),
        };
        let record = self
            .store
            .get(self.province, holder.as_str())?
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
        let exp = now + self.codes.lifetime.as_secs() as i64;
        let claims = CodeClaims {
            iss: format!("hufu:{}", self.province),
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
        let keyring = self.codes.keyring.read().expect("keyring lock");
        let token = keyring.sign(&claims).map_err(AdminError::Signing)?;
        Ok(IssueCodeResponse {
            token,
            kid: keyring.active_kid().to_owned(),
            expires: Some(timestamp(exp)),
            status: Some(record),
        })
    }

    async fn rotate(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<RotateKeyResponse, AdminError> {
        let caller = caller(&request)?;
        let alg = request.get_ref().algorithm.trim();
        let alg: CodeAlg = if alg.is_empty() { "es256" } else { alg }
            .parse()
            .map_err(AdminError::Algorithm)?;
        let (kid, previous) = match &self.write_log {
            Some(log) => {
                let previous = self.active_kid();
                (log.rotate_key(alg).await?, previous)
            }
            None => self.rotate_here(alg).await?,
        };
        tracing::info!(%kid, %previous, "code-signing key rotated");
        self.audit
            .record(|| {
                audit::entry(EntryKind::KeyRotated, &caller, self.province)
                    .with_detail(format!("new kid {kid}, previous kid {previous}"))
            })
            .await;
        Ok(RotateKeyResponse {
            kid,
            previous_kid: previous,
        })
    }

    fn active_kid(&self) -> String {
        let keyring = self.codes.keyring.read().expect("keyring lock");
        keyring.active_kid().to_owned()
    }

    /// Rotates this node's own keyring; returns the new and previous kids.
    async fn rotate_here(&self, alg: CodeAlg) -> Result<(String, String), AdminError> {
        // Key generation and the key files' writes: on the blocking pool,
        // and on a copy of the keyring, so codes are issued meanwhile.
        let codes = self.codes.clone();
        blocking(move || {
            codes
                .change_keyring(|keyring| {
                    let previous = keyring.active_kid().to_owned();
                    Ok((keyring.rotate(alg)?, previous))
                })
                .map_err(AdminError::Rotation)
        })
        .await
    }

    async fn revoke(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<RevokeKeyResponse, AdminError> {
        let caller = caller(&request)?;
        let kid = request.into_inner().kid;
        if let Some(log) = &self.write_log {
            // Refused here as a single node would, before it is logged.
            self.codes
                .keyring
                .read()
                .expect("keyring lock")
                .check_revocable(&kid)
                .map_err(AdminError::Revocation)?;
            log.revoke_key(&kid).await?;
        } else {
            let codes = self.codes.clone();
            let revoked = kid.clone();
            blocking(move || {
                codes
                    .change_keyring(|keyring| keyring.revoke(&revoked))
                    .map_err(AdminError::Revocation)
            })
            .await?;
        }
        tracing::warn!(%kid, "code-signing key revoked");
        self.audit
            .record(|| {
                audit::entry(EntryKind::KeyRevoked, &caller, self.province)
                    .with_detail(format!("kid {kid}"))
            })
            .await;
        Ok(RevokeKeyResponse {})
    }
}

/// Runs `work` (disk, key generation) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AdminError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(work).await?
}

#[tonic::async_trait]
impl admin_service_server::AdminService for AdminService {
    async fn put_status(
        &self,
        request: Request<PutStatusRequest>,
    ) -> Result<Response<PutStatusResponse>, Status> {
        Ok(Response::new(self.put_status(request).await?))
    }

    async fn import_statuses(
        &self,
        request: Request<Streaming<ImportStatusesRequest>>,
    ) -> Result<Response<ImportStatusesResponse>, Status> {
        Ok(Response::new(self.import(request).await?))
    }

    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Ok(Response::new(self.get_status(request)?))
    }

    async fn issue_code(
        &self,
        request: Request<IssueCodeRequest>,
    ) -> Result<Response<IssueCodeResponse>, Status> {
        Ok(Response::new(self.issue_code(request)?))
    }

    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        Ok(Response::new(self.rotate(request).await?))
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<RevokeKeyResponse>, Status> {
        Ok(Response::new(self.revoke(request).await?))
    }

    async fn link_code(
        &self,
        request: Request<LinkCodeRequest>,
    ) -> Result<Response<LinkCodeResponse>, Status> {
        let caller = caller(&request)?;
        let reply = legacy::link::link(&self.legacy, &caller, request.into_inner()).await?;
        Ok(Response::new(reply))
    }

    async fn unlink_code(
        &self,
        request: Request<UnlinkCodeRequest>,
    ) -> Result<Response<UnlinkCodeResponse>, Status> {
        let caller = caller(&request)?;
        let reply = legacy::link::unlink(&self.legacy, &caller, request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}

/// The records `outcomes` says were applied, with their sequence numbers:
/// what is audited as changed.
fn applied<'r>(
    outcomes: &[PutOutcome],
    records: &'r [StatusRecord],
) -> Vec<(Option<u64>, &'r StatusRecord)> {
    outcomes
        .iter()
        .zip(records)
        .filter_map(|(outcome, record)| match outcome {
            PutOutcome::Applied { sequence } => Some((Some(*sequence), record)),
            _ => None,
        })
        .collect()
}
