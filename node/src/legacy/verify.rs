//! `Verify` for a member's legacy code: the scan has matched a format, so
//! the issuer and the code's hash are known. The holder and status come
//! from this province's bindings, a fresh replica that knows the code, the
//! issuer itself, or the replica said to be stale; the verdict is `VALID`
//! or `UNKNOWN_CODE`, and the caller's policy applies as for a Hufu code.

use hufu_certs::{Identity, Province};
use hufu_federation::audit::EntryKind;
use hufu_federation::holder::NationalId;
use hufu_federation::legacy::CodeHash;
use hufu_proto::v1::{HolderMatch, Policy, Provenance, Source, Verdict, VerifyResponse};

use super::resolve::answer;
use super::{LegacyCodes, Resolved, audit_detail};
use crate::answer::{evaluate, provenance};
use crate::audit;
use crate::error::NodeResult;
use crate::status::{now_millis, now_unix};

/// A legacy code as matched: its issuer, format and hash (the id is gone).
#[derive(Debug, Clone)]
pub struct LegacyCode {
    pub issuer: Province,
    pub format: String,
    pub hash: CodeHash,
}

impl LegacyCodes {
    /// How old this node's replica of `p` is, in milliseconds (None: no
    /// signed head from `p` yet), from when a head last confirmed it, by
    /// this node's clock, as for lookups.
    fn replica_age_ms(&self, p: Province) -> NodeResult<Option<i64>> {
        Ok(self
            .store
            .replica_confirmed(p)?
            .map(|at| (now_millis() - at).max(0)))
    }

    /// Whether a replica of age `age_ms` may answer on its own.
    fn replica_fresh(&self, age_ms: Option<i64>) -> bool {
        age_ms.is_some_and(|a| a <= self.max_replica_age.as_millis() as i64)
    }
}

/// The answer to `Verify` of a legacy code, for `caller`.
pub async fn verify(
    state: &LegacyCodes,
    caller: &Identity,
    code: LegacyCode,
    policy: Option<&Policy>,
    national_id: Option<&NationalId>,
) -> NodeResult<VerifyResponse> {
    let (resolved, provenance) = resolve(state, caller, &code).await?;
    let Resolved { holder, record } = &resolved;
    let holder_match = match holder {
        Some(h) => {
            state
                .federation
                .holder_match(caller, code.issuer, h, national_id)
                .await
        }
        None => HolderMatch::Unspecified,
    };
    let (verdict, policy_met, reason) = match (holder, record) {
        (None, _) => (
            Verdict::UnknownCode,
            false,
            format!(
                "{} code of province {} is not bound to any holder (never linked, or unlinked): refuse it",
                code.format, code.issuer
            ),
        ),
        (Some(_), None) => (
            Verdict::Valid,
            false,
            format!(
                "{} code of province {} is bound, but its holder has no status yet: treat as unverified",
                code.format, code.issuer
            ),
        ),
        (Some(_), Some(status)) => {
            let (met, reason) = evaluate(policy, status, &provenance, now_unix());
            (Verdict::Valid, met, reason)
        }
    };
    // Cross-province checks are audited, as for Hufu codes.
    if caller.province != state.province || code.issuer != state.province {
        state
            .audit
            .record(|| {
                let e = audit::answered(
                    EntryKind::VerifyServed,
                    caller,
                    code.issuer,
                    holder.as_deref().unwrap_or_default(),
                    answer(&resolved),
                    Some(provenance.source),
                );
                let mut detail = audit_detail(&code.format, &code.hash);
                if policy.is_some() {
                    detail.push_str(if policy_met {
                        "; policy met"
                    } else {
                        "; policy not met"
                    });
                }
                e.with_detail(detail)
            })
            .await;
    }
    Ok(VerifyResponse {
        verdict: verdict as i32,
        reason,
        status: resolved.record.clone(),
        provenance: Some(provenance),
        policy_met,
        holder_match: holder_match as i32,
        format: code.format,
        ..Default::default()
    })
}

/// What `code` resolves to and where the answer came from: this
/// province's own bindings; a fresh replica that knows the code; the
/// issuer; or, when the issuer cannot answer, the replica with its age.
async fn resolve(
    state: &LegacyCodes,
    caller: &Identity,
    code: &LegacyCode,
) -> NodeResult<(Resolved, Provenance)> {
    let p = code.issuer;
    if p == state.province {
        return Ok((
            state.resolve_stored(p, &code.hash)?,
            provenance(Source::Authoritative, Some(0), p),
        ));
    }
    let age = state.replica_age_ms(p)?;
    let fresh = state.replica_fresh(age);
    let stored = state.resolve_stored(p, &code.hash)?;
    // An unbound code may have been linked since the last change this
    // replica holds: only the issuer can say it is unknown.
    if fresh && stored.holder.is_some() {
        return Ok((stored, provenance(Source::Replica, age, state.province)));
    }
    match state
        .resolve_authoritative(p, &code.format, &code.hash, caller)
        .await
    {
        Ok(resolved) => Ok((resolved, provenance(Source::Authoritative, Some(0), p))),
        Err(why) => {
            tracing::debug!(province = %p, error = %why, "issuer unreachable; legacy code from the replica");
            let source = if fresh {
                Source::Replica
            } else {
                Source::ReplicaStale
            };
            Ok((stored, provenance(source, age, state.province)))
        }
    }
}
