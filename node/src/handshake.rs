//! What a TLS handshake at the front door may hold, by whom it is waiting on.
//!
//! A handshake alternates between work (the node computes its key exchange
//! and signature, then checks the client's certificate) and waiting for the
//! caller's next bytes. Waiting on the caller must cost the node nothing
//! another caller needs: a socket that sends half a ClientHello, or a whole
//! one and then nothing, would otherwise hold one of the few handshake
//! permits until the handshake deadline, and eight of them would lock every
//! new client out. So a [`Paced`] handshake holds a permit only while it has
//! bytes to work on, and while it waits on its caller it holds a place of
//! its source address instead ([`Sources`]): one address may have only so
//! many connections that keep the node waiting, whether silent or stalled
//! mid-handshake. Connections waiting on the node (for a permit, for a
//! place) count against nobody, so a crowd of honest clients behind one
//! address is slowed, not cut.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// Connections per source address that keep the node waiting on their
/// caller (not yet spoken, or stalled in their handshake).
#[derive(Clone, Default)]
pub struct Sources(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place under its address's count; freed when dropped.
pub struct SourcePlace {
    sources: Sources,
    ip: IpAddr,
}

impl Sources {
    /// A place for a new connection from `ip`, or None when that address
    /// already keeps `limit` connections waiting.
    pub fn enter(&self, ip: IpAddr, limit: usize) -> Option<SourcePlace> {
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

    /// A place for a connection already accepted, which is counted even
    /// over the limit: the limit refuses new connections, and a handshake
    /// under way ends at its deadline anyway.
    fn take(&self, ip: IpAddr) -> SourcePlace {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(ip).or_insert(0) += 1;
        SourcePlace {
            sources: self.clone(),
            ip,
        }
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

/// A handshake future that holds a permit of `permits` only while it runs
/// and a place of its source while it waits on its caller.
pub struct Paced<F> {
    handshake: Pin<Box<F>>,
    permits: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    sources: Sources,
    ip: IpAddr,
    waiting: Option<SourcePlace>,
}

impl<F> Paced<F> {
    /// `handshake` of a connection from `ip`, paced by `permits`.
    pub fn new(handshake: F, permits: Arc<Semaphore>, sources: Sources, ip: IpAddr) -> Paced<F> {
        Paced {
            handshake: Box::pin(handshake),
            permits: PollSemaphore::new(permits),
            permit: None,
            sources,
            ip,
            waiting: None,
        }
    }
}

impl<F: Future> Future for Paced<F> {
    type Output = Option<F::Output>;

    /// None when the permits are closed (the node is stopping).
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Woken: the caller sent something (or the deadline passed), so the
        // handshake has work and waits on the node for a permit.
        this.waiting = None;
        if this.permit.is_none() {
            match this.permits.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => this.permit = Some(permit),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.handshake.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending => {
                // rustls works synchronously inside a poll: pending means
                // the socket has nothing to read (or no room to write), so
                // the handshake now waits on its caller.
                this.permit = None;
                this.waiting = Some(this.sources.take(this.ip));
                Poll::Pending
            }
        }
    }
}
