//! Authorization from the caller's certificate identity alone (DESIGN.md,
//! Identities): the TLS handshake has already proved the identity, this
//! decides what it may do at this node. The admission layer applies it to
//! every call, from its method table, before the body is read; handlers only
//! ask who the caller is.

use hufu_certs::{Identity, Province, Role};

use crate::error::{NodeError, NodeResult};
use crate::net::PeerInfo;
use crate::standing::Standing;

/// The groups of calls a node distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `Lookup`, `BatchLookup`: terminals of this province, nodes of any member.
    Lookup,
    /// `Verify`: terminals of this province.
    Verify,
    /// Published keys: any authenticated caller.
    PublicKeys,
    /// The admin API: admins of this province.
    Admin,
    /// The federation API: nodes of any member.
    Federation,
    /// The read-only audit API: auditors.
    Audit,
    /// Offering a trust list: nodes of any member (gossip), and admins of
    /// this province (installing what they signed).
    TrustOffer,
    /// What only replicas of one province share (a replica snapshot, with
    /// the province's sealed keyring): nodes of this province.
    Replica,
}

/// The verified identity of the caller of `request`.
pub fn caller<T>(request: &tonic::Request<T>) -> NodeResult<std::sync::Arc<Identity>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|info| info.identity.clone())
        .ok_or(NodeError::Unauthenticated)
}

/// Checks that `caller` may make a call of kind `access` named `method` at a
/// node of province `own`.
pub fn authorize(
    own: Province,
    caller: &Identity,
    method: &'static str,
    access: Access,
) -> NodeResult<()> {
    let local = caller.province == own;
    let allowed = match (access, caller.role) {
        (Access::Lookup, Role::Terminal) | (Access::Verify, Role::Terminal) if !local => {
            return Err(NodeError::denied(
                caller,
                method,
                &format!(
                    "a terminal of province {} ({}) may only call its own province's nodes, and this node serves {own} ({}): point the terminal at a {} node",
                    caller.province,
                    caller.province.name(),
                    own.name(),
                    caller.province
                ),
            ));
        }
        (Access::Lookup, Role::Terminal | Role::Node) => true,
        (Access::Verify, Role::Terminal) => true,
        (Access::PublicKeys, _) => true,
        (Access::Admin, Role::Admin) if !local => {
            return Err(NodeError::denied(
                caller,
                method,
                &format!(
                    "an admin of province {} ({}) may only administer its own province's nodes, and this node serves {own} ({})",
                    caller.province,
                    caller.province.name(),
                    own.name()
                ),
            ));
        }
        (Access::Admin, Role::Admin) => true,
        (Access::Federation | Access::TrustOffer, Role::Node) => true,
        (Access::TrustOffer, Role::Admin) => local,
        (Access::Audit, Role::Auditor) => true,
        (Access::Replica, Role::Node) if !local => {
            return Err(NodeError::denied(
                caller,
                method,
                &format!(
                    "only nodes of this node's own province {own} ({}) may call it: it serves another replica of the province",
                    own.name()
                ),
            ));
        }
        (Access::Replica, Role::Node) => true,
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        let roles: &[Role] = match access {
            Access::Lookup => &[Role::Terminal, Role::Node],
            Access::Verify => &[Role::Terminal],
            Access::PublicKeys => &[],
            Access::Admin => &[Role::Admin],
            Access::Federation => &[Role::Node],
            Access::TrustOffer => &[Role::Node, Role::Admin],
            Access::Audit => &[Role::Auditor],
            Access::Replica => &[Role::Node],
        };
        Err(NodeError::role_denied(caller, method, roles))
    }
}

/// The connection's peer (identity and certificate serial) of `request`.
pub fn peer<T>(request: &tonic::Request<T>) -> NodeResult<&PeerInfo> {
    request
        .extensions()
        .get::<PeerInfo>()
        .ok_or(NodeError::Unauthenticated)
}

/// Whether `peer` is still in good standing for a call of `method`: its
/// province is a member of the trust list in force and its certificate is
/// not revoked. The handshake checked this once; this is the check on every
/// call (DESIGN.md, Identities).
pub fn in_good_standing(
    standing: &Standing,
    peer: &PeerInfo,
    method: &'static str,
) -> NodeResult<()> {
    standing
        .check_peer(peer)
        .map_err(|why| NodeError::denied(&peer.identity, method, &why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, role: Role) -> Identity {
        Identity::new(Province::parse(p).unwrap(), role, "x").unwrap()
    }

    #[test]
    fn the_rules_of_design_md() {
        let gd = Province::parse("440000").unwrap();
        let ok = |p, r, a| authorize(gd, &id(p, r), "m", a).is_ok();
        assert!(ok("440000", Role::Terminal, Access::Lookup));
        assert!(ok("440000", Role::Terminal, Access::Verify));
        assert!(!ok("610000", Role::Terminal, Access::Lookup));
        assert!(!ok("610000", Role::Terminal, Access::Verify));
        assert!(ok("610000", Role::Node, Access::Lookup));
        assert!(ok("610000", Role::Node, Access::Federation));
        assert!(!ok("440000", Role::Terminal, Access::Federation));
        assert!(ok("440000", Role::Admin, Access::Admin));
        assert!(!ok("610000", Role::Admin, Access::Admin));
        assert!(!ok("440000", Role::Terminal, Access::Admin));
        assert!(!ok("440000", Role::Node, Access::Admin));
        assert!(!ok("440000", Role::Admin, Access::Lookup));
        assert!(ok("610000", Role::Auditor, Access::Audit));
        assert!(!ok("440000", Role::Admin, Access::Audit));
        assert!(ok("440000", Role::Node, Access::Replica));
        assert!(!ok("610000", Role::Node, Access::Replica));
        assert!(!ok("440000", Role::Admin, Access::Replica));
        let err = authorize(gd, &id("440000", Role::Auditor), "Lookup", Access::Lookup)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only terminal, node certificates are allowed"),
            "{err}"
        );
    }
}
