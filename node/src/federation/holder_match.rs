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

use super::Federation;
use crate::audit;
use crate::peers::PeerError;

/// Audit answers of a holder match: a word, as entries take.
pub fn answer_word(matches: bool) -> &'static str {
    if matches { "match" } else { "mismatch" }
}

/// The audit detail that marks a lookup entry as a holder match.
pub const DETAIL: &str = "holder match";

impl Federation {
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
        if self.codes.is_own_holder(id, holder) {
            HolderMatch::True
        } else {
            HolderMatch::False
        }
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

    async fn ask_match(
        &self,
        p: Province,
        holder: &str,
        id: &NationalId,
    ) -> Result<bool, PeerError> {
        let request = MatchHolderRequest {
            holder: holder.to_owned(),
            national_id: id.as_str().to_owned(),
        };
        self.peers
            .call(p, "holder match at", |call| {
                let request = call.request(request.clone());
                async move {
                    FederationServiceClient::new(call.channel)
                        .match_holder(request)
                        .await
                        .map(|reply| reply.into_inner().matches)
                }
            })
            .await
    }
}
