//! One error type per gRPC service, each converted to a `tonic::Status` here
//! and nowhere else.
//!
//! A service's error keeps a library's error (a province code that does not
//! parse, a witness refusal, an audit log position past the end) as its
//! type until this point, where it is given its gRPC code and, for invalid
//! input, the request field at fault (a `BadRequest` detail). The node's own
//! refusals ([`NodeError`]: standing, store, replicas) pass through with the
//! codes [`crate::error`] gives them. Internal failures reach the caller as
//! a generic message with a log reference, whatever service they come from.

use hufu_certs::{CertError, Province};
use hufu_federation::audit::{AuditError, WitnessError};
use hufu_federation::codes::CodeError;
use hufu_federation::holder::HolderError;
use tokio::task::JoinError;
use tonic::{Code, Status};

use crate::error::{NodeError, field_status, internal_status};
use crate::federation::TrustOfferError;

/// Errors of `hufu.v1.StatusLookupService`.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The `issuer` asked about is not a province code.
    #[error("{0}")]
    Issuer(#[source] CertError),
    #[error("{0}")]
    Holder(#[source] HolderError),
    #[error("national_id: {0}: read the identity card again")]
    NationalId(#[source] HolderError),
    #[error(
        "batch of {0} holders exceeds the limit of {max}; split it into several calls",
        max = super::lookup::MAX_BATCH
    )]
    BatchTooLarge(usize),
    #[error("batch lookup task: {0}")]
    Task(#[from] JoinError),
    #[error("jwks: {0}")]
    Jwks(#[from] serde_json::Error),
}

impl From<LookupError> for Status {
    fn from(err: LookupError) -> Status {
        let field = match err {
            LookupError::Node(err) => return err.into(),
            LookupError::Issuer(_) => "issuer",
            LookupError::Holder(_) => "holder",
            LookupError::NationalId(_) => "national_id",
            LookupError::BatchTooLarge(_) => "holders",
            LookupError::Task(_) | LookupError::Jwks(_) => return internal_status(&err),
        };
        field_status(field, err.to_string())
    }
}

/// Errors of `hufu.v1.AdminService`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The holder's name cannot be masked for display.
    #[error("{0}")]
    Name(#[source] CodeError),
    #[error("{0}")]
    NationalId(#[source] HolderError),
    #[error("{0}")]
    Algorithm(#[source] CodeError),
    /// The key to revoke is unknown or the last one.
    #[error("{0}")]
    Revocation(#[source] CodeError),
    #[error("signing: {0}")]
    Signing(#[source] CodeError),
    #[error("rotating keys: {0}")]
    Rotation(#[source] CodeError),
    #[error("blocking task: {0}")]
    Task(#[from] JoinError),
    /// An import ended early; the rows stored before stay stored.
    #[error(
        "import stopped after {accepted} rows were stored durably: {cause}; running the same import again is safe (rows already stored count as unchanged)"
    )]
    ImportStopped { accepted: u64, cause: ImportCause },
}

/// What ended an import early.
#[derive(Debug, thiserror::Error)]
pub enum ImportCause {
    /// The caller's stream of rows broke.
    #[error("import stream: {}", .0.message())]
    Stream(Status),
    #[error("{0}")]
    Store(NodeError),
}

impl From<AdminError> for Status {
    fn from(err: AdminError) -> Status {
        let field = match err {
            AdminError::Node(err) => return err.into(),
            AdminError::Name(_) => "name",
            AdminError::NationalId(_) => "national_id",
            AdminError::Algorithm(_) => "algorithm",
            AdminError::Revocation(_) => {
                return Status::failed_precondition(err.to_string());
            }
            AdminError::ImportStopped { .. } => return Status::unavailable(err.to_string()),
            AdminError::Signing(_) | AdminError::Rotation(_) | AdminError::Task(_) => {
                return internal_status(&err);
            }
        };
        field_status(field, err.to_string())
    }
}

/// Errors of `hufu.v1.FederationService`.
#[derive(Debug, thiserror::Error)]
pub enum FederationServiceError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The `issuer` of a feed is not a province code.
    #[error("{0}")]
    Issuer(#[source] CertError),
    #[error("{0}")]
    Holder(#[source] HolderError),
    #[error("{0}: re-read the identity card")]
    NationalId(#[source] HolderError),
    #[error(transparent)]
    TrustOffer(#[from] TrustOfferError),
    /// A subscriber claims changes this province never made.
    #[error(
        "subscriber is at change {after}, but province {province} has only {tail}: a different history"
    )]
    AheadOfFeed {
        after: u64,
        province: Province,
        tail: u64,
    },
}

impl From<FederationServiceError> for Status {
    fn from(err: FederationServiceError) -> Status {
        let field = match err {
            FederationServiceError::Node(err) => return err.into(),
            FederationServiceError::Issuer(_) => "issuer",
            FederationServiceError::Holder(_) => "holder",
            FederationServiceError::NationalId(_) => "national_id",
            FederationServiceError::AheadOfFeed { .. } => "after_sequence",
            FederationServiceError::TrustOffer(TrustOfferError::Note(_)) => "note",
            FederationServiceError::TrustOffer(
                TrustOfferError::NoTrustList
                | TrustOfferError::LeavesFederation { .. }
                | TrustOfferError::Refused(_),
            ) => return Status::failed_precondition(err.to_string()),
            FederationServiceError::TrustOffer(
                TrustOfferError::Task(_) | TrustOfferError::Enforce(_),
            ) => return internal_status(&err),
        };
        field_status(field, err.to_string())
    }
}

/// Errors of `hufu.v1.AuditService`.
#[derive(Debug, thiserror::Error)]
pub enum AuditServiceError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("audit log: {0}")]
    Log(#[from] AuditError),
}

/// A position the audit log does not hold is the caller's to fix; anything
/// else the log refuses is this node's failure.
impl From<AuditServiceError> for Status {
    fn from(err: AuditServiceError) -> Status {
        match err {
            AuditServiceError::Node(err) => err.into(),
            AuditServiceError::Log(AuditError::OutOfRange(msg)) => Status::out_of_range(msg),
            AuditServiceError::Log(_) => internal_status(&err),
        }
    }
}

/// Errors of `hufu.v1.WitnessService`.
#[derive(Debug, thiserror::Error)]
pub enum WitnessServiceError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The checkpoint offered does not parse, or names no province.
    #[error("{0}")]
    Checkpoint(#[source] AuditError),
    #[error("a proof hash has {0} bytes, not 32")]
    ProofHash(usize),
    /// This node's witness state cannot be opened.
    #[error("audit log: {0}")]
    Log(#[from] AuditError),
    #[error("witness task: {0}")]
    Task(#[from] JoinError),
    /// The witness refused to cosign the checkpoint `caller` offered.
    #[error("{source}")]
    Refused {
        caller: String,
        source: WitnessError,
    },
    /// Two checkpoints of one log that cannot both be true.
    #[error("refused to cosign: {0}")]
    Conflict(#[source] WitnessError),
}

impl From<WitnessServiceError> for Status {
    fn from(err: WitnessServiceError) -> Status {
        let code = match err {
            WitnessServiceError::Node(err) => return err.into(),
            WitnessServiceError::Checkpoint(_) => {
                return field_status("checkpoint", err.to_string());
            }
            WitnessServiceError::ProofHash(_) => return field_status("proof", err.to_string()),
            WitnessServiceError::Conflict(_) => Code::FailedPrecondition,
            WitnessServiceError::Refused {
                ref caller,
                ref source,
            } => match source {
                WitnessError::OwnLog { .. } | WitnessError::BadLogSignature { .. } => {
                    return Status::permission_denied(format!(
                        "{caller} may not call AddCheckpoint: {source}"
                    ));
                }
                WitnessError::Malformed(_) | WitnessError::LogKey(_) => Code::InvalidArgument,
                WitnessError::Rollback { .. } => Code::FailedPrecondition,
                _ => return internal_status(&err),
            },
            WitnessServiceError::Log(_) | WitnessServiceError::Task(_) => {
                return internal_status(&err);
            }
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_log_errors_keep_their_kind() {
        let past = Status::from(AuditServiceError::from(AuditError::OutOfRange(
            "index 9 past the end of the log (size 3)".into(),
        )));
        assert_eq!(past.code(), Code::OutOfRange);
        assert_eq!(past.message(), "index 9 past the end of the log (size 3)");
        let closed = Status::from(AuditServiceError::from(AuditError::Closed(
            "writer stopped at /srv/hufu/audit".into(),
        )));
        assert_eq!(closed.code(), Code::Internal);
        assert!(!closed.message().contains("/srv/hufu"), "{closed:?}");
    }

    #[test]
    fn library_errors_name_the_field_at_fault() {
        use tonic_types::StatusExt;
        let err = hufu_certs::Province::parse("44").unwrap_err();
        let status = Status::from(LookupError::Issuer(err));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations[0].field, "issuer");
        assert_eq!(violations[0].description, status.message());
    }

    #[test]
    fn witness_refusals_keep_their_codes() {
        let refused = |source| {
            Status::from(WitnessServiceError::Refused {
                caller: "spiffe://hufu/610000/node/n1".into(),
                source,
            })
        };
        let own = refused(WitnessError::OwnLog {
            origin: "hufu.example/440000".into(),
        });
        assert_eq!(own.code(), Code::PermissionDenied);
        assert!(
            own.message()
                .starts_with("spiffe://hufu/610000/node/n1 may not call AddCheckpoint: "),
            "{own:?}"
        );
        let malformed = refused(WitnessError::Malformed("no size line".into()));
        assert_eq!(malformed.code(), Code::InvalidArgument);
        assert_eq!(malformed.message(), "malformed checkpoint: no size line");
    }
}
