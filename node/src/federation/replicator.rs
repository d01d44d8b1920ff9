//! Keeping a replica of one other province's status feed: subscribe to the
//! province itself; while it cannot be reached, catch up from any other
//! member that holds its feed (batches are signed by the issuer, so a relay
//! cannot alter them); resume from the last change applied, so there is no
//! gap and no duplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_federation::codes::Jwks;
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{GetJwksRequest, GetSnapshotRequest, SubscribeChangesRequest};
use tokio_util::sync::CancellationToken;

use super::{Federation, snapshot};
use crate::peers::PeerError;

/// Largest feed message accepted (a batch of a few thousand changes).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// How long a relay session lasts before the issuer itself is tried again.
const RELAY_SESSION: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A head dated further ahead of this node's clock than this is logged: the
/// issuer's clock is wrong. (Freshness is capped at arrival whatever the skew.)
const CLOCK_SKEW_TOLERANCE_MS: i64 = 5_000;

/// Where a session pulls from.
struct Source {
    province: Province,
    endpoint: String,
    direct: bool,
}

/// What the operator is told about a peer's own feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkEvent {
    /// It stopped delivering (a restart, a network fault): said at once.
    Interrupted,
    /// It has not delivered for [`DOWN_AFTER`]: an outage.
    Down(Duration),
    /// It delivers again after an interruption that was reported.
    Back(Duration),
}

/// A peer's feed silent this long is down, not restarting. Nodes of a
/// federation also start in any order, a few seconds apart.
const DOWN_AFTER: Duration = Duration::from_secs(30);

/// Whether `p`'s own feed reaches this node, for the log lines an operator
/// watches: one when it goes down, one when it comes back.
struct Link {
    /// Since when the issuer's own feed has not delivered; None while it does.
    down_since: Option<Instant>,
    /// Whether the feed has delivered since this node started.
    ever_up: bool,
    interrupted_said: bool,
    down_said: bool,
}

impl Link {
    fn new(now: Instant) -> Link {
        Link {
            down_since: Some(now),
            ever_up: false,
            interrupted_said: false,
            down_said: false,
        }
    }

    fn delivered(&mut self, now: Instant) -> Option<LinkEvent> {
        let since = self.down_since.take();
        let said = self.interrupted_said || self.down_said;
        self.ever_up = true;
        self.interrupted_said = false;
        self.down_said = false;
        match since {
            Some(since) if said => Some(LinkEvent::Back(now - since)),
            _ => None,
        }
    }

    fn failed(&mut self, now: Instant) -> Option<LinkEvent> {
        let since = *self.down_since.get_or_insert(now);
        if self.ever_up && !self.interrupted_said {
            self.interrupted_said = true;
            return Some(LinkEvent::Interrupted);
        }
        if !self.down_said && now - since >= DOWN_AFTER {
            self.down_said = true;
            return Some(LinkEvent::Down(now - since));
        }
        None
    }
}

fn log_link(p: Province, event: Option<LinkEvent>, error: &str) {
    match event {
        None => {}
        Some(LinkEvent::Interrupted) => tracing::info!(
            province = %p, %error,
            "feed from province {p} interrupted: replicating through other members until it is back"
        ),
        Some(LinkEvent::Down(d)) => tracing::warn!(
            province = %p, %error,
            "feed from province {p} is down (no delivery for {}s): its codes verify from the replica, caught up through other members where they can",
            d.as_secs()
        ),
        Some(LinkEvent::Back(d)) => tracing::info!(
            province = %p,
            "feed from province {p} is back after {}s: replicating directly again",
            d.as_secs()
        ),
    }
}

pub async fn run(state: Arc<Federation>, p: Province, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut turns = Turns::default();
    let mut link = Link::new(Instant::now());
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(source) = choose_source(&state, p, &turns) else {
            // Nobody to ask (a federation of two with the other down).
            if sleep_or_stop(&stop, backoff.current()).await {
                return;
            }
            backoff.grow();
            continue;
        };
        let ended = session(&state, p, &source, &stop, &mut link).await;
        if !source.direct {
            turns.relay = turns.relay.wrapping_add(1);
        } else if ended.is_err() {
            turns.direct = turns.direct.wrapping_add(1);
        }
        let pause = match ended {
            Ok(()) => backoff.reset(),
            Err(err) => {
                if source.direct {
                    log_link(p, link.failed(Instant::now()), &err.to_string());
                    // A failed subscription call is counted by the peer
                    // client; a feed that broke off is counted here.
                    if let SessionError::Feed(why) = &err {
                        state
                            .peers
                            .failed(p, &format!("feed from {}: {why}", source.endpoint));
                    }
                }
                tracing::debug!(province = %p, from = %source.province, endpoint = %source.endpoint, error = %err, "feed session ended");
                backoff.grow()
            }
        };
        if sleep_or_stop(&stop, pause).await {
            return;
        }
    }
}

/// The pause between feed sessions: short after a session that ended
/// well, doubling after each failure up to [`MAX_BACKOFF`].
#[derive(Debug)]
struct Backoff(Duration);

const FIRST_BACKOFF: Duration = Duration::from_millis(50);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(FIRST_BACKOFF)
    }
}

impl Backoff {
    /// The pause as it stands.
    fn current(&self) -> Duration {
        self.0
    }

    /// After a failure: the pause doubles, up to [`MAX_BACKOFF`]; returns it.
    fn grow(&mut self) -> Duration {
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        self.0
    }

    /// After a session that ended well: back to the first pause.
    fn reset(&mut self) -> Duration {
        self.0 = FIRST_BACKOFF;
        self.0
    }
}

/// Returns true if stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

fn choose_source(state: &Federation, p: Province, turns: &Turns) -> Option<Source> {
    let membership = state.peers.members();
    let issuer = membership.member(p)?;
    if state.peers.allows(p) && !issuer.endpoints.is_empty() {
        let endpoint = &issuer.endpoints[turns.direct % issuer.endpoints.len()];
        return Some(Source {
            province: p,
            endpoint: endpoint.clone(),
            direct: true,
        });
    }
    let relays: Vec<_> = membership
        .others(state.province)
        .into_iter()
        .filter(|m| m.province != p && !m.endpoints.is_empty())
        .collect();
    if relays.is_empty() {
        return None;
    }
    let relay = relays[turns.relay % relays.len()];
    let endpoint = &relay.endpoints[(turns.relay / relays.len()) % relay.endpoints.len()];
    Some(Source {
        province: relay.province,
        endpoint: endpoint.clone(),
        direct: false,
    })
}

/// Which endpoint the next feed session asks: the issuer's endpoints in
/// turn, moving on after a failed session (a province with several
/// replicas lists them all, and one down must not stop its feed), and the
/// relays' in turn, moving on after every relayed session.
#[derive(Debug, Default)]
struct Turns {
    direct: usize,
    relay: usize,
}

/// Why a feed session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The subscription call failed (already counted by the peer client).
    #[error(transparent)]
    Call(PeerError),
    /// The feed broke off, went silent or sent what could not be applied.
    #[error("{0}")]
    Feed(String),
}

async fn session(
    state: &Arc<Federation>,
    p: Province,
    source: &Source,
    stop: &CancellationToken,
    link: &mut Link,
) -> Result<(), SessionError> {
    let log_key = state
        .peers
        .members()
        .member(p)
        .map(|m| m.log_key.clone())
        .ok_or_else(|| SessionError::Feed(format!("{p} left the federation")))?;
    let after = held_through(state, p).await?;
    // The first call on a channel also connects it (TCP and TLS): when a
    // federation starts, every node connects to every other at once, and
    // a subscription refused for taking longer than a lookup would only
    // start the handshake again.
    let deadline = state.peers.deadline() + crate::client::CONNECT_TIMEOUT;
    let request = SubscribeChangesRequest {
        issuer: p.to_string(),
        after_sequence: after,
    };
    let answer = state
        .peers
        .call_at(
            source.province,
            &source.endpoint,
            deadline,
            "feed from",
            |call| {
                // The subscription stays open: no deadline travels with it.
                let request = request.clone();
                async move {
                    FederationServiceClient::new(call.channel)
                        .max_decoding_message_size(MAX_BATCH_BYTES)
                        .subscribe_changes(request)
                        .await
                }
            },
        )
        .await;
    let mut stream = match answer {
        Ok(stream) => stream.into_inner(),
        Err(PeerError::Stopped) => return Ok(()),
        Err(err) if is_compacted(err.refusal()) => {
            return install_snapshot(state, p, source, &log_key).await;
        }
        Err(err) => return Err(SessionError::Call(err)),
    };
    // Heartbeats come about once a second: silence for longer means the
    // source is gone even if the connection looks open.
    let idle = state.heartbeat * 3 + deadline;
    let ends = (!source.direct).then(|| Instant::now() + RELAY_SESSION);
    let mut skew_logged = false;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            next = tokio::time::timeout(idle, stream.message()) => next,
        };
        let batch = match next {
            Err(_) => return Err(SessionError::Feed(format!("silent for {idle:?}"))),
            Ok(Err(status)) if is_compacted(Some(&status)) => {
                return install_snapshot(state, p, source, &log_key).await;
            }
            Ok(Err(status)) => return Err(SessionError::Feed(status.message().to_owned())),
            Ok(Ok(None)) => return Err(SessionError::Feed("feed ended".into())),
            Ok(Ok(Some(batch))) => batch,
        };
        match state.store.apply_batch(p, &batch, &log_key).await {
            Ok(applied) => {
                state
                    .metrics
                    .feed_changes
                    .inc_by(applied.new_changes as u64);
                if let Some(head) = &batch.head {
                    let now = crate::status::now_millis();
                    let skew = head.time_ms - now;
                    state.metrics.replica_clock_skew(p, skew);
                    state.metrics.replica_head_time(p, head.time_ms.min(now));
                    if skew > CLOCK_SKEW_TOLERANCE_MS && !skew_logged {
                        skew_logged = true;
                        tracing::warn!(province = %p, from = %source.province, skew_ms = skew, "feed head dated in the future: the issuer's clock runs ahead; its replica's age counts from arrival instead");
                    }
                    if source.direct {
                        log_link(p, link.delivered(Instant::now()), "");
                        state.peers.success(p);
                        refresh_keys_if_changed(state, p, &source.endpoint, &head.keys_digest)
                            .await;
                    }
                }
            }
            Err(err) => {
                state.metrics.feed_refused.inc();
                tracing::warn!(province = %p, from = %source.province, error = %err, "feed batch refused");
                return Err(SessionError::Feed(err.to_string()));
            }
        }
        if ends.is_some_and(|e| Instant::now() > e) {
            return Ok(());
        }
    }
}

/// The last of `p`'s changes this node holds: a feed or a snapshot is asked
/// for from the next one.
async fn held_through(state: &Federation, p: Province) -> Result<u64, SessionError> {
    let tail = state
        .store
        .tail(p)
        .await
        .map_err(|e| SessionError::Feed(e.to_string()))?;
    Ok(tail.sequence)
}

/// Whether a feed was refused because the changes asked for are compacted.
fn is_compacted(status: Option<&tonic::Status>) -> bool {
    status.is_some_and(|s| s.code() == tonic::Code::OutOfRange)
}

/// Installs the snapshot of `p`'s compacted feed from `source`: the next
/// session follows the feed from its end.
async fn install_snapshot(
    state: &Arc<Federation>,
    p: Province,
    source: &Source,
    log_key: &str,
) -> Result<(), SessionError> {
    let feed = |e: anyhow::Error| SessionError::Feed(format!("snapshot of {p}: {e:#}"));
    let after = held_through(state, p).await?;
    let deadline = state.peers.deadline() + crate::client::CONNECT_TIMEOUT;
    let mut messages = state
        .peers
        .call_at(
            source.province,
            &source.endpoint,
            deadline,
            "feed snapshot from",
            |call| async move {
                FederationServiceClient::new(call.channel)
                    .max_decoding_message_size(MAX_BATCH_BYTES)
                    .get_snapshot(GetSnapshotRequest {
                        issuer: p.to_string(),
                        after_sequence: after,
                    })
                    .await
                    .map(|r| r.into_inner())
            },
        )
        .await
        .map_err(SessionError::Call)?;
    let first = snapshot::next_message(&mut messages)
        .await
        .map_err(feed)?
        .ok_or_else(|| SessionError::Feed("the snapshot stream ended before it began".into()))?
        .part
        .unwrap_or_default();
    let end = snapshot::install(&state.store, p, log_key, first, &mut messages, |m| {
        m.part.unwrap_or_default()
    })
    .await
    .map_err(feed)?;
    tracing::info!(province = %p, from = %source.endpoint, sequence = end.sequence, "installed the snapshot of a compacted feed; following it from there");
    Ok(())
}

/// Fetches `p`'s published keys from `p` when its head says they changed
/// (rotation, revocation), so codes signed with a new key verify at once and
/// a revoked key is refused at once, without waiting for a trust list.
async fn refresh_keys_if_changed(
    state: &Arc<Federation>,
    p: Province,
    endpoint: &str,
    digest: &[u8],
) {
    {
        let known = state.key_digests.lock().expect("digest lock");
        if known.get(&p).map(|d| d.as_slice()) == Some(digest) {
            return;
        }
    }
    let request = GetJwksRequest {
        province: p.to_string(),
    };
    let reply = match state
        .peers
        .call_at(
            p,
            endpoint,
            state.peers.deadline(),
            "key fetch from",
            |call| {
                let request = call.request(request.clone());
                async move {
                    StatusLookupServiceClient::new(call.channel)
                        .get_jwks(request)
                        .await
                }
            },
        )
        .await
    {
        Ok(r) => r.into_inner(),
        Err(err) => {
            tracing::debug!(province = %p, error = %err, "fetching keys failed");
            return;
        }
    };
    // The answer must be what the province signed the digest of in its head.
    let published = hufu_federation::feed::keys_digest(
        &reply.jwks_json,
        &reply.revoked_kids,
        &reply.revoked_serials,
    );
    if published.as_slice() != digest {
        tracing::debug!(province = %p, "published keys do not match the signed head yet; retrying with the next head");
        return;
    }
    let Ok(mut jwks) = serde_json::from_str::<Jwks>(&reply.jwks_json) else {
        tracing::warn!(province = %p, "province published an unreadable JWKS");
        return;
    };
    // Keys listed in the trust list stay accepted unless revoked.
    let mut revoked = reply.revoked_kids.clone();
    if let Some(member) = state.peers.members().member(p) {
        for key in &member.jwks.keys {
            if jwks.find(&key.kid).is_none() && !revoked.contains(&key.kid) {
                jwks.keys.push(key.clone());
            }
        }
        revoked.extend(member.revoked_kids.iter().cloned());
        revoked.sort();
        revoked.dedup();
    }
    // Revoked certificates of `p` are refused from now on, here too.
    if state
        .standing
        .set_revoked(p, reply.revoked_serials.iter().cloned())
    {
        tracing::warn!(province = %p, revoked = reply.revoked_serials.len(), "certificate revocations of a member put in force");
        if let Err(err) = state.store.put_revoked(p, &reply.revoked_serials) {
            tracing::error!(province = %p, error = %err, "revocations not kept on disk; they stay in force until a restart");
        }
    }
    match state.codes.verifier.set_issuer_keys(p, &jwks, &revoked) {
        Ok(()) => {
            state
                .key_digests
                .lock()
                .expect("digest lock")
                .insert(p, digest.to_vec());
            tracing::info!(province = %p, keys = jwks.keys.len(), revoked = revoked.len(), "code keys refreshed");
        }
        Err(err) => tracing::warn!(province = %p, error = %err, "published code keys refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failed_sessions_back_off_doubling_to_the_cap_and_a_good_one_resets() {
        let stop = CancellationToken::new();
        let mut backoff = Backoff::default();
        let start = tokio::time::Instant::now();
        // Failures in a row: 100, 200, ... ms, then the cap.
        let mut waited = Duration::ZERO;
        for expected in [100, 200, 400, 800, 1600, 2000, 2000] {
            let pause = backoff.grow();
            assert_eq!(pause, Duration::from_millis(expected));
            assert!(!sleep_or_stop(&stop, pause).await);
            waited += pause;
        }
        assert_eq!(start.elapsed(), waited, "each pause is slept in full");
        assert_eq!(backoff.reset(), FIRST_BACKOFF);
        assert_eq!(backoff.grow(), FIRST_BACKOFF * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_at_once_when_the_node_stops() {
        let stop = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            stopper.cancel();
        });
        assert!(sleep_or_stop(&stop, MAX_BACKOFF).await);
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[test]
    fn a_feed_is_reported_interrupted_down_and_back_once_each() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let mut link = Link::new(t);
        // Peers start in any order: silence at start is not reported at once.
        assert_eq!(link.failed(t + s), None);
        assert_eq!(link.delivered(t + 2 * s), None);
        // A running feed that stops is said at once, and only once.
        assert_eq!(link.failed(t + 10 * s), Some(LinkEvent::Interrupted));
        assert_eq!(link.failed(t + 12 * s), None);
        // Still silent after DOWN_AFTER: an outage, said once.
        assert_eq!(link.failed(t + 40 * s), Some(LinkEvent::Down(30 * s)));
        assert_eq!(link.failed(t + 50 * s), None);
        assert_eq!(link.delivered(t + 60 * s), Some(LinkEvent::Back(50 * s)));
        assert_eq!(link.delivered(t + 61 * s), None);
        // A peer never reached since start is down after DOWN_AFTER too.
        let mut link = Link::new(t);
        assert_eq!(link.failed(t + 29 * s), None);
        assert_eq!(link.failed(t + 31 * s), Some(LinkEvent::Down(31 * s)));
    }
}
