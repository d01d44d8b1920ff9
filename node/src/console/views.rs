//! What the console's pages show, as JSON documents built from the node's
//! state: the federation (trust list in force, members with their replica
//! ages and peer health), the audit log and the keys. None of them carries
//! holder-level data: provinces, sequences, times, key ids and hashes only.

use serde::{Deserialize, Serialize};

use crate::peers::PeerView;
use crate::state::NodeState;
use crate::status::now_millis;

/// Members table and trust list, as `/console/api/federation.json` serves
/// it and `hufu federation status` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FederationView {
    /// The province this node serves.
    pub province: String,
    pub now_ms: i64,
    /// Replica age beyond which a replica is stale.
    pub max_replica_age_secs: u64,
    /// None when the node runs alone, without a trust list.
    pub trust: Option<TrustView>,
    pub members: Vec<MemberRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrustView {
    pub version: u64,
    pub threshold: usize,
    pub witness_quorum: usize,
    /// Key names of the signature lines on the list in force.
    pub signers: Vec<String>,
    pub issued_at: i64,
}

/// One member as this node sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberRow {
    pub province: String,
    pub name: String,
    pub endpoints: Vec<String>,
    /// `self` (this node's own province), `fresh`, `stale` (older than the
    /// limit) or `empty` (nothing replicated yet).
    pub state: String,
    /// Sequence of the newest change held (own: the change log's head).
    pub sequence: u64,
    /// When a signed head last confirmed the replica, by this node's
    /// clock (unix ms), as Verify measures replica age.
    pub confirmed_ms: Option<i64>,
    pub age_secs: Option<f64>,
    /// Circuit breaker and last error of calls to this member.
    pub peer: PeerView,
}

impl FederationView {
    pub async fn of(state: &NodeState) -> FederationView {
        let now = now_millis();
        let max_age = state.max_replica_age;
        let trust = state.federation.trust.lock().await.as_ref().map(|store| {
            let current = store.current();
            TrustView {
                version: current.list.version,
                threshold: current.list.threshold,
                witness_quorum: current.list.witness_quorum,
                signers: current
                    .signer_names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                issued_at: current.list.issued_at,
            }
        });
        let membership = state.peers.members();
        let mut members = Vec::new();
        // Alone, without a trust list, the node still shows its own row.
        let alone = [(state.province, String::new(), Vec::new())];
        let listed: Vec<_> = match &membership.list {
            Some(l) => l
                .members
                .iter()
                .map(|m| (m.province, m.name.clone(), m.endpoints.clone()))
                .collect(),
            None => alone.to_vec(),
        };
        for (province, name, endpoints) in listed {
            let own = province == state.province;
            let (sequence, confirmed_ms) = if own {
                let tail = state.store.tail(province).await.map(|t| t.sequence);
                (tail.unwrap_or_default(), Some(now))
            } else {
                let sequence = match state.store.latest_head(province) {
                    Ok(Some(head)) => head.sequence,
                    _ => 0,
                };
                // Age as Verify measures it: an issuer's clock running
                // ahead cannot make a replica look younger.
                (
                    sequence,
                    state.store.replica_confirmed(province).ok().flatten(),
                )
            };
            let age_secs = confirmed_ms.map(|t| (now - t).max(0) as f64 / 1000.0);
            let row_state = match (own, age_secs) {
                (true, _) => "self",
                (false, None) => "empty",
                (false, Some(age)) if age <= max_age.as_secs_f64() => "fresh",
                (false, Some(_)) => "stale",
            };
            members.push(MemberRow {
                province: province.to_string(),
                name,
                endpoints,
                state: row_state.into(),
                sequence,
                confirmed_ms,
                age_secs: (!own).then_some(age_secs).flatten(),
                peer: state.peers.view(province),
            });
        }
        FederationView {
            province: state.province.to_string(),
            now_ms: now,
            max_replica_age_secs: max_age.as_secs(),
            trust,
            members,
        }
    }
}

/// Checkpoints shown on the audit page.
const CHECKPOINTS_SHOWN: usize = 10;

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub province: String,
    pub enabled: bool,
    pub log_size: u64,
    /// The latest published checkpoints, newest first.
    pub checkpoints: Vec<CheckpointRow>,
    pub published_count: usize,
    pub witness_failures: Vec<crate::audit::WitnessFailure>,
    /// Conflicting checkpoints this node's witness found in other logs.
    pub conflicts: u64,
    /// Evidence kept, per log origin.
    pub evidence: Vec<EvidenceRow>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointRow {
    pub size: u64,
    pub root: String,
    pub cosigners: Vec<Cosigner>,
}

#[derive(Debug, Serialize)]
pub struct Cosigner {
    pub witness: String,
    pub province: Option<String>,
    /// When it cosigned, unix seconds.
    pub time: u64,
}

#[derive(Debug, Serialize)]
pub struct EvidenceRow {
    pub origin: String,
    pub count: usize,
    /// When the newest conflict was found, unix seconds.
    pub last_found_at: u64,
    pub last_reason: String,
}

impl AuditView {
    /// Reads the log's checkpoints and the witness's evidence from disk.
    pub fn of(state: &NodeState) -> anyhow::Result<AuditView> {
        let audit = &state.audit;
        let log = audit.log()?;
        let published = log.published()?;
        let checkpoints = published
            .iter()
            .rev()
            .take(CHECKPOINTS_SHOWN)
            .map(|cp| CheckpointRow {
                size: cp.checkpoint().size,
                root: cp.checkpoint().root.to_base64(),
                cosigners: cp
                    .cosignatures()
                    .iter()
                    .map(|c| Cosigner {
                        witness: c.witness().to_owned(),
                        province: c.province().map(|p| p.to_string()),
                        time: c.time(),
                    })
                    .collect(),
            })
            .collect();
        let mut evidence: Vec<EvidenceRow> = Vec::new();
        for e in audit.witness()?.evidence()? {
            match evidence.iter_mut().find(|r| r.origin == e.origin) {
                Some(row) => {
                    row.count += 1;
                    if e.found_at >= row.last_found_at {
                        row.last_found_at = e.found_at;
                        row.last_reason = e.reason;
                    }
                }
                None => evidence.push(EvidenceRow {
                    origin: e.origin,
                    count: 1,
                    last_found_at: e.found_at,
                    last_reason: e.reason,
                }),
            }
        }
        Ok(AuditView {
            province: state.province.to_string(),
            enabled: audit.enabled(),
            log_size: log.size()?,
            checkpoints,
            published_count: published.len(),
            witness_failures: audit.recent_failures(),
            conflicts: evidence.iter().map(|r| r.count as u64).sum(),
            evidence,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct KeysView {
    pub province: String,
    /// The province's published JWKS, as verifiers fetch it.
    pub jwks: serde_json::Value,
    /// Every key the keyring holds: rotations and revocations.
    pub keys: Vec<KeyRow>,
    /// Digest of the published keys and revocations, as feed heads announce it.
    pub digest: String,
    pub members: Vec<MemberKeys>,
}

#[derive(Debug, Serialize)]
pub struct KeyRow {
    pub kid: String,
    pub alg: String,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub active: bool,
}

#[derive(Debug, Serialize)]
pub struct MemberKeys {
    pub province: String,
    pub name: String,
    /// Key ids in the trust list.
    pub kids: Vec<String>,
    pub revoked_kids: Vec<String>,
    /// Digest of the keys last announced in the member's feed, once seen.
    pub announced_digest: Option<String>,
}

impl KeysView {
    pub fn of(state: &NodeState) -> KeysView {
        let now = crate::status::now_unix();
        let (jwks, keys) = {
            let keyring = state.codes.keyring.read().expect("keyring lock");
            let jwks = serde_json::to_value(keyring.jwks(now)).unwrap_or_default();
            let keys = keyring
                .keys()
                .iter()
                .map(|k| KeyRow {
                    kid: k.kid.clone(),
                    alg: k.alg.to_string(),
                    created_at: k.created_at,
                    retired_at: k.retired_at,
                    revoked_at: k.revoked_at,
                    active: k.is_active(),
                })
                .collect();
            (jwks, keys)
        };
        let announced = state
            .federation
            .key_digests
            .lock()
            .expect("digest lock")
            .clone();
        let members = state
            .peers
            .members()
            .list
            .iter()
            .flat_map(|l| l.members.iter())
            .filter(|m| m.province != state.province)
            .map(|m| MemberKeys {
                province: m.province.to_string(),
                name: m.name.clone(),
                kids: m.jwks.keys.iter().map(|k| k.kid.clone()).collect(),
                revoked_kids: m.revoked_kids.clone(),
                announced_digest: announced.get(&m.province).map(|d| hex(d)),
            })
            .collect();
        KeysView {
            province: state.province.to_string(),
            jwks,
            keys,
            digest: hex(&state.codes.own_keys_digest()),
            members,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}
