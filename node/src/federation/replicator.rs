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
use hufu_proto::v1::{GetJwksRequest, SubscribeChangesRequest};
use tokio_util::sync::CancellationToken;

use crate::state::NodeState;

/// Largest feed message accepted (a batch of a few thousand changes).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// How long a relay session lasts before the issuer itself is tried again.
const RELAY_SESSION: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where a session pulls from.
struct Source {
    province: Province,
    endpoint: String,
    direct: bool,
}

/// Whether `p`'s own feed reaches this node, for the log lines an operator
/// watches: one when it goes down, one when it comes back.
struct Link {
    p: Province,
    /// Since when the issuer's own feed has not delivered; None while it does.
    down_since: Option<Instant>,
    /// Whether the feed has delivered since this node started.
    ever_up: bool,
    /// Whether "down" has been logged for the current outage.
    reported: bool,
}

/// A peer not reached this long after start is reported down: nodes of a
/// federation start in any order, and a few seconds apart is not an outage.
const DOWN_AT_START: Duration = Duration::from_secs(30);

impl Link {
    fn new(p: Province) -> Link {
        Link {
            p,
            down_since: Some(Instant::now()),
            ever_up: false,
            reported: false,
        }
    }

    fn delivered(&mut self) {
        if let Some(since) = self.down_since.take()
            && self.reported
        {
            tracing::info!(
                province = %self.p,
                "feed from province {} is back after {:.0?}: replicating directly again",
                self.p,
                since.elapsed()
            );
        }
        self.ever_up = true;
        self.reported = false;
    }

    fn failed(&mut self, error: &str) {
        let since = *self.down_since.get_or_insert_with(Instant::now);
        if self.reported || (!self.ever_up && since.elapsed() < DOWN_AT_START) {
            return;
        }
        self.reported = true;
        tracing::warn!(
            province = %self.p, %error,
            "feed from province {} is down: its codes verify from the replica and its feed is caught up through other members meanwhile",
            self.p
        );
    }
}

pub async fn run(state: Arc<NodeState>, p: Province, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    let mut relay_turn = 0usize;
    let mut link = Link::new(p);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(source) = choose_source(&state, p, &mut relay_turn) else {
            // Nobody to ask (a federation of two with the other down).
            if sleep_or_stop(&stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        match session(&state, p, &source, &stop, &mut link).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(err) => {
                if source.direct {
                    state.peers.failure(p);
                    link.failed(&err);
                }
                tracing::debug!(province = %p, from = %source.province, endpoint = %source.endpoint, error = %err, "feed session ended");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if sleep_or_stop(&stop, backoff).await {
            return;
        }
    }
}

/// Returns true if stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

fn choose_source(state: &NodeState, p: Province, relay_turn: &mut usize) -> Option<Source> {
    let membership = state.membership.load_full();
    let issuer = membership.member(p)?;
    if state.peers.allows(p)
        && let Some(endpoint) = issuer.endpoints.first()
    {
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
    *relay_turn = relay_turn.wrapping_add(1);
    let relay = relays[*relay_turn % relays.len()];
    Some(Source {
        province: relay.province,
        endpoint: relay.endpoints[0].clone(),
        direct: false,
    })
}

async fn session(
    state: &Arc<NodeState>,
    p: Province,
    source: &Source,
    stop: &CancellationToken,
    link: &mut Link,
) -> Result<(), String> {
    let log_key = state
        .membership
        .load()
        .member(p)
        .map(|m| m.log_key.clone())
        .ok_or_else(|| format!("{p} left the federation"))?;
    let after = state
        .store
        .tail(p)
        .await
        .map_err(|e| e.to_string())?
        .sequence;
    let channel = state
        .peers
        .channel(source.province, &source.endpoint)
        .map_err(|e| e.to_string())?;
    let mut client =
        FederationServiceClient::new(channel).max_decoding_message_size(MAX_BATCH_BYTES);
    let deadline = state.peers.deadline;
    let call = client.subscribe_changes(SubscribeChangesRequest {
        issuer: p.to_string(),
        after_sequence: after,
    });
    let mut stream = tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    // Heartbeats come about once a second: silence for longer means the
    // source is gone even if the connection looks open.
    let idle = state.heartbeat * 3 + deadline;
    let ends = (!source.direct).then(|| Instant::now() + RELAY_SESSION);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            next = tokio::time::timeout(idle, stream.message()) => next,
        };
        let batch = match next {
            Err(_) => return Err(format!("silent for {idle:?}")),
            Ok(Err(status)) => return Err(status.message().to_owned()),
            Ok(Ok(None)) => return Err("feed ended".into()),
            Ok(Ok(Some(batch))) => batch,
        };
        match state.store.apply_batch(p, &batch, &log_key).await {
            Ok(applied) => {
                state
                    .metrics
                    .feed_changes
                    .inc_by(applied.new_changes as u64);
                if let Some(head) = &batch.head {
                    state.metrics.replica_head_time(p, head.time_ms);
                    if source.direct {
                        link.delivered();
                        state.peers.success(p);
                        refresh_keys_if_changed(state, p, &source.endpoint, &head.keys_digest)
                            .await;
                    }
                }
            }
            Err(err) => {
                state.metrics.feed_refused.inc();
                tracing::warn!(province = %p, from = %source.province, error = %err, "feed batch refused");
                return Err(err.to_string());
            }
        }
        if ends.is_some_and(|e| Instant::now() > e) {
            return Ok(());
        }
    }
}

/// Fetches `p`'s published keys from `p` when its head says they changed
/// (rotation, revocation), so codes signed with a new key verify at once and
/// a revoked key is refused at once, without waiting for a trust list.
async fn refresh_keys_if_changed(
    state: &Arc<NodeState>,
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
    let Ok(channel) = state.peers.channel(p, endpoint) else {
        return;
    };
    let mut request = tonic::Request::new(GetJwksRequest {
        province: p.to_string(),
    });
    request.set_timeout(state.peers.deadline);
    let reply = match StatusLookupServiceClient::new(channel)
        .get_jwks(request)
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            tracing::debug!(province = %p, error = %status.message(), "fetching keys failed");
            return;
        }
    };
    let Ok(mut jwks) = serde_json::from_str::<Jwks>(&reply.jwks_json) else {
        tracing::warn!(province = %p, "province published an unreadable JWKS");
        return;
    };
    // Keys listed in the trust list stay accepted unless revoked.
    let mut revoked = reply.revoked_kids.clone();
    if let Some(member) = state.membership.load().member(p) {
        for key in &member.jwks.keys {
            if jwks.find(&key.kid).is_none() && !revoked.contains(&key.kid) {
                jwks.keys.push(key.clone());
            }
        }
        revoked.extend(member.revoked_kids.iter().cloned());
        revoked.sort();
        revoked.dedup();
    }
    match state.verifier.set_issuer_keys(p, &jwks, &revoked) {
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
