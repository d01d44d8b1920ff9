//! Serving HTTP/2 on the node's mutual-TLS connections, one hyper
//! connection each, with settings chosen by who is on the other end.
//!
//! The number of streams a connection may have open is the node's main
//! defence against a crowd that never backs off: calls beyond it wait in
//! the caller's own process, at no cost to the node, while a call the node
//! has taken up costs it even if it is refused. Terminals, admins and
//! auditors get a few streams each; other provinces' nodes, which carry a
//! feed and their lookups over one connection, get more.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hufu_certs::Role;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tower::ServiceExt;

use crate::net::PeerInfo;

type Body = tonic::body::Body;

/// HTTP/2 settings of the node's connections.
#[derive(Clone, Debug)]
pub struct Http2Settings {
    /// Streams a connection of a terminal, admin or auditor may have open.
    pub caller_streams: u32,
    /// Streams a connection of another province's node may have open.
    pub peer_streams: u32,
    /// Streams a caller may cancel before the node took them up; beyond it
    /// the connection is closed (rapid reset, CVE-2023-44487).
    pub max_pending_resets: usize,
    pub connection_window: u32,
    pub stream_window: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long calls in flight may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// Serves every connection `incoming` yields until `stop` is cancelled,
/// then lets calls in flight finish (within the grace) and returns.
/// Terminals' connections are served on the runtime this runs on; those of
/// admins, auditors and other nodes on `control` if given
/// ([`crate::lane`]). Each call runs as a task of `calls` (on its
/// connection's runtime): a call may outlive its connection for a moment,
/// and it holds the node's state, so the node's shutdown waits for it
/// before it counts the storage as closed.
pub async fn serve<S: Handler, C: Connection>(
    incoming: impl Stream<Item = Result<C, io::Error>>,
    service: S,
    settings: Http2Settings,
    control: Option<tokio::runtime::Handle>,
    calls: TaskTracker,
    stop: CancellationToken,
) {
    let mut incoming = std::pin::pin!(incoming);
    let mut connections = JoinSet::new();
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            conn = incoming.next() => match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        // Finished connections leave the set as new ones arrive.
        while connections.try_join_next().is_some() {}
        let (service, settings, stop) = (service.clone(), settings.clone(), stop.clone());
        let calls = calls.clone();
        match &control {
            Some(lane) if conn.connect_info().identity.role != Role::Terminal => {
                let mut conn = conn;
                connections.spawn_on(
                    async move {
                        if let Err(err) = conn.rehome() {
                            let remote = conn.connect_info().remote;
                            tracing::warn!(%remote, error = %err, "connection dropped: its socket could not be moved to the control lane");
                            return;
                        }
                        serve_connection(conn, service, settings, calls, stop).await
                    },
                    lane,
                );
            }
            _ => {
                connections.spawn(serve_connection(conn, service, settings, calls, stop));
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Runs hyper's tasks (one a call) as tasks of a tracker, on the runtime
/// of the connection that spawns them.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, call: F) {
        self.0.spawn(call);
    }
}

/// The service that answers the node's calls.
pub trait Handler:
    tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Handler for S where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A connection the node serves: a byte stream that knows its caller.
pub trait Connection:
    AsyncRead + AsyncWrite + Connected<ConnectInfo = PeerInfo> + Unpin + Send + 'static
{
    /// Has the runtime this is called on watch the connection's socket from
    /// now on, instead of the one that accepted it.
    fn rehome(&mut self) -> io::Result<()>;
}

async fn serve_connection<S: Handler, C: Connection>(
    conn: C,
    service: S,
    settings: Http2Settings,
    calls: TaskTracker,
    stop: CancellationToken,
) {
    let info = conn.connect_info();
    let streams = match info.identity.role {
        Role::Node => settings.peer_streams,
        _ => settings.caller_streams,
    };
    let mut builder = hyper::server::conn::http2::Builder::new(Tracked(calls));
    builder
        .max_concurrent_streams(streams.max(1))
        .max_pending_accept_reset_streams(settings.max_pending_resets)
        .initial_connection_window_size(settings.connection_window)
        .initial_stream_window_size(settings.stream_window)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .timer(hyper_util::rt::TokioTimer::new());
    let peer = info.clone();
    let handler =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(peer.clone());
            service.clone().oneshot(request)
        });
    let connection = builder.serve_connection(TokioIo::new(conn), handler);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(settings.shutdown_grace, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(remote = %info.remote, caller = %info.identity.uri(), error = ?err, "connection ended");
    }
}
