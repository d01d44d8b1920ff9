//! The node's mutual-TLS front door: accepts TCP connections, runs TLS
//! handshakes concurrently (bounded and with a deadline, so slow or hostile
//! clients cannot stall the accept loop or exhaust memory), and hands tonic
//! connections that carry the caller's verified identity.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use hufu_certs::Role;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handshake::{Paced, Sources};
use crate::places::{self, Place, PlaceConfig, Places};

mod conn;

use conn::ConnSlot;
pub use conn::{PeerConn, PeerInfo};

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
                    let place = place.map(|place| (place, limits.caller_streams));
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
                        let slot = ConnSlot {
                            _permit: slot,
                            metrics: metrics.clone(),
                        };
                        let conn = PeerConn::new(tls, info, slot, place);
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
