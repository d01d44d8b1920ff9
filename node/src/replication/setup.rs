//! A new replica of a province, made from the directory of one of its
//! nodes: the same province (CA certificate, holder secret, log and
//! governance keys, code-signing keyring, trust lists, admin certificate),
//! with its own node name, node certificate, listen address and empty
//! store. It catches up from the write log when it starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hufu_certs::{Identity, LeafOptions, Role};

use crate::config::{NodeConfig, ReplicationConfig};
use crate::init::{CONFIG_FILE, load_ca};

/// What differs in a replica.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub node_name: String,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// DNS names and IP addresses the replica is reached at.
    pub hosts: Vec<String>,
}

/// Creates replica `opts.node_name` of the province of node `from` (whose
/// directory's CA key issues the replica's node certificate, and stays
/// there) in `dir`, with `replication` as its `[replication]`, and returns
/// the replica's config path.
pub fn init_replica(
    from: &NodeConfig,
    dir: &Path,
    opts: &ReplicaOptions,
    replication: ReplicationConfig,
) -> anyhow::Result<PathBuf> {
    let config_path = dir.join(CONFIG_FILE);
    anyhow::ensure!(
        !config_path.exists(),
        "{} already exists: refusing to overwrite a node (choose another directory)",
        config_path.display()
    );
    let mut config = from.clone();
    let from = &from.base_dir;
    anyhow::ensure!(
        opts.node_name != config.node_name,
        "the replica needs its own node name: {} is the name of the node it is made from",
        opts.node_name
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shared = [
        config.ca_cert.clone(),
        config.holder_secret.clone(),
        config.log_key.clone(),
        config.governance_key.clone(),
        config.revoked_certs.clone(),
        config.client.admin_cert.clone(),
        config.client.admin_key.clone(),
        config.codes.keys_dir.clone(),
        config.trust_dir.clone(),
    ];
    for path in shared.iter().filter(|p| p.is_relative()) {
        copy(&from.join(path), &dir.join(path))?;
    }

    let ca = load_ca(from)?;
    let identity = Identity::new(config.province, Role::Node, &opts.node_name)?;
    let mut hosts = opts.hosts.clone();
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        let ip = opts.listen.ip();
        if !ip.is_unspecified() && !ip.is_loopback() {
            hosts.push(ip.to_string());
        }
    }
    let cert = PathBuf::from(format!("node/{}.pem", opts.node_name));
    let key = PathBuf::from(format!("node/{}.key", opts.node_name));
    ca.issue(&identity, &LeafOptions::for_node(&hosts))?
        .write(&dir.join(&cert), &dir.join(&key))?;

    config.node_name = opts.node_name.clone();
    config.node_cert = cert;
    config.node_key = key;
    config.listen = opts.listen;
    config.metrics_listen = opts.metrics_listen;
    // The client commands dial the replica itself.
    config.client.endpoint = if opts.listen.ip().is_unspecified() {
        format!("localhost:{}", opts.listen.port())
    } else {
        opts.listen.to_string()
    };
    config.replication = Some(replication);
    let text = format!(
        "# Hufu node configuration: replica {} of province {}, made by\n# `hufu init --replica-of`. Its store fills from the province's write log.\n{}",
        opts.node_name,
        config.province,
        toml::to_string(&config).context("cannot write the replica's configuration")?
    );
    std::fs::write(&config_path, text)?;
    NodeConfig::load(&config_path)?;
    Ok(config_path)
}

/// Copies a file or a directory tree, keeping private files private.
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if !from.exists() {
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    // std::fs::copy keeps the permission bits (0600 for secrets).
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}
