//! Resolving a legacy code's hash to a holder and status: from this node's
//! storage (its own bindings, or its replica of the issuer's), and from the
//! issuing province itself with `ResolveCode`, through the peer client's
//! deadline, circuit breaker and retry budget.

use hufu_certs::{Identity, Province};
use hufu_federation::audit::{AnswerSource, EntryKind};
use hufu_federation::legacy::CodeHash;
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{ResolveCodeRequest, ResolveCodeResponse};

use super::{LegacyCodes, Resolved, UNKNOWN_CODE, audit_detail};
use crate::audit;
use crate::error::{NodeError, NodeResult};

impl LegacyCodes {
    /// What this node's storage says of code `hash` of province `p`: its
    /// own bindings for this province, its replica of `p`'s feed otherwise.
    pub fn resolve_stored(&self, p: Province, hash: &CodeHash) -> NodeResult<Resolved> {
        let holder = self.store.binding(p, hash)?;
        let record = match &holder {
            Some(h) => self.store.get(p, h)?,
            None => None,
        };
        Ok(Resolved { holder, record })
    }

    /// Asks province `p` itself what code `hash` of its format `format` is
    /// bound to, on behalf of `caller`; the call made is audited (format and
    /// hash, never the code).
    pub async fn resolve_authoritative(
        &self,
        p: Province,
        format: &str,
        hash: &CodeHash,
        caller: &Identity,
    ) -> Result<Resolved, String> {
        let result = self.ask_resolve(p, format, hash).await;
        self.audit
            .record(|| {
                let made = audit::entry(EntryKind::LookupMade, caller, p)
                    .with_detail(audit_detail(format, hash));
                match &result {
                    Ok(r) => audit::about(made, r.holder.as_deref().unwrap_or_default())
                        .with_answer(answer(r))
                        .with_source(AnswerSource::Authoritative),
                    Err(_) => made.with_answer(audit::UNREACHABLE),
                }
            })
            .await;
        result
    }

    async fn ask_resolve(
        &self,
        p: Province,
        format: &str,
        hash: &CodeHash,
    ) -> Result<Resolved, String> {
        let request = ResolveCodeRequest {
            format: format.to_owned(),
            code_hash: hash.0.to_vec(),
        };
        let reply = self
            .peers
            .call(p, "resolve code at", |call| {
                let request = call.request(request.clone());
                async move {
                    FederationServiceClient::new(call.channel)
                        .resolve_code(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        resolved_from(p, reply)
    }

    /// `ResolveCode` at the issuer: what code `hash` of this province's
    /// format `format` is bound to, asked by `caller` (another province's
    /// node), audited as a lookup served.
    pub async fn serve_resolve(
        &self,
        caller: &Identity,
        format: &str,
        code_hash: &[u8],
    ) -> NodeResult<ResolveCodeResponse> {
        let own = self.province;
        let membership = self.peers.members();
        if !membership.formats.names(own).contains(&format) {
            return Err(NodeError::invalid_field(
                "format",
                format!(
                    "{format:?} is not a legacy code format of province {own} (its formats: {})",
                    membership.formats.names(own).join(", ")
                ),
            ));
        }
        let hash = CodeHash::from_slice(code_hash).ok_or_else(|| {
            NodeError::invalid_field(
                "code_hash",
                format!(
                    "code_hash is {} bytes: send the 32-byte SHA-256",
                    code_hash.len()
                ),
            )
        })?;
        let resolved = self.resolve_stored(own, &hash)?;
        if caller.province != own {
            self.audit
                .record(|| {
                    audit::about(
                        audit::entry(EntryKind::LookupServed, caller, own),
                        resolved.holder.as_deref().unwrap_or_default(),
                    )
                    .with_answer(answer(&resolved))
                    .with_source(AnswerSource::Authoritative)
                    .with_detail(audit_detail(format, &hash))
                })
                .await;
        }
        Ok(ResolveCodeResponse {
            bound: resolved.holder.is_some(),
            holder: resolved.holder.unwrap_or_default(),
            record: resolved.record,
        })
    }
}

/// The audit answer for a resolution: the colour, `not_found` for a bound
/// holder without a status, or `unknown_code`.
pub fn answer(r: &Resolved) -> &'static str {
    match &r.holder {
        None => UNKNOWN_CODE,
        Some(_) => audit::answer(r.record.as_ref()),
    }
}

/// Checks the issuer's answer says what an answer about one of its codes
/// may say: a holder pseudonym when bound, and a record of that holder.
fn resolved_from(p: Province, reply: ResolveCodeResponse) -> Result<Resolved, String> {
    if !reply.bound {
        return Ok(Resolved::default());
    }
    reply
        .holder
        .parse::<hufu_federation::holder::HolderId>()
        .map_err(|e| format!("province {p} answered with a bad holder: {e}"))?;
    if let Some(r) = &reply.record
        && (r.holder != reply.holder || r.issuer != p.to_string())
    {
        return Err(format!(
            "province {p} answered with a record of another holder or province"
        ));
    }
    Ok(Resolved {
        holder: Some(reply.holder),
        record: reply.record,
    })
}
