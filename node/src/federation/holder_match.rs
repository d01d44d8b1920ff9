//! Asking a code's issuing province whether a national id read at a
//! checkpoint is its holder's (`MatchHolder`), through the peer client's
//! deadline, circuit breaker and retry budget. Only the issuer holds the
//! secret behind its pseudonyms, so only it can answer; no answer is
//! `UNKNOWN`, never a match.

use hufu_certs::{Identity, Province};
use hufu_federation::audit::{AnswerSource, EntryKind};
use hufu_federation::holder::NationalId;
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{HolderMatch, MatchHolderRequest};

use crate::audit;
use crate::state::NodeState;

/// Audit answers of a holder match: a word, as entries take.
pub fn answer_word(matches: bool) -> &'static str {
    if matches { "match" } else { "mismatch" }
}

/// The audit detail that marks a lookup entry as a holder match.
pub const DETAIL: &str = "holder match";

impl NodeState {
    /// Whether `id` is the national id of `holder` of province `p`: this
    /// node recomputes the pseudonym for its own province's codes, and asks
    /// the issuer for another's. UNSPECIFIED when no id was given.
    pub async fn holder_match(
        &self,
        caller: &Identity,
        p: Province,
        holder: &str,
        id: Option<&NationalId>,
    ) -> HolderMatch {
        let Some(id) = id else {
            return HolderMatch::Unspecified;
        };
        if p != self.province {
            return self.match_holder_authoritative(p, holder, id, caller).await;
        }
        if self.is_own_holder(id, holder) {
            HolderMatch::True
        } else {
            HolderMatch::False
        }
    }

    /// Whether `id` pseudonymises to `holder` under this province's secret.
    /// Compared in constant time: the answer is all a caller learns.
    pub fn is_own_holder(&self, id: &NationalId, holder: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            self.secret.pseudonym(id).as_str().as_bytes(),
            holder.as_bytes(),
        )
        .is_ok()
    }

    /// Whether `id` is the national id of holder `holder` of province `p`,
    /// asked of `p` itself on behalf of `caller`. The call made is audited
    /// (the pseudonym and the answer, never the id).
    pub async fn match_holder_authoritative(
        &self,
        p: Province,
        holder: &str,
        id: &NationalId,
        caller: &Identity,
    ) -> HolderMatch {
        let result = self.ask_match(p, holder, id).await;
        self.audit
            .record(|| {
                let made = audit::about(audit::entry(EntryKind::LookupMade, caller, p), holder)
                    .with_detail(DETAIL);
                match &result {
                    Ok(matches) => made
                        .with_answer(answer_word(*matches))
                        .with_source(AnswerSource::Authoritative),
                    Err(_) => made.with_answer(audit::UNREACHABLE),
                }
            })
            .await;
        match result {
            Ok(true) => HolderMatch::True,
            Ok(false) => HolderMatch::False,
            Err(why) => {
                tracing::debug!(province = %p, error = %why, "issuer unreachable; holder match unknown");
                HolderMatch::Unknown
            }
        }
    }

    async fn ask_match(&self, p: Province, holder: &str, id: &NationalId) -> Result<bool, String> {
        let membership = self.membership.load_full();
        let member = membership
            .member(p)
            .ok_or_else(|| format!("province {p} is not a member"))?;
        if !self.peers.allows(p) {
            return Err(format!("province {p} is failing: circuit open"));
        }
        let mut last_error = format!("province {p} lists no endpoints");
        for (attempt, endpoint) in member.endpoints.iter().enumerate() {
            if attempt > 0 && !self.peers.may_retry(p) {
                break;
            }
            let channel = self.peers.channel(p, endpoint).map_err(|e| e.to_string())?;
            let mut request = tonic::Request::new(MatchHolderRequest {
                holder: holder.to_owned(),
                national_id: id.as_str().to_owned(),
            });
            request.set_timeout(self.peers.deadline);
            let mut client = FederationServiceClient::new(channel);
            match tokio::time::timeout(self.peers.deadline, client.match_holder(request)).await {
                Ok(Ok(reply)) => {
                    self.peers.success(p);
                    return Ok(reply.into_inner().matches);
                }
                Ok(Err(status)) => last_error = format!("{endpoint}: {}", status.message()),
                Err(_) => {
                    last_error = format!("{endpoint}: no answer within {:?}", self.peers.deadline)
                }
            }
            self.peers.failure(p);
        }
        Err(last_error)
    }
}
