//! One audit event and its canonical encoding.
//!
//! An entry is encoded as compact JSON with every field present, in this
//! order, absent optional fields written `null`:
//!
//! ```text
//! {"v":1,"time":1700000000123,"kind":"lookup_served","caller":"spiffe://hufu/province/610000/node/sn-1","province":"440000","holder":"MFRGGZDFMZTWQ2LKNNWG23TPOA","answer":"green","source":"authoritative","detail":null}
//! ```
//!
//! `v` is the encoding version (1). Strings are escaped as serde_json does
//! (quotes, backslashes and control characters only). Decoding refuses any
//! other spelling of the same entry (another field order, spaces, unknown
//! fields, a missing `null`), so an entry has exactly one encoding and one
//! leaf hash.
//!
//! Data minimisation is in the types: the holder is a [`HolderId`] (26
//! base32 characters, a pseudonym), the province a [`Province`], the caller a
//! certificate [`Identity`], the source an enum, and the answer a short word
//! of letters, `_` and `-`. None of them can hold a national id (17 digits
//! and a check character) or a phone number. Only `detail` is free text, and
//! it refuses any run of 11 or more digits, the shape of both.

use std::str::FromStr;

use hufu_certs::{Identity, Province};
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::holder::HolderId;

/// The encoding version this code writes and reads.
const VERSION: u32 = 1;

/// Longest `detail`, in characters.
pub const MAX_DETAIL_CHARS: usize = 256;

/// Longest `answer`, in characters.
const MAX_ANSWER_CHARS: usize = 32;

/// Shortest run of digits `detail` refuses: phone numbers have 11, national
/// ids 15 or 18.
const MAX_DIGIT_RUN: usize = 10;

/// Longest encoded entry accepted when decoding; a valid entry is well under
/// 1 KiB.
pub(crate) const MAX_ENTRY_BYTES: usize = 4096;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    /// This node answered another province's `Lookup`.
    LookupServed,
    /// This node asked another province (`Lookup` to the issuer).
    LookupMade,
    /// This node verified a code issued by another province.
    VerifyServed,
    /// An admin changed a holder's status.
    StatusChanged,
    /// A code-signing key was rotated.
    KeyRotated,
    /// A code-signing key was revoked.
    KeyRevoked,
    /// The node accepted a new trust list version.
    TrustListChanged,
}

impl EntryKind {
    /// The name used in the encoding, such as `lookup_served`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EntryKind::LookupServed => "lookup_served",
            EntryKind::LookupMade => "lookup_made",
            EntryKind::VerifyServed => "verify_served",
            EntryKind::StatusChanged => "status_changed",
            EntryKind::KeyRotated => "key_rotated",
            EntryKind::KeyRevoked => "key_revoked",
            EntryKind::TrustListChanged => "trust_list_changed",
        }
    }
}

impl FromStr for EntryKind {
    type Err = AuditError;

    fn from_str(s: &str) -> Result<EntryKind, AuditError> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            AuditError::BadEntry(format!(
                "unknown entry kind {s:?}: use lookup_served, lookup_made, verify_served, status_changed, key_rotated, key_revoked or trust_list_changed"
            ))
        })
    }
}

/// Where an answer came from (DESIGN.md, "Verify, step by step").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerSource {
    /// The issuing province answered.
    Authoritative,
    /// The local replica, fresh enough.
    Replica,
    /// The local replica, too old, because the issuer was unreachable.
    ReplicaStale,
    /// The token's own signed claim.
    Token,
}

/// One audited event: who asked (`caller`), about what (`province`,
/// `holder`), what was answered and from where, and when.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Wire")]
pub struct AuditEntry {
    /// Unix time in milliseconds.
    pub time: u64,
    pub kind: EntryKind,
    /// The certificate identity on whose behalf the node acted: the peer
    /// node for a lookup served, the local terminal or admin otherwise.
    pub caller: Identity,
    /// The province asked about: the issuer of the code or holder.
    pub province: Province,
    /// The holder, by pseudonym only.
    pub holder: Option<HolderId>,
    /// The colour or verdict: a word of letters, `_` and `-` (at most 32),
    /// such as `green` or `expired`.
    pub answer: Option<String>,
    pub source: Option<AnswerSource>,
    /// Short free text (at most 256 characters, no control characters, no
    /// run of 11 or more digits), such as a trust list version or a key id.
    pub detail: Option<String>,
}

/// The encoding, field by field in canonical order, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    time: u64,
    kind: EntryKind,
    caller: String,
    province: Province,
    holder: Option<String>,
    answer: Option<String>,
    source: Option<AnswerSource>,
    detail: Option<String>,
}

/// The encoding as written: [`Wire`], borrowing the entry's fields.
#[derive(Serialize)]
struct WireRef<'a> {
    v: u32,
    time: u64,
    kind: EntryKind,
    caller: String,
    province: Province,
    holder: Option<&'a str>,
    answer: Option<&'a str>,
    source: Option<AnswerSource>,
    detail: Option<&'a str>,
}

impl Serialize for AuditEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireRef {
            v: VERSION,
            time: self.time,
            kind: self.kind,
            caller: self.caller.uri(),
            province: self.province,
            holder: self.holder.as_ref().map(HolderId::as_str),
            answer: self.answer.as_deref(),
            source: self.source,
            detail: self.detail.as_deref(),
        }
        .serialize(serializer)
    }
}

/// So that [`AuditLog::append`](super::AuditLog::append) takes an entry by
/// value or by reference.
impl From<&AuditEntry> for AuditEntry {
    fn from(entry: &AuditEntry) -> AuditEntry {
        entry.clone()
    }
}

impl TryFrom<Wire> for AuditEntry {
    type Error = String;

    fn try_from(w: Wire) -> Result<AuditEntry, String> {
        if w.v != VERSION {
            return Err(format!(
                "entry version {} is not {VERSION}, the one this hufu reads: upgrade hufu",
                w.v
            ));
        }
        let caller = Identity::parse_uri(&w.caller).map_err(|e| format!("caller: {e}"))?;
        let holder = w
            .holder
            .map(|h| {
                // FromStr trims: the encoding must not carry spaces.
                HolderId::from_str(&h)
                    .ok()
                    .filter(|id| id.as_str() == h)
                    .ok_or_else(|| format!("holder {h:?} is not a holder pseudonym"))
            })
            .transpose()?;
        let entry = AuditEntry {
            time: w.time,
            kind: w.kind,
            caller,
            province: w.province,
            holder,
            answer: w.answer,
            source: w.source,
            detail: w.detail,
        };
        entry.check().map_err(|e| match e {
            AuditError::BadEntry(reason) => reason,
            other => other.to_string(),
        })?;
        Ok(entry)
    }
}

impl AuditEntry {
    /// An entry of `kind` at `time` (unix millis) by `caller` about
    /// `province`, with no holder, answer, source or detail yet.
    pub fn new(time: u64, kind: EntryKind, caller: Identity, province: Province) -> AuditEntry {
        AuditEntry {
            time,
            kind,
            caller,
            province,
            holder: None,
            answer: None,
            source: None,
            detail: None,
        }
    }

    pub fn with_holder(mut self, holder: HolderId) -> AuditEntry {
        self.holder = Some(holder);
        self
    }

    pub fn with_answer(mut self, answer: impl Into<String>) -> AuditEntry {
        self.answer = Some(answer.into());
        self
    }

    pub fn with_source(mut self, source: AnswerSource) -> AuditEntry {
        self.source = Some(source);
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> AuditEntry {
        self.detail = Some(detail.into());
        self
    }

    /// Checks the free-form fields: `answer` a short word, `detail` short,
    /// printable and free of long digit runs.
    pub fn check(&self) -> Result<(), AuditError> {
        if let Some(answer) = &self.answer {
            let word = |c: char| c.is_ascii_alphabetic() || c == '_' || c == '-';
            if answer.is_empty() || answer.len() > MAX_ANSWER_CHARS || !answer.chars().all(word) {
                return Err(AuditError::BadEntry(format!(
                    "answer {answer:?} is not a word of 1 to {MAX_ANSWER_CHARS} letters, '_' or '-': give a colour or verdict such as green or expired"
                )));
            }
        }
        if let Some(detail) = &self.detail {
            if detail.chars().count() > MAX_DETAIL_CHARS {
                return Err(AuditError::BadEntry(format!(
                    "detail is longer than {MAX_DETAIL_CHARS} characters: keep it to a short note"
                )));
            }
            if detail.chars().any(char::is_control) {
                return Err(AuditError::BadEntry(
                    "detail holds control characters: keep it to one printable line".into(),
                ));
            }
            if longest_digit_run(detail) > MAX_DIGIT_RUN {
                return Err(AuditError::BadEntry(format!(
                    "detail holds a run of more than {MAX_DIGIT_RUN} digits, the shape of a national id or phone number: audit entries name holders by pseudonym only"
                )));
            }
        }
        Ok(())
    }

    /// The canonical encoding (see the module documentation): the bytes
    /// the log stores and hashes.
    pub fn encode(&self) -> Result<Vec<u8>, AuditError> {
        self.check()?;
        let mut out = Vec::with_capacity(256);
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the canonical encoding to `out`, without the checks: for an
    /// entry already checked. Written directly rather than through serde, as
    /// the log's writer does it for every entry: byte for byte what
    /// serde_json makes of the entry's [`Serialize`] (a test holds them
    /// equal).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), AuditError> {
        use std::io::Write;
        let source = self.source.map(|s| match s {
            AnswerSource::Authoritative => "authoritative",
            AnswerSource::Replica => "replica",
            AnswerSource::ReplicaStale => "replica_stale",
            AnswerSource::Token => "token",
        });
        write!(
            out,
            "{{\"v\":{VERSION},\"time\":{},\"kind\":\"{}\",\"caller\":",
            self.time,
            self.kind.as_str()
        )
        .and_then(|()| json_str(out, Some(&self.caller.uri())))
        .and_then(|()| write!(out, ",\"province\":\"{}\",\"holder\":", self.province))
        .and_then(|()| json_str(out, self.holder.as_ref().map(HolderId::as_str)))
        .and_then(|()| out.write_all(b",\"answer\":"))
        .and_then(|()| json_str(out, self.answer.as_deref()))
        .and_then(|()| out.write_all(b",\"source\":"))
        .and_then(|()| json_str(out, source))
        .and_then(|()| out.write_all(b",\"detail\":"))
        .and_then(|()| json_str(out, self.detail.as_deref()))
        .and_then(|()| out.write_all(b"}"))
        .map_err(|e| AuditError::BadEntry(e.to_string()))
    }

    /// Reads an entry, refusing anything but its canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<AuditEntry, AuditError> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(AuditError::BadEntry(format!(
                "{} bytes, more than the {MAX_ENTRY_BYTES} an entry may have",
                bytes.len()
            )));
        }
        let entry: AuditEntry = serde_json::from_slice(bytes)
            .map_err(|e| AuditError::BadEntry(format!("not an audit entry: {e}")))?;
        if entry.encode()? != bytes {
            return Err(AuditError::BadEntry(
                "not in canonical form (compact json, fields in order, absent fields null)".into(),
            ));
        }
        Ok(entry)
    }
}

/// Writes `s` as JSON, or `null`: as is when nothing in it needs escaping
/// (every string of a valid entry but a `detail` with quotes or
/// backslashes), else escaped by serde_json.
fn json_str(out: &mut Vec<u8>, s: Option<&str>) -> std::io::Result<()> {
    match s {
        None => out.extend_from_slice(b"null"),
        Some(s) if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Some(s) => serde_json::to_writer(out, s)?,
    }
    Ok(())
}

/// The longest run of numeric characters, full-width digits included.
fn longest_digit_run(s: &str) -> usize {
    let (mut longest, mut run) = (0, 0);
    for c in s.chars() {
        run = if c.is_numeric() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

#[cfg(test)]
mod tests {
    use hufu_certs::{Identity, Province, Role};

    use super::*;
    use crate::holder::{HolderSecret, NationalId};

    #[test]
    fn the_direct_encoding_is_serde_jsons_byte_for_byte() {
        let secret = HolderSecret::new(&[7u8; 32]).unwrap();
        let holder =
            secret.pseudonym(&NationalId::with_check_character("11010519491231002").unwrap());
        let caller =
            Identity::new(Province::parse("610000").unwrap(), Role::Node, "sn-1.a_b").unwrap();
        let base = AuditEntry::new(
            u64::MAX,
            EntryKind::LookupServed,
            caller.clone(),
            Province::parse("110000").unwrap(),
        );
        let mut entries = vec![base.clone()];
        for kind in [
            EntryKind::LookupMade,
            EntryKind::VerifyServed,
            EntryKind::StatusChanged,
            EntryKind::KeyRotated,
            EntryKind::KeyRevoked,
            EntryKind::TrustListChanged,
        ] {
            entries.push(AuditEntry {
                kind,
                time: 0,
                ..base.clone()
            });
        }
        for source in [
            AnswerSource::Authoritative,
            AnswerSource::Replica,
            AnswerSource::ReplicaStale,
            AnswerSource::Token,
        ] {
            entries.push(
                base.clone()
                    .with_holder(holder.clone())
                    .with_answer("not_found")
                    .with_source(source),
            );
        }
        for detail in [
            "policy met",
            "",
            "quote \" and backslash \\ and slash /",
            "控制 é ✓ 🙂",
            "tab\there, newline\n, nul\u{0}, del\u{7f}, \u{1b}[0m",
            "\u{2028}\u{2029}",
        ] {
            entries.push(base.clone().with_detail(detail));
        }
        // An identity built without its checks, escaped all the same.
        let mut odd = caller;
        odd.name = "a\"b\\c\u{1}".into();
        entries.push(AuditEntry {
            caller: odd,
            ..base.clone()
        });
        for e in &entries {
            let mut direct = Vec::new();
            e.encode_into(&mut direct).unwrap();
            let serde = serde_json::to_vec(e).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&serde)
            );
        }
    }
}
