//! One error type for the node's services, mapped to gRPC status codes in one
//! place so callers see consistent codes and lowercase, actionable messages.

use hufu_certs::{Province, Role};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
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
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
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
