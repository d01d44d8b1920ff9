//! A compacted change log: behind the retention window only each holder's
//! latest change stays, under the issuer's signed snapshot statement. A new
//! member and a member that fell behind reach exactly the issuer's state
//! from it (statuses, feed head, a code's verdict), and follow the feed on.

mod common;

use common::{eventually, issue_code, province, quick_federation, sample_input};
use hufu_node::local::LocalProvince;
use hufu_node::status::{now_millis, now_unix, timestamp};
use hufu_proto::v1::{Colour, PutStatusRequest, StatusRecord, Verdict};
use prost::Message;
use std::time::Duration;

const GD: &str = "440000";
const BJ: &str = "110000";
const SX: &str = "610000";
const WITHIN: Duration = Duration::from_secs(20);
/// Holders imported first: enough for the statuses to fill many buckets,
/// which split as they grow.
const IMPORTED: u64 = 1000;

/// Puts sample holder `n` at `p` as of now (later than any earlier write
/// or code of the holder).
async fn put(p: &LocalProvince, n: u64, colour: Colour) {
    let mut status = sample_input(p.province, n, colour);
    status.as_of = Some(timestamp(now_unix()));
    p.admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(status),
        })
        .await
        .unwrap();
}

fn store(p: &LocalProvince) -> &hufu_node::store::Store {
    &p.node.as_ref().unwrap().state.store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_member_and_a_fallen_behind_one_reach_the_issuers_state_from_a_compacted_log() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = quick_federation(scratch.path(), &[GD, BJ, SX], |_| {});
    let gd = province(GD);
    fed.start(gd).await.unwrap();
    fed.start(province(BJ)).await.unwrap();
    common::import_samples(fed.get(gd), IMPORTED).await;
    for n in 0..10 {
        put(fed.get(gd), n, Colour::Green).await;
    }
    // A code of holder 5 while green, still valid throughout the test.
    let code = issue_code(fed.get(gd), 5).await;
    eventually(WITHIN, || async {
        let held = store(fed.get(province(BJ))).tail(gd).await.unwrap();
        (held.sequence == IMPORTED + 10).then_some(())
    })
    .await;
    fed.get_mut(province(BJ)).stop().await.unwrap();

    // While Beijing is away: holder 5 turns red, three turn yellow, four
    // are new; then the issuer compacts everything written so far.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put(fed.get(gd), 5, Colour::Red).await;
    for n in 0..3 {
        put(fed.get(gd), n, Colour::Yellow).await;
    }
    for n in 10..14 {
        put(fed.get(gd), n, Colour::Green).await;
    }
    let issuer = fed.get(gd);
    let signer = issuer.node.as_ref().unwrap().state.log_signer.clone();
    let through = store(issuer)
        .compact_own(now_millis() + 1, &signer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(through, IMPORTED + 18);
    // One change per holder stays: each holder's latest (all of them
    // imported, some changed since).
    let base = store(issuer).base(gd).unwrap().unwrap();
    assert_eq!(base.snapshot.kept, IMPORTED);
    let kept = store(issuer)
        .kept_changes(gd, &base, 0, usize::MAX)
        .unwrap();
    assert_eq!(kept.len() as u64, IMPORTED);
    for (_, bytes) in &kept {
        let record = StatusRecord::decode(bytes.as_slice()).unwrap();
        let current = store(issuer).get(gd, &record.holder).unwrap();
        assert_eq!(current.as_ref(), Some(&record));
    }
    assert!(store(issuer).changes(gd, 0, through, 10).is_err());
    // The feed goes on after the compacted part.
    put(fed.get(gd), 20, Colour::Red).await;
    put(fed.get(gd), 7, Colour::Yellow).await;

    // Beijing (behind the compacted part) and Shaanxi (new) start.
    fed.start(province(BJ)).await.unwrap();
    fed.start(province(SX)).await.unwrap();
    let issuer = fed.get(gd);
    let head = store(issuer).tail(gd).await.unwrap();
    assert_eq!(head.sequence, IMPORTED + 20);
    for member in [BJ, SX] {
        let m = fed.get(province(member));
        eventually(WITHIN, || async {
            (store(m).tail(gd).await.unwrap() == head).then_some(())
        })
        .await;
        for n in 0..IMPORTED {
            let holder = common::pseudonym(issuer, n);
            assert_eq!(
                store(m).get(gd, &holder).unwrap(),
                store(issuer).get(gd, &holder).unwrap(),
                "holder {n} at {member}"
            );
        }
        assert_eq!(store(m).base(gd).unwrap().unwrap().snapshot, base.snapshot);
        // The code of holder 5 (still valid) is answered with the red
        // status its compacted change holds, not the green it was signed
        // with.
        let reply = common::verify(m, &code.token).await;
        assert_eq!(
            reply.verdict(),
            Verdict::Valid,
            "{member}: {}",
            reply.reason
        );
        assert_eq!(
            reply.status.unwrap().colour,
            Colour::Red as i32,
            "{member}: {}",
            reply.reason
        );
    }

    // Both follow the feed from there.
    put(fed.get(gd), 21, Colour::Green).await;
    let head = store(fed.get(gd)).tail(gd).await.unwrap();
    for member in [BJ, SX] {
        let m = fed.get(province(member));
        eventually(WITHIN, || async {
            (store(m).tail(gd).await.unwrap() == head).then_some(())
        })
        .await;
    }
    fed.stop_all().await.unwrap();
}
