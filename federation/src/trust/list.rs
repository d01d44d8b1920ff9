//! The trust list document: its members, thresholds and version, the checks
//! that make a list well-formed, and the edits a proposal is made of.
//!
//! Every edit checks what it touches, so a proposal goes wrong at the line
//! that broke it; [`TrustList::validate`] checks everything again, because a
//! list received from a peer was edited by somebody else's code.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use hufu_certs::Province;
use serde::{Deserialize, Serialize};

use super::TrustError;
use super::key::governance_key_name;
use crate::codes::Jwks;
use crate::legacy::{LegacyFormat, MAX_FORMATS, check_formats};
use crate::note::{KeyType, VerifierKey};

/// First line of every signed trust list text.
const HEADER_PREFIX: &str = "hufu trust list v";

/// One member province, as the trust list describes it to every other member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub province: Province,
    /// A human name, such as `Guangdong`.
    pub name: String,
    /// The province CA certificate (PEM): what peers' TLS trusts for it.
    pub ca_cert_pem: String,
    /// The public keys that verify the province's codes.
    pub jwks: Jwks,
    /// Kids of code-signing keys the province has revoked.
    pub revoked_kids: Vec<String>,
    /// The audit log's Ed25519 verifier key (signed-note form); empty until
    /// the province runs an audit log.
    pub log_key: String,
    /// The governance verifier key, named `hufu-governance-<code>`.
    pub governance_key: String,
    /// `host:port` of the province's nodes.
    pub endpoints: Vec<String>,
    /// The province's existing (legacy) code formats, which every member's
    /// nodes recognise. Left out of the text when empty, so lists made
    /// before formats existed keep their signed text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legacy_formats: Vec<LegacyFormat>,
}

impl Member {
    /// The member file a province hands to the founders or to the members
    /// voting it in: pretty JSON, one member.
    pub fn to_json(&self) -> String {
        // Plain strings, numbers and lists: serialisation cannot fail.
        let mut json = serde_json::to_string_pretty(self).expect("a member always serialises");
        json.push('\n');
        json
    }

    /// Reads and checks a member file.
    pub fn from_json(s: &str) -> Result<Member, TrustError> {
        let member: Member =
            serde_json::from_str(s).map_err(|e| TrustError::MemberFile(e.to_string()))?;
        member.validate()?;
        Ok(member)
    }

    /// Checks this entry on its own: name, that the CA certificate is the CA
    /// of this very province, code-signing keys, log and governance keys,
    /// endpoints. Nothing here reads the clock (an expired CA is TLS's
    /// business), so a chain that verified once still verifies years later.
    pub fn validate(&self) -> Result<(), TrustError> {
        let invalid = |reason: String| TrustError::InvalidMember {
            province: self.province,
            reason,
        };
        if self.name.trim().is_empty() || self.name.chars().any(char::is_control) {
            return Err(invalid(
                "the name is empty or holds control characters; use the province's name, such as Guangdong".into(),
            ));
        }

        let ca = ca_of(&self.ca_cert_pem).map_err(|e| invalid(format!("ca certificate: {e}")))?;
        if ca != self.province {
            return Err(TrustError::ForeignCa {
                member: self.province,
                ca,
            });
        }

        let mut kids = HashSet::new();
        for jwk in &self.jwks.keys {
            jwk.decoding_key()
                .map_err(|e| invalid(format!("code-signing key: {e}")))?;
            if !kids.insert(jwk.kid.as_str()) {
                return Err(invalid(format!(
                    "code-signing key {} is published twice",
                    jwk.kid
                )));
            }
        }
        if let Some(kid) = self.revoked_kids.iter().find(|k| kids.contains(k.as_str())) {
            return Err(invalid(format!(
                "code-signing key {kid} is both published and revoked: drop it from the jwks"
            )));
        }

        if !self.log_key.is_empty() {
            let key =
                VerifierKey::parse(&self.log_key).map_err(|e| invalid(format!("log key: {e}")))?;
            // A log signs its checkpoints with plain ed25519 signatures; a
            // cosigner key here would never verify one.
            if key.key_type() != KeyType::Ed25519 {
                return Err(invalid(
                    "log key is a cosignature key (type 0x04): give the log's ed25519 verifier key (type 0x01)".into(),
                ));
            }
        }
        self.governance_verifier()?;

        if self.legacy_formats.len() > MAX_FORMATS {
            return Err(invalid(format!(
                "{} legacy code formats, more than the {MAX_FORMATS} allowed",
                self.legacy_formats.len()
            )));
        }
        for (i, format) in self.legacy_formats.iter().enumerate() {
            format.compile().map_err(invalid)?;
            if self.legacy_formats[..i]
                .iter()
                .any(|f| f.name == format.name)
            {
                return Err(invalid(format!("format {} is declared twice", format.name)));
            }
        }

        let mut seen = HashSet::new();
        for endpoint in &self.endpoints {
            check_endpoint(endpoint)
                .map_err(|reason| invalid(format!("endpoint {endpoint:?}: {reason}")))?;
            if !seen.insert(endpoint.as_str()) {
                return Err(invalid(format!("endpoint {endpoint:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// The governance key, parsed, checked to carry this province's name.
    pub(crate) fn governance_verifier(&self) -> Result<VerifierKey, TrustError> {
        let key =
            VerifierKey::parse(&self.governance_key).map_err(|e| TrustError::InvalidMember {
                province: self.province,
                reason: format!("governance key: {e}"),
            })?;
        let expected = governance_key_name(self.province);
        if key.key_type() != KeyType::Ed25519 {
            return Err(TrustError::InvalidMember {
                province: self.province,
                reason: "governance key is a cosignature key (type 0x04): give the ed25519 verifier key (type 0x01)".into(),
            });
        }
        if key.name() != expected {
            return Err(TrustError::InvalidMember {
                province: self.province,
                reason: format!(
                    "governance key is named {:?}, expected {expected:?}: generate the key for this province",
                    key.name()
                ),
            });
        }
        Ok(key)
    }
}

/// The versioned list of member provinces, and the rules for its successor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustList {
    /// 1 for the genesis, then one more per accepted change.
    pub version: u64,
    /// How many of this version's members must sign the next version.
    pub threshold: usize,
    /// How many other provinces must cosign an audit-log checkpoint.
    pub witness_quorum: usize,
    /// Sorted by province, one entry per province.
    pub members: Vec<Member>,
    /// When this version was proposed (unix seconds).
    pub issued_at: i64,
}

impl TrustList {
    /// Version 1 of a federation of `members` (in any order), of which
    /// `threshold` must sign each change. The witness quorum starts at 1, or 0
    /// for a federation of one province, which has nobody to witness it.
    pub fn genesis(
        mut members: Vec<Member>,
        threshold: usize,
        now: i64,
    ) -> Result<TrustList, TrustError> {
        members.sort_by_key(|m| m.province);
        let list = TrustList {
            version: 1,
            threshold,
            witness_quorum: members.len().saturating_sub(1).min(1),
            members,
            issued_at: now,
        };
        list.validate()?;
        Ok(list)
    }

    /// Checks the whole list: version, member order and uniqueness, every
    /// member, distinct governance keys, threshold and witness quorum. Says
    /// nothing about signatures.
    pub fn validate(&self) -> Result<(), TrustError> {
        if self.version == 0 {
            return Err(TrustError::MalformedList(
                "version 0 does not exist: the genesis is version 1".into(),
            ));
        }
        if self.members.is_empty() {
            return Err(TrustError::NoMembers);
        }
        for pair in self.members.windows(2) {
            let (a, b) = (pair[0].province, pair[1].province);
            if a == b {
                return Err(TrustError::DuplicateMember(a));
            }
            if a > b {
                return Err(TrustError::MalformedList(format!(
                    "members are not in province order ({a} after {b})"
                )));
            }
        }
        let mut owners = HashMap::new();
        for member in &self.members {
            member.validate()?;
            let key = member.governance_verifier()?;
            // Signature lines are counted per key: two provinces sharing one
            // key would let one holder count twice.
            if let Some(&other) = owners.get(key.public_key()) {
                return Err(TrustError::SharedGovernanceKey {
                    a: other,
                    b: member.province,
                });
            }
            owners.insert(*key.public_key(), member.province);
        }
        check_threshold(self.threshold, self.members.len())?;
        check_witness_quorum(self.witness_quorum, self.members.len())?;
        check_formats(self)
    }

    /// The entry of `province`, if it is a member.
    pub fn member(&self, province: Province) -> Option<&Member> {
        self.members
            .binary_search_by_key(&province, |m| m.province)
            .ok()
            .map(|i| &self.members[i])
    }

    /// The member provinces, in code order.
    pub fn provinces(&self) -> Vec<Province> {
        self.members.iter().map(|m| m.province).collect()
    }

    /// The next version, unchanged but for its version and time: the draft a
    /// proposal edits.
    pub fn successor(&self, now: i64) -> TrustList {
        TrustList {
            version: self.version.saturating_add(1),
            issued_at: now,
            ..self.clone()
        }
    }

    /// Adds a new member province.
    pub fn add_member(&mut self, member: Member) -> Result<(), TrustError> {
        let index = match self
            .members
            .binary_search_by_key(&member.province, |m| m.province)
        {
            Ok(_) => return Err(TrustError::AlreadyMember(member.province)),
            Err(index) => index,
        };
        member.validate()?;
        self.check_key_unshared(&member)?;
        self.members.insert(index, member);
        Ok(())
    }

    /// Removes a member. The threshold and witness quorum must still be
    /// reachable by those who remain: lower them first if not.
    pub fn remove_member(&mut self, province: Province) -> Result<(), TrustError> {
        let index = self.index_of(province)?;
        let remaining = self.members.len() - 1;
        let refuse = |reason: String| Err(TrustError::CannotRemove { province, reason });
        if remaining == 0 {
            return refuse("it is the only member".into());
        }
        if self.threshold > remaining {
            return refuse(format!(
                "{remaining} members would remain, fewer than the threshold of {}; lower the threshold first",
                self.threshold
            ));
        }
        if self.witness_quorum > remaining - 1 {
            return refuse(format!(
                "{remaining} members would remain, too few for a witness quorum of {}; lower the quorum first",
                self.witness_quorum
            ));
        }
        self.members.remove(index);
        Ok(())
    }

    /// Replaces the `host:port` endpoints of `province`'s nodes.
    pub fn set_endpoints(
        &mut self,
        province: Province,
        endpoints: Vec<String>,
    ) -> Result<(), TrustError> {
        self.edit(province, |m| m.endpoints = endpoints)
    }

    /// Replaces `province`'s code-signing keys and revoked kids.
    pub fn set_jwks(
        &mut self,
        province: Province,
        jwks: Jwks,
        revoked: Vec<String>,
    ) -> Result<(), TrustError> {
        self.edit(province, |m| {
            m.jwks = jwks;
            m.revoked_kids = revoked;
        })
    }

    /// Replaces `province`'s legacy code formats, refused if one could
    /// match the same text as another member's or as Hufu's own codes.
    pub fn set_legacy_formats(
        &mut self,
        province: Province,
        formats: Vec<LegacyFormat>,
    ) -> Result<(), TrustError> {
        self.edit(province, |m| m.legacy_formats = formats)?;
        check_formats(self)
    }

    /// Replaces `province`'s governance key (a verifier key string).
    pub fn set_governance_key(
        &mut self,
        province: Province,
        governance_key: String,
    ) -> Result<(), TrustError> {
        self.edit(province, |m| m.governance_key = governance_key)
    }

    /// Replaces `province`'s CA certificate (PEM), which must be a CA of
    /// that province.
    pub fn set_ca(&mut self, province: Province, ca_cert_pem: String) -> Result<(), TrustError> {
        self.edit(province, |m| m.ca_cert_pem = ca_cert_pem)
    }

    /// Replaces `province`'s audit-log verifier key (empty: none).
    pub fn set_log_key(&mut self, province: Province, log_key: String) -> Result<(), TrustError> {
        self.edit(province, |m| m.log_key = log_key)
    }

    /// Sets how many of this version's members must sign the next one.
    pub fn set_threshold(&mut self, threshold: usize) -> Result<(), TrustError> {
        check_threshold(threshold, self.members.len())?;
        self.threshold = threshold;
        Ok(())
    }

    /// Sets how many other provinces must cosign a checkpoint.
    pub fn set_witness_quorum(&mut self, quorum: usize) -> Result<(), TrustError> {
        check_witness_quorum(quorum, self.members.len())?;
        self.witness_quorum = quorum;
        Ok(())
    }

    /// The text that members sign: `hufu trust list v<version>`, then the
    /// list as compact JSON (fields in declaration order), each on its own
    /// line. Parsing checks a received text is exactly this, so one list has
    /// one text and a signature is never over an equivalent spelling.
    pub fn note_text(&self) -> String {
        // Plain strings, numbers and lists: serialisation cannot fail.
        let json = serde_json::to_string(self).expect("a trust list always serialises");
        format!("{HEADER_PREFIX}{}\n{json}\n", self.version)
    }

    /// Reads a text made by [`note_text`](Self::note_text), refusing any
    /// other spelling of a list.
    pub(crate) fn from_note_text(text: &str) -> Result<TrustList, TrustError> {
        let malformed = |reason: String| TrustError::MalformedList(reason);
        let (header, rest) = text
            .split_once('\n')
            .ok_or_else(|| malformed("the text has no header line".into()))?;
        let version: u64 = header
            .strip_prefix(HEADER_PREFIX)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                malformed(format!(
                    "the first line is {header:?}, expected \"{HEADER_PREFIX}<version>\""
                ))
            })?;
        let json = rest
            .strip_suffix('\n')
            .ok_or_else(|| malformed("the text does not end in a newline".into()))?;
        let list: TrustList = serde_json::from_str(json)
            .map_err(|e| malformed(format!("the json does not parse: {e}")))?;
        if list.version != version {
            return Err(malformed(format!(
                "the header says v{version} but the json says v{}",
                list.version
            )));
        }
        if list.note_text() != text {
            return Err(malformed(
                "the text is not in canonical form (compact json, fields in order, members sorted): sign only texts made by hufu".into(),
            ));
        }
        Ok(list)
    }

    fn index_of(&self, province: Province) -> Result<usize, TrustError> {
        self.members
            .binary_search_by_key(&province, |m| m.province)
            .map_err(|_| TrustError::NotAMember {
                province,
                version: self.version,
            })
    }

    /// Applies `change` to `province`'s entry if the result is still valid.
    fn edit(
        &mut self,
        province: Province,
        change: impl FnOnce(&mut Member),
    ) -> Result<(), TrustError> {
        let index = self.index_of(province)?;
        let mut member = self.members[index].clone();
        change(&mut member);
        member.validate()?;
        self.check_key_unshared(&member)?;
        self.members[index] = member;
        Ok(())
    }

    /// Checks no other member has `member`'s governance key.
    fn check_key_unshared(&self, member: &Member) -> Result<(), TrustError> {
        let key = member.governance_verifier()?;
        for other in self
            .members
            .iter()
            .filter(|o| o.province != member.province)
        {
            if other
                .governance_verifier()
                .is_ok_and(|k| k.public_key() == key.public_key())
            {
                return Err(TrustError::SharedGovernanceKey {
                    a: other.province,
                    b: member.province,
                });
            }
        }
        Ok(())
    }
}

fn check_threshold(threshold: usize, members: usize) -> Result<(), TrustError> {
    if threshold == 0 || threshold > members {
        return Err(TrustError::ThresholdOutOfRange { threshold, members });
    }
    Ok(())
}

fn check_witness_quorum(quorum: usize, members: usize) -> Result<(), TrustError> {
    // Witnesses are the other provinces: a province never witnesses itself.
    if quorum > members.saturating_sub(1) {
        return Err(TrustError::WitnessQuorumOutOfRange { quorum, members });
    }
    Ok(())
}

/// The province of the single CA certificate in `pem`.
fn ca_of(pem: &str) -> Result<Province, String> {
    let blocks = pem::parse_many(pem).map_err(|e| format!("not pem: {e}"))?;
    let [block] = blocks.as_slice() else {
        return Err(format!(
            "expected one pem block, found {}: give only the province ca certificate",
            blocks.len()
        ));
    };
    if block.tag() != "CERTIFICATE" {
        return Err(format!(
            "pem label is {:?}, expected \"CERTIFICATE\"",
            block.tag()
        ));
    }
    hufu_certs::ca_province(block.contents()).map_err(|e| e.to_string())
}

/// `host:port`, the host a DNS name, an IPv4 address or a bracketed IPv6
/// address, as gRPC clients take them.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or("expected host:port, such as node1.gd.example:7443")?;
    if port.is_empty()
        || !port.bytes().all(|b| b.is_ascii_digit())
        || !port.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err("the port is not a number from 1 to 65535");
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(drop)
            .map_err(|_| "the bracketed host is not an ipv6 address");
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err("the host is not a dns name, an ipv4 address or a bracketed ipv6 address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "node1.gd.example:7443",
            "localhost:1",
            "10.0.0.1:65535",
            "[::1]:7443",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "node1",
            "node1:",
            ":7443",
            "node1:0",
            "node1:65536",
            "node1:+7",
            "::1:7443",
            "[nope]:7443",
            "a b:1",
            "-a.example:1",
            "a..b:1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
