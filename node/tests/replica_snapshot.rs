//! Replicas behind what the province's write log keeps: with a stream
//! limited to a few writes (real nats-server processes), a new empty
//! replica and one that was stopped while the stream moved on catch up from
//! another replica's snapshot, then follow the stream, and end with the
//! same feed (numbers and chain), statuses, keyring and answers as the
//! others, also when the replica asked compacted its change log, and decide
//! writes of the snapshot's holders as the others do. Only nodes of the
//! province itself get a replica snapshot.

mod common;

use common::replicas::{CONVERGE_WITHIN, PEER, own_changes, put, replicated_with, terminal};
use common::{eventually, province};
use hufu_node::local::LocalProvince;
use hufu_node::status::{now_millis, now_unix, timestamp};
use hufu_node::store::StoredChange;
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{Colour, GetReplicaSnapshotRequest, LookupRequest, PutStatusRequest, Verdict};

/// Writes the stream keeps in these tests.
const KEPT: u64 = 8;

fn state(r: &LocalProvince) -> &hufu_node::state::NodeState {
    &r.node.as_ref().unwrap().state
}

/// A replica's feed of its province: the compacted part's statement and
/// kept changes, and the changes after it.
type Feed = (
    Option<hufu_proto::v1::FeedSnapshot>,
    Vec<(u64, Vec<u8>)>,
    Vec<StoredChange>,
);

/// `None` while a snapshot is being installed at `r`: its compacted part
/// and the changes after it are read one after the other, and the install
/// may move the boundary between the two reads.
fn feed(r: &LocalProvince) -> Option<Feed> {
    let store = &state(r).store;
    let base = store.base(r.province).ok()?;
    let through = base.as_ref().map_or(0, |b| b.through());
    let kept = match &base {
        Some(b) => store.kept_changes(r.province, b, 0, usize::MAX).ok()?,
        None => Vec::new(),
    };
    let after = store
        .changes(r.province, through, u64::MAX, usize::MAX)
        .ok()?;
    Some((base.map(|b| b.snapshot), kept, after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_and_a_stopped_one_catch_up_past_the_streams_limit_from_a_snapshot() {
    let (_scratch, mut fed) = replicated_with(3, &[], |c| c.max_messages = KEPT).await;
    fed.federation.start_all().await.unwrap();
    fed.write_log_ready().await.unwrap();
    let gd = fed.province();
    fed.start_replica(0).await.unwrap();
    let first = fed.federation.get(gd);
    for n in 0..4 {
        put(first, n, Colour::Green).await.unwrap();
    }
    let second = &fed.replicas[0];
    eventually(CONVERGE_WITHIN, || async {
        (own_changes(second).len() == 4).then_some(())
    })
    .await;
    fed.replicas[0].stop().await.unwrap();

    // While the second replica is stopped: a key rotation and far more
    // writes than the stream keeps.
    let first = fed.federation.get(gd);
    let rotated = common::rotate_key(first).await;
    for n in 4..34 {
        put(first, n, common::colour_of(n)).await.unwrap();
    }
    let log = state(first).write_log.clone().unwrap();
    let (first_kept, last) = log.kept().await.unwrap();
    assert!(
        first_kept > 5,
        "the stream still holds position {first_kept}"
    );
    assert!(last - first_kept < KEPT, "{first_kept}..={last}");

    // The first replica compacts its change log up to change 30: the
    // snapshots it gives begin with the compacted part.
    assert_eq!(own_changes(first).len(), 34);
    let signer = state(first).log_signer.clone();
    assert!(
        state(first)
            .store
            .compact_own(now_millis() + 1, &signer)
            .await
            .unwrap()
            .is_some()
    );
    let expected = feed(first).expect("the first replica's feed");
    assert!(expected.0.is_some());

    // The stopped replica and a new, empty one start.
    for n in 0..2 {
        fed.start_replica(n).await.unwrap();
    }
    let first = fed.federation.get(gd);
    let head = state(first).store.tail(gd).await.unwrap();
    assert_eq!(head.sequence, 34);
    for r in &fed.replicas {
        // The keyring is installed after the feed's changes.
        eventually(CONVERGE_WITHIN, || async {
            let keyring = state(r)
                .codes
                .keyring
                .read()
                .unwrap()
                .active_kid()
                .to_owned();
            // Converged: the same changes, keyring and tail (once, in six
            // runs, the changes matched while the tail did not yet).
            let tail = state(r).store.tail(gd).await.ok();
            (feed(r).as_ref() == Some(&expected)
                && keyring == rotated.kid
                && tail.as_ref() == Some(&head))
            .then_some(())
        })
        .await;
        assert_eq!(state(r).store.tail(gd).await.unwrap(), head);
        assert_eq!(
            state(r).codes.own_keys_digest(),
            state(first).codes.own_keys_digest()
        );
        // The same answers: every holder's status, and a code signed with
        // the rotated key at the first replica verifies here.
        for n in 0..34 {
            let reply = terminal(r, first)
                .await
                .lookup(LookupRequest {
                    issuer: gd.to_string(),
                    holder: common::pseudonym(first, n),
                })
                .await
                .unwrap()
                .into_inner();
            let colour = if n < 4 {
                Colour::Green
            } else {
                common::colour_of(n)
            };
            assert_eq!(
                reply.record.unwrap().colour,
                colour as i32,
                "holder {n} at {}",
                r.config.node_name
            );
        }
        let code = common::issue_code(first, 7).await;
        assert_eq!(code.kid, rotated.kid);
        let verdict = common::verify_as(r, first, &code.token).await;
        assert_eq!(verdict.verdict(), Verdict::Valid, "{}", verdict.reason);
    }

    // Both follow the stream from the snapshot on: a write taken by the new
    // replica is the feed's next change everywhere.
    let third = &fed.replicas[1];
    let sequence = put(third, 40, Colour::Red).await.unwrap();
    assert_eq!(sequence, 35);
    let expected = eventually(CONVERGE_WITHIN, || async {
        feed(first).filter(|f| f.2.last().is_some_and(|c| c.0 == 35))
    })
    .await;
    for r in &fed.replicas {
        eventually(CONVERGE_WITHIN, || async {
            (feed(r).as_ref() == Some(&expected)).then_some(())
        })
        .await;
    }

    // The new replica's filter of the holders it holds has the snapshot's:
    // an older status of holder 7 (a kept change of the compacted part),
    // taken by it, is refused as stale and changes nothing, as at the
    // replica that wrote it. (Taken for a holder never stored, it was
    // stored over the newer one, there only.)
    let mut older = common::sample_input(gd, 7, Colour::Red);
    older.as_of = Some(timestamp(now_unix() - 7200));
    let refused = third
        .admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(older),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("stored status is newer"),
        "{}",
        refused.message()
    );
    for r in fed.replicas.iter().chain([fed.federation.get(gd)]) {
        assert_eq!(state(r).store.tail(gd).await.unwrap().sequence, 35);
    }
    fed.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_another_province_gets_no_replica_snapshot() {
    let (_scratch, mut fed) = replicated_with(1, &[], |c| c.max_messages = KEPT).await;
    fed.federation.start_all().await.unwrap();
    fed.write_log_ready().await.unwrap();
    let gd = fed.province();
    let first = fed.federation.get(gd);
    put(first, 1, Colour::Green).await.unwrap();
    let endpoint = first.target().unwrap().endpoint;

    // The peer province's node, with its own node certificate, over the
    // same mutual TLS a replica uses.
    let peer = fed.federation.get(province(PEER));
    let asked = state(peer)
        .peers
        .call_at(
            gd,
            &endpoint,
            std::time::Duration::from_secs(5),
            "replica snapshot from",
            |call| async move {
                FederationServiceClient::new(call.channel)
                    .get_replica_snapshot(GetReplicaSnapshotRequest {
                        issuer: gd.to_string(),
                        after_sequence: 0,
                    })
                    .await
                    .map(|r| r.into_inner())
            },
        )
        .await;
    let refused = asked.err().and_then(|e| e.refusal().cloned()).unwrap();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("own province"),
        "{}",
        refused.message()
    );
    fed.stop_all().await.unwrap();
}
