//! How the `hufu` client commands reach a node: the connection flags they
//! share, with defaults from the node's `hufu.toml`.

use std::path::PathBuf;

use anyhow::Context;

use hufu_certs::Province;

use hufu_node::client::{self, ClientCert, Target};
use hufu_node::config::NodeConfig;

/// How client commands reach a node. `--config` supplies defaults (endpoint,
/// province, CA, admin certificate); the other flags override them.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// The node's hufu.toml (from `hufu init`).
    #[arg(long, default_value = "hufu.toml")]
    pub config: PathBuf,
    /// host:port of the node.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Province of the node dialled.
    #[arg(long)]
    pub province: Option<Province>,
    /// CA certificate the node's certificate must chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (default: the admin certificate from the config).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl ConnArgs {
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let config = if self.config.exists() {
            Some(NodeConfig::load(&self.config)?)
        } else {
            None
        };
        let need = |what: &str| {
            anyhow::anyhow!(
                "{what} is needed: pass --{what} or --config with a hufu.toml ({} not found)",
                self.config.display()
            )
        };
        let endpoint = match (&self.endpoint, &config) {
            (Some(e), _) => e.clone(),
            (None, Some(c)) => c.client.endpoint.clone(),
            (None, None) => return Err(need("endpoint")),
        };
        let province = match (self.province, &config) {
            (Some(p), _) => p,
            (None, Some(c)) => c.province,
            (None, None) => return Err(need("province")),
        };
        let ca_pem = match (&self.ca, &config) {
            (Some(p), _) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?,
            (None, Some(c)) => c.read(&c.ca_cert)?,
            (None, None) => return Err(need("ca")),
        };
        let cert = match (&self.cert, &self.key, &config) {
            (Some(c), Some(k), _) => ClientCert::load(c, k)?,
            (_, _, Some(c)) => {
                ClientCert::load(&c.path(&c.client.admin_cert), &c.path(&c.client.admin_key))?
            }
            _ => return Err(need("cert")),
        };
        crate::cli::explain::dialled(&endpoint, province);
        let target = Target::with_ca_pem(&endpoint, province, &ca_pem)?;
        client::connect(&target, &cert).await
    }

    /// The province of the node dialled.
    pub fn province(&self) -> anyhow::Result<Province> {
        match self.province {
            Some(p) => Ok(p),
            None => Ok(NodeConfig::load(&self.config)?.province),
        }
    }
}
