//! Starting and stopping a node: binds the listeners, assembles the gRPC
//! services behind mutual TLS, and shuts down gracefully, finishing calls in
//! flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hufu_proto::v1::admin_service_server::AdminServiceServer;
use hufu_proto::v1::audit_service_server::AuditServiceServer;
use hufu_proto::v1::federation_service_server::FederationServiceServer;
use hufu_proto::v1::status_lookup_service_server::StatusLookupServiceServer;
use hufu_proto::v1::witness_service_server::WitnessServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::net;
use crate::services::admin::AdminService;
use crate::services::audit::{AuditService, WitnessService};
use crate::services::federation::FederationService;
use crate::services::lookup::LookupService;
use crate::state::NodeState;

/// HTTP/2 receive window of a connection (see the h2 frame budget above
/// its use).
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// A node that is serving. Dropping it does not stop it: call
/// [`RunningNode::shutdown`].
pub struct RunningNode {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<NodeState>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// Serves control connections; dropped last.
    control: Option<crate::lane::ControlLane>,
}

/// How long shutdown waits for calls in flight and background tasks.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

impl RunningNode {
    /// Stops accepting, lets calls in flight finish, waits for every task
    /// the node started, its calls' included (within
    /// [`SHUTDOWN_DEADLINE`]), flushes storage.
    /// When it returns, the node's storage is closed, or about to be as the
    /// caller drops nothing else of it and sled's IO threads finish its
    /// last writes: a restart on the same data directory can follow at once
    /// (opening waits for those threads, [`crate::store::open_db`]).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
        let result = match tokio::time::timeout_at(deadline, self.task).await {
            Ok(joined) => joined.context("server task panicked")?,
            Err(_) => Err(anyhow::anyhow!(
                "calls in flight did not finish within {SHUTDOWN_DEADLINE:?}"
            )),
        };
        let tasks = &self.state.tasks;
        tasks.close();
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            anyhow::bail!(
                "{} background tasks or calls did not stop within {SHUTDOWN_DEADLINE:?}; the node's storage stays open until they do",
                tasks.len()
            );
        }
        let state = self.state.clone();
        match tokio::task::spawn_blocking(move || state.audit.log()?.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "audit log not flushed at shutdown"),
            Err(err) => tracing::error!(error = %err, "audit log flush panicked"),
        }
        // Every acknowledged write is on disk already: a final flush that
        // fails (a full disk) loses nothing acknowledged, so it is reported,
        // not turned into a failed exit.
        if let Err(err) = self.state.store.flush().await {
            tracing::warn!(error = %err, "storage not flushed at shutdown; acknowledged writes were flushed before");
        }
        drop(self.control);
        result
    }
}

/// Starts a node with `config`, listening on `config.listen` (port 0 picks a
/// free port; see [`RunningNode::addr`]).
pub async fn start(config: &NodeConfig) -> anyhow::Result<RunningNode> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    start_on(config, listener, metrics_listener).await
}

/// Starts a node on listeners the caller has bound.
pub async fn start_on(
    config: &NodeConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
) -> anyhow::Result<RunningNode> {
    config
        .check_limits()
        .context("the configuration cannot serve")?;
    crate::preflight::check(config)?;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let write_log = match &config.replication {
        Some(replication) => Some(Arc::new(
            crate::replication::WriteLog::connect(replication, config)
                .await
                .context("[replication]")?,
        )),
        None => None,
    };
    let state = NodeState::open(
        config,
        metrics.clone(),
        stop.clone(),
        tasks.clone(),
        write_log,
    )?;
    let tls = with_session_tickets(hufu_certs::server_config(
        state.anchors.clone(),
        &config.read(&config.node_cert)?,
        &config.read(&config.node_key)?,
    )?)?;

    let addr = listener.local_addr()?;
    crate::console::note_certificates(
        &metrics,
        &config.read(&config.node_cert)?,
        &config.read(&config.ca_cert)?,
    );
    let metrics_addr = match metrics_listener {
        Some(l) => Some(crate::console::serve(l, state.clone(), stop.clone(), &tasks).await?),
        None => None,
    };

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StatusLookupServiceServer<LookupService>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<AdminService>>()
        .await;
    health_reporter
        .set_serving::<FederationServiceServer<FederationService>>()
        .await;
    health_reporter
        .set_serving::<AuditServiceServer<AuditService>>()
        .await;
    health_reporter
        .set_serving::<WitnessServiceServer<WitnessService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hufu_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;

    let limits = &config.limits;
    let max = limits.max_message_bytes;
    let lookup = StatusLookupServiceServer::new(LookupService::new(&state))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max.max(4 * 1024 * 1024));
    let admin = AdminServiceServer::new(AdminService::new(&state))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max.max(4 * 1024 * 1024));

    let federation = FederationServiceServer::new(FederationService::new(&state))
        .max_decoding_message_size(max)
        .max_encoding_message_size(64 * 1024 * 1024);
    // A page of 10,000 entries is a few MiB.
    let audit = AuditServiceServer::new(AuditService::new(&state))
        .max_decoding_message_size(max)
        .max_encoding_message_size(64 * 1024 * 1024);
    let witness = WitnessServiceServer::new(WitnessService::new(&state))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let control = match limits.control_lane {
        false => None,
        true => Some(
            crate::lane::ControlLane::new(limits.control_threads)
                .context("cannot start the runtime for control connections")?,
        ),
    };
    if control.is_some() && limits.terminals_nice > 0 {
        match crate::lane::lower_terminals(limits.terminals_nice) {
            Ok(n) => tracing::debug!(
                threads = n,
                by = limits.terminals_nice,
                "terminals' runtime given a lower priority than the control lane"
            ),
            Err(err) => {
                tracing::warn!(%err, "cannot lower the priority of the terminals' runtime: control calls share the CPU with terminals' as equals")
            }
        }
    }
    let lane = control.as_ref().map(|c| c.handle());
    let standing = state.standing.clone();
    let incoming = net::incoming(
        listener,
        TlsAcceptor::from(tls),
        net::DoorLimits {
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
            handshakes_per_source: limits.handshakes_per_source,
            first_byte_timeout: Duration::from_millis(limits.first_byte_timeout_ms),
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_secs),
            scheduling_delay_target: Duration::from_millis(limits.scheduling_delay_target_ms),
            caller_streams: limits.max_concurrent_streams,
            surge_streams: limits.surge_concurrent_streams,
        },
        stop.clone(),
        metrics.clone(),
        &tasks,
        lane.as_ref(),
    );
    // Every connection is watched for its caller's standing: refused now if
    // revoked or of a province that left, closed later if that happens.
    let incoming = tokio_stream::StreamExt::filter_map(incoming, move |conn| match conn {
        Ok(conn) => standing.admit(conn).map(Ok),
        Err(err) => Some(Err(err)),
    });

    let admission = admission::Admission::new(
        admission_config(config),
        state.standing.clone(),
        &metrics,
        stop.clone(),
    );
    let routes = tonic::service::Routes::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(lookup)
        .add_service(admin)
        .add_service(federation)
        .add_service(audit)
        .add_service(witness)
        .clone()
        .routes()
        .prepare();
    // Admission (and authorization) first; then every admitted call is
    // counted and timed by method.
    let routes = tower::Layer::layer(&crate::metered::MeteredLayer(metrics.clone()), routes);
    let service = tower::Layer::layer(&admission::AdmissionLayer(admission), routes);
    let http2 = crate::serve::Http2Settings {
        caller_streams: limits.max_concurrent_streams,
        peer_streams: limits.peer_concurrent_streams,
        max_pending_resets: limits.max_pending_resets,
        // h2 closes a connection whose buffered small DATA frames exceed a
        // budget of half the connection window (`too_many_data_frames`), and
        // grpcio sends each streamed message in a frame of its own: with
        // hyper's 1 MiB windows a streamed import died after a few thousand
        // rows. A stream window of 1/32 of the connection window keeps the
        // frames one stream can buffer, at 16 bytes or more each, inside
        // the budget; smaller frames still exhaust it, so floods stay cut off.
        connection_window: CONNECTION_WINDOW,
        stream_window: CONNECTION_WINDOW / 32,
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(10),
    };

    tasks.spawn(state.federation.clone().gossip(
        Duration::from_secs(config.federation.gossip_secs.max(1)),
        stop.clone(),
    ));

    if state.audit.enabled() {
        tasks.spawn(state.audit.clone().run(stop.clone()));
    }
    tasks.spawn(crate::storage_health::run(
        state.store.clone(),
        health_reporter.clone(),
        stop.clone(),
    ));

    if config.storage.compact_after_secs > 0 {
        let lifetime = state
            .codes
            .keyring
            .read()
            .expect("keyring lock")
            .max_code_lifetime();
        let window = Duration::from_secs(config.storage.compact_after_secs)
            .max(lifetime + hufu_federation::codes::RETIRED_KEY_GRACE);
        tasks.spawn(crate::federation::snapshot::compact_periodically(
            state.store.clone(),
            state.log_signer.clone(),
            window,
            stop.clone(),
        ));
    }

    if let Some(log) = &state.write_log {
        tasks.spawn(crate::replication::run(
            state.clone(),
            log.clone(),
            stop.clone(),
        ));
    }

    tasks.spawn(crate::revocation::watch(
        state.standing.clone(),
        state.codes.clone(),
        config.path(&config.revoked_certs),
        stop.clone(),
    ));

    // Retired code-signing keys leave the verifier once their codes expire.
    {
        let codes = state.codes.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => codes.publish_own_keys(),
                }
            }
        });
    }

    let shutdown = stop.clone();
    let calls = tasks.clone();
    let task = tokio::spawn(async move {
        crate::serve::serve(incoming, service, http2, lane, calls, shutdown).await;
        Ok(())
    });
    tracing::info!(
        province = %config.province,
        %addr,
        metrics = ?metrics_addr,
        "node serving"
    );
    Ok(RunningNode {
        addr,
        metrics_addr,
        state,
        stop,
        task,
        control,
    })
}

/// Admission settings from the config's `[limits]`.
fn admission_config(config: &NodeConfig) -> admission::AdmissionConfig {
    let limits = &config.limits;
    let initial = admission::default_limit();
    admission::AdmissionConfig {
        province: config.province,
        queue: admission::QueueConfig {
            fixed_limit: (limits.max_in_flight > 0).then_some(limits.max_in_flight),
            bounds: admission::LimitBounds {
                initial,
                min: 4,
                max: initial * 8,
            },
            max_queued: limits.max_queued,
            max_wait: Duration::from_millis(limits.max_queue_wait_ms),
        },
        pushback_ms: limits.retry_pushback_ms,
        max_message_bytes: limits.max_message_bytes,
        max_buffered_bytes: limits.max_buffered_bytes,
        streams_per_caller: limits.streams_per_caller,
        max_streams: limits.max_streams,
    }
}

/// Stateless TLS 1.3 session tickets, so that a caller who reconnects (a
/// phone between networks, a terminal after a reset) resumes its session
/// instead of paying a full mutual-TLS handshake. A resumed connection
/// keeps the identity of its first handshake; membership and revocation are
/// checked on every call, so resumption cannot outlive either.
fn with_session_tickets(
    config: Arc<rustls::ServerConfig>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = (*config).clone();
    config.ticketer =
        rustls::crypto::aws_lc_rs::Ticketer::new().context("cannot make a TLS ticket key")?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}
