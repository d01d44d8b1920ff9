//! The operator's side of the trust list: describing a province as a
//! member, making a genesis, signing, proposing changes, installing.

use std::path::Path;

use anyhow::Context;
use hufu_certs::Province;
use hufu_federation::audit::LogSigner;
use hufu_federation::legacy::LegacyFormat;
use hufu_federation::trust::{GovernanceKey, Member, SignedTrustList, TrustList, TrustStore};

use crate::config::NodeConfig;
use crate::status::now_unix;

/// This province as a trust list member, reachable at `endpoints`.
pub fn member_of(config: &NodeConfig, endpoints: Vec<String>) -> anyhow::Result<Member> {
    let keyring = crate::codes::open_keyring(config)?;
    let member = Member {
        province: config.province,
        name: config.province.name().to_owned(),
        ca_cert_pem: config.read(&config.ca_cert)?,
        jwks: keyring.jwks(now_unix()),
        revoked_kids: keyring.revoked_kids(),
        log_key: LogSigner::load(&config.path(&config.log_key))?.verifier_key(),
        governance_key: GovernanceKey::load(&config.path(&config.governance_key))?.verifier_key(),
        endpoints: if endpoints.is_empty() {
            vec![config.client.endpoint.clone()]
        } else {
            endpoints
        },
        legacy_formats: Vec::new(),
    };
    member.validate()?;
    Ok(member)
}

pub fn read_member(path: &Path) -> anyhow::Result<Member> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Member::from_json(&text).with_context(|| format!("member file {}", path.display()))
}

/// A file of legacy code formats: a JSON list, each with `name`, `prefix`,
/// `pattern`, `max_len` and `example`.
pub fn read_formats(path: &Path) -> anyhow::Result<Vec<LegacyFormat>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let formats: Vec<LegacyFormat> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of formats, each {{\"name\", \"prefix\", \"pattern\", \"max_len\", \"example\"}}",
            path.display()
        )
    })?;
    for f in &formats {
        f.compile()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(formats)
}

pub fn read_note(path: &Path) -> anyhow::Result<SignedTrustList> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    SignedTrustList::parse(&text).with_context(|| format!("trust list {}", path.display()))
}

pub fn write_note(path: &Path, note: &SignedTrustList) -> anyhow::Result<()> {
    std::fs::write(path, note.note()).with_context(|| format!("cannot write {}", path.display()))
}

/// An unsigned genesis trust list of `members`.
pub fn genesis(
    members: Vec<Member>,
    threshold: usize,
    witness_quorum: Option<usize>,
) -> anyhow::Result<SignedTrustList> {
    let mut list = TrustList::genesis(members, threshold, now_unix())?;
    if let Some(q) = witness_quorum {
        list.set_witness_quorum(q)?;
    }
    Ok(SignedTrustList::unsigned(list))
}

/// Adds this province's governance signature.
pub fn sign(config: &NodeConfig, note: &mut SignedTrustList) -> anyhow::Result<()> {
    let key = GovernanceKey::load(&config.path(&config.governance_key))?;
    note.sign(&key)?;
    Ok(())
}

/// Changes for the next version.
#[derive(Debug, Default)]
pub struct Proposal {
    pub add: Vec<Member>,
    pub update: Vec<Member>,
    pub remove: Vec<Province>,
    pub endpoints: Vec<(Province, Vec<String>)>,
    /// New legacy code formats per member.
    pub formats: Vec<(Province, Vec<LegacyFormat>)>,
    pub threshold: Option<usize>,
    pub witness_quorum: Option<usize>,
}

pub fn propose(current: &TrustList, change: Proposal) -> anyhow::Result<SignedTrustList> {
    let mut next = current.successor(now_unix());
    for m in change.add {
        next.add_member(m)?;
    }
    for m in change.update {
        let p = m.province;
        anyhow::ensure!(
            next.member(p).is_some(),
            "province {p} is not a member: use --add"
        );
        next.set_ca(p, m.ca_cert_pem)?;
        next.set_jwks(p, m.jwks, m.revoked_kids)?;
        next.set_log_key(p, m.log_key)?;
        next.set_governance_key(p, m.governance_key)?;
        next.set_endpoints(p, m.endpoints)?;
        next.set_legacy_formats(p, m.legacy_formats)?;
    }
    for p in change.remove {
        next.remove_member(p)?;
    }
    for (p, endpoints) in change.endpoints {
        next.set_endpoints(p, endpoints)?;
    }
    for (p, formats) in change.formats {
        next.set_legacy_formats(p, formats)?;
    }
    if let Some(t) = change.threshold {
        next.set_threshold(t)?;
    }
    if let Some(q) = change.witness_quorum {
        next.set_witness_quorum(q)?;
    }
    next.validate()?;
    Ok(SignedTrustList::unsigned(next))
}

/// Installs a trust list into a (stopped) node's trust directory: a genesis
/// into an empty one, or the next version. Returns the version now held.
pub fn install(config: &NodeConfig, note: &SignedTrustList) -> anyhow::Result<u64> {
    let dir = config.path(&config.trust_dir);
    // A running node reads its trust directory only at start: a list
    // written under it would be ignored until a restart, silently.
    anyhow::ensure!(
        !config.storage_in_use()?,
        "the node of province {} is running (it holds {}): stop it and install again, or hand the list to the running node with `hufu federation apply`",
        config.province,
        config.path(&config.data_dir).display()
    );
    anyhow::ensure!(
        note.list.member(config.province).is_some(),
        "province {} is not a member of this trust list (v{})",
        config.province,
        note.list.version
    );
    match super::load_trust(&dir, config.province)? {
        None => {
            note.verify_genesis()?;
            Ok(TrustStore::init_genesis(&dir, note)?.version())
        }
        Some(mut store) => {
            store.apply(note.clone())?;
            Ok(store.version())
        }
    }
}
