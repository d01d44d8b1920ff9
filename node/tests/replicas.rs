//! A province of three node replicas sharing one write log on a real
//! three-server NATS JetStream cluster: writes taken by any replica are
//! applied everywhere in one order, keys rotate at all replicas at once,
//! and a write log without quorum refuses writes while reads go on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::replicas::{
    CONVERGE_WITHIN, PEER, RECOVER_WITHIN, own_changes, put, replicated, terminal,
};
use common::{Serve, eventually, province};
use hufu_node::local::LocalProvince;
use hufu_node::store::Store;
use hufu_proto::v1::{Colour, LookupRequest, Verdict};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_different_replicas_are_applied_everywhere_in_one_order() {
    let (_scratch, mut fed) = replicated(3).await;
    fed.start_all().await.unwrap();
    let replicas = fed.all_replicas();
    let first = replicas[0];

    // Every replica takes writes; each is read back at once where it was
    // taken, and numbered in the province's one feed.
    let mut sequences = Vec::new();
    for n in 0..12u64 {
        let taker = replicas[n as usize % 3];
        let sequence = put(taker, n, common::colour_of(n)).await.unwrap();
        sequences.push(sequence);
        let stored = taker
            .node
            .as_ref()
            .unwrap()
            .state
            .store
            .get(taker.province, &common::pseudonym(taker, n))
            .unwrap();
        assert!(
            stored.is_some(),
            "write {n} not readable where it was taken"
        );
    }
    assert_eq!(sequences, (1..=12).collect::<Vec<_>>());

    // Every replica holds the same change log: same numbers, same chain.
    let expected = eventually(CONVERGE_WITHIN, || async {
        Some(own_changes(first)).filter(|c| c.len() == 12)
    })
    .await;
    for r in &replicas {
        eventually(CONVERGE_WITHIN, || async {
            (own_changes(r) == expected).then_some(())
        })
        .await;
    }

    // Each replica keeps its own audit log, under its own origin, and the
    // peer witnesses all of them: none is taken for a rewrite of another.
    let mut origins = Vec::new();
    for r in &replicas {
        let state = &r.node.as_ref().unwrap().state;
        let cosigned = eventually(CONVERGE_WITHIN, || async {
            let cp = state.audit.log().unwrap().latest_published().unwrap()?;
            (!cp.cosignatures().is_empty()).then_some(cp)
        })
        .await;
        origins.push(cosigned.checkpoint().origin.clone());
    }
    origins.dedup();
    assert_eq!(origins.len(), 3, "{origins:?}");
    let peer_state = &fed
        .federation
        .get(province(PEER))
        .node
        .as_ref()
        .unwrap()
        .state;
    assert_eq!(peer_state.audit.witness().unwrap().conflicts().unwrap(), 0);

    // The peer province replicates the same feed.
    let peer = fed.federation.get(province(PEER));
    let peer_store = &peer.node.as_ref().unwrap().state.store;
    eventually(CONVERGE_WITHIN, || async {
        (peer_store
            .changes(fed.province(), 0, u64::MAX, usize::MAX)
            .unwrap()
            == expected)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_rotated_and_revoked_through_one_replica_change_at_every_replica() {
    let (_scratch, mut fed) = replicated(3).await;
    fed.start_all().await.unwrap();
    let first = fed.federation.get(fed.province());
    let others = &fed.replicas;
    put(first, 1, Colour::Green).await.unwrap();
    let before = common::issue_code(first, 1).await;

    let rotated = common::rotate_key(&others[0]).await;
    assert_ne!(rotated.kid, rotated.previous_kid);

    // The new key signs at every replica...
    for r in [first, &others[0], &others[1]] {
        let keyring_kid = eventually(CONVERGE_WITHIN, || async {
            let state = &r.node.as_ref().unwrap().state;
            let kid = state.codes.keyring.read().unwrap().active_kid().to_owned();
            // Published (to the verifier too) once the keyring has it.
            let published = state
                .codes
                .own_published_keys()
                .jwks_json
                .contains(&rotated.kid);
            (kid == rotated.kid && published).then_some(kid)
        })
        .await;
        assert_eq!(keyring_kid, rotated.kid);
    }
    // ...and a code it signed at one replica verifies at each.
    for r in [first, &others[0], &others[1]] {
        let code = common::issue_code(r, 1).await;
        assert_eq!(code.kid, rotated.kid);
        for verifier in [first, &others[0], &others[1]] {
            let reply = common::verify_as(verifier, first, &code.token).await;
            assert_eq!(reply.verdict(), Verdict::Valid, "{}", reply.reason);
        }
    }
    // The retired key is revoked through the third replica: its codes stop
    // verifying at all of them.
    others[1]
        .admin()
        .await
        .unwrap()
        .revoke_key(hufu_proto::v1::RevokeKeyRequest {
            kid: rotated.previous_kid.clone(),
        })
        .await
        .unwrap();
    for verifier in [first, &others[0], &others[1]] {
        eventually(CONVERGE_WITHIN, || async {
            let reply = common::verify_as(verifier, first, &before.token).await;
            (reply.verdict() != Verdict::Valid).then_some(())
        })
        .await;
    }
    // All three publish the same keys.
    let digests: Vec<_> = [first, &others[0], &others[1]]
        .iter()
        .map(|r| r.node.as_ref().unwrap().state.codes.own_keys_digest())
        .collect();
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas publish different keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_nats_quorum_writes_fail_unavailable_and_lookups_go_on() {
    let (_scratch, mut fed) = replicated(2).await;
    fed.start_all().await.unwrap();
    let first = fed.federation.get(fed.province());
    let others = &fed.replicas;
    put(first, 1, Colour::Yellow).await.unwrap();
    let holder = common::pseudonym(first, 1);
    eventually(CONVERGE_WITHIN, || async {
        let state = &others[0].node.as_ref().unwrap().state;
        state.store.get(state.province, &holder).unwrap()
    })
    .await;

    fed.nats.kill(0);
    fed.nats.kill(1);
    for r in [first, &others[0]] {
        let refused = put(r, 2, Colour::Red).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("write log"),
            "{}",
            refused.message()
        );
        let looked_up = terminal(r, first)
            .await
            .lookup(LookupRequest {
                issuer: r.province.to_string(),
                holder: holder.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(looked_up.record.unwrap().colour, Colour::Yellow as i32);
    }

    // Quorum back: writes are taken again.
    fed.nats.start_server(0).unwrap();
    fed.nats.start_server(1).unwrap();
    fed.nats.wait_ready(Duration::from_secs(30)).await.unwrap();
    eventually(RECOVER_WITHIN, || async {
        put(&others[0], 2, Colour::Red).await.ok()
    })
    .await;
}

/// Puts sample holders `n` (n ≡ `lane` mod 3) through `replica` one after
/// another until `stop`, and returns those acknowledged; failures (the
/// replica or a NATS server is down) are not acknowledged, and skipped.
async fn write_lane(replica: LocalProvince, lane: u64, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut acked = Vec::new();
    for n in (lane..).step_by(3) {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let written = tokio::time::timeout(
            Duration::from_secs(5),
            put(&replica, n, common::colour_of(n)),
        )
        .await;
        if let Ok(Ok(_)) = written {
            acked.push(n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_replica_and_of_a_nats_server_loses_no_acknowledged_write() {
    let (scratch, mut fed) = replicated(3).await;
    fed.federation.start_all().await.unwrap();
    fed.write_log_ready().await.unwrap();
    let logs = scratch.path().to_owned();
    // Replicas 2 and 3 are `hufu serve` processes, so that one can be killed:
    // each binds its configured port itself, released just before.
    fed.release_listeners();
    let mut processes: Vec<Serve> = fed
        .replica_configs
        .iter()
        .enumerate()
        .map(|(i, c)| Serve::start(c, &logs.join(format!("serve-{i}.log"))))
        .collect();
    let others = &fed.replicas;
    for r in others {
        eventually(CONVERGE_WITHIN, || async { r.admin().await.ok() }).await;
    }
    let first = fed.federation.get(fed.province());

    // Three writers, one per replica, while one replica and one NATS server
    // are killed with SIGKILL.
    let stop = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = [first, &others[0], &others[1]]
        .into_iter()
        .enumerate()
        .map(|(lane, r)| {
            let r = LocalProvince {
                province: r.province,
                dir: r.dir.clone(),
                config: {
                    let mut c = r.config.clone();
                    c.client.endpoint = r.target().unwrap().endpoint;
                    c
                },
                node: None,
            };
            tokio::spawn(write_lane(r, lane as u64, stop.clone()))
        })
        .collect();
    let acked_at_first = || {
        let state = &first.node.as_ref().unwrap().state;
        let changes = state
            .store
            .changes(state.province, 0, u64::MAX, usize::MAX)
            .unwrap();
        changes.len()
    };
    eventually(CONVERGE_WITHIN, || async {
        (acked_at_first() >= 20).then_some(())
    })
    .await;
    processes[0].0.kill().unwrap();
    processes[0].0.wait().unwrap();
    fed.nats.kill(0);
    let at_kill = acked_at_first();
    // The survivors keep taking writes.
    eventually(RECOVER_WITHIN, || async {
        (acked_at_first() >= at_kill + 20).then_some(())
    })
    .await;
    processes[0] = Serve::start(&fed.replica_configs[0], &logs.join("serve-0-again.log"));
    let at_restart = acked_at_first();
    eventually(RECOVER_WITHIN, || async {
        (acked_at_first() >= at_restart + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for lane in lanes {
        acked.extend(lane.await.unwrap());
    }
    assert!(
        acked.len() >= 40,
        "only {} writes acknowledged",
        acked.len()
    );

    // The restarted replica catches up: every acknowledged write is at
    // every replica.
    for r in [first, &others[0], &others[1]] {
        for &n in &acked {
            let holder = common::pseudonym(first, n);
            let record = eventually(CONVERGE_WITHIN, || async {
                let mut admin = r.admin().await.ok()?;
                let reply = admin
                    .get_status(hufu_proto::v1::GetStatusRequest {
                        subject: Some(hufu_proto::v1::get_status_request::Subject::Holder(
                            holder.clone(),
                        )),
                    })
                    .await
                    .ok()?;
                reply.into_inner().record
            })
            .await;
            assert_eq!(record.colour, common::colour_of(n) as i32, "holder {n}");
        }
    }

    // And all hold the same change log, in the same order.
    let expected = own_changes(first);
    drop(processes);
    for r in others {
        let store = Store::open(&r.config.path(&r.config.data_dir), r.province).unwrap();
        assert_eq!(
            store.changes(r.province, 0, u64::MAX, usize::MAX).unwrap(),
            expected,
            "replica {} differs",
            r.config.node_name
        );
    }
}

fn hufu(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hufu"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn hufu_init_replica_of_makes_a_node_of_the_same_province_with_its_own_identity() {
    let scratch = tempfile::tempdir().unwrap();
    let first = scratch.path().join("gd-1");
    let second = scratch.path().join("gd-2");
    let out = hufu(&[
        "init",
        "--province",
        "440000",
        "--dir",
        first.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");

    // Without NATS servers named anywhere, it says what to add.
    let out = hufu(&[
        "init",
        "--replica-of",
        first.to_str().unwrap(),
        "--node-name",
        "node-2",
        "--dir",
        second.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nats"),
        "{out:?}"
    );
    // Nor under the same node name.
    let out = hufu(&[
        "init",
        "--replica-of",
        first.to_str().unwrap(),
        "--nats",
        "nats://127.0.0.1:4222",
        "--dir",
        second.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("its own node name"),
        "{out:?}"
    );

    let out = hufu(&[
        "init",
        "--replica-of",
        first.to_str().unwrap(),
        "--node-name",
        "node-2",
        "--nats",
        "nats://127.0.0.1:4222",
        "--listen",
        "127.0.0.1:7444",
        "--metrics-listen",
        "127.0.0.1:9465",
        "--dir",
        second.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let a = hufu_node::config::NodeConfig::load(&first.join("hufu.toml")).unwrap();
    let b = hufu_node::config::NodeConfig::load(&second.join("hufu.toml")).unwrap();
    assert_eq!((b.province, b.node_name.as_str()), (a.province, "node-2"));
    assert_eq!(
        b.replication.as_ref().unwrap().servers,
        ["nats://127.0.0.1:4222"]
    );
    let read =
        |c: &hufu_node::config::NodeConfig, p: &std::path::Path| std::fs::read(c.path(p)).unwrap();
    // The province's secrets are the same; the node's certificate is its own.
    assert_eq!(read(&a, &a.holder_secret), read(&b, &b.holder_secret));
    assert_eq!(read(&a, &a.log_key), read(&b, &b.log_key));
    assert_ne!(read(&a, &a.node_cert), read(&b, &b.node_cert));
    assert!(
        !second.join("ca/ca.key").exists(),
        "the CA key stays with the node it was made from"
    );
}
