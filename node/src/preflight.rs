//! Checks made before a node serves, so that a clumsy set-up is caught at
//! start with a clear message instead of being exploited later:
//!
//! - the node certificate must be a node certificate of the province the
//!   configuration serves (another province's certificate would make the
//!   node speak for that province to every peer);
//! - every private file (holder secret, node and client keys, the CA key,
//!   log and governance keys, code-signing keys) readable or writable by
//!   group or others is reported, and a private file in a world-writable
//!   directory refuses the start, since anyone could replace it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hufu_certs::{Identity, Role};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::NodeConfig;

/// Refuses a node certificate that is not a node certificate of
/// `config.province`. Returns the identity it carries.
pub fn node_identity(config: &NodeConfig) -> anyhow::Result<Identity> {
    let path = config.path(&config.node_cert);
    let pem = config.read(&config.node_cert)?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("node certificate {}: {e}", path.display()))?;
    let identity = Identity::from_cert_der(&der)
        .with_context(|| format!("node certificate {}", path.display()))?;
    anyhow::ensure!(
        identity.role == Role::Node,
        "node certificate {} is a {} certificate ({identity}), not a node certificate: issue one with `hufu certs issue --role node`",
        path.display(),
        identity.role
    );
    anyhow::ensure!(
        identity.province == config.province,
        "node certificate {} names province {} ({identity}), but this configuration serves province {}: use a node certificate of {} issued by its own CA",
        path.display(),
        identity.province,
        config.province,
        config.province
    );
    if identity.name != config.node_name {
        tracing::warn!(
            certificate = %identity,
            node_name = %config.node_name,
            "the node certificate names another node than node_name; the certificate's name is what peers see"
        );
    }
    Ok(identity)
}

/// The private files of a node's configuration that exist on disk.
pub fn private_files(config: &NodeConfig) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [
        &config.holder_secret,
        &config.node_key,
        &config.log_key,
        &config.governance_key,
        &config.client.admin_key,
    ]
    .into_iter()
    .map(|p| config.path(p))
    .collect();
    // The CA key beside the CA certificate (`hufu init` keeps it there).
    files.push(config.path(&config.ca_cert).with_extension("key"));
    // Code-signing keys: one PKCS#8 PEM per key.
    files.extend(files_in(&config.path(&config.codes.keys_dir), "pem"));
    // Keys of certificates issued with `hufu certs issue`.
    for role in ["node", "admin", "terminal", "auditor"] {
        files.extend(files_in(&config.base_dir.join(role), "key"));
    }
    files.sort();
    files.dedup();
    files.retain(|f| f.is_file());
    files
}

fn files_in(dir: &Path, extension: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the modes of every private file and of the directories holding
/// them. Returns the warnings (files others may read); an error when a
/// directory holding a secret is world-writable.
pub fn check_permissions(config: &NodeConfig) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let mut dirs = Vec::new();
    for file in private_files(config) {
        let mode = std::fs::metadata(&file)
            .with_context(|| format!("cannot read the mode of {}", file.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "private file {} has mode {:o}: group or others may read it; run chmod 600 {}",
                file.display(),
                mode & 0o777,
                file.display()
            ));
        }
        if let Some(dir) = file.parent() {
            dirs.push((dir.to_path_buf(), file));
        }
    }
    dirs.sort();
    dirs.dedup_by(|a, b| a.0 == b.0);
    for (dir, file) in dirs {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let mode = std::fs::metadata(&dir)
            .with_context(|| format!("cannot read the mode of {}", dir.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o002 == 0,
            "directory {} holding the secret {} is world-writable (mode {:o}): anyone could replace the secret; run chmod o-w {} (and check what is in it) before serving",
            dir.display(),
            file.display(),
            mode & 0o7777,
            dir.display()
        );
    }
    Ok(warnings)
}

/// Everything checked before serving; warnings are logged.
pub fn check(config: &NodeConfig) -> anyhow::Result<Identity> {
    let identity = node_identity(config)?;
    for warning in check_permissions(config)? {
        tracing::warn!("{warning}");
    }
    Ok(identity)
}
