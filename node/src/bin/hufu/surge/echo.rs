//! The surge's baseline: a bare tonic server (the standard health service
//! only) with tonic's own mutual TLS and default settings, on the node's
//! certificates and address. What the stack does without Hufu's overload
//! control, under identical conditions.

use std::path::Path;

use anyhow::Context;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use hufu_node::config::NodeConfig;

/// Serves until the process is killed.
pub async fn echo_server(config_path: &Path) -> anyhow::Result<()> {
    let config = NodeConfig::load(config_path)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            config.read(&config.node_cert)?,
            config.read(&config.node_key)?,
        ))
        .client_ca_root(Certificate::from_pem(config.read(&config.ca_cert)?));
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        .tls_config(tls)
        .context("tls settings")?
        .add_service(health)
        .serve(config.listen)
        .await
        .context("echo server failed")
}
