//! A province beyond one machine: its node replicas share one write log,
//! a NATS JetStream stream, and each consumes it into its own sled store.
//!
//! With a `[replication]` section in `hufu.toml`, a node that takes a
//! write (a status change, an import chunk, a key rotation or revocation)
//! does not write its store: it publishes the write to the stream and
//! waits, first for JetStream's acknowledgement (the write is then on a
//! quorum of the stream's replicas), then for its own consumer to have
//! applied it, so that the caller reads its write back from the node it
//! wrote to. Every replica applies the stream in the same order with the
//! same rules (a record is stored only if it supersedes the stored one), so
//! all hold the same statuses, number the province's feed alike and sign
//! the same feed heads; keyring changes carry the new key (sealed) and the
//! time of the change, so all publish the same JWKS.
//!
//! The feed's change numbers are not the stream's positions: the stream
//! also carries key changes, and writes the rules drop (a stale or repeated
//! record), none of which is a change of the hash-chained, gapless feed.
//! Each replica numbers the changes it applies in stream order from the
//! same rules, so all number them alike, and the position applied is kept
//! beside the store to resume from.
//!
//! When JetStream cannot acknowledge (it lost its quorum, or this node
//! cannot reach it), writes fail with `UNAVAILABLE` and a message saying
//! so, and everything that only reads (lookups, verification, the feed,
//! the audit API) goes on from the local store.
//!
//! What each replica keeps of its own: its node certificate, its audit log
//! (the node that took a write audits it), its metrics. Without
//! `[replication]` none of this runs: the node is the single process on
//! sled it always was.

pub mod cluster;
mod consumer;
pub mod setup;
pub mod snapshot;
mod write;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use hufu_certs::Province;
use hufu_federation::codes::{CodeAlg, generate_key, key_id};
use hufu_proto::v1::StatusRecord;
use prost::Message;
use tokio::sync::{oneshot, watch};

pub use consumer::{Replica, applied_position, run};
pub use write::{KeyRevocation, KeyRotation, KeySeal, Write};

use crate::config::{NodeConfig, ReplicationConfig};
use crate::error::{NodeError, NodeResult};
use crate::status::now_unix;
use crate::store::PutOutcome;
use crate::store::binding::Binding;

/// What applying one write did, as its taker is told.
#[derive(Debug)]
pub enum Applied {
    Statuses(Vec<PutOutcome>),
    /// The kid rotated to or revoked, or why the keyring refused it.
    Key(Result<String, String>),
}

/// This node's side of the province's write log.
pub struct WriteLog {
    jetstream: jetstream::Context,
    stream: String,
    subject: String,
    replicas: usize,
    timeout: Duration,
    seal: KeySeal,
    /// Writes this node published, by message id, waiting to be applied.
    waiting: Mutex<HashMap<String, oneshot::Sender<Applied>>>,
    /// The stream position this node has applied up to.
    applied: watch::Sender<u64>,
    /// Held while a write is applied and its position stored, so that a
    /// snapshot sees the store, keyring and position of one moment.
    applying: tokio::sync::Mutex<()>,
    /// Writes the stream keeps at most (0: all).
    max_messages: u64,
    /// Replicas to take a snapshot from first.
    snapshot_from: Vec<String>,
    /// Why the last connection attempt to NATS failed, until one succeeds
    /// (refused credentials, TLS), for the message of a refused write.
    connection_error: std::sync::Arc<Mutex<Option<String>>>,
    /// The settings that decide whether NATS admits this node, named when
    /// it cannot connect.
    access_settings: String,
    /// Whether TLS to NATS is configured.
    tls: bool,
}

impl WriteLog {
    /// Connects to the NATS servers of `config` for `node`'s province. The
    /// servers need not be up yet: the client keeps trying in the
    /// background, and writes fail with `UNAVAILABLE` until it succeeds.
    pub async fn connect(
        config: &ReplicationConfig,
        node: &NodeConfig,
    ) -> anyhow::Result<WriteLog> {
        anyhow::ensure!(
            !config.servers.is_empty(),
            "replication.servers is empty: list the NATS servers of the province's JetStream cluster, e.g. [\"nats://127.0.0.1:4222\"]"
        );
        let addrs = config
            .servers
            .iter()
            .map(|s| {
                s.parse::<async_nats::ServerAddr>().with_context(|| {
                    format!(
                        "replication.servers: {s:?} is not a NATS address such as nats://host:4222"
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let connection_error = std::sync::Arc::new(Mutex::new(None));
        let seen = connection_error.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("hufu {} {}", node.province, node.node_name))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().expect("connection error lock");
                    match event {
                        async_nats::Event::Connected => *seen = None,
                        async_nats::Event::ClientError(e) => *seen = Some(e.to_string()),
                        async_nats::Event::ServerError(e) => *seen = Some(e.to_string()),
                        _ => {}
                    }
                }
            });
        if let Some(user) = &config.user {
            let file = config.password_file.as_ref().with_context(|| {
                "replication.user is set without replication.password_file: name the file holding the password"
            })?;
            let password = node.read(file)?.trim().to_owned();
            options = options.user_and_password(user.clone(), password);
        }
        if let Some(ca) = &config.tls_ca {
            options = options
                .require_tls(true)
                .add_root_certificates(node.path(ca));
        }
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(node.path(cert), node.path(key));
            }
            (None, None) => {}
            _ => anyhow::bail!(
                "replication.tls_cert and replication.tls_key go together: set both or neither"
            ),
        }
        let access_settings = access_settings(config);
        let client = options
            .connect(addrs)
            .await
            .context("cannot set up the connection to NATS")?;
        let timeout = Duration::from_millis(config.ack_timeout_ms.max(1));
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(timeout);
        let secret = std::fs::read(node.path(&node.holder_secret))
            .context("cannot read the holder secret")?;
        Ok(WriteLog {
            jetstream,
            stream: config.stream_name(node.province),
            subject: subject(node.province),
            replicas: config.replicas.max(1),
            timeout,
            seal: KeySeal::from_secret(&secret),
            waiting: Mutex::new(HashMap::new()),
            applied: watch::channel(0).0,
            applying: tokio::sync::Mutex::new(()),
            max_messages: config.max_messages,
            snapshot_from: config.snapshot_from.clone(),
            connection_error,
            access_settings,
            tls: config.tls_ca.is_some() || config.tls_cert.is_some(),
        })
    }

    /// The stream, created on first use with the configured replicas.
    async fn stream(&self) -> Result<stream::Stream, String> {
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                num_replicas: self.replicas,
                storage: stream::StorageType::File,
                // Everything is kept unless a limit is set: a replica that
                // starts empty replays the whole log, or, behind what the
                // log kept, takes a snapshot from another replica first. A
                // retry of a write with the same id within this window is
                // stored once.
                max_messages: i64::try_from(self.max_messages).unwrap_or(i64::MAX),
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// The stream position this node has applied up to, as it changes.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The stream's last position (what every replica will reach).
    pub async fn last_position(&self) -> NodeResult<u64> {
        Ok(self.kept().await?.1)
    }

    /// The first and last positions the stream still holds (the first is
    /// above 1 once the stream's limit dropped its oldest writes).
    pub async fn kept(&self) -> NodeResult<(u64, u64)> {
        let mut stream = self.stream().await.map_err(unavailable)?;
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// Stores own status records through the log: returns each record's
    /// outcome once the write is durable in JetStream and applied here.
    pub async fn put_statuses(&self, records: &[StatusRecord]) -> NodeResult<Vec<PutOutcome>> {
        match self.propose(&Write::statuses(records)).await? {
            Applied::Statuses(outcomes) if outcomes.len() == records.len() => Ok(outcomes),
            other => Err(NodeError::Internal(format!(
                "the write log applied a status write as {other:?}"
            ))),
        }
    }

    /// Binds (or unbinds) own legacy codes through the log: returns each
    /// binding's outcome once the write is durable in JetStream and applied
    /// here.
    pub async fn put_bindings(&self, bindings: &[Binding]) -> NodeResult<Vec<PutOutcome>> {
        let write = Write {
            bindings: bindings.iter().map(Binding::to_message).collect(),
            ..Write::default()
        };
        match self.propose(&write).await? {
            Applied::Statuses(outcomes) if outcomes.len() == bindings.len() => Ok(outcomes),
            other => Err(NodeError::Internal(format!(
                "the write log applied a binding write as {other:?}"
            ))),
        }
    }

    /// Rotates the province's code-signing key at every replica: a new key,
    /// made here, sealed into the log. Returns the new kid.
    pub async fn rotate_key(&self, alg: CodeAlg) -> NodeResult<String> {
        let pkcs8 = tokio::task::spawn_blocking(move || generate_key(alg))
            .await
            .map_err(|e| NodeError::Internal(format!("key generation task: {e}")))?
            .map_err(|e| NodeError::Internal(format!("rotating keys: {e}")))?;
        let kid = key_id(alg, &pkcs8).map_err(|e| NodeError::Internal(e.to_string()))?;
        let write = Write {
            rotation: Some(KeyRotation {
                algorithm: alg.to_string(),
                sealed_key: self.seal.seal(&pkcs8)?,
                at: now_unix(),
            }),
            ..Write::default()
        };
        match self.propose(&write).await? {
            Applied::Key(Ok(applied)) if applied == kid => Ok(kid),
            Applied::Key(Err(why)) => Err(NodeError::Internal(format!("rotating keys: {why}"))),
            other => Err(NodeError::Internal(format!(
                "the write log applied a key rotation as {other:?}"
            ))),
        }
    }

    /// Revokes code-signing key `kid` at every replica.
    pub async fn revoke_key(&self, kid: &str) -> NodeResult<()> {
        let write = Write {
            revocation: Some(KeyRevocation {
                kid: kid.to_owned(),
                at: now_unix(),
            }),
            ..Write::default()
        };
        match self.propose(&write).await? {
            Applied::Key(Ok(_)) => Ok(()),
            Applied::Key(Err(why)) => Err(NodeError::FailedPrecondition(why)),
            other => Err(NodeError::Internal(format!(
                "the write log applied a key revocation as {other:?}"
            ))),
        }
    }

    /// Publishes `write`, waits for JetStream's acknowledgement, then for
    /// this node to apply it, and returns what applying it did.
    async fn propose(&self, write: &Write) -> NodeResult<Applied> {
        let id = message_id()?;
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("waiting lock")
            .insert(id.clone(), tx);
        let result = self.publish_and_wait(&id, write, rx).await;
        self.waiting.lock().expect("waiting lock").remove(&id);
        result
    }

    async fn publish_and_wait(
        &self,
        id: &str,
        write: &Write,
        applied: oneshot::Receiver<Applied>,
    ) -> NodeResult<Applied> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let refused = |why: String| {
            let connection = self
                .connection_error
                .lock()
                .expect("connection error lock")
                .clone();
            // A TLS handshake the server refuses (no client certificate,
            // one from another CA) reaches the client as an I/O error on
            // the TLS stream: with TLS configured, any failure to connect
            // while not connected is reported as a connection failure.
            let not_connected = self.jetstream.client().connection_state()
                != async_nats::connection::State::Connected;
            match connection {
                Some(e)
                    if e.contains("authorization")
                        || e.contains("TLS")
                        || (not_connected && self.tls) =>
                {
                    NodeError::Unavailable(format!(
                        "the province's write log (NATS JetStream stream {}) did not take the write: this node cannot connect to NATS ({e}); nothing was stored. Check replication.servers and {} against the NATS servers' configuration, then restart this node",
                        self.stream, self.access_settings
                    ))
                }
                _ => NodeError::Unavailable(format!(
                    "the province's write log (NATS JetStream stream {}) did not take the write: {why}; nothing was stored. Writes need a quorum of the NATS servers: bring them back, then send the write again (lookups go on meanwhile)",
                    self.stream
                )),
            }
        };
        let payload: bytes::Bytes = write.encode_to_vec().into();
        let mut created = false;
        let deadline = Instant::now() + self.timeout;
        let ack = loop {
            let ack = self
                .jetstream
                .publish_with_headers(self.subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| refused(e.to_string()))?;
            match tokio::time::timeout(self.timeout, ack).await {
                Err(_) => {
                    return Err(refused(format!(
                        "no acknowledgement within {:?}",
                        self.timeout
                    )));
                }
                Ok(Ok(ack)) => break ack,
                // The first write of a province, before any replica's
                // consumer made the stream, or a stream still electing its
                // leader (no responders): make it, send again (the same id:
                // stored once).
                Ok(Err(e))
                    if e.kind() == PublishErrorKind::StreamNotFound
                        && Instant::now() < deadline =>
                {
                    if !created {
                        self.stream().await.map_err(refused)?;
                        created = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => return Err(refused(e.to_string())),
            }
        };
        match tokio::time::timeout(self.timeout, applied).await {
            Ok(Ok(applied)) => Ok(applied),
            _ => Err(NodeError::Unavailable(format!(
                "the write is durable in the province's write log (position {}) but this node has not applied it within {:?}: every replica will; read it back in a moment, or send it again (a repeated write changes nothing)",
                ack.sequence, self.timeout
            ))),
        }
    }

    /// Tells the writer of message `id`, if it waits here, what applying it did.
    fn applied(&self, id: Option<&str>, position: u64, outcome: Applied) {
        self.applied.send_replace(position);
        if let Some(tx) = id.and_then(|id| self.waiting.lock().expect("waiting lock").remove(id)) {
            let _ = tx.send(outcome);
        }
    }
}

/// The subject the province's writes are published on.
fn subject(province: Province) -> String {
    format!("hufu.{province}.writes")
}

fn unavailable(why: String) -> NodeError {
    NodeError::Unavailable(format!(
        "the province's write log cannot be reached: {why}; check the NATS servers"
    ))
}

/// A random id for one write, so that a retried publish is stored once.
fn message_id() -> NodeResult<String> {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| NodeError::Internal("no randomness for a write id".into()))?;
    Ok(data_encoding::HEXLOWER.encode(&bytes))
}

/// The `[replication]` settings that decide whether NATS admits a node,
/// for the message of a node that cannot connect.
fn access_settings(config: &ReplicationConfig) -> String {
    let mut settings = Vec::new();
    if config.user.is_some() {
        settings.push("replication.user and replication.password_file");
    }
    if config.tls_ca.is_some() || config.tls_cert.is_some() {
        settings.push("replication.tls_ca, replication.tls_cert and replication.tls_key");
    }
    if settings.is_empty() {
        "the credentials or TLS settings in [replication]".to_owned()
    } else {
        settings.join(", and ")
    }
}
