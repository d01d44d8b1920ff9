//! Provinces' existing (legacy) codes at this node: recognising a scanned
//! code of any member, resolving it to a holder, and binding this
//! province's own codes to its holders.
//!
//! A member declares its code formats in the trust list
//! (`hufu_federation::legacy`). `Verify` sends a text that is not a Hufu
//! code through [`CodeFormats`](hufu_federation::legacy::CodeFormats): a
//! match names the issuer, the format and the code id, which is hashed at
//! once ([`CodeHash`]) and forgotten. The hash is what the issuer binds to
//! a holder, what its feed carries to every replica, what `ResolveCode`
//! asks about, and what audit entries name: no code id is ever stored,
//! sent between provinces or audited.
//!
//! Resolution follows the same rules as a lookup: this province's codes
//! from its own bindings; another's from the replica of its feed when that
//! is fresh and knows the code, else from the issuer itself
//! ([`resolve`]), else from the replica, said to be stale.

pub mod link;
pub mod resolve;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use hufu_certs::Province;
use hufu_federation::legacy::CodeHash;

use crate::audit::NodeAudit;
use crate::codes::Codes;
use crate::federation::Federation;
use crate::peers::PeerClient;
use crate::replication::WriteLog;
use crate::state::NodeState;
use crate::store::Store;

/// The parts of the node that legacy codes use: bindings in the store,
/// formats and `ResolveCode` through the peer client, holder pseudonyms and
/// matches, the audit log, and the province's write log with replicas.
#[derive(Clone)]
pub struct LegacyCodes {
    pub province: Province,
    store: Arc<Store>,
    codes: Arc<Codes>,
    audit: Arc<NodeAudit>,
    peers: Arc<PeerClient>,
    federation: Arc<Federation>,
    write_log: Option<Arc<WriteLog>>,
    max_replica_age: Duration,
}

impl LegacyCodes {
    /// The parts of `state` legacy codes use.
    pub fn new(state: &NodeState) -> LegacyCodes {
        LegacyCodes {
            province: state.province,
            store: state.store.clone(),
            codes: state.codes.clone(),
            audit: state.audit.clone(),
            peers: state.peers.clone(),
            federation: state.federation.clone(),
            write_log: state.write_log.clone(),
            max_replica_age: state.max_replica_age,
        }
    }
}

/// What a node knows of one legacy code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// The holder the code is bound to; None: not bound (never linked, or
    /// unlinked).
    pub holder: Option<String>,
    /// That holder's current status, if they have one.
    pub record: Option<hufu_proto::v1::StatusRecord>,
}

/// How audit entries name a legacy code: its format and the hash of its
/// id (never the id).
pub fn audit_detail(format: &str, hash: &CodeHash) -> String {
    format!("legacy code {format} {hash}")
}

/// The audit answer for a code bound to nobody.
pub const UNKNOWN_CODE: &str = "unknown_code";
