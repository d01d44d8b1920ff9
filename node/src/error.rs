//! One error type for the node's services, mapped to gRPC status codes in one
//! place so callers see consistent codes and lowercase, actionable messages.
//!
//! Where a caller can act on a refusal programmatically, the status also
//! carries `google.rpc` rich error details (`grpc-status-details-bin`): a
//! `BadRequest` naming the request field at fault for invalid input, so a
//! client can point its user at the field without parsing the message.

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
        if let NodeError::InvalidField { field, description } = &err {
            return tonic::Status::with_error_details(
                Code::InvalidArgument,
                err.to_string(),
                ErrorDetails::with_bad_request_violation(field, description),
            );
        }
        let code = match &err {
            NodeError::InvalidArgument(_) | NodeError::InvalidField { .. } => Code::InvalidArgument,
            NodeError::HolderNotFound { .. } | NodeError::NotFound(_) => Code::NotFound,
            NodeError::PermissionDenied { .. } => Code::PermissionDenied,
            NodeError::Unauthenticated => Code::Unauthenticated,
            NodeError::WrongProvince { .. } => Code::NotFound,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::Unavailable(_) => Code::Unavailable,
            NodeError::Storage(_)
            | NodeError::Transaction(_)
            | NodeError::Corrupt(_)
            | NodeError::Internal(_) => {
                tracing::error!(error = %err, "internal error");
                Code::Internal
            }
        };
        tonic::Status::new(code, err.to_string())
    }
}

pub type NodeResult<T> = Result<T, NodeError>;
