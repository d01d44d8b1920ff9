//! The node's gRPC services.

pub mod admin;
pub mod audit;
pub mod error;
pub mod federation;
pub mod lookup;
