//! A terminal's or peer's connection once its handshake is done: the TLS
//! stream tonic reads and writes, the caller's verified identity, and for
//! a terminal its place, whose stream limit goes out on the wire.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use hufu_certs::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::places::Place;
use crate::places::wire::StreamLimit;

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
    /// The TLS stream, shared with the places' judge so that a pause goes
    /// out at once (see [`announce_pause`]).
    io: Arc<Mutex<Io>>,
    info: PeerInfo,
    /// Counts against the node's connection limit while open.
    slot: ConnSlot,
    /// A terminal's place, and what its caller sent not yet read by hyper.
    place: Option<HeldPlace>,
}

/// What the connection's task and the places' judge both write to.
struct Io {
    tls: TlsStream<TcpStream>,
    /// A terminal's stream limit on the wire.
    limit: Option<Limit>,
}

/// The frames that carry a place's stream limit to the caller.
struct Limit {
    wire: StreamLimit,
    /// Bytes written to TLS since its last flush, by the node and not by
    /// hyper (which flushes its own).
    unflushed: bool,
}

/// A place and what its caller sent, its frames filtered, before hyper
/// reads it.
struct HeldPlace {
    place: Place,
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

fn lock(io: &Mutex<Io>) -> MutexGuard<'_, Io> {
    io.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes a terminal's pause (a stream limit of zero) from the places'
/// judge, without waiting for the connection's task: when the node runs
/// late, that task waits as long as every other, and its caller goes on
/// sending calls (each cancelled at its deadline frees a stream for the
/// next) that the node must read later. The frame goes out if hyper
/// stands between two frames and the connection's task is not using it
/// now; what the socket does not take at once, and any other case, is
/// left to the task, which the seat wakes.
fn announce_pause(io: &Mutex<Io>, metrics: &crate::metrics::Metrics) {
    let Ok(mut guard) = io.try_lock() else {
        return;
    };
    let Io { tls, limit } = &mut *guard;
    let Some(limit) = limit else {
        return;
    };
    let frame = limit.wire.to_add(0);
    if frame.is_empty() {
        return;
    }
    let mut copy = [0u8; 32];
    let len = frame.len().min(copy.len());
    copy[..len].copy_from_slice(&frame[..len]);
    let (tcp, session) = tls.get_mut();
    let Ok(n) = io::Write::write(&mut session.writer(), &copy[..len]) else {
        return;
    };
    if limit.wire.added(n) {
        metrics.stream_limits_sent.inc();
    }
    while session.wants_write() {
        match session.write_tls(&mut NoWait(tcp)) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    limit.unflushed = session.wants_write();
}

/// Writes to a socket only what it takes at once.
struct NoWait<'a>(&'a TcpStream);

impl io::Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PeerConn {
    pub(super) fn new(
        tls: TlsStream<TcpStream>,
        info: PeerInfo,
        slot: ConnSlot,
        place: Option<(Place, u32)>,
    ) -> PeerConn {
        let limit = place.as_ref().map(|(_, streams)| Limit {
            wire: StreamLimit::new(*streams),
            unflushed: false,
        });
        let io = Arc::new(Mutex::new(Io { tls, limit }));
        let place = place.map(|(place, _)| {
            let weak = Arc::downgrade(&io);
            let metrics = slot.metrics.clone();
            place.seat.on_pause(Box::new(move || {
                if let Some(io) = weak.upgrade() {
                    announce_pause(&io, &metrics);
                }
            }));
            HeldPlace {
                place,
                inbox: Inbox {
                    bytes: vec![0; INBOX].into_boxed_slice(),
                    start: 0,
                    end: 0,
                },
            }
        });
        PeerConn {
            io,
            info,
            slot,
            place,
        }
    }

    /// Moves the socket to the reactor of the runtime this is called on: a
    /// second descriptor of the same socket is registered there, and the
    /// first, registered where the connection was accepted, is closed.
    /// Bytes the kernel holds stay in the socket, and a socket readable
    /// already is reported readable at once by its new registration.
    pub fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        let mut io = lock(&self.io);
        let (tcp, _) = io.tls.get_mut();
        let fd = tcp.as_fd().try_clone_to_owned()?;
        *tcp = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        Ok(())
    }
}

/// Writes the node's SETTINGS frame, if the place's stream limit has
/// changed and hyper stands between two frames: Ready once nothing of it is
/// left to write before hyper's next byte.
fn poll_limit(
    io: &mut Io,
    place: &Option<HeldPlace>,
    metrics: &crate::metrics::Metrics,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let (Some(held), Some(limit)) = (place, &mut io.limit) else {
        return Poll::Ready(Ok(()));
    };
    let wanted = held.place.seat.poll_streams(cx);
    loop {
        let frame = limit.wire.to_add(wanted);
        if frame.is_empty() {
            break;
        }
        let n = std::task::ready!(Pin::new(&mut io.tls).poll_write(cx, frame))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        if limit.wire.added(n) {
            metrics.stream_limits_sent.inc();
        }
        limit.unflushed = true;
    }
    if limit.unflushed {
        std::task::ready!(Pin::new(&mut io.tls).poll_flush(cx))?;
        limit.unflushed = false;
    }
    Poll::Ready(Ok(()))
}

impl Io {
    /// Notes what hyper wrote, to find its frames' boundaries.
    fn wrote(&mut self, bytes: &[u8]) {
        if let Some(limit) = &mut self.limit {
            limit.wire.wrote(bytes);
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
        let mut guard = lock(&this.io);
        let io = &mut *guard;
        // A changed limit goes out even while hyper has nothing to write; a
        // socket too full for it now must not stop reading.
        if let Poll::Ready(Err(err)) = poll_limit(io, &this.place, &this.slot.metrics, cx) {
            return Poll::Ready(Err(err));
        }
        let (Some(held), Some(limit)) = (&mut this.place, &mut io.limit) else {
            return Pin::new(&mut io.tls).poll_read(cx, buf);
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
            let before = limit.wire.held().len();
            held.inbox.bytes[..before].copy_from_slice(limit.wire.held());
            let mut read = ReadBuf::new(&mut held.inbox.bytes[before..]);
            std::task::ready!(Pin::new(&mut io.tls).poll_read(cx, &mut read))?;
            let got = read.filled().len();
            if got == 0 {
                if before == 0 {
                    return Poll::Ready(Ok(()));
                }
                // The caller closed its side: hyper sees whatever it sent,
                // however cut short.
                limit.wire.release_held();
                (held.inbox.start, held.inbox.end) = (0, before);
                continue;
            }
            held.place.seat.note_read(got);
            let kept = limit
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
        let mut guard = lock(&this.io);
        let io = &mut *guard;
        std::task::ready!(poll_limit(io, &this.place, &this.slot.metrics, cx))?;
        let n = std::task::ready!(Pin::new(&mut io.tls).poll_write(cx, buf))?;
        io.wrote(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut guard = lock(&this.io);
        let io = &mut *guard;
        std::task::ready!(poll_limit(io, &this.place, &this.slot.metrics, cx))?;
        Pin::new(&mut io.tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.io).tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut guard = lock(&this.io);
        let io = &mut *guard;
        std::task::ready!(poll_limit(io, &this.place, &this.slot.metrics, cx))?;
        let n = std::task::ready!(Pin::new(&mut io.tls).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for slice in bufs {
            let part = left.min(slice.len());
            io.wrote(&slice[..part]);
            left -= part;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        lock(&self.io).tls.is_write_vectored()
    }
}

/// A connection's place under the node's connection limit.
pub(super) struct ConnSlot {
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}
