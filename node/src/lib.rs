//! One province's Hufu node: storage, gRPC services behind mutual TLS,
//! metrics, and the library behind every `hufu` subcommand, so tests drive
//! exactly what operators run.

pub mod admission;
pub mod audit;
pub mod audit_cli;
pub mod auth;
pub mod bench;
pub mod certs_cli;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_check;
pub mod conn;
pub mod console;
pub mod demo;
pub mod error;
pub mod explain;
pub mod federation;
pub mod import;
pub mod init;
pub mod loadgen;
pub mod local;
pub mod metrics;
pub mod net;
pub mod preflight;
pub mod qr;
pub mod revocation;
pub mod sample;
pub mod serve;
pub mod server;
pub mod services;
pub mod signal;
pub mod standing;
pub mod state;
pub mod status;
pub mod storage_health;
pub mod store;
pub mod surge;
