//! Every method the node serves, in one table: who may call it (DESIGN.md,
//! Identities), which admission class it belongs to, and the shape of its
//! call. Authorization and admission both read this table from the request's
//! path, before a byte of its body has been read.

use hufu_certs::{Identity, Role};
use hufu_proto::v1::witness_service_server;
use hufu_proto::v1::{
    admin_service_server, audit_service_server, federation_service_server,
    status_lookup_service_server,
};

use super::Class;
use crate::auth::Access;

/// How a method's messages flow, which decides how it is admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One message each way: admitted once its message has arrived.
    Unary,
    /// A stream of request messages (imports): admitted when it starts,
    /// each message limited in size by the decoder.
    ClientStream,
    /// A response stream that lasts as long as the caller wants (feeds,
    /// health watches, reflection): outside the in-flight limit, under a
    /// budget per caller identity instead.
    LongLived,
}

/// What the table says of one method.
#[derive(Clone, Copy, Debug)]
pub struct Method {
    /// The method's name, for messages and metrics.
    pub name: &'static str,
    /// Who may call it; `None`: any authenticated caller.
    pub access: Option<Access>,
    /// Its admission class for a caller that is not another node.
    pub class: Class,
    pub shape: Shape,
}

impl Method {
    /// The class of a call by `caller`: lookups made by other provinces'
    /// nodes are federation traffic.
    pub fn class_for(&self, caller: &Identity) -> Class {
        if self.class == Class::Serving && caller.role == Role::Node {
            Class::Federation
        } else {
            self.class
        }
    }
}

const fn unary(name: &'static str, access: Access, class: Class) -> Method {
    Method {
        name,
        access: Some(access),
        class,
        shape: Shape::Unary,
    }
}

/// The method a request path names. Paths of a known service that the table
/// does not list take that service's rules (so a method added to a service
/// is never left open); unknown paths are served by the router's
/// UNIMPLEMENTED under the serving class.
pub fn method(path: &str) -> Method {
    let (service, name) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", ""));
    let name: &'static str = match STATIC_NAMES.iter().find(|n| **n == name) {
        Some(n) => n,
        None => "unknown method",
    };
    match service {
        s if s == status_lookup_service_server::SERVICE_NAME => match name {
            "Verify" => unary(name, Access::Verify, Class::Serving),
            "GetJwks" => unary(name, Access::PublicKeys, Class::Serving),
            _ => unary(name, Access::Lookup, Class::Serving),
        },
        s if s == admin_service_server::SERVICE_NAME => Method {
            shape: if name == "ImportStatuses" {
                Shape::ClientStream
            } else {
                Shape::Unary
            },
            ..unary(name, Access::Admin, Class::Bulk)
        },
        s if s == federation_service_server::SERVICE_NAME => match name {
            "SubscribeChanges" => Method {
                shape: Shape::LongLived,
                ..unary(name, Access::Federation, Class::Federation)
            },
            "GetSnapshot" => Method {
                shape: Shape::LongLived,
                ..unary(name, Access::Federation, Class::Federation)
            },
            "GetReplicaSnapshot" => Method {
                shape: Shape::LongLived,
                ..unary(name, Access::Replica, Class::Federation)
            },
            "OfferTrustList" => unary(name, Access::TrustOffer, Class::Federation),
            _ => unary(name, Access::Federation, Class::Federation),
        },
        s if s == witness_service_server::SERVICE_NAME => {
            unary(name, Access::Federation, Class::Federation)
        }
        s if s == audit_service_server::SERVICE_NAME => unary(name, Access::Audit, Class::Bulk),
        "grpc.health.v1.Health" => Method {
            name,
            access: None,
            class: Class::Serving,
            shape: if name == "Watch" {
                Shape::LongLived
            } else {
                Shape::Unary
            },
        },
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Method {
                name,
                access: None,
                class: Class::Bulk,
                shape: Shape::LongLived,
            }
        }
        _ => Method {
            name,
            access: None,
            class: Class::Serving,
            shape: Shape::Unary,
        },
    }
}

/// Method names as `'static` strings, for metrics labels and messages.
const STATIC_NAMES: &[&str] = &[
    "Lookup",
    "BatchLookup",
    "Verify",
    "GetJwks",
    "PutStatus",
    "ImportStatuses",
    "GetStatus",
    "IssueCode",
    "RotateKey",
    "RevokeKey",
    "SubscribeChanges",
    "GetTrustList",
    "OfferTrustList",
    "AddCheckpoint",
    "MatchHolder",
    "ResolveCode",
    "GetReplicaSnapshot",
    "GetSnapshot",
    "LinkCode",
    "UnlinkCode",
    "GetCheckpoints",
    "GetEntries",
    "GetInclusionProof",
    "GetConsistencyProof",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

#[cfg(test)]
mod tests {
    use super::*;
    use hufu_certs::Province;

    fn id(role: Role) -> Identity {
        Identity::new(Province::parse("440000").unwrap(), role, "x").unwrap()
    }

    #[test]
    fn every_service_has_its_rules() {
        let m = method(&format!(
            "/{}/Verify",
            status_lookup_service_server::SERVICE_NAME
        ));
        assert_eq!(m.access, Some(Access::Verify));
        assert_eq!(m.class_for(&id(Role::Terminal)), Class::Serving);
        let m = method(&format!(
            "/{}/Lookup",
            status_lookup_service_server::SERVICE_NAME
        ));
        assert_eq!(m.class_for(&id(Role::Node)), Class::Federation);
        let m = method(&format!(
            "/{}/ImportStatuses",
            admin_service_server::SERVICE_NAME
        ));
        assert_eq!(
            (m.access, m.class, m.shape),
            (Some(Access::Admin), Class::Bulk, Shape::ClientStream)
        );
        let m = method(&format!(
            "/{}/SubscribeChanges",
            federation_service_server::SERVICE_NAME
        ));
        assert_eq!(m.shape, Shape::LongLived);
        let m = method(&format!(
            "/{}/AddCheckpoint",
            witness_service_server::SERVICE_NAME
        ));
        assert_eq!(m.class, Class::Federation);
        let m = method(&format!(
            "/{}/GetEntries",
            audit_service_server::SERVICE_NAME
        ));
        assert_eq!((m.access, m.class), (Some(Access::Audit), Class::Bulk));
        let m = method("/grpc.health.v1.Health/Watch");
        assert_eq!((m.access, m.shape), (None, Shape::LongLived));
    }

    /// The whole table, method by method: who may call it, its class for a
    /// terminal (or admin, auditor) and for another province's node, and its
    /// shape. A change to any row of DESIGN.md's rules shows up here.
    #[test]
    fn every_method_path_is_classified() {
        use Access::*;
        use Class::{Bulk, Federation as Fed, Serving};
        use Shape::*;
        let lookup = status_lookup_service_server::SERVICE_NAME;
        let admin = admin_service_server::SERVICE_NAME;
        let federation = federation_service_server::SERVICE_NAME;
        let witness = witness_service_server::SERVICE_NAME;
        let audit = audit_service_server::SERVICE_NAME;
        let health = "grpc.health.v1.Health";
        let reflection = "grpc.reflection.v1.ServerReflection";
        /// service, method, access, class (terminal), class (node), shape
        type Row<'a> = (&'a str, &'a str, Option<Access>, Class, Class, Shape);
        #[rustfmt::skip]
        let table: &[Row] = &[
            (lookup, "Lookup", Some(Lookup), Serving, Fed, Unary),
            (lookup, "BatchLookup", Some(Lookup), Serving, Fed, Unary),
            (lookup, "Verify", Some(Verify), Serving, Fed, Unary),
            (lookup, "GetJwks", Some(PublicKeys), Serving, Fed, Unary),
            (admin, "PutStatus", Some(Admin), Bulk, Bulk, Unary),
            (admin, "ImportStatuses", Some(Admin), Bulk, Bulk, ClientStream),
            (admin, "GetStatus", Some(Admin), Bulk, Bulk, Unary),
            (admin, "IssueCode", Some(Admin), Bulk, Bulk, Unary),
            (admin, "RotateKey", Some(Admin), Bulk, Bulk, Unary),
            (admin, "RevokeKey", Some(Admin), Bulk, Bulk, Unary),
            (admin, "LinkCode", Some(Admin), Bulk, Bulk, Unary),
            (admin, "UnlinkCode", Some(Admin), Bulk, Bulk, Unary),
            (federation, "SubscribeChanges", Some(Federation), Fed, Fed, LongLived),
            (federation, "GetSnapshot", Some(Federation), Fed, Fed, LongLived),
            (federation, "GetReplicaSnapshot", Some(Replica), Fed, Fed, LongLived),
            (federation, "GetTrustList", Some(Federation), Fed, Fed, Unary),
            (federation, "OfferTrustList", Some(TrustOffer), Fed, Fed, Unary),
            (federation, "MatchHolder", Some(Federation), Fed, Fed, Unary),
            (federation, "ResolveCode", Some(Federation), Fed, Fed, Unary),
            (witness, "AddCheckpoint", Some(Federation), Fed, Fed, Unary),
            (audit, "GetCheckpoints", Some(Audit), Bulk, Bulk, Unary),
            (audit, "GetEntries", Some(Audit), Bulk, Bulk, Unary),
            (audit, "GetInclusionProof", Some(Audit), Bulk, Bulk, Unary),
            (audit, "GetConsistencyProof", Some(Audit), Bulk, Bulk, Unary),
            (health, "Check", None, Serving, Fed, Unary),
            (health, "Watch", None, Serving, Fed, LongLived),
            (reflection, "ServerReflectionInfo", None, Bulk, Bulk, LongLived),
            ("no.such.Service", "Lookup", None, Serving, Fed, Unary),
        ];
        for (service, name, access, terminal, node, shape) in table {
            let m = method(&format!("/{service}/{name}"));
            let row = format!("{service}/{name}");
            assert_eq!(m.name, *name, "{row}");
            assert_eq!(m.access, *access, "{row}");
            assert_eq!(m.class_for(&id(Role::Terminal)), *terminal, "{row}");
            assert_eq!(m.class_for(&id(Role::Node)), *node, "{row}");
            assert_eq!(m.shape, *shape, "{row}");
        }
        // Every name the table knows has its row above.
        for name in STATIC_NAMES {
            assert!(table.iter().any(|row| row.1 == *name), "{name} has no row");
        }
        assert_eq!(method("/garbage").name, "unknown method");
    }

    #[test]
    fn a_new_method_of_a_service_takes_the_services_rules() {
        let m = method(&format!(
            "/{}/SomethingNew",
            admin_service_server::SERVICE_NAME
        ));
        assert_eq!(m.access, Some(Access::Admin));
        let m = method(&format!(
            "/{}/SomethingNew",
            federation_service_server::SERVICE_NAME
        ));
        assert_eq!(m.access, Some(Access::Federation));
    }
}
