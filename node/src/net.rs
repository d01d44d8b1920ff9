//! The node's mutual-TLS front door: accepts TCP connections, runs TLS
//! handshakes concurrently (bounded and with a deadline, so slow or hostile
//! clients cannot stall the accept loop or exhaust memory), and hands tonic
//! connections that carry the caller's verified identity.

use std::io;
use std::net::SocketAddr;
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
    _slot: tokio::sync::OwnedSemaphorePermit,
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

/// Accepts connections until `stop` is cancelled and yields those whose
/// handshake succeeded. Failed handshakes are logged and counted, never
/// surfaced to tonic (which would otherwise stop serving).
#[allow(clippy::too_many_arguments)]
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    max_connections: usize,
    max_handshakes: usize,
    handshake_timeout: Duration,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> ReceiverStream<Result<PeerConn, io::Error>> {
    let (tx, rx) = mpsc::channel(max_handshakes.max(1));
    let permits = Arc::new(Semaphore::new(max_handshakes.max(1)));
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
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
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                metrics.handshake_failures.inc();
                tracing::warn!(%remote, "too many handshakes in progress; connection dropped");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .ok_or_else(|| "no client certificate".to_string())
                            .and_then(|certs| {
                                let identity =
                                    hufu_certs::peer_identity(certs).map_err(|e| e.to_string())?;
                                // peer_identity found a leaf, so certs[0] exists.
                                let serial = hufu_certs::certificate_serial(&certs[0])
                                    .map_err(|e| e.to_string())?;
                                Ok((identity, serial))
                            });
                        match identity {
                            Ok((identity, serial)) => {
                                let info = PeerInfo {
                                    identity: Arc::new(identity),
                                    serial: serial.into(),
                                    remote,
                                };
                                let _ = tx
                                    .send(Ok(PeerConn {
                                        tls,
                                        info,
                                        _slot: slot,
                                    }))
                                    .await;
                            }
                            Err(err) => {
                                metrics.handshake_failures.inc();
                                tracing::info!(%remote, error = %err, "peer identity refused");
                            }
                        }
                    }
                    Ok(Err(err)) => {
                        metrics.handshake_failures.inc();
                        tracing::info!(%remote, error = %err, "tls handshake failed");
                    }
                    Err(_) => {
                        metrics.handshake_failures.inc();
                        tracing::info!(%remote, "tls handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
