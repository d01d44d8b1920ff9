//! `hufu init`: a ready-to-serve province directory: its CA, node and admin
//! certificates, holder-pseudonym secret, code-signing keys and a commented
//! configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hufu_certs::{CertificateAuthority, Identity, LeafOptions, Province, Role};
use hufu_federation::codes::{CodeAlg, Keyring};
use hufu_federation::holder::HolderSecret;

use crate::config::{CodesConfig, NodeConfig};

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub province: Province,
    pub node_name: String,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// DNS names and IP addresses the node is reached at (go into its certificate).
    pub hosts: Vec<String>,
}

impl InitOptions {
    pub fn new(province: Province) -> InitOptions {
        InitOptions {
            province,
            node_name: "node-1".into(),
            listen: "127.0.0.1:7443".parse().expect("valid address"),
            metrics_listen: Some("127.0.0.1:9464".parse().expect("valid address")),
            hosts: vec![],
        }
    }
}

/// Paths of a province directory, relative to it.
pub const CONFIG_FILE: &str = "hufu.toml";
pub const CA_CERT: &str = "ca/ca.pem";
pub const CA_KEY: &str = "ca/ca.key";

/// Creates the province directory `dir` and returns the config path.
pub fn init_province(dir: &Path, opts: &InitOptions) -> anyhow::Result<PathBuf> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        bail!(
            "{} already exists: refusing to overwrite a province (choose another --dir)",
            config_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let p = opts.province;

    let ca = CertificateAuthority::generate(p)?;
    std::fs::create_dir_all(dir.join("ca"))?;
    std::fs::write(dir.join(CA_CERT), ca.cert_pem())?;
    hufu_certs::write_private_file(&dir.join(CA_KEY), ca.key_pem().as_bytes())?;

    let node = Identity::new(p, Role::Node, &opts.node_name)?;
    // The commands run on the node's host dial `client.endpoint`: localhost
    // when the node listens on all addresses, else its listen address. The
    // certificate names that host too, whatever `--host` names for callers
    // elsewhere, or those commands would fail their TLS handshake.
    let (endpoint_host, endpoint) = if opts.listen.ip().is_unspecified() {
        (
            "localhost".to_owned(),
            format!("localhost:{}", opts.listen.port()),
        )
    } else {
        (opts.listen.ip().to_string(), opts.listen.to_string())
    };
    let mut hosts = opts.hosts.clone();
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    }
    if !hosts.contains(&endpoint_host) {
        hosts.push(endpoint_host);
    }
    ca.issue(&node, &LeafOptions::for_node(&hosts))?
        .write(&dir.join("node/node.pem"), &dir.join("node/node.key"))?;
    let admin = Identity::new(p, Role::Admin, "admin")?;
    ca.issue(&admin, &LeafOptions::default())?
        .write(&dir.join("admin/admin.pem"), &dir.join("admin/admin.key"))?;

    std::fs::create_dir_all(dir.join("secret"))?;
    hufu_certs::write_private_file(
        &dir.join("secret/holder.secret"),
        &HolderSecret::generate_bytes(),
    )?;

    hufu_federation::audit::LogSigner::generate(p, &opts.node_name)?
        .save(&dir.join("secret/log.key"))?;
    hufu_federation::trust::GovernanceKey::generate(p)?.save(&dir.join("secret/governance.key"))?;

    let codes = CodesConfig::default();
    Keyring::open_or_create(
        &dir.join(&codes.keys_dir),
        CodeAlg::Es256,
        std::time::Duration::from_secs(codes.lifetime_secs),
    )?;

    let metrics = match opts.metrics_listen {
        Some(addr) => format!("metrics_listen = \"{addr}\""),
        None => "# metrics_listen = \"127.0.0.1:9464\"".into(),
    };
    let text = format!(
        r#"# Hufu node configuration for province {code} ({name}).
# Relative paths are resolved against this file's directory.

# GB/T 2260 code of the province this node serves.
province = "{code}"
# This node's name; its identity is spiffe://hufu/province/{code}/node/<name>.
node_name = "{node_name}"
# gRPC over mutual TLS.
listen = "{listen}"
# Prometheus metrics over plain HTTP (GET /metrics). Comment out to disable.
{metrics}
# sled database: statuses and the status-change log.
data_dir = "data"

# The province CA (its key, ca/ca.key, is only needed by `hufu certs issue`).
ca_cert = "{CA_CERT}"
node_cert = "node/node.pem"
node_key = "node/node.key"
# 32 random bytes keying holder pseudonyms. Losing it unlinks every holder:
# back it up; leaking it lets others link pseudonyms to national ids.
holder_secret = "secret/holder.secret"
# Ed25519 key signing this province's status feed and audit checkpoints; its
# public half is the province's log_key in the trust list.
log_key = "secret/log.key"
# Ed25519 key with which this province signs trust lists (governance).
governance_key = "secret/governance.key"
# The accepted chain of trust lists (`hufu federation install` puts the
# genesis here). While empty, the node serves its own province alone.
trust_dir = "trust"

[federation]
# A replica older than this many seconds asks the issuing province directly.
max_replica_age_secs = 30
# Deadline for calls to other provinces, in milliseconds.
peer_deadline_ms = 1000
# Feed heartbeat interval (milliseconds) and changes per feed batch.
heartbeat_ms = 1000
batch_changes = 5000
# How often to ask peers for a newer trust list, in seconds.
gossip_secs = 5

[codes]
# Code-signing keys (private keys mode 0600; never leave this node).
keys_dir = "{keys}"
# es256 (default) or eddsa, for newly created keys.
algorithm = "es256"
# How long an issued code is valid, in seconds.
lifetime_secs = {lifetime}
# Clock leeway when checking exp/nbf, in seconds.
leeway_secs = {leeway}
# Verified codes remembered so a repeated scan skips the signature check.
cache_entries = {cache}

[limits]
# Largest request message accepted, in bytes.
max_message_bytes = 2097152
# HTTP/2 streams a connection may have open at once: calls beyond it wait
# in the caller, at no cost to the node. Terminals, admins and auditors get
# max_concurrent_streams each; other provinces' nodes peer_concurrent_streams.
max_concurrent_streams = 8
peer_concurrent_streams = 64
# Streams a terminal's connection may have open while the node pauses
# terminals in a surge (see scheduling_delay_target_ms).
surge_concurrent_streams = 1
# Streams a caller may cancel before the node took them up; beyond it the
# connection is closed (HTTP/2 rapid-reset protection).
max_pending_resets = 1024
# TLS handshakes computing at once (one waiting for its caller's bytes holds
# none); connections from one address that keep the node waiting (silent, or
# stalled mid-handshake); the time a new connection has to send its first
# byte (ms) and to finish its handshake (s).
max_handshakes = 8
handshakes_per_source = 64
first_byte_timeout_ms = 2000
handshake_timeout_secs = 10
# Requests in flight across the whole node. 0: adaptive, following measured
# latency (a gradient limit). Federation traffic may fill it all, terminals
# 90%, admin and audit work 50%. Calls beyond it wait, newest first, while
# their deadline allows; a call whose deadline cannot be met is refused at
# once. Refusals are RESOURCE_EXHAUSTED with this retry push-back.
max_in_flight = 0
max_queued = 4096
max_queue_wait_ms = 1000
retry_pushback_ms = 100
# Request bytes buffered at once across callers; one caller identity may
# hold an eighth of it (at least one message of max_message_bytes).
max_buffered_bytes = 67108864
# Long-lived streams (feeds, health watches) per caller identity, and in all.
streams_per_caller = 64
max_streams = 4096
# Open connections at once.
max_connections = 10000
# A runtime of its own for the connections of admins, auditors and other
# provinces' nodes, so that status writes, feeds and witnessing go on while
# terminals saturate the node (false: they share the terminals'), and its
# threads (0: one per core).
control_lane = true
control_threads = 0
# With the lane, how much higher the terminals' threads' nice value is than
# the rest of the node's (0: the same): control calls go first for the CPU.
terminals_nice = 5

# The audit log of cross-province events, witnessed by the other members.
# [audit]
# Record events (off only to measure what auditing costs).
# enabled = true
# How often a grown log gets a checkpoint for the witnesses, in seconds.
# checkpoint_secs = 10
# Memory its storage may keep of the log's pages, in MiB.
# cache_mib = 16

# The status store (statuses, change logs, replicas of the other members).
# [storage]
# Memory it may keep of its pages, in MiB: its share of the node's memory
# whatever the volume imported or replicated.
# cache_mib = 64
# Statuses written but not yet merged into storage, held in memory (about
# 64 bytes each; merged in order in the background).
# unmerged_statuses = 2000000

# Used by `hufu status`, `hufu code` and `hufu keys` to reach this node.
[client]
endpoint = "{endpoint}"
admin_cert = "admin/admin.pem"
admin_key = "admin/admin.key"
"#,
        code = p,
        name = p.name(),
        node_name = opts.node_name,
        listen = opts.listen,
        keys = codes.keys_dir.display(),
        lifetime = codes.lifetime_secs,
        leeway = codes.leeway_secs,
        cache = codes.cache_entries,
    );
    std::fs::write(&config_path, text)?;
    // Check what we wrote parses, so `serve` cannot be the first to notice.
    NodeConfig::load(&config_path)?;
    Ok(config_path)
}

/// Issues a certificate from the province CA in `dir` and writes it to
/// `dir/<role>/<name>.pem` and `.key`; returns the two paths.
pub fn issue_cert(
    dir: &Path,
    role: Role,
    name: &str,
    opts: &LeafOptions,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let config = NodeConfig::load(&dir.join(CONFIG_FILE))?;
    let ca = load_ca(dir)?;
    let identity = Identity::new(config.province, role, name)?;
    let cert = dir.join(format!("{role}/{name}.pem"));
    let key = dir.join(format!("{role}/{name}.key"));
    ca.issue(&identity, opts)?.write(&cert, &key)?;
    Ok((cert, key))
}

pub fn load_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    let cert = std::fs::read_to_string(dir.join(CA_CERT))
        .with_context(|| format!("cannot read {}", dir.join(CA_CERT).display()))?;
    let key = std::fs::read_to_string(dir.join(CA_KEY)).with_context(|| {
        format!(
            "cannot read {} (the CA key is needed to issue certificates)",
            dir.join(CA_KEY).display()
        )
    })?;
    Ok(CertificateAuthority::from_pem(&cert, &key)?)
}
