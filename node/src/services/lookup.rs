//! `hufu.v1.StatusLookupService`: status lookups and code verification for
//! terminals of this province and nodes of every member.

use crate::audit::NodeAudit;
use crate::codes::Codes;
use crate::federation::Federation;
use crate::peers::PeerClient;
use crate::standing::Standing;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;

use hufu_certs::{Identity, Province};
use hufu_federation::audit::EntryKind;
use hufu_federation::codes::{self, Verdict as CodeVerdict};
use hufu_federation::holder::{HolderId, NationalId};
use hufu_federation::legacy::{MAX_SCAN_BYTES, Scan};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::status_lookup_service_server::StatusLookupService;
use hufu_proto::v1::{
    BatchEntry, BatchLookupRequest, BatchLookupResponse, Colour, GetJwksRequest, GetJwksResponse,
    HolderMatch, LookupRequest, LookupResponse, Provenance, Reason, Source, StatusRecord, Verdict,
    VerifyRequest, VerifyResponse,
};
use tonic::{Request, Response, Status};

use crate::answer::{evaluate, provenance};
use crate::audit;
use crate::auth::caller;
use crate::error::{NodeError, NodeResult};
use crate::legacy::LegacyCodes;
use crate::legacy::verify::LegacyCode;
use crate::peers::PeerError;
use crate::services::error::LookupError;
use crate::state::NodeState;
use crate::status::{now_millis, now_unix, seconds, timestamp};

/// Most holders one `BatchLookup` may ask for.
pub const MAX_BATCH: usize = 1000;

/// A batch entry's error for a holder without a status.
const NO_STATUS: &str = "no status";

/// Whether a batch entry is an answer about a holder (not an invalid id).
fn answered(entry: &BatchEntry) -> bool {
    entry.record.is_some() || entry.error == NO_STATUS
}

/// `hufu.v1.StatusLookupService`: lookups, batch lookups, verification and
/// published keys, from this node's store and replicas or the issuer.
pub struct LookupService {
    province: Province,
    store: Arc<Store>,
    codes: Arc<Codes>,
    audit: Arc<NodeAudit>,
    standing: Arc<Standing>,
    peers: Arc<PeerClient>,
    federation: Arc<Federation>,
    max_replica_age: Duration,
    legacy: LegacyCodes,
}

impl LookupService {
    /// The service, holding the parts of `state` it uses.
    pub fn new(state: &NodeState) -> Self {
        LookupService {
            province: state.province,
            store: state.store.clone(),
            codes: state.codes.clone(),
            audit: state.audit.clone(),
            standing: state.standing.clone(),
            peers: state.peers.clone(),
            federation: state.federation.clone(),
            max_replica_age: state.max_replica_age,
            legacy: LegacyCodes::new(state),
        }
    }

    /// The province asked about: this node's own, or a federation member.
    fn issuer(&self, issuer: &str) -> Result<Province, LookupError> {
        let asked = Province::parse(issuer).map_err(LookupError::Issuer)?;
        if asked == self.province {
            return Ok(asked);
        }
        let membership = self.peers.members();
        if membership.member(asked).is_some() {
            return Ok(asked);
        }
        Err(match membership.list {
            None => NodeError::WrongProvince {
                asked,
                own: self.province,
            },
            Some(_) => NodeError::NotFound(format!(
                "province {asked} is not a member of the federation (trust list v{})",
                membership.version()
            )),
        }
        .into())
    }

    /// Whether a call by `caller` about province `p` crosses provinces, and
    /// so is audited: the caller or the holder's province is not this one.
    fn cross_province(&self, caller: &Identity, p: Province) -> bool {
        caller.province != self.province || p != self.province
    }

    fn own_provenance(&self) -> Provenance {
        provenance(Source::Authoritative, Some(0), self.province)
    }

    /// How old this node's replica of `p` is, in milliseconds (None: no
    /// signed head from `p` yet). Measured from when a head last confirmed
    /// it, by this node's clock, so an issuer's clock running ahead cannot
    /// make the replica look younger than it is.
    fn replica_age_ms(&self, p: Province) -> NodeResult<Option<i64>> {
        Ok(self
            .store
            .replica_confirmed(p)?
            .map(|at| (now_millis() - at).max(0)))
    }

    fn fresh(&self, age_ms: Option<i64>) -> bool {
        age_ms.is_some_and(|a| a <= self.max_replica_age.as_millis() as i64)
    }

    /// A holder's record in province `p` and where it came from: this
    /// node's own data, a fresh replica, the issuer asked directly, or (when
    /// the issuer cannot be reached) the stale replica with its age.
    async fn answer(
        &self,
        caller: &Identity,
        p: Province,
        holder: &str,
    ) -> NodeResult<(Option<StatusRecord>, Provenance)> {
        if p == self.province {
            return Ok((self.store.get(p, holder)?, self.own_provenance()));
        }
        let age = self.replica_age_ms(p)?;
        if self.fresh(age) {
            return Ok((
                self.store.get(p, holder)?,
                provenance(Source::Replica, age, self.province),
            ));
        }
        match self
            .federation
            .lookup_authoritative(p, holder, caller)
            .await
        {
            Ok(record) => Ok((record, provenance(Source::Authoritative, Some(0), p))),
            Err(why) => {
                tracing::debug!(province = %p, error = %why, "issuer unreachable; answering from stale replica");
                Ok((
                    self.store.get(p, holder)?,
                    provenance(Source::ReplicaStale, age, self.province),
                ))
            }
        }
    }

    async fn lookup(&self, request: Request<LookupRequest>) -> Result<LookupResponse, LookupError> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let issuer = self.issuer(&req.issuer)?;
        let holder: HolderId = req.holder.parse().map_err(LookupError::Holder)?;
        let (record, provenance) = self.answer(&caller, issuer, holder.as_str()).await?;
        if self.cross_province(&caller, issuer) {
            self.audit
                .record(|| {
                    audit::answered(
                        EntryKind::LookupServed,
                        &caller,
                        issuer,
                        holder.as_str(),
                        audit::answer(record.as_ref()),
                        Some(provenance.source),
                    )
                })
                .await;
        }
        let record = record.ok_or_else(|| NodeError::HolderNotFound {
            issuer,
            holder: holder.to_string(),
        })?;
        Ok(LookupResponse {
            record: Some(record),
            provenance: Some(provenance),
        })
    }

    async fn batch_lookup(
        &self,
        request: Request<BatchLookupRequest>,
    ) -> Result<BatchLookupResponse, LookupError> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        if req.holders.len() > MAX_BATCH {
            return Err(LookupError::BatchTooLarge(req.holders.len()));
        }
        let p = self.issuer(&req.issuer)?;
        // One freshness decision for the whole batch: a batch is answered
        // from one source, never a mixture.
        let provenance = if p == self.province {
            self.own_provenance()
        } else {
            let age = self.replica_age_ms(p)?;
            if self.fresh(age) {
                provenance(Source::Replica, age, self.province)
            } else {
                match self.forward_batch(&caller, p, &req.holders).await {
                    Ok(reply) => {
                        self.audit_batch(&caller, p, &reply.entries, Source::Authoritative as i32)
                            .await;
                        return Ok(reply);
                    }
                    Err(why) => {
                        tracing::debug!(province = %p, error = %why, "issuer unreachable; batch from stale replica");
                        provenance(Source::ReplicaStale, age, self.province)
                    }
                }
            }
        };
        // Up to a thousand sled reads: on the blocking pool, so that a slow
        // disk slows this batch, not the threads that shed load.
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || {
            let mut entries = Vec::with_capacity(req.holders.len());
            for holder in req.holders {
                let entry = match holder.parse::<HolderId>() {
                    Err(e) => BatchEntry {
                        holder,
                        record: None,
                        error: e.to_string(),
                    },
                    Ok(id) => match store.get(p, id.as_str())? {
                        Some(record) => BatchEntry {
                            holder,
                            record: Some(record),
                            error: String::new(),
                        },
                        None => BatchEntry {
                            holder,
                            record: None,
                            error: NO_STATUS.into(),
                        },
                    },
                };
                entries.push(entry);
            }
            Ok::<_, NodeError>(entries)
        })
        .await??;
        if self.cross_province(&caller, p) {
            self.audit_batch(&caller, p, &entries, provenance.source)
                .await;
        }
        Ok(BatchLookupResponse {
            entries,
            provenance: Some(provenance),
        })
    }

    /// Records a `lookup_served` entry for every holder of a batch answered
    /// to `caller` about province `p` from `source`.
    async fn audit_batch(
        &self,
        caller: &Identity,
        p: Province,
        entries: &[BatchEntry],
        source: i32,
    ) {
        let served = entries
            .iter()
            .filter(|e| answered(e))
            .map(|e| {
                audit::answered(
                    EntryKind::LookupServed,
                    caller,
                    p,
                    &e.holder,
                    audit::answer(e.record.as_ref()),
                    Some(source),
                )
            })
            .collect::<Vec<_>>();
        self.audit.record_all(served).await;
    }

    /// Asks the issuing province for a whole batch, within the deadline, on
    /// behalf of `caller`; each holder asked about is audited.
    async fn forward_batch(
        &self,
        caller: &Identity,
        p: Province,
        holders: &[String],
    ) -> Result<BatchLookupResponse, PeerError> {
        let request = BatchLookupRequest {
            issuer: p.to_string(),
            holders: holders.to_vec(),
        };
        let result = self
            .peers
            .call(p, "batch lookup at", |call| {
                let request = call.request(request.clone());
                async move {
                    StatusLookupServiceClient::new(call.channel)
                        .batch_lookup(request)
                        .await
                        .map(|reply| reply.into_inner())
                }
            })
            .await;
        let made = |holder: &str, answer: &str, source| {
            audit::answered(EntryKind::LookupMade, caller, p, holder, answer, source)
        };
        if self.audit.enabled() {
            let entries: Vec<_> = match &result {
                Ok(reply) => reply
                    .entries
                    .iter()
                    .filter(|e| answered(e))
                    .map(|e| {
                        made(
                            &e.holder,
                            audit::answer(e.record.as_ref()),
                            Some(Source::Authoritative as i32),
                        )
                    })
                    .collect(),
                Err(_) => holders
                    .iter()
                    .filter(|h| h.parse::<HolderId>().is_ok())
                    .map(|h| made(h, audit::UNREACHABLE, None))
                    .collect(),
            };
            self.audit.record_all(entries).await;
        }
        result
    }

    async fn verify(&self, request: Request<VerifyRequest>) -> Result<VerifyResponse, LookupError> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        // The national id read from a card is checked first, so that a
        // misread is the terminal's error before anything else happens; it
        // lives only in this call.
        let national_id = match req.national_id.trim() {
            "" => None,
            id => Some(NationalId::parse(id).map_err(LookupError::NationalId)?),
        };
        // Hufu's own code, or a member's legacy code, or neither.
        let legacy = match self.peers.members().formats.scan(&req.token) {
            Scan::Hufu => None,
            Scan::Legacy(m) => Some(LegacyCode {
                issuer: m.issuer,
                format: m.format.to_owned(),
                hash: m.hash(),
            }),
            Scan::Unmatched => {
                return Ok(refusal(&CodeVerdict::Malformed(
                    "neither a Hufu code nor a legacy code of any member's declared format: scan the code again".into(),
                )));
            }
            Scan::TooLong { bytes } => {
                return Ok(refusal(&CodeVerdict::Malformed(format!(
                    "the scanned text is {bytes} bytes, more than the {MAX_SCAN_BYTES} any code has: refused unread"
                ))));
            }
        };
        if let Some(code) = legacy {
            return Ok(crate::legacy::verify::verify(
                &self.legacy,
                &caller,
                code,
                req.policy.as_ref(),
                national_id.as_ref(),
            )
            .await?);
        }
        let now = now_unix();
        let code = match codes::qr::from_scanned(&req.token)
            .and_then(|token| self.codes.verifier.verify(&token, now))
        {
            Ok(code) => code,
            Err(verdict) => {
                self.audit_refusal(&caller, &req.token, &verdict).await;
                return Ok(refusal(&verdict));
            }
        };
        let claims = &code.claims;
        let from_token = StatusRecord {
            issuer: code.issuer.to_string(),
            holder: claims.sub.clone(),
            colour: proto_colour(claims.hc.colour) as i32,
            as_of: Some(timestamp(claims.hc.as_of)),
            last_negative_test: claims.hc.neg_test.map(timestamp),
            reason: Reason::Unspecified as i32,
        };
        // Effective status: the newer of the code's own claim and what is
        // known about the holder (own data, replica, or the issuer itself);
        // the holder match, when asked, at the same time.
        let (known, holder_match) = tokio::join!(
            self.answer(&caller, code.issuer, &claims.sub),
            self.federation
                .holder_match(&caller, code.issuer, &claims.sub, national_id.as_ref()),
        );
        let (known, provenance) = known?;
        // At equal `as_of` the record wins: the issuer may rewrite a status
        // within the same second, and the record is its latest word.
        let (status, source) = match known {
            Some(record) if seconds(record.as_of.as_ref()).unwrap_or(0) >= claims.hc.as_of => {
                (record, provenance.source)
            }
            _ => (from_token, Source::Token as i32),
        };
        let (policy_met, reason) = evaluate(req.policy.as_ref(), &status, &provenance, now);
        if self.cross_province(&caller, code.issuer) {
            self.audit
                .record(|| {
                    let e = audit::answered(
                        EntryKind::VerifyServed,
                        &caller,
                        code.issuer,
                        &claims.sub,
                        audit::answer(Some(&status)),
                        Some(source),
                    );
                    let policy = match (&req.policy, policy_met) {
                        (None, _) => None,
                        (Some(_), true) => Some("policy met"),
                        (Some(_), false) => Some("policy not met"),
                    };
                    // Only that a match was asked and its outcome.
                    let matched = match holder_match {
                        HolderMatch::Unspecified => None,
                        HolderMatch::True => Some("holder match true"),
                        HolderMatch::False => Some("holder match false"),
                        HolderMatch::Unknown => Some("holder match unknown"),
                    };
                    match (policy, matched) {
                        (None, None) => e,
                        (Some(d), None) | (None, Some(d)) => e.with_detail(d),
                        (Some(p), Some(m)) => e.with_detail(format!("{p}; {m}")),
                    }
                })
                .await;
        }
        Ok(VerifyResponse {
            verdict: Verdict::Valid as i32,
            reason,
            status: Some(status),
            provenance: Some(provenance),
            policy_met,
            kid: code.kid.to_string(),
            expires: Some(timestamp(claims.exp)),
            masked_name: claims.hn.clone().unwrap_or_default(),
            masked_national_id: claims.hi.clone().unwrap_or_default(),
            holder_match: holder_match as i32,
            format: String::new(),
        })
    }

    /// Audits a refused code that claims another province as its issuer,
    /// under the claims it carries (unverified, and said so).
    async fn audit_refusal(&self, caller: &Identity, token: &str, verdict: &CodeVerdict) {
        if !self.audit.enabled() {
            return;
        }
        let Some((issuer, holder)) = claimed_issuer(token) else {
            return;
        };
        if !self.cross_province(caller, issuer) {
            return;
        }
        self.audit
            .record(|| {
                audit::answered(
                    EntryKind::VerifyServed,
                    caller,
                    issuer,
                    &holder,
                    verdict.label(),
                    None,
                )
                .with_detail("code refused; issuer and holder as claimed, unverified")
            })
            .await;
    }

    fn jwks(&self, request: Request<GetJwksRequest>) -> Result<GetJwksResponse, LookupError> {
        caller(&request)?;
        let req = request.into_inner();
        if !req.province.is_empty() {
            let p = self.issuer(&req.province)?;
            if p != self.province {
                // Another member's keys exactly as this node's verifier holds
                // them: the trust list's, updated by what the province itself
                // published since (rotations, revocations), so a tool that
                // checks codes with this answer agrees with `Verify` here.
                let (jwks, revoked_kids) = self.codes.verifier.keys_of(p).ok_or_else(|| {
                    NodeError::NotFound(format!(
                        "no code-signing keys of province {p} are known here yet: retry shortly"
                    ))
                })?;
                return Ok(GetJwksResponse {
                    jwks_json: serde_json::to_string(&jwks)?,
                    revoked_kids,
                    revoked_serials: self.standing.revoked(p),
                });
            }
        }
        // Exactly what this province's feed heads announce the digest of.
        let own = self.codes.own_published_keys();
        Ok(GetJwksResponse {
            jwks_json: own.jwks_json.clone(),
            revoked_kids: own.revoked_kids.clone(),
            revoked_serials: own.revoked_serials.clone(),
        })
    }
}

/// The issuer and holder a code claims, read without checking anything.
fn claimed_issuer(token: &str) -> Option<(Province, String)> {
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: String,
        #[serde(default)]
        sub: String,
    }
    let token = codes::qr::from_scanned(token).ok()?;
    let payload = token.split('.').nth(1)?;
    let json = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .ok()?;
    let claims: Claims = serde_json::from_slice(&json).ok()?;
    let issuer = Province::parse(claims.iss.strip_prefix("hufu:")?).ok()?;
    Some((issuer, claims.sub))
}

pub fn proto_colour(c: codes::Colour) -> Colour {
    match c {
        codes::Colour::Green => Colour::Green,
        codes::Colour::Yellow => Colour::Yellow,
        codes::Colour::Red => Colour::Red,
    }
}

/// The reply for a code that is not good: a verdict, not a transport error.
fn refusal(verdict: &CodeVerdict) -> VerifyResponse {
    let v = match verdict {
        CodeVerdict::Malformed(_) => Verdict::Malformed,
        CodeVerdict::BadSignature(_) => Verdict::BadSignature,
        CodeVerdict::UnknownKey { .. } => Verdict::UnknownKey,
        CodeVerdict::RevokedKey { .. } => Verdict::RevokedKey,
        CodeVerdict::Expired { .. } => Verdict::Expired,
        CodeVerdict::NotYetValid { .. } => Verdict::NotYetValid,
    };
    VerifyResponse {
        verdict: v as i32,
        reason: verdict.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl StatusLookupService for LookupService {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        Ok(Response::new(self.lookup(request).await?))
    }

    async fn batch_lookup(
        &self,
        request: Request<BatchLookupRequest>,
    ) -> Result<Response<BatchLookupResponse>, Status> {
        Ok(Response::new(self.batch_lookup(request).await?))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        Ok(Response::new(self.verify(request).await?))
    }

    async fn get_jwks(
        &self,
        request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(self.jwks(request)?))
    }
}
