//! The node's gRPC services.

pub mod admin;
pub mod audit;
pub mod federation;
pub mod lookup;
