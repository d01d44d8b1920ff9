//! Binding this province's legacy codes to its holders (`LinkCode`,
//! `UnlinkCode`, the `legacy_code` column of an import). The code arrives
//! as its holder carries it, is matched against this province's formats
//! and hashed at once; only the hash is written, through the change log
//! like a status change, and audited before it is.

use hufu_certs::Identity;
use hufu_federation::audit::EntryKind;
use hufu_federation::holder::HolderId;
use hufu_federation::legacy::Scan;
use hufu_proto::v1::{
    LinkCodeRequest, LinkCodeResponse, UnlinkCodeRequest, UnlinkCodeResponse, link_code_request,
};

use super::verify::LegacyCode;
use super::{LegacyCodes, audit_detail};
use crate::audit;
use crate::error::{NodeError, NodeResult};
use crate::store::PutOutcome;
use crate::store::binding::Binding;

impl LegacyCodes {
    /// The code in `text`, which must be of one of this province's formats;
    /// `field` names the request field for the error.
    pub fn own_code(&self, text: &str, field: &str) -> NodeResult<LegacyCode> {
        let membership = self.peers.members();
        match membership.formats.scan(text) {
            Scan::Legacy(m) if m.issuer == self.province => Ok(LegacyCode {
                issuer: m.issuer,
                format: m.format.to_owned(),
                hash: m.hash(),
            }),
            _ => {
                let names = membership.formats.names(self.province);
                let known = if names.is_empty() {
                    format!(
                        "province {} declares no legacy code formats in the trust list in force: propose them first (hufu federation propose --formats)",
                        self.province
                    )
                } else {
                    format!(
                        "province {}'s formats are {}: give the code exactly as its holder carries it",
                        self.province,
                        names.join(", ")
                    )
                };
                Err(NodeError::invalid_field(
                    field,
                    format!("not a legacy code of this province: {known}"),
                ))
            }
        }
    }

    /// Binds `code` to `holder`, or unbinds it (`holder` None), for
    /// `caller`; audited before it is written. Returns the change's
    /// sequence, 0 when nothing changed.
    pub async fn link_code(
        &self,
        caller: &Identity,
        code: &LegacyCode,
        holder: Option<&HolderId>,
    ) -> NodeResult<u64> {
        let done = self
            .link_codes(caller, &[(code.clone(), holder.cloned())])
            .await?;
        Ok(done.first().copied().unwrap_or(0))
    }

    /// Binds (or unbinds) several codes in one write, each audited before
    /// the write. Returns each change's sequence, 0 where nothing changed.
    pub async fn link_codes(
        &self,
        caller: &Identity,
        links: &[(LegacyCode, Option<HolderId>)],
    ) -> NodeResult<Vec<u64>> {
        if links.is_empty() {
            return Ok(Vec::new());
        }
        let bindings: Vec<Binding> = links
            .iter()
            .map(|(code, holder)| Binding {
                format: code.format.clone(),
                hash: code.hash,
                holder: holder.clone(),
            })
            .collect();
        // With replicas, the bindings go through the province's write log
        // like status changes: audited first, all of them, since only the
        // log decides what changes.
        if let Some(log) = &self.write_log {
            self.audit_links(caller, links.iter().map(|(c, h)| (c, h)))
                .await?;
            return Ok(sequences(log.put_bindings(&bindings).await?));
        }
        let pending = self.store.prepare_bindings(&bindings).await?;
        let changed = links
            .iter()
            .zip(pending.outcomes())
            .filter(|(_, outcome)| **outcome != PutOutcome::Unchanged)
            .map(|((code, holder), _)| (code, holder));
        self.audit_links(caller, changed).await?;
        Ok(sequences(pending.commit().await?))
    }

    /// Audits links and unlinks about to be stored (who, which holder,
    /// which code by format and hash) and returns once their entries are on
    /// disk.
    async fn audit_links<'a>(
        &self,
        caller: &Identity,
        links: impl IntoIterator<Item = (&'a LegacyCode, &'a Option<HolderId>)>,
    ) -> NodeResult<()> {
        if !self.audit.enabled() {
            return Ok(());
        }
        let mut entries = Vec::new();
        for (code, holder) in links {
            // An unlink names the holder the code was bound to.
            let about = match holder {
                Some(h) => Some(h.to_string()),
                None => self.store.binding(self.province, &code.hash)?,
            };
            let answer = if holder.is_some() {
                "linked"
            } else {
                "unlinked"
            };
            entries.push(
                audit::about(
                    audit::entry(EntryKind::StatusChanged, caller, self.province),
                    about.as_deref().unwrap_or_default(),
                )
                .with_answer(answer)
                .with_detail(audit_detail(&code.format, &code.hash)),
            );
        }
        self.audit.record_all(entries).await;
        self.audit.sync().await.map_err(|err| {
            // The audit log shares the disk: refuse writes until it has room.
            self.store.refuse_writes(&err);
            NodeError::Unavailable(format!(
                "the audit entry of the link could not be written ({err}), so the code was not linked: free disk space on the node, then send it again"
            ))
        })
    }
}

/// Each write's change number, 0 where nothing changed.
fn sequences(outcomes: Vec<PutOutcome>) -> Vec<u64> {
    outcomes
        .into_iter()
        .map(|o| match o {
            PutOutcome::Applied { sequence } => sequence,
            _ => 0,
        })
        .collect()
}

/// `LinkCode`: binds the code to the holder named by national id
/// (pseudonymised here, never kept) or pseudonym.
pub async fn link(
    state: &LegacyCodes,
    caller: &Identity,
    req: LinkCodeRequest,
) -> NodeResult<LinkCodeResponse> {
    let code = state.own_code(&req.code, "code")?;
    let holder = match &req.subject {
        Some(link_code_request::Subject::NationalId(id)) => {
            state.codes.holder_from(Some(id), None)?
        }
        Some(link_code_request::Subject::Holder(h)) => state.codes.holder_from(None, Some(h))?,
        None => state.codes.holder_from(None, None)?,
    };
    let sequence = state.link_code(caller, &code, Some(&holder)).await?;
    tracing::info!(format = %code.format, code = %code.hash, sequence, "legacy code linked");
    Ok(LinkCodeResponse {
        format: code.format,
        holder: holder.to_string(),
        sequence,
    })
}

/// `UnlinkCode`: the code is bound to nobody from now on.
pub async fn unlink(
    state: &LegacyCodes,
    caller: &Identity,
    req: UnlinkCodeRequest,
) -> NodeResult<UnlinkCodeResponse> {
    let code = state.own_code(&req.code, "code")?;
    let sequence = state.link_code(caller, &code, None).await?;
    tracing::info!(format = %code.format, code = %code.hash, sequence, "legacy code unlinked");
    Ok(UnlinkCodeResponse {
        format: code.format,
        sequence,
    })
}
