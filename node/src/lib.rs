//! One province's Hufu node: storage, gRPC services behind mutual TLS,
//! metrics, and what sets a province up (`init`, `config_check`) or runs
//! provinces on loopback (`local`, `sample`) for tests and tools. The
//! `hufu` command's own tree (command line, demo, benchmarks, surge) is
//! the binary in `src/bin/hufu/`, which uses only this library's public
//! API, so tests drive exactly what operators run.

pub mod admission;
pub mod answer;
pub mod audit;
pub mod auth;
pub mod client;
pub mod codes;
pub mod config;
pub mod config_check;
pub mod console;
pub mod error;
pub mod federation;
pub mod handshake;
pub mod import;
pub mod init;
pub mod lane;
pub mod legacy;
pub mod local;
pub mod metered;
pub mod metrics;
pub mod net;
pub mod peers;
pub mod places;
pub mod ports;
pub mod preflight;
pub mod replication;
pub mod revocation;
pub mod sample;
pub mod serve;
pub mod server;
pub mod services;
pub mod standing;
pub mod state;
pub mod status;
pub mod storage_health;
pub mod store;
