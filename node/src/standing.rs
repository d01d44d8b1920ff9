//! Whether a caller is still in good standing: its province is a member of
//! the trust list in force and its certificate is not revoked.
//!
//! The TLS handshake checks a certificate once, when a connection opens;
//! connections last for hours, and resumed sessions skip the check. So the
//! standing is checked again on every call ([`Standing::check`], from the
//! authorization path), and whenever the rules change (a trust list that
//! removes a member, a newly revoked serial) every open connection whose
//! caller lost its standing is closed, which also ends its feed streams.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use hufu_certs::{Identity, Province};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::net::{PeerConn, PeerInfo};

/// Why a caller is no longer served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "province {province} is not a member of trust list v{version}: its certificates are no longer accepted"
    )]
    NotAMember { province: Province, version: u64 },
    #[error(
        "certificate serial {serial} was revoked by province {province}: ask its operator for a new certificate"
    )]
    Revoked { province: Province, serial: String },
}

/// The rules in force, swapped whole when they change.
#[derive(Debug, Default)]
struct Rules {
    /// Member provinces of the trust list in force, and its version; None
    /// while the node runs alone (its CAs alone decide).
    members: Option<(BTreeSet<Province>, u64)>,
    /// Revoked certificate serials by issuing province.
    revoked: HashMap<Province, Arc<HashSet<String>>>,
}

/// The standing rules and the connections they apply to.
pub struct Standing {
    own: Province,
    rules: ArcSwap<Rules>,
    open: Mutex<HashMap<u64, (PeerInfo, CancellationToken)>>,
    next_id: AtomicU64,
}

impl Standing {
    pub fn new(own: Province) -> Arc<Standing> {
        Arc::new(Standing {
            own,
            rules: ArcSwap::from_pointee(Rules::default()),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Whether the holder of the certificate `serial` naming `identity` may
    /// be served now. Cheap: one atomic load and two hash lookups.
    /// This node's province.
    pub fn own(&self) -> Province {
        self.own
    }

    pub fn check(&self, identity: &Identity, serial: &str) -> Result<(), Refusal> {
        let rules = self.rules.load();
        if identity.province != self.own
            && let Some((members, version)) = &rules.members
            && !members.contains(&identity.province)
        {
            return Err(Refusal::NotAMember {
                province: identity.province,
                version: *version,
            });
        }
        if rules
            .revoked
            .get(&identity.province)
            .is_some_and(|serials| serials.contains(serial))
        {
            return Err(Refusal::Revoked {
                province: identity.province,
                serial: serial.to_owned(),
            });
        }
        Ok(())
    }

    /// [`check`](Self::check) for a connection's peer.
    pub fn check_peer(&self, peer: &PeerInfo) -> Result<(), Refusal> {
        self.check(&peer.identity, &peer.serial)
    }

    /// Puts the members of trust list `version` in force (None: no trust
    /// list), closing connections of provinces that left.
    pub fn set_members(&self, members: Option<(BTreeSet<Province>, u64)>) {
        self.rules.rcu(|rules| Rules {
            members: members.clone(),
            revoked: rules.revoked.clone(),
        });
        self.close_refused();
    }

    /// Puts `province`'s revoked serials in force, closing connections of
    /// certificates among them. Returns whether the list changed.
    pub fn set_revoked(
        &self,
        province: Province,
        serials: impl IntoIterator<Item = String>,
    ) -> bool {
        let serials: HashSet<String> = serials.into_iter().collect();
        let unchanged = self
            .rules
            .load()
            .revoked
            .get(&province)
            .map_or(serials.is_empty(), |held| **held == serials);
        if unchanged {
            return false;
        }
        let serials = Arc::new(serials);
        self.rules.rcu(|rules| {
            let mut revoked = rules.revoked.clone();
            revoked.insert(province, serials.clone());
            Rules {
                members: rules.members.clone(),
                revoked,
            }
        });
        self.close_refused();
        true
    }

    /// `province`'s revoked serials, sorted.
    pub fn revoked(&self, province: Province) -> Vec<String> {
        let mut serials: Vec<String> = self
            .rules
            .load()
            .revoked
            .get(&province)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        serials.sort();
        serials
    }

    /// Number of connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.lock().expect("connections lock").len()
    }

    /// Closes every open connection whose caller is refused by the rules now
    /// in force.
    fn close_refused(&self) {
        let open = self.open.lock().expect("connections lock");
        for (peer, close) in open.values() {
            if let Err(why) = self.check_peer(peer) {
                if !close.is_cancelled() {
                    tracing::warn!(caller = %peer.identity, remote = %peer.remote, reason = %why, "closing the connection of a caller no longer in good standing");
                }
                close.cancel();
            }
        }
    }

    /// Takes charge of a freshly accepted connection: refuses it at once if
    /// its caller is not in good standing, and otherwise closes it later
    /// when the caller loses its standing.
    pub fn admit(self: &Arc<Self>, conn: PeerConn) -> Option<GuardedConn> {
        let peer = conn.connect_info();
        if let Err(why) = self.check_peer(&peer) {
            tracing::info!(caller = %peer.identity, remote = %peer.remote, reason = %why, "connection refused");
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.open
            .lock()
            .expect("connections lock")
            .insert(id, (peer.clone(), close.clone()));
        // The rules may have changed between the check and the insert.
        if self.check_peer(&peer).is_err() {
            close.cancel();
        }
        Some(GuardedConn {
            inner: conn,
            closed: Box::pin(close.cancelled_owned()),
            id,
            standing: self.clone(),
        })
    }
}

/// A connection that fails every read and write once its caller has lost
/// its standing, so hyper drops it with all its streams.
pub struct GuardedConn {
    inner: PeerConn,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    id: u64,
    standing: Arc<Standing>,
}

impl Drop for GuardedConn {
    fn drop(&mut self) {
        self.standing
            .open
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

impl GuardedConn {
    /// Err once the caller has lost its standing; registers for the wake-up
    /// otherwise.
    fn poll_standing(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "caller no longer in good standing",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl crate::serve::Connection for GuardedConn {
    fn rehome(&mut self) -> io::Result<()> {
        self.inner.rehome()
    }
}

impl Connected for GuardedConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(err) = this.poll_standing(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(err) = this.poll_standing(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(err) = this.poll_standing(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(err) = this.poll_standing(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use hufu_certs::Role;

    use super::*;

    fn id(p: &str, role: Role) -> Identity {
        Identity::new(Province::parse(p).unwrap(), role, "x").unwrap()
    }

    #[test]
    fn members_and_revocations_decide() {
        let gd = Province::parse("440000").unwrap();
        let sn = Province::parse("610000").unwrap();
        let standing = Standing::new(gd);
        // Alone: anything the handshake let in.
        assert!(standing.check(&id("610000", Role::Node), "01").is_ok());
        standing.set_members(Some(([gd].into_iter().collect(), 2)));
        assert_eq!(
            standing.check(&id("610000", Role::Node), "01"),
            Err(Refusal::NotAMember {
                province: sn,
                version: 2
            })
        );
        // The own province is always a member.
        assert!(standing.check(&id("440000", Role::Terminal), "01").is_ok());
        assert!(standing.set_revoked(gd, ["01".to_owned()]));
        assert!(!standing.set_revoked(gd, ["01".to_owned()]));
        assert!(standing.check(&id("440000", Role::Terminal), "01").is_err());
        assert!(standing.check(&id("440000", Role::Terminal), "02").is_ok());
        // A serial is revoked only for the province that revoked it.
        standing.set_members(None);
        assert!(standing.check(&id("610000", Role::Terminal), "01").is_ok());
        assert_eq!(standing.revoked(gd), ["01"]);
    }
}
