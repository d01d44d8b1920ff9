//! The one client for calls between provinces. Every call this node makes
//! to another member (gossip, trust-list pushes, authoritative lookups and
//! batch forwards, holder matches, witness requests, feed subscriptions and
//! key fetches) goes through [`PeerClient`], which gives each the same
//! manners:
//!
//! - a deadline, sent to the peer as `grpc-timeout` and enforced here;
//! - the province's circuit breaker and adaptive throttle before the call,
//!   its success or failure counted after it ([`health`]);
//! - fail-over across the province's endpoints in the trust list, while the
//!   retry budget allows;
//! - an end at shutdown: a call in flight returns [`PeerError::Stopped`]
//!   when the node's cancellation token fires;
//! - a typed error, [`PeerError`], that says which endpoint failed and how.
//!
//! The client also holds the trust list in force ([`Membership`]): who the
//! peers are and where they listen.

mod health;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hufu_certs::{Province, TrustAnchors};
use hufu_federation::legacy::CodeFormats;
use hufu_federation::trust::{Member, TrustList};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use health::{AdaptiveThrottle, PeerView, draw};

use crate::client::{self, ClientCert, Target};
use health::PeerHealth;

/// The trust list in force, as a cheap snapshot for request handlers.
#[derive(Debug, Default)]
pub struct Membership {
    pub list: Option<TrustList>,
    /// Every member's legacy code formats, compiled for `Verify`.
    pub formats: CodeFormats,
}

impl Membership {
    pub fn version(&self) -> u64 {
        self.list.as_ref().map(|l| l.version).unwrap_or(0)
    }

    pub fn member(&self, p: Province) -> Option<&Member> {
        self.list.as_ref().and_then(|l| l.member(p))
    }

    /// Other members, for replication and gossip.
    pub fn others(&self, own: Province) -> Vec<&Member> {
        self.list
            .as_ref()
            .map(|l| l.members.iter().filter(|m| m.province != own).collect())
            .unwrap_or_default()
    }
}

/// Why a call to another province did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("province {0} is not a member of the trust list in force")]
    NotMember(Province),
    #[error("province {0} lists no endpoints in the trust list")]
    NoEndpoints(Province),
    #[error("province {0} is failing: its circuit is open, calls resume after a pause")]
    CircuitOpen(Province),
    #[error("cannot dial {endpoint}: {source:#}")]
    Dial {
        endpoint: String,
        source: anyhow::Error,
    },
    #[error("{endpoint}: no answer within {after:?}")]
    TimedOut { endpoint: String, after: Duration },
    /// The peer could not be reached or could not answer (unavailable,
    /// overloaded, out of time, broken connection): another endpoint may.
    #[error("{endpoint}: {}", .status.message())]
    Unreachable {
        endpoint: String,
        status: tonic::Status,
    },
    /// The peer answered with a refusal: asking another endpoint would get
    /// the same answer.
    #[error("{endpoint} refused: {}", .status.message())]
    Refused {
        endpoint: String,
        status: tonic::Status,
    },
    #[error("this node is shutting down")]
    Stopped,
}

impl PeerError {
    /// Whether the province failed (counted against it, another endpoint
    /// may be tried), as opposed to answering or never being asked.
    fn is_failure(&self) -> bool {
        matches!(
            self,
            PeerError::Dial { .. } | PeerError::TimedOut { .. } | PeerError::Unreachable { .. }
        )
    }

    /// The status a peer refused the call with, if it did.
    pub fn refusal(&self) -> Option<&tonic::Status> {
        match self {
            PeerError::Refused { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// Whether a status says the peer did not answer rather than refused: a
/// server that ran out of the call's `grpc-timeout` answers CANCELLED, and a
/// status with a transport error behind it is a broken connection,
/// whatever its code.
fn is_unreachable(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::ResourceExhausted
                | tonic::Code::Internal
        )
}

/// One attempt's channel and deadline, handed to the code that makes the
/// call.
#[derive(Clone, Debug)]
pub struct PeerCall {
    pub channel: Channel,
    pub deadline: Duration,
}

impl PeerCall {
    /// `message` as a request carrying the deadline to the peer.
    pub fn request<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }
}

/// The node's client for other provinces: lazily connected channels per
/// endpoint, per-province health, and the trust list in force.
pub struct PeerClient {
    own_cert: ClientCert,
    anchors: Arc<TrustAnchors>,
    members: ArcSwap<Membership>,
    channels: Mutex<HashMap<(Province, String), Channel>>,
    health: Mutex<HashMap<Province, PeerHealth>>,
    deadline: Duration,
    stop: CancellationToken,
}

impl PeerClient {
    pub fn new(
        own_cert: ClientCert,
        anchors: Arc<TrustAnchors>,
        deadline: Duration,
        stop: CancellationToken,
    ) -> PeerClient {
        PeerClient {
            own_cert,
            anchors,
            members: ArcSwap::from_pointee(Membership::default()),
            channels: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            deadline,
            stop,
        }
    }

    /// The deadline of one call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The trust list in force.
    pub fn members(&self) -> Arc<Membership> {
        self.members.load_full()
    }

    /// Puts `list` in force: channels to endpoints it no longer lists are
    /// forgotten.
    pub fn set_members(&self, list: &TrustList) {
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|(p, e), _| {
                list.member(*p)
                    .is_some_and(|m| m.endpoints.iter().any(|x| x == e))
            });
        self.members.store(Arc::new(Membership {
            list: Some(list.clone()),
            formats: CodeFormats::new(list),
        }));
    }

    /// Calls province `p` at its endpoints in turn until one answers: the
    /// breaker and throttle may refuse the call before it is made, each
    /// endpoint is given the deadline, and endpoints after the first are
    /// tried only while the retry budget allows. `what` names the call in
    /// the error operators see, before the endpoint (`lookup at`).
    pub async fn call<T, F, Fut>(
        &self,
        p: Province,
        what: &str,
        mut make: F,
    ) -> Result<T, PeerError>
    where
        F: FnMut(PeerCall) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let endpoints = self
            .members()
            .member(p)
            .ok_or(PeerError::NotMember(p))?
            .endpoints
            .clone();
        if endpoints.is_empty() {
            return Err(PeerError::NoEndpoints(p));
        }
        if !self.allows(p) {
            return Err(PeerError::CircuitOpen(p));
        }
        let mut last = None;
        for (attempt, endpoint) in endpoints.iter().enumerate() {
            if attempt > 0 && !self.may_retry(p) {
                break;
            }
            match self
                .attempt(p, endpoint, self.deadline, what, &mut make)
                .await
            {
                Err(err) if err.is_failure() => last = Some(err),
                done => return done,
            }
        }
        Err(last.expect("one endpoint was tried"))
    }

    /// Calls province `p`'s node at `endpoint` once, within `deadline`, with
    /// no breaker check before it (the caller chose this endpoint, e.g. a
    /// relay for a feed); the outcome is counted as for [`call`](Self::call).
    pub async fn call_at<T, F, Fut>(
        &self,
        p: Province,
        endpoint: &str,
        deadline: Duration,
        what: &str,
        mut make: F,
    ) -> Result<T, PeerError>
    where
        F: FnMut(PeerCall) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.attempt(p, endpoint, deadline, what, &mut make).await
    }

    async fn attempt<T, F, Fut>(
        &self,
        p: Province,
        endpoint: &str,
        deadline: Duration,
        what: &str,
        make: &mut F,
    ) -> Result<T, PeerError>
    where
        F: FnMut(PeerCall) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let result = match self.channel(p, endpoint) {
            Err(source) => Err(PeerError::Dial {
                endpoint: endpoint.to_owned(),
                source,
            }),
            Ok(channel) => {
                let call = make(PeerCall { channel, deadline });
                let answer = tokio::select! {
                    _ = self.stop.cancelled() => return Err(PeerError::Stopped),
                    answer = tokio::time::timeout(deadline, call) => answer,
                };
                match answer {
                    Ok(Ok(value)) => Ok(value),
                    Err(_) => Err(PeerError::TimedOut {
                        endpoint: endpoint.to_owned(),
                        after: deadline,
                    }),
                    Ok(Err(status)) if is_unreachable(&status) => Err(PeerError::Unreachable {
                        endpoint: endpoint.to_owned(),
                        status,
                    }),
                    Ok(Err(status)) => Err(PeerError::Refused {
                        endpoint: endpoint.to_owned(),
                        status,
                    }),
                }
            }
        };
        match &result {
            Err(err) if err.is_failure() => {
                self.failure(p);
                self.note_error(p, &format!("{what} {err}"));
            }
            _ => self.success(p),
        }
        result
    }

    /// A channel to a node of `province` at `endpoint`, reconnecting as
    /// needed; the server must prove it is a node of that province.
    fn channel(&self, province: Province, endpoint: &str) -> anyhow::Result<Channel> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(&(province, endpoint.to_owned())) {
            return Ok(c.clone());
        }
        let target = Target {
            endpoint: endpoint.to_owned(),
            province,
            anchors: self.anchors.clone(),
        };
        let channel = client::connect_lazy(&target, &self.own_cert)?;
        channels.insert((province, endpoint.to_owned()), channel.clone());
        Ok(channel)
    }

    /// Whether a call to `province` may be tried now: its circuit is not
    /// open, and adaptive throttling does not drop the call.
    pub fn allows(&self, province: Province) -> bool {
        let now = now();
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.allows(now) && h.adaptive.allows(now, draw())
    }

    fn may_retry(&self, province: Province) -> bool {
        self.health
            .lock()
            .expect("health lock")
            .entry(province)
            .or_default()
            .throttle
            .may_retry()
    }

    /// Counts an answer from `province` (also for a feed that delivers).
    pub fn success(&self, province: Province) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.success();
        h.throttle.success();
        h.adaptive.accepted();
    }

    /// Counts a failure of `province` (also for a feed that broke off),
    /// remembering why for operators.
    pub fn failed(&self, province: Province, error: &str) {
        self.failure(province);
        self.note_error(province, error);
    }

    fn failure(&self, province: Province) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(province).or_default();
        h.breaker.failure(now());
        h.throttle.failure();
    }

    fn note_error(&self, province: Province, error: &str) {
        let mut health = self.health.lock().expect("health lock");
        health.entry(province).or_default().last_error =
            Some((error.to_owned(), crate::status::now_millis()));
    }

    /// The breaker state and last error of `province`, as an operator sees them.
    pub fn view(&self, province: Province) -> PeerView {
        let health = self.health.lock().expect("health lock");
        match health.get(&province) {
            Some(h) => h.view(now()),
            None => PeerHealth::default().view(now()),
        }
    }
}

/// Now, on tokio's clock: paused in tests, so that breaker pauses pass
/// without waiting.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::health::{OPEN_AFTER, OPEN_FOR};
    use super::*;

    fn client() -> PeerClient {
        let cert = ClientCert {
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        PeerClient::new(
            cert,
            TrustAnchors::new(vec![]).unwrap(),
            OPEN_FOR,
            CancellationToken::new(),
        )
    }

    #[test]
    fn operators_see_the_breaker_and_the_last_error() {
        let peers = client();
        let gd = Province::parse("440000").unwrap();
        let view = peers.view(gd);
        assert_eq!((view.breaker.as_str(), view.last_error), ("closed", None));
        for _ in 0..OPEN_AFTER {
            peers.failed(gd, "feed from 127.0.0.1:1: connection refused");
        }
        let view = peers.view(gd);
        assert_eq!(view.breaker, "open");
        assert_eq!(view.failures, OPEN_AFTER);
        assert_eq!(
            view.last_error.as_deref(),
            Some("feed from 127.0.0.1:1: connection refused")
        );
        // After the pause the next call probes; a success closes it and
        // the last error stays visible, with its time.
        peers
            .health
            .lock()
            .unwrap()
            .get_mut(&gd)
            .unwrap()
            .breaker
            .open_until = Some(now() - Duration::from_millis(1));
        assert_eq!(peers.view(gd).breaker, "half-open");
        peers.success(gd);
        let view = peers.view(gd);
        assert_eq!(view.breaker, "closed");
        assert!(view.last_error.is_some() && view.last_error_ms.is_some());
    }

    /// A peer that ran out of time, or whose connection broke, did not
    /// refuse: another endpoint may answer, and the checkpoint task says
    /// its witness was not reached rather than that it refused.
    #[test]
    fn running_out_of_time_is_not_a_refusal() {
        for status in [
            tonic::Status::deadline_exceeded("deadline has elapsed"),
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::unavailable("connection reset"),
            tonic::Status::resource_exhausted("shed"),
        ] {
            assert!(is_unreachable(&status), "{status:?}");
        }
        for status in [
            tonic::Status::failed_precondition("not a consistent extension"),
            tonic::Status::permission_denied("not a member"),
            tonic::Status::invalid_argument("bad checkpoint"),
        ] {
            assert!(!is_unreachable(&status), "{status:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_refuses_calls_until_its_pause_has_passed() {
        let peers = client();
        let gd = Province::parse("440000").unwrap();
        for _ in 0..OPEN_AFTER {
            assert!(peers.allows(gd));
            peers.failed(gd, "lookup at 127.0.0.1:1: connection refused");
        }
        assert!(!peers.allows(gd), "open after {OPEN_AFTER} failures");
        tokio::time::advance(OPEN_FOR / 2).await;
        assert!(!peers.allows(gd), "still open halfway through the pause");
        tokio::time::advance(OPEN_FOR / 2).await;
        assert!(peers.allows(gd), "one probe once the pause has passed");
        assert!(!peers.allows(gd), "only one probe at a time");
        peers.success(gd);
        assert!(peers.allows(gd));
        assert_eq!(peers.view(gd).breaker, "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_cannot_be_made_count_against_the_province() {
        let peers = client();
        let gd = Province::parse("440000").unwrap();
        for _ in 0..OPEN_AFTER {
            let err = peers
                .call_at(
                    gd,
                    "127.0.0.1:1",
                    OPEN_FOR,
                    "lookup at",
                    |call| async move { Ok::<_, tonic::Status>(call.deadline) },
                )
                .await
                .unwrap_err();
            assert!(matches!(err, PeerError::Dial { .. }), "{err}");
        }
        let view = peers.view(gd);
        assert_eq!(view.breaker, "open");
        let last = view.last_error.unwrap();
        assert!(
            last.starts_with("lookup at cannot dial 127.0.0.1:1"),
            "{last}"
        );
    }
}
