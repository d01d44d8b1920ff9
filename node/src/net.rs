//! The node's mutual-TLS front door: accepts TCP connections, runs TLS
//! handshakes concurrently (bounded and with a deadline, so slow or hostile
//! clients cannot stall the accept loop or exhaust memory), and hands tonic
//! connections that carry the caller's verified identity.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hufu_certs::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// Who is on the other end of a connection, established by the TLS handshake.
/// Tonic places it in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub identity: Arc<Identity>,
    /// The serial of the certificate presented, as revocation lists name it.
    pub serial: Arc<str>,
    pub remote: SocketAddr,
}

/// A TLS connection with its verified peer.
pub struct PeerConn {
    tls: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Counts against the node's connection limit while open.
    _slot: ConnSlot,
}

impl Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Limits of the front door (from `[limits]`).
#[derive(Clone, Debug)]
pub struct DoorLimits {
    /// Open connections at once; more are closed on accept.
    pub max_connections: usize,
    /// TLS handshakes computed at once.
    pub max_handshakes: usize,
    /// Connections from one address that have not finished their handshake.
    pub handshakes_per_source: usize,
    /// Time a new connection has to send its first byte.
    pub first_byte_timeout: Duration,
    /// Time a connection has to finish its handshake.
    pub handshake_timeout: Duration,
}

/// Connections per source address that are still before or in their
/// handshake; a place is freed when the handshake ends either way.
#[derive(Clone, Default)]
struct Sources(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

struct SourcePlace {
    sources: Sources,
    ip: IpAddr,
}

impl Sources {
    fn enter(&self, ip: IpAddr, limit: usize) -> Option<SourcePlace> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SourcePlace {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut map = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until `stop` is cancelled and yields those whose
/// handshake succeeded. Failed handshakes are logged and counted, never
/// surfaced to tonic (which would otherwise stop serving).
///
/// A socket that has sent nothing costs a task and a buffer, not a
/// handshake slot: it gets a short first-byte deadline, and one address may
/// hold only a few sockets before or in their handshake, so silent or slow
/// sockets cannot lock other clients out. Handshakes are computed a few at
/// a time, so a wave of reconnects cannot crowd out calls on open
/// connections.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: DoorLimits,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> ReceiverStream<Result<PeerConn, io::Error>> {
    let (tx, rx) = mpsc::channel(limits.max_handshakes.max(1));
    let permits = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Sources::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.handshake_failures.inc();
                tracing::warn!(%remote, "connection limit reached; connection dropped");
                continue;
            };
            let Some(place) = sources.enter(remote.ip(), limits.handshakes_per_source) else {
                metrics.handshake_failures.inc();
                tracing::debug!(%remote, "too many connections in handshake from this address; dropped");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            let permits = permits.clone();
            let limits = limits.clone();
            tokio::spawn(async move {
                let handshake = async {
                    // Nothing is computed for a socket until it speaks.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(limits.first_byte_timeout, tcp.peek(&mut first))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return Err("closed before its handshake".to_string()),
                        Err(_) => return Err("sent nothing before its deadline".to_string()),
                    }
                    let _permit = permits
                        .acquire()
                        .await
                        .map_err(|_| "node stopping".to_string())?;
                    let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                    Ok(tls)
                };
                let tls = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        metrics.handshake_failures.inc();
                        tracing::info!(%remote, error = %err, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failures.inc();
                        tracing::info!(%remote, "tls handshake timed out");
                        return;
                    }
                };
                drop(place);
                let session = tls.get_ref().1;
                let kind = match session.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => "resumed",
                    _ => "full",
                };
                metrics
                    .handshakes
                    .get_or_create(&vec![("kind", kind)])
                    .inc();
                let identity = session
                    .peer_certificates()
                    .ok_or_else(|| "no client certificate".to_string())
                    .and_then(|certs| {
                        let identity =
                            hufu_certs::peer_identity(certs).map_err(|e| e.to_string())?;
                        // peer_identity found a leaf, so certs[0] exists.
                        let serial =
                            hufu_certs::certificate_serial(&certs[0]).map_err(|e| e.to_string())?;
                        Ok((identity, serial))
                    });
                match identity {
                    Ok((identity, serial)) => {
                        let info = PeerInfo {
                            identity: Arc::new(identity),
                            serial: serial.into(),
                            remote,
                        };
                        metrics.connections.inc();
                        let conn = PeerConn {
                            tls,
                            info,
                            _slot: ConnSlot {
                                _permit: slot,
                                metrics: metrics.clone(),
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(err) => {
                        metrics.handshake_failures.inc();
                        tracing::info!(%remote, error = %err, "peer identity refused");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A connection's place under the node's connection limit.
struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}
