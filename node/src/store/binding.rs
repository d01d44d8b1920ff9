//! Legacy code bindings as the change log and the feed carry them: a change
//! whose bytes begin with 0 is `0 ‖ CodeBinding` (protobuf), which the
//! encoding of a status record never begins with, so one chain of changes
//! carries both and a relayer cannot pass one off as the other. Its effect
//! is the `B` key of the code's hash: the holder's 16 bytes, or nothing.
//! Own bindings enter the change log through the same seam as statuses
//! ([`Store::prepare_bindings`], then [`PendingPut::commit`]).

use data_encoding::BASE32_NOPAD;
use hufu_certs::Province;
use hufu_federation::holder::HolderId;
use hufu_federation::legacy::CodeHash;
use hufu_proto::v1::CodeBinding;
use prost::Message;

use super::codec::{self, HOLDER_BYTES};
use super::{PendingPut, PutOutcome, Store};
use crate::error::{NodeError, NodeResult};

/// First byte of a binding change.
pub const TAG: u8 = 0;

/// One legacy code bound to a holder, or unbound (`holder` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub format: String,
    pub hash: CodeHash,
    pub holder: Option<HolderId>,
}

impl Binding {
    /// The binding as the feed and the write log carry it.
    pub fn to_message(&self) -> CodeBinding {
        CodeBinding {
            format: self.format.clone(),
            code_hash: self.hash.0.to_vec(),
            holder: self
                .holder
                .as_ref()
                .map(|h| h.as_str().to_owned())
                .unwrap_or_default(),
        }
    }

    /// The change's bytes, as chained, stored and sent in the feed.
    pub fn to_change_bytes(&self) -> Vec<u8> {
        let message = self.to_message();
        let mut bytes = Vec::with_capacity(1 + message.encoded_len());
        bytes.push(TAG);
        message.encode(&mut bytes).expect("a vec grows");
        bytes
    }

    /// The binding a change's bytes hold; None when they hold a status.
    pub fn from_change_bytes(bytes: &[u8]) -> Option<Result<Binding, String>> {
        let rest = bytes.strip_prefix(&[TAG])?;
        Some(Binding::decode(rest))
    }

    fn decode(rest: &[u8]) -> Result<Binding, String> {
        let m = CodeBinding::decode(rest).map_err(|e| format!("code binding: {e}"))?;
        Binding::from_message(&m)
    }

    /// A binding received as a message, checked.
    pub fn from_message(m: &CodeBinding) -> Result<Binding, String> {
        let hash = CodeHash::from_slice(&m.code_hash).ok_or_else(|| {
            format!(
                "code binding: a code hash of {} bytes, expected 32",
                m.code_hash.len()
            )
        })?;
        let holder = match m.holder.as_str() {
            "" => None,
            h => Some(
                h.parse::<HolderId>()
                    .map_err(|e| format!("code binding: {e}"))?,
            ),
        };
        if m.format.is_empty() {
            return Err("code binding without a format".into());
        }
        Ok(Binding {
            format: m.format.clone(),
            hash,
            holder,
        })
    }
}

impl Binding {
    /// Stages the binding's effect on `p`'s bindings into `batch`.
    pub(super) fn stage(&self, p: Province, batch: &mut sled::Batch) {
        let key = codec::binding_key(p, &self.hash.0);
        match self
            .holder
            .as_ref()
            .and_then(|h| codec::holder_bytes(h.as_str()))
        {
            Some(holder) => batch.insert(key, &holder[..]),
            None => batch.remove(key),
        }
    }
}

impl Store {
    /// The holder legacy code `hash` of province `p` is bound to, if any
    /// (this province's own bindings, or a replica's).
    pub fn binding(&self, p: Province, hash: &CodeHash) -> NodeResult<Option<String>> {
        match self.tree()?.get(codec::binding_key(p, &hash.0))? {
            Some(v) if v.len() == HOLDER_BYTES => Ok(Some(BASE32_NOPAD.encode(&v))),
            Some(_) => Err(NodeError::Internal("stored code binding is corrupt".into())),
            None => Ok(None),
        }
    }

    /// Decides what each of this province's `bindings` changes (`Applied`
    /// with its sequence, or `Unchanged` when the code is already bound so)
    /// and holds the change log until [`PendingPut::commit`], as
    /// [`prepare`](Self::prepare) does for statuses: what must be durable
    /// first (the audit entries) can be.
    pub async fn prepare_bindings(&self, bindings: &[Binding]) -> NodeResult<PendingPut<'_>> {
        self.stage_own(
            bindings,
            |binding| binding.hash,
            |binding, earlier| {
                let held = match earlier {
                    Some(e) => e.holder.as_ref().map(|h| h.as_str().to_owned()),
                    None => self.binding(self.own, &binding.hash)?,
                };
                let holder = binding.holder.as_ref().map(HolderId::as_str);
                Ok((held.as_deref() == holder).then_some(PutOutcome::Unchanged))
            },
            Binding::to_change_bytes,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hufu_proto::v1::StatusRecord;

    #[test]
    fn bindings_and_statuses_never_share_bytes() {
        let p = hufu_certs::Province::parse("440000").unwrap();
        let b = Binding {
            format: "yuekang".into(),
            hash: CodeHash::of(p, "yuekang", "ABC"),
            holder: Some("MFRGGZDFMZTWQ2LKNNWG23TPOA".parse().unwrap()),
        };
        let bytes = b.to_change_bytes();
        assert_eq!(Binding::from_change_bytes(&bytes), Some(Ok(b)));
        // A status record's encoding starts with a field tag, never 0.
        let status = StatusRecord {
            issuer: "440000".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(Binding::from_change_bytes(&status).is_none());
        assert!(StatusRecord::decode(bytes.as_slice()).is_err());
        assert!(matches!(
            Binding::from_change_bytes(&[TAG, 0xff]),
            Some(Err(_))
        ));
    }
}
