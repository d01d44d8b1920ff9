//! A province of several node replicas on a real three-server JetStream
//! cluster (nats-server processes on loopback), beside a peer province.

use std::time::Duration;

use hufu_certs::Role;
use hufu_node::config::ReplicationConfig;
use hufu_node::local::LocalProvince;
use hufu_node::local::replicas::ReplicatedFederation;
use hufu_node::store::StoredChange;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{Colour, PutStatusRequest};
use tonic::transport::Channel;

/// The replicated province and its peer.
pub const REPLICATED: &str = "440000";
pub const PEER: &str = "110000";

/// Polls for at most this long for replicas to converge.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(20);

/// Polls for at most this long for writes to resume after a NATS server or
/// a replica was killed or came back: NATS elects new stream and meta
/// leaders and clients reconnect with back-off, which on a busy machine can
/// take longer than convergence. What such a step checks is that writes
/// resume, not how fast.
pub const RECOVER_WITHIN: Duration = Duration::from_secs(90);

/// The NATS cluster, the federation (quick settings) and `replicas` nodes
/// of the replicated province in all, none started; writes give up after
/// 2 s, audit checkpoints every 200 ms. The scratch directory outlives the federation when dropped after it.
pub async fn replicated(replicas: usize) -> (tempfile::TempDir, ReplicatedFederation) {
    replicated_declaring(replicas, &[]).await
}

/// As [`replicated`], with the legacy code formats the replicated province
/// declares.
pub async fn replicated_declaring(
    replicas: usize,
    formats: &[hufu_federation::legacy::LegacyFormat],
) -> (tempfile::TempDir, ReplicatedFederation) {
    replicated_with(replicas, formats, |_| {}).await
}

/// As [`replicated_declaring`], with `tune` adjusting the `[replication]`
/// of every replica.
pub async fn replicated_with(
    replicas: usize,
    formats: &[hufu_federation::legacy::LegacyFormat],
    tune: impl Fn(&mut ReplicationConfig),
) -> (tempfile::TempDir, ReplicatedFederation) {
    let scratch = tempfile::tempdir().unwrap();
    let provinces = [super::province(REPLICATED), super::province(PEER)];
    let fed = ReplicatedFederation::init_declaring(
        scratch.path(),
        &provinces,
        &[(super::province(REPLICATED), formats.to_vec())],
        replicas,
        |servers| {
            // The default acknowledgement timeout (5 s): on a loaded test
            // machine applying a write just published may take over 2 s.
            let mut config = ReplicationConfig::new(servers);
            tune(&mut config);
            config
        },
        |c| {
            super::quick(c);
            c.audit.checkpoint_secs = 0.2;
        },
    )
    .await
    .unwrap();
    (scratch, fed)
}

/// The replica's own province's change log, all of it.
pub fn own_changes(p: &LocalProvince) -> Vec<StoredChange> {
    let store = &p.node.as_ref().unwrap().state.store;
    store.changes(p.province, 0, u64::MAX, usize::MAX).unwrap()
}

/// A terminal of the province at replica `r`, its certificate issued by the
/// CA in the first replica's directory (the others do not hold the CA key).
pub async fn terminal(
    r: &LocalProvince,
    first: &LocalProvince,
) -> StatusLookupServiceClient<Channel> {
    let cert = first.client_cert(Role::Terminal, "gate").unwrap();
    StatusLookupServiceClient::new(r.channel_as(&cert).await.unwrap())
}

/// The colour of `p`'s own holder `n`, as a terminal of `p` looks it up.
pub async fn colour_of(p: &LocalProvince, n: u64) -> i32 {
    let reply = p
        .terminal("gate")
        .await
        .unwrap()
        .lookup(hufu_proto::v1::LookupRequest {
            issuer: p.province.to_string(),
            holder: super::pseudonym(p, n),
        })
        .await
        .unwrap()
        .into_inner();
    reply.record.unwrap().colour
}

/// Puts sample holder `n` through replica `p`; returns its change number.
pub async fn put(p: &LocalProvince, n: u64, colour: Colour) -> Result<u64, tonic::Status> {
    let mut admin = p
        .admin()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = admin
        .put_status(PutStatusRequest {
            status: Some(super::sample_input(p.province, n, colour)),
        })
        .await?;
    Ok(reply.into_inner().sequence)
}

/// Puts sample holder `n` through replica `p` as an operator would: sent
/// again while the province's write log refuses it with UNAVAILABLE (its
/// stream still being made or electing a leader, which on a busy machine
/// can outlast a write's timeout), for at most [`RECOVER_WITHIN`]. Returns
/// its change number (0, unchanged, if a refused attempt was stored after
/// all); any other refusal fails the test.
pub async fn put_until_taken(p: &LocalProvince, n: u64, colour: Colour) -> u64 {
    super::eventually(RECOVER_WITHIN, || async {
        match put(p, n, colour).await {
            Ok(sequence) => Some(sequence),
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
                None
            }
        }
    })
    .await
}
