//! `hufu config check`: everything `hufu serve` would trip over, found
//! without serving. Files are read, keys parsed, the node's certificate is
//! checked against the province (identity, CA, key, the host clients dial)
//! by a real TLS handshake in memory, limits are checked for values that
//! would fail every call, and the listen addresses are bound and released.
//! Nothing is written.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hufu_certs::{Identity, Role, TrustAnchors};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::NodeConfig;

/// One thing checked, and what to do when it failed.
#[derive(Clone, Debug)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

/// What `hufu config check` found, in the order checked.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    /// The failures only.
    pub fn problems(&self) -> impl Iterator<Item = &str> {
        self.findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| f.text.as_str())
    }

    fn record(&mut self, outcome: anyhow::Result<String>) {
        self.findings.push(match outcome {
            Ok(text) => Finding { ok: true, text },
            Err(err) => Finding {
                ok: false,
                text: format!("{err:#}"),
            },
        });
    }
}

/// Checks the configuration at `path` as `hufu serve` would use it.
pub async fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match NodeConfig::load(path) {
        Ok(c) => c,
        Err(err) => {
            report.record(Err(err));
            return report;
        }
    };
    report.record(Ok(format!(
        "{} parses: province {} ({}), node {}",
        path.display(),
        config.province,
        config.province.name(),
        config.node_name
    )));
    let problems = config.limit_problems();
    if problems.is_empty() {
        report.record(Ok("limits can serve".into()));
    }
    for p in problems {
        report.record(Err(anyhow::anyhow!("{p}")));
    }
    report.record(secrets(&config));
    match crate::preflight::check_permissions(&config) {
        Ok(warnings) if warnings.is_empty() => {
            report.record(Ok("private files are readable by their owner only".into()))
        }
        Ok(warnings) => {
            for w in warnings {
                report.record(Err(anyhow::anyhow!("{w}")));
            }
        }
        Err(err) => report.record(Err(err)),
    }
    report.record(code_keys(&config));
    report.record(node_identity(&config));
    report.record(handshake(&config).await);
    report.record(trust(&config));
    let running = config.storage_in_use();
    report.record(storage(&config, &running));
    let running = running.unwrap_or(false);
    report.record(port("listen", config.listen, running));
    if let Some(addr) = config.metrics_listen {
        report.record(port("metrics_listen", addr, running));
    }
    report
}

fn secrets(config: &NodeConfig) -> anyhow::Result<String> {
    let path = config.path(&config.holder_secret);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read holder secret {}", path.display()))?;
    hufu_federation::holder::HolderSecret::new(&bytes)
        .with_context(|| format!("holder secret {}", path.display()))?;
    let path = config.path(&config.log_key);
    hufu_federation::audit::LogSigner::load(&path)
        .with_context(|| format!("log key {}", path.display()))?;
    let path = config.path(&config.governance_key);
    hufu_federation::trust::GovernanceKey::load(&path)
        .with_context(|| format!("governance key {}", path.display()))?;
    Ok("holder secret, log key and governance key are readable".into())
}

fn code_keys(config: &NodeConfig) -> anyhow::Result<String> {
    let dir = config.path(&config.codes.keys_dir);
    let files = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "cannot read the code-signing keys directory {}: restore it from backup (a new one would sign codes no other province knows)",
                dir.display()
            )
        })?
        .count();
    config
        .codes
        .algorithm
        .parse::<hufu_federation::codes::CodeAlg>()
        .map_err(|e| anyhow::anyhow!("codes.algorithm: {e}"))?;
    Ok(format!(
        "code-signing keys directory {} holds {files} files",
        dir.display()
    ))
}

fn node_identity(config: &NodeConfig) -> anyhow::Result<String> {
    let path = config.path(&config.node_cert);
    let der = first_cert(&config.read(&config.node_cert)?)
        .with_context(|| format!("node certificate {}", path.display()))?;
    let identity = Identity::from_cert_der(&der)
        .with_context(|| format!("node certificate {}", path.display()))?;
    anyhow::ensure!(
        identity.province == config.province && identity.role == Role::Node,
        "node certificate {} is for {identity}, not a node of province {}: issue one with `hufu certs issue --role node` from this province's CA",
        path.display(),
        config.province
    );
    anyhow::ensure!(
        identity.name == config.node_name,
        "node certificate {} names node {:?}, the config node_name {:?}: make them agree",
        path.display(),
        identity.name,
        config.node_name
    );
    Ok(format!("node certificate is {identity}"))
}

/// A TLS handshake in memory between the node (as `serve` configures it)
/// and the admin client (as the `hufu` commands configure it), dialling
/// the host of `client.endpoint`: proves the certificates chain to the
/// province's CA, match their keys and name that host.
async fn handshake(config: &NodeConfig) -> anyhow::Result<String> {
    let ca = first_cert(&config.read(&config.ca_cert)?)
        .with_context(|| format!("CA certificate {}", config.ca_cert.display()))?;
    let ca_province = hufu_certs::ca_province(&ca)
        .with_context(|| format!("CA certificate {}", config.ca_cert.display()))?;
    anyhow::ensure!(
        ca_province == config.province,
        "CA certificate {} is the CA of province {ca_province}, not {}",
        config.ca_cert.display(),
        config.province
    );
    let anchors = TrustAnchors::new([ca])?;
    let server = hufu_certs::server_config(
        anchors.clone(),
        &config.read(&config.node_cert)?,
        &config.read(&config.node_key)?,
    )
    .context("node certificate and key")?;
    let admin_cert = config.read(&config.client.admin_cert)?;
    let admin_key = config.read(&config.client.admin_key)?;
    let client = hufu_certs::client_config(anchors, config.province, &admin_cert, &admin_key)
        .context("admin certificate and key")?;
    let (host, _) = crate::client::host_port(&config.client.endpoint)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| anyhow::anyhow!("client.endpoint host {host:?}: {e}"))?;

    let (a, b) = tokio::io::duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(a);
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, b);
    let both = async { tokio::try_join!(accept, connect) };
    match tokio::time::timeout(Duration::from_secs(5), both).await {
        Ok(Ok(_)) => Ok(format!(
            "node and admin certificates chain to the province CA and the node certificate is valid for {host} (client.endpoint)"
        )),
        Ok(Err(err)) => Err(anyhow::anyhow!(
            "a TLS handshake between the node certificate and the admin certificate, dialling {host} (client.endpoint), fails: {err}: issue certificates from this province's CA (`hufu certs issue`), with --host {host} for the node"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "the in-memory TLS handshake did not finish"
        )),
    }
}

fn trust(config: &NodeConfig) -> anyhow::Result<String> {
    let dir = config.path(&config.trust_dir);
    let Some(store) = crate::federation::load_trust(&dir, config.province)? else {
        // Alone, the node also trusts the CAs listed in member_cas.
        for path in &config.member_cas {
            first_cert(&config.read(path)?)
                .with_context(|| format!("member CA {}", path.display()))?;
        }
        return Ok(format!(
            "no trust list in {}: the node serves its province alone ({} member CAs)",
            dir.display(),
            config.member_cas.len()
        ));
    };
    let list = &store.current().list;
    let member = list
        .member(config.province)
        .context("own province missing from the trust list")?;
    let ca_in_list = first_cert(&member.ca_cert_pem)?;
    let ca = first_cert(&config.read(&config.ca_cert)?)?;
    anyhow::ensure!(
        ca_in_list == ca,
        "trust list v{} gives province {} another CA than {}: propose an update with `hufu federation propose --update`",
        list.version,
        config.province,
        config.ca_cert.display()
    );
    let log_key =
        hufu_federation::audit::LogSigner::load(&config.path(&config.log_key))?.verifier_key();
    anyhow::ensure!(
        member.log_key == log_key,
        "trust list v{} gives province {} another log key than {}: peers would refuse this node's feed; propose an update with `hufu federation propose --update`",
        list.version,
        config.province,
        config.log_key.display()
    );
    Ok(format!(
        "trust list v{} in {}: {} members, this province's CA and log key match",
        list.version,
        dir.display(),
        list.members.len()
    ))
}

fn storage(config: &NodeConfig, running: &anyhow::Result<bool>) -> anyhow::Result<String> {
    let dir = config.path(&config.data_dir);
    match running {
        Ok(true) => {
            return Ok(format!(
                "storage {}: a node is running on it",
                dir.display()
            ));
        }
        Ok(false) => {}
        Err(err) => anyhow::bail!("storage {}: {err:#}", dir.display()),
    }
    // Where serve will create files: the directory itself, or its parent.
    let writable_dir = if dir.exists() {
        dir.clone()
    } else {
        dir.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| ".".into())
    };
    tempfile::tempfile_in(&writable_dir).with_context(|| {
        format!(
            "storage {}: cannot create files in {}",
            dir.display(),
            writable_dir.display()
        )
    })?;
    Ok(format!(
        "storage {} is writable{}",
        dir.display(),
        if dir.exists() {
            ""
        } else {
            " (created at the first start)"
        }
    ))
}

fn port(key: &str, addr: SocketAddr, running: bool) -> anyhow::Result<String> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(format!("{key} {addr} is free")),
        Err(_) if running => Ok(format!("{key} {addr} is in use by the running node")),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "{key} {addr} is in use by another process: stop it or choose another address (two nodes on one host need different listen and metrics_listen)"
        )),
        Err(err) => Err(anyhow::anyhow!("{key} {addr}: cannot listen: {err}")),
    }
}

fn first_cert(pem: &str) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))
}
