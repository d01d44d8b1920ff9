//! The error type of the node's components (store, replicas, standing,
//! legacy codes), with its gRPC status codes, and the two statuses every
//! service's error shares: invalid input in a named field, and an internal
//! failure behind a log reference. Each service's own error type, converted
//! to a status in one place, is in `services/error.rs`; callers see
//! consistent codes and lowercase, actionable messages.
//!
//! Where a caller can act on a refusal programmatically, the status also
//! carries `google.rpc` rich error details (`grpc-status-details-bin`): a
//! `BadRequest` naming the request field at fault for invalid input, so a
//! client can point its user at the field without parsing the message.
//!
//! Internal failures (storage, corrupt records, bugs) are the node's own
//! business: their detail can name paths, keys or data, and callers include
//! other provinces. The detail is logged under a random reference and the
//! caller gets a generic message carrying that reference, so an operator can
//! still match a caller's report to the log line (the reference also travels
//! as a `RequestInfo` detail).

use hufu_certs::{Province, Role};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    /// Invalid input in one request field, named by its path in the request
    /// message (`status.national_id`).
    #[error("{description}")]
    InvalidField { field: String, description: String },
    /// A holder named in the request field `field` (a national id or a
    /// pseudonym) that does not parse.
    #[error("{source}")]
    BadHolder {
        field: &'static str,
        source: hufu_federation::holder::HolderError,
    },
    #[error("no status for holder {holder} in province {issuer}")]
    HolderNotFound { issuer: Province, holder: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{caller} may not call {method}: {why}")]
    PermissionDenied {
        caller: String,
        method: &'static str,
        why: String,
    },
    #[error("no client certificate identity on this connection")]
    Unauthenticated,
    #[error("province {asked} is not served by this node (it serves {own})")]
    WrongProvince { asked: Province, own: Province },
    #[error("{0}")]
    FailedPrecondition(String),
    /// A position past the end (an audit log index or tree size).
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("storage transaction: {0}")]
    Transaction(String),
    #[error("corrupt stored record: {0}")]
    Corrupt(#[from] prost::DecodeError),
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        NodeError::InvalidArgument(msg.into())
    }

    /// Invalid input in the request field `field` (its proto name).
    pub fn invalid_field(field: &str, description: impl Into<String>) -> Self {
        NodeError::InvalidField {
            field: field.to_owned(),
            description: description.into(),
        }
    }

    /// The same error, with a field path made relative to the message that
    /// holds the field at `parent`: `national_id` within `status` becomes
    /// `status.national_id`.
    pub fn within(self, parent: &str) -> Self {
        match self {
            NodeError::InvalidField { field, description } => NodeError::InvalidField {
                field: format!("{parent}.{field}"),
                description,
            },
            NodeError::BadHolder { field, source } => NodeError::InvalidField {
                field: format!("{parent}.{field}"),
                description: source.to_string(),
            },
            other => other,
        }
    }

    pub fn denied(caller: &hufu_certs::Identity, method: &'static str, why: &str) -> Self {
        NodeError::PermissionDenied {
            caller: caller.uri(),
            method,
            why: why.to_owned(),
        }
    }

    /// The denial for a role that may never call `method`.
    pub fn role_denied(
        caller: &hufu_certs::Identity,
        method: &'static str,
        allowed: &[Role],
    ) -> Self {
        let allowed: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        Self::denied(
            caller,
            method,
            &format!("only {} certificates are allowed", allowed.join(", ")),
        )
    }
}

impl From<NodeError> for tonic::Status {
    fn from(err: NodeError) -> tonic::Status {
        use tonic::Code;
        let code = match &err {
            NodeError::InvalidField { field, description } => {
                return field_status(field, description.clone());
            }
            NodeError::BadHolder { field, .. } => return field_status(field, err.to_string()),
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::HolderNotFound { .. } | NodeError::NotFound(_) => Code::NotFound,
            NodeError::PermissionDenied { .. } => Code::PermissionDenied,
            NodeError::Unauthenticated => Code::Unauthenticated,
            NodeError::WrongProvince { .. } => Code::NotFound,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::OutOfRange(_) => Code::OutOfRange,
            NodeError::Unavailable(_) => Code::Unavailable,
            NodeError::Storage(_)
            | NodeError::Transaction(_)
            | NodeError::Corrupt(_)
            | NodeError::Internal(_) => return internal_status(&err),
        };
        tonic::Status::new(code, err.to_string())
    }
}

/// `INVALID_ARGUMENT` for the request field `field` (its path in the request
/// message), named in a `BadRequest` detail; `description` is the message.
pub fn field_status(field: &str, description: String) -> tonic::Status {
    tonic::Status::with_error_details(
        tonic::Code::InvalidArgument,
        description.clone(),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// `INTERNAL` for a failure of this node: `detail` goes to the log under a
/// fresh reference, the caller gets a generic message with the reference.
pub fn internal_status(detail: &dyn std::fmt::Display) -> tonic::Status {
    let reference = correlation_id();
    tracing::error!(%reference, error = %detail, "internal error");
    tonic::Status::with_error_details(
        tonic::Code::Internal,
        internal_message(&reference),
        ErrorDetails::with_request_info(reference, ""),
    )
}

impl NodeError {
    /// The error as a complete gRPC response, for layers that answer before
    /// any service runs.
    pub fn into_http(self) -> http::Response<tonic::body::Body> {
        tonic::Status::from(self).into_http()
    }
}

pub type NodeResult<T> = Result<T, NodeError>;

/// What a caller is told about an internal failure logged under `reference`.
pub fn internal_message(reference: &str) -> String {
    format!(
        "internal error at this node (reference {reference}): retry later; if it persists, give the reference to the node's operator, whose log has the details"
    )
}

/// A short random reference tying a caller's error to a log line.
fn correlation_id() -> String {
    let mut bytes = [0u8; 6];
    // Uniqueness matters, secrecy does not: a failed draw still gives an id.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    data_encoding::HEXLOWER.encode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_stays_in_the_log() {
        let err = NodeError::Internal("cannot open /srv/hufu/data/db: secret detail".into());
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("secret detail"), "{status:?}");
        assert!(status.message().contains("reference "), "{status:?}");
        let invalid = tonic::Status::from(NodeError::invalid("holder id is not base32"));
        assert_eq!(invalid.message(), "holder id is not base32");
    }
}
