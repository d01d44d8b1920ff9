//! The node's configuration file (`hufu.toml`), as written by `hufu init`.
//! Relative paths are resolved against the directory holding the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hufu_certs::Province;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// GB/T 2260 code of the province this node serves.
    pub province: Province,
    /// This node's name within the province (the last part of its identity).
    pub node_name: String,
    /// gRPC (mutual TLS) listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics over plain HTTP; omit to disable.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// sled database directory.
    pub data_dir: PathBuf,
    /// The province CA certificate.
    pub ca_cert: PathBuf,
    /// The node's certificate and private key.
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    /// The 32-byte secret that keys holder pseudonyms.
    pub holder_secret: PathBuf,
    /// CA certificates of other member provinces whose nodes (and, for
    /// refusals with a clear reason, terminals) may connect.
    #[serde(default)]
    pub member_cas: Vec<PathBuf>,
    /// Ed25519 key signing this province's feed heads and audit checkpoints
    /// (its public half is the member's `log_key` in the trust list).
    pub log_key: PathBuf,
    /// Ed25519 key this province signs trust lists with.
    pub governance_key: PathBuf,
    /// The chain of trust lists this node has accepted (absent: the node
    /// runs alone, trusting only its own CA and `member_cas`).
    pub trust_dir: PathBuf,
    /// This province's revoked certificate serials, written by
    /// `hufu certs revoke`; the node puts changes in force within a second
    /// and publishes them to the other members.
    #[serde(default = "default_revoked_certs")]
    pub revoked_certs: PathBuf,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub codes: CodesConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// The province's write log on NATS JetStream, shared by all its node
    /// replicas (absent: this node is the province's only node, on sled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
    /// What the `hufu` client commands use to reach this node.
    pub client: ClientConfig,
    /// Where this file was loaded from; relative paths hang off its directory.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_revoked_certs() -> PathBuf {
    PathBuf::from("ca/revoked.json")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodesConfig {
    /// Code-signing keys directory.
    pub keys_dir: PathBuf,
    /// "es256" or "eddsa".
    pub algorithm: String,
    /// How long a code is valid, in seconds.
    pub lifetime_secs: u64,
    /// Clock leeway for `exp`/`nbf`, in seconds.
    pub leeway_secs: u64,
    /// Verified tokens remembered so a repeated scan skips the signature check.
    pub cache_entries: usize,
}

impl Default for CodesConfig {
    fn default() -> Self {
        CodesConfig {
            keys_dir: PathBuf::from("keys"),
            algorithm: "es256".into(),
            lifetime_secs: 3600,
            leeway_secs: 60,
            cache_entries: 100_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// A replica older than this (seconds since the issuer's last signed
    /// head) is too stale to answer alone: the issuer is asked directly.
    pub max_replica_age_secs: u64,
    /// Deadline for a direct call to another province, in milliseconds.
    pub peer_deadline_ms: u64,
    /// How often a feed restates its head when nothing changes, in ms.
    pub heartbeat_ms: u64,
    /// Changes per feed batch.
    pub batch_changes: usize,
    /// How often to ask peers for newer trust lists, in seconds.
    pub gossip_secs: u64,
    /// For testing only: shifts the time this node writes into its signed
    /// feed heads by this many seconds, to reproduce an issuer whose clock
    /// is wrong. Leave it at 0.
    pub clock_offset_secs: i64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            max_replica_age_secs: 30,
            peer_deadline_ms: 1000,
            heartbeat_ms: 1000,
            batch_changes: 5000,
            gossip_secs: 5,
            clock_offset_secs: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams a connection of a terminal, admin or auditor may have
    /// open at once. Calls beyond it wait in the caller, at no cost to the
    /// node: the node's main defence against crowds that never back off.
    pub max_concurrent_streams: u32,
    /// Streams a terminal's connection may have open at once while the node
    /// pauses terminals (`scheduling_delay_target_ms`): a caller allowed few
    /// open calls queues the rest in its own process, where stale ones
    /// expire at no cost to the node, so the node's queue stays short.
    pub surge_concurrent_streams: u32,
    /// The same for another province's node (a feed and lookups share its
    /// connection).
    pub peer_concurrent_streams: u32,
    /// Streams a connection's caller may cancel before the node has taken
    /// them up; beyond it the connection is closed (HTTP/2 rapid reset,
    /// CVE-2023-44487). High enough that callers giving up at their
    /// deadline during a surge keep their connections.
    pub max_pending_resets: usize,
    /// TLS handshakes computing at once; a handshake waiting for its
    /// caller's bytes holds none.
    pub max_handshakes: usize,
    /// Connections from one address that may keep the node waiting on
    /// their caller: not yet spoken (silent sockets) or stalled in their
    /// handshake. More from that address are closed on accept; connections
    /// waiting on the node (for a permit, a place) do not count.
    pub handshakes_per_source: usize,
    /// Milliseconds a new connection has to send its first byte.
    pub first_byte_timeout_ms: u64,
    /// Seconds a client has to finish its TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Requests in flight across the node: 0 for an adaptive limit that
    /// follows measured latency, or a fixed number.
    pub max_in_flight: usize,
    /// Calls that may wait for admission at once; more are refused.
    pub max_queued: usize,
    /// Longest wait for admission of a call that carries no deadline, in ms.
    pub max_queue_wait_ms: u64,
    /// Request bytes the node may be buffering at once, across callers;
    /// one caller identity may hold an eighth of it (at least one message
    /// of `max_message_bytes`), so requests a caller never finishes cannot
    /// take it from the others.
    pub max_buffered_bytes: usize,
    /// Long-lived streams (feeds, health watches) one caller may hold open.
    pub streams_per_caller: usize,
    /// Long-lived streams across the node.
    pub max_streams: usize,
    /// Push-back sent with RESOURCE_EXHAUSTED, in milliseconds.
    pub retry_pushback_ms: u64,
    /// Open connections at once; more are closed on accept.
    pub max_connections: usize,
    /// Places for terminals' connections (`places`): when the node's
    /// scheduling delay (how late its timers fire, the least of ten probes
    /// in 100 ms) passes this many milliseconds, it pauses its newest busy
    /// terminals' connections (an HTTP/2 stream limit of zero: their calls
    /// wait in their callers) and lets new ones wait unhandshaken; it gives
    /// places back, paused connections first, while the delay is low.
    /// 0: off.
    pub scheduling_delay_target_ms: u64,
    /// Serve the connections of admins, auditors and other provinces'
    /// nodes on a runtime of their own apart from terminals' (the control
    /// lane, `node/src/lane.rs`), so that status writes, feeds and
    /// witnessing go on through a surge of terminals; false: they share
    /// the terminals'.
    pub control_lane: bool,
    /// Threads of the control lane; 0: one per core, as the terminals'
    /// runtime has (an import's stream and its storing, a feed and its
    /// checks, run side by side).
    pub control_threads: usize,
    /// With the control lane, how much higher the kernel's nice value of
    /// the terminals' runtime's threads is than the rest of the node's (1
    /// to 19: the higher, the more the control lane, the audit log and the
    /// store go first when both want the node's CPU); 0: the same.
    pub terminals_nice: i32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 2 * 1024 * 1024,
            max_concurrent_streams: 8,
            surge_concurrent_streams: 1,
            peer_concurrent_streams: 64,
            max_pending_resets: 1024,
            max_handshakes: 8,
            handshakes_per_source: 64,
            first_byte_timeout_ms: 2000,
            handshake_timeout_secs: 10,
            max_in_flight: 0,
            max_queued: 4096,
            max_queue_wait_ms: 1000,
            max_buffered_bytes: 64 * 1024 * 1024,
            streams_per_caller: 64,
            max_streams: 4096,
            retry_pushback_ms: 100,
            max_connections: 10_000,
            scheduling_delay_target_ms: 50,
            control_lane: true,
            control_threads: 0,
            terminals_nice: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record cross-province events in the audit log. Off only to measure
    /// what auditing costs: a federation member is expected to audit.
    pub enabled: bool,
    /// How often, in seconds, a grown log gets a new checkpoint that the
    /// other members are asked to witness.
    pub checkpoint_secs: f64,
    /// Memory sled may keep of the audit log's pages, in MiB: the log is
    /// appended to and read back rarely, so a small cache serves it.
    pub cache_mib: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            checkpoint_secs: 10.0,
            cache_mib: 16,
        }
    }
}

impl AuditConfig {
    /// The cache in bytes, at least 4 MiB.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_mib.max(4) * 1024 * 1024
    }

    /// The checkpoint interval, at least 10 ms.
    pub fn checkpoint_every(&self) -> Duration {
        Duration::try_from_secs_f64(self.checkpoint_secs)
            .unwrap_or(Duration::from_secs(10))
            .max(Duration::from_millis(10))
    }
}

/// `[replication]`: several `hufu serve` of one province share one write
/// log, a JetStream stream; each consumes it into its own sled store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// NATS servers of the JetStream cluster, e.g. "nats://10.0.0.1:4222".
    pub servers: Vec<String>,
    /// The stream holding the province's writes (default `HUFU_<code>`).
    #[serde(default)]
    pub stream: Option<String>,
    /// Copies JetStream keeps of the stream: 3 survives the loss of one
    /// NATS server.
    #[serde(default = "default_stream_replicas")]
    pub replicas: usize,
    /// How long a write waits for JetStream's acknowledgement and for this
    /// node to apply it, in milliseconds, before failing with UNAVAILABLE.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// NATS user and a file holding its password, if the servers ask.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Mutual TLS to NATS: the CA that signed the servers' certificates,
    /// and this node's client certificate and key.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Writes the stream keeps at most, the oldest dropped first (0: all).
    /// A replica that falls behind what the stream still holds, or starts
    /// empty after it dropped its first writes, catches up from another
    /// replica's snapshot. Set when the stream is made.
    #[serde(default)]
    pub max_messages: u64,
    /// Endpoints (`host:port`) of the province's other replicas that a
    /// replica behind the stream takes a snapshot from, tried in order
    /// before the province's endpoints in the trust list.
    #[serde(default)]
    pub snapshot_from: Vec<String>,
}

fn default_stream_replicas() -> usize {
    3
}

fn default_ack_timeout_ms() -> u64 {
    5000
}

impl ReplicationConfig {
    /// A configuration for `servers` with every other setting at its default.
    pub fn new(servers: Vec<String>) -> ReplicationConfig {
        ReplicationConfig {
            servers,
            stream: None,
            replicas: default_stream_replicas(),
            ack_timeout_ms: default_ack_timeout_ms(),
            user: None,
            password_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            max_messages: 0,
            snapshot_from: Vec::new(),
        }
    }

    /// The stream's name for `province`.
    pub fn stream_name(&self, province: Province) -> String {
        self.stream
            .clone()
            .unwrap_or_else(|| format!("HUFU_{province}"))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Memory sled may keep of the status store's pages, in MiB. It bounds
    /// the store's cache whatever the volume imported or replicated; the
    /// default suits a node of 2 cores and a few GiB.
    pub cache_mib: u64,
    /// Compact this province's change log behind this many seconds: of
    /// older changes only each holder's latest stays, under a snapshot
    /// statement signed with the log key, from which new members and
    /// nodes that fell behind catch up. Never less than the longest code
    /// lifetime; 0: never compact.
    pub compact_after_secs: u64,
    /// Statuses written but not yet merged into the store's buckets that
    /// it may hold in memory (about 64 bytes each): writes go to the
    /// change log and to this table, which is merged into the buckets in
    /// order, in the background, when half full or once writes pause.
    pub unmerged_statuses: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mib: crate::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            compact_after_secs: 0,
            unmerged_statuses: crate::store::DEFAULT_UNMERGED_STATUSES,
        }
    }
}

impl StorageConfig {
    /// The cache in bytes, at least 4 MiB.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_mib.max(4) * 1024 * 1024
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Address the client commands dial, e.g. "127.0.0.1:7443".
    pub endpoint: String,
    /// Admin certificate and key used by `hufu status`, `hufu code`, `hufu keys`.
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config: NodeConfig =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// A path from the config, resolved against the config's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn read(&self, p: &Path) -> anyhow::Result<String> {
        let full = self.path(p);
        std::fs::read_to_string(&full).with_context(|| format!("cannot read {}", full.display()))
    }

    /// The audit log's own sled database, beside `data_dir` (its batched
    /// writes never contend with the status store's).
    pub fn audit_dir(&self) -> PathBuf {
        self.path(&self.data_dir).with_extension("audit")
    }

    pub fn code_lifetime(&self) -> Duration {
        Duration::from_secs(self.codes.lifetime_secs)
    }

    /// Settings a node cannot serve with, each saying what to set instead.
    /// Such a value starts silently and then fails every call (a stream
    /// limit of 0 hangs them, a message limit of 0 refuses them all).
    pub fn limit_problems(&self) -> Vec<String> {
        let l = &self.limits;
        let d = LimitsConfig::default();
        let mut problems = Vec::new();
        let mut zero = |name: &str, value: u64, default: String, effect: &str| {
            if value == 0 {
                problems.push(format!(
                    "{name} = 0 {effect}: set it to at least 1 (default {default})"
                ));
            }
        };
        zero(
            "limits.max_concurrent_streams",
            l.max_concurrent_streams.into(),
            d.max_concurrent_streams.to_string(),
            "would make every call wait forever",
        );
        zero(
            "limits.surge_concurrent_streams",
            l.surge_concurrent_streams.into(),
            d.surge_concurrent_streams.to_string(),
            "would stop every terminal during a surge",
        );
        zero(
            "limits.max_message_bytes",
            l.max_message_bytes as u64,
            d.max_message_bytes.to_string(),
            "would refuse every request",
        );
        zero(
            "limits.max_connections",
            l.max_connections as u64,
            d.max_connections.to_string(),
            "would close every connection",
        );
        zero(
            "limits.max_handshakes",
            l.max_handshakes as u64,
            d.max_handshakes.to_string(),
            "would refuse every TLS handshake",
        );
        zero(
            "limits.handshake_timeout_secs",
            l.handshake_timeout_secs,
            d.handshake_timeout_secs.to_string(),
            "would time out every TLS handshake",
        );
        zero(
            "codes.lifetime_secs",
            self.codes.lifetime_secs,
            CodesConfig::default().lifetime_secs.to_string(),
            "would issue codes that have already expired",
        );
        zero(
            "federation.peer_deadline_ms",
            self.federation.peer_deadline_ms,
            FederationConfig::default().peer_deadline_ms.to_string(),
            "would time out every call to another province",
        );
        if !(0..=19).contains(&l.terminals_nice) {
            problems.push(format!(
                "limits.terminals_nice = {} is out of range: set 0 to 19 (default {})",
                l.terminals_nice, d.terminals_nice
            ));
        }
        problems
    }

    /// Refuses settings a node cannot serve with (see [`Self::limit_problems`]).
    pub fn check_limits(&self) -> anyhow::Result<()> {
        let problems = self.limit_problems();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(())
    }

    /// Whether a node holds this configuration's storage open (sled keeps
    /// an exclusive lock on `data_dir/db` while a node runs).
    pub fn storage_in_use(&self) -> anyhow::Result<bool> {
        use fs2::FileExt;
        let lock = self.path(&self.data_dir).join("db");
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&lock)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot open {}", lock.display()))
                );
            }
        };
        match file.try_lock_exclusive() {
            Ok(()) => {
                let _ = FileExt::unlock(&file);
                Ok(false)
            }
            Err(e) if e.kind() == fs2::lock_contended_error().kind() => Ok(true),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot lock {}", lock.display()))),
        }
    }
}
