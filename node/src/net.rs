//! The node's mutual-TLS front door: accepts TCP connections, runs TLS
//! handshakes concurrently (bounded and with a deadline, so slow or hostile
//! clients cannot stall the accept loop or exhaust memory), and hands tonic
//! connections that carry the caller's verified identity.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use hufu_certs::Identity;
use hufu_certs::Role;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::handshake::{Paced, Sources};
use crate::places::wire::StreamLimit;
use crate::places::{self, Place, PlaceConfig, Places};

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
    slot: ConnSlot,
    /// A terminal's place, and its stream limit on the wire.
    place: Option<HeldPlace>,
}

/// A place and the frames that carry its stream limit to the caller.
struct HeldPlace {
    place: Place,
    wire: StreamLimit,
    /// Bytes written to TLS since its last flush, by the node and not by
    /// hyper (which flushes its own).
    unflushed: bool,
    /// What the caller sent, its frames filtered, before hyper reads it.
    inbox: Inbox,
}

/// Bytes read from a terminal and not yet given to hyper: `start..end` of
/// `bytes`. Filtering needs whole frame headers, whatever room hyper's
/// buffer has left.
struct Inbox {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Bytes read from a terminal's connection at once: many calls' worth.
const INBOX: usize = 4096;

impl PeerConn {
    /// Writes the node's SETTINGS frame, if the place's stream limit has
    /// changed and hyper stands between two frames: Ready once nothing of
    /// it is left to write before hyper's next byte.
    fn poll_limit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(held) = &mut self.place else {
            return Poll::Ready(Ok(()));
        };
        let wanted = held.place.seat.poll_streams(cx);
        loop {
            let frame = held.wire.to_add(wanted);
            if frame.is_empty() {
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.tls).poll_write(cx, frame))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if held.wire.added(n) {
                self.slot.metrics.stream_limits_sent.inc();
            }
            held.unflushed = true;
        }
        if held.unflushed {
            std::task::ready!(Pin::new(&mut self.tls).poll_flush(cx))?;
            held.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Moves the socket to the reactor of the runtime this is called on: a
    /// second descriptor of the same socket is registered there, and the
    /// first, registered where the connection was accepted, is closed.
    /// Bytes the kernel holds stay in the socket, and a socket readable
    /// already is reported readable at once by its new registration.
    pub fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        let (tcp, _) = self.tls.get_mut();
        let fd = tcp.as_fd().try_clone_to_owned()?;
        *tcp = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        Ok(())
    }

    /// Notes what hyper wrote, to find its frames' boundaries.
    fn wrote(&mut self, bytes: &[u8]) {
        if let Some(held) = &mut self.place {
            held.wire.wrote(bytes);
        }
    }
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
        let this = self.get_mut();
        // A changed limit goes out even while hyper has nothing to write; a
        // socket too full for it now must not stop reading.
        if let Poll::Ready(Err(err)) = this.poll_limit(cx) {
            return Poll::Ready(Err(err));
        }
        let Some(held) = &mut this.place else {
            return Pin::new(&mut this.tls).poll_read(cx, buf);
        };
        loop {
            if held.inbox.start < held.inbox.end {
                let n = buf.remaining().min(held.inbox.end - held.inbox.start);
                let from = held.inbox.start;
                buf.put_slice(&held.inbox.bytes[from..from + n]);
                held.inbox.start += n;
                return Poll::Ready(Ok(()));
            }
            // The start of a frame header held back last time goes first.
            let before = held.wire.held().len();
            held.inbox.bytes[..before].copy_from_slice(held.wire.held());
            let mut read = ReadBuf::new(&mut held.inbox.bytes[before..]);
            std::task::ready!(Pin::new(&mut this.tls).poll_read(cx, &mut read))?;
            let got = read.filled().len();
            if got == 0 {
                if before == 0 {
                    return Poll::Ready(Ok(()));
                }
                // The caller closed its side: hyper sees whatever it sent,
                // however cut short.
                held.wire.release_held();
                (held.inbox.start, held.inbox.end) = (0, before);
                continue;
            }
            held.place.seat.note_read(got);
            let kept = held
                .wire
                .read(&mut held.inbox.bytes[..before + got])
                .map_err(|_| {
                    this.slot.metrics.connections_taken_back.inc();
                    io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the caller opened streams beyond the limit the node set",
                    )
                })?;
            (held.inbox.start, held.inbox.end) = (0, kept);
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_limit(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.tls).poll_write(cx, buf))?;
        this.wrote(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_limit(cx))?;
        Pin::new(&mut this.tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_limit(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.tls).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for slice in bufs {
            let part = left.min(slice.len());
            this.wrote(&slice[..part]);
            left -= part;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
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
    /// TLS handshakes computing at once (a handshake waiting on its
    /// caller's bytes holds none).
    pub max_handshakes: usize,
    /// Connections from one address that keep the node waiting on their
    /// caller: not yet spoken, or stalled in their handshake (`handshake`).
    pub handshakes_per_source: usize,
    /// Time a new connection has to send its first byte.
    pub first_byte_timeout: Duration,
    /// Time a connection has to finish its handshake (and to wait for a
    /// place before it).
    pub handshake_timeout: Duration,
    /// Scheduling delay above which terminals' places are cut
    /// (`places`); zero: no places.
    pub scheduling_delay_target: Duration,
    /// Streams a terminal may open at once on its connection
    /// (`max_concurrent_streams`): what a paused connection gets back.
    pub caller_streams: u32,
    /// The same while places are cut (`surge_concurrent_streams`).
    pub surge_streams: u32,
}

/// Places never fall below this many terminals' connections.
const MIN_PLACES: usize = 16;
/// While every place is taken, how often one waiting connection is let
/// through to its handshake without a place: nodes, admins and auditors
/// need none, and a handshake is the only way to learn who is calling (a
/// terminal among them is paused at once, see [`Places::take_paused`]).
const TRICKLE: Duration = Duration::from_millis(500);

/// Accepts connections until `stop` is cancelled and yields those whose
/// handshake succeeded. Failed handshakes are logged and counted, never
/// surfaced to tonic (which would otherwise stop serving).
///
/// A socket that has sent nothing costs a task and a buffer, not a
/// handshake permit: it gets a short first-byte deadline. A handshake holds
/// a permit only while it computes, never while it waits for its caller's
/// bytes, and one address may keep only a few connections waiting (silent
/// or stalled mid-handshake), so silent or stalling sockets cannot lock
/// other clients out. Handshakes are computed a few at a time, so a wave of
/// reconnects cannot crowd out calls on open connections. Its tasks (the
/// accept loop, each handshake) are `tasks`'s, and end when `stop` is
/// cancelled: shutdown waits for them. Places are judged on `control` if
/// given (the control lane), so that they follow a surge that has swamped
/// this runtime.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: DoorLimits,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    tasks: &TaskTracker,
    control: Option<&tokio::runtime::Handle>,
) -> ReceiverStream<Result<PeerConn, io::Error>> {
    let (tx, rx) = mpsc::channel(limits.max_handshakes.max(1));
    let permits = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Sources::default();
    let place_door = (!limits.scheduling_delay_target.is_zero()).then(|| {
        let door = Arc::new(PlaceDoor {
            places: Places::new(PlaceConfig {
                min: MIN_PLACES,
                max: limits.max_connections,
                target_lag: limits.scheduling_delay_target,
                streams: limits.caller_streams,
                surge_streams: limits.surge_streams,
            }),
            waiting: Arc::new(AtomicUsize::new(0)),
            trickle: Notify::new(),
        });
        places::watch(
            door.places.clone(),
            door.waiting.clone(),
            metrics.clone(),
            stop.clone(),
            tasks,
            control,
        );
        tasks.spawn({
            let (door, stop) = (door.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(TRICKLE);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if door.waiting.load(Ordering::Relaxed) > 0 {
                        door.trickle.notify_last();
                    }
                }
            }
        });
        door
    });
    let handshakes = tasks.clone();
    tasks.spawn(async move {
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
            let Some(source) = sources.enter(remote.ip(), limits.handshakes_per_source) else {
                metrics.handshake_failures.inc();
                tracing::debug!(%remote, "too many connections in handshake from this address; dropped");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            let permits = permits.clone();
            let sources = sources.clone();
            let limits = limits.clone();
            let door = place_door.clone();
            let stop = stop.clone();
            handshakes.spawn(async move {
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
                    // A socket that spoke waits on the node now (for a
                    // place, a permit): that counts against nobody.
                    drop(source);
                    let place = match &door {
                        Some(door) => door.wait(&tcp).await?,
                        None => None,
                    };
                    let tls = Paced::new(acceptor.accept(tcp), permits, sources, remote.ip())
                        .await
                        .ok_or_else(|| "node stopping".to_string())?
                        .map_err(|e| e.to_string())?;
                    Ok((tls, place))
                };
                let finished = tokio::select! {
                    _ = stop.cancelled() => return,
                    finished = tokio::time::timeout(limits.handshake_timeout, handshake) => finished,
                };
                let (tls, place) =
                    match finished {
                        Ok(Ok(done)) => done,
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
                let identity = identity.map(|(identity, serial)| {
                    // Only terminals hold places; a terminal let through
                    // without one (to learn who it was) is paused at once.
                    let place = match &door {
                        Some(door) if identity.role == Role::Terminal => {
                            Some(place.unwrap_or_else(|| door.places.take_paused()))
                        }
                        _ => None,
                    };
                    let place = place.map(|place| HeldPlace {
                        place,
                        wire: StreamLimit::new(limits.caller_streams),
                        unflushed: false,
                        inbox: Inbox {
                            bytes: vec![0; INBOX].into_boxed_slice(),
                            start: 0,
                            end: 0,
                        },
                    });
                    (identity, serial, place)
                });
                match identity {
                    Ok((identity, serial, place)) => {
                        let info = PeerInfo {
                            identity: Arc::new(identity),
                            serial: serial.into(),
                            remote,
                        };
                        metrics.connections.inc();
                        let conn = PeerConn {
                            tls,
                            info,
                            slot: ConnSlot {
                                _permit: slot,
                                metrics: metrics.clone(),
                            },
                            place,
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

/// Where new connections wait for a terminal's place, before their
/// handshake costs the node anything.
struct PlaceDoor {
    places: Arc<Places>,
    /// Connections waiting now.
    waiting: Arc<AtomicUsize>,
    /// Lets one waiting connection through without a place now and then.
    trickle: Notify,
}

impl PlaceDoor {
    /// A place for `tcp`, or `None` when the trickle lets it through to
    /// learn who it is; Err if its caller gave up waiting.
    async fn wait(&self, tcp: &TcpStream) -> Result<Option<Place>, String> {
        let place = match self.places.try_take() {
            Some(place) => Some(place),
            None => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Decrement(&self.waiting);
                loop {
                    tokio::select! {
                        _ = self.places.room() => {
                            if let Some(place) = self.places.try_take() {
                                break Some(place);
                            }
                        }
                        _ = self.trickle.notified() => break None,
                    }
                }
            }
        };
        // A caller that gave up while it waited has closed its socket: no
        // handshake for it.
        if let Some(Ok(ready)) = tcp.ready(Interest::READABLE).now_or_never()
            && ready.is_read_closed()
        {
            return Err("closed while it waited for a place".to_string());
        }
        Ok(place)
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
