//! Three provinces on loopback with real certificates, real sled and real
//! mutual TLS: codes cross provinces, changes propagate, a province goes down
//! and comes back, and forgeries are refused.

mod common;

use common::eventually;

use std::time::{Duration, Instant};

use hufu_certs::{Identity, LeafOptions, Province, Role};
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::{
    Colour, LookupRequest, OfferTrustListRequest, PutStatusRequest, Source,
    SubscribeChangesRequest, SubscribeChangesResponse, Verdict, VerifyRequest,
};
use tonic::Code;

const SN: &str = "610000";
const GD: &str = "440000";
const TJ: &str = "120000";

fn p(code: &str) -> Province {
    common::province(code)
}

async fn federation(root: &std::path::Path) -> LocalFederation {
    common::logs();
    let mut fed = LocalFederation::init(root, &[p(SN), p(GD), p(TJ)], |c| {
        c.federation.heartbeat_ms = 100;
        c.federation.max_replica_age_secs = 1;
        c.federation.peer_deadline_ms = 300;
        c.federation.gossip_secs = 1;
    })
    .unwrap();
    fed.start_all().await.unwrap();
    fed
}

/// A code for the `n`th sample holder of `province`.
async fn issue(province: &LocalProvince, n: u64) -> String {
    common::issue_code(province, n).await.token
}

async fn lookup_colour(at: &LocalProvince, issuer: &str, holder: &str) -> Option<(i32, i32)> {
    let mut t = at.terminal("gate").await.ok()?;
    let reply = t
        .lookup(LookupRequest {
            issuer: issuer.into(),
            holder: holder.into(),
        })
        .await
        .ok()?
        .into_inner();
    Some((reply.record?.colour, reply.provenance?.source))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_cross_provinces_and_changes_propagate() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = federation(scratch.path()).await;
    let mut holders = std::collections::HashMap::new();
    for code in [SN, GD, TJ] {
        holders.insert(code, common::import_samples(fed.get(p(code)), 6).await);
    }

    // Every province verifies every province's codes from its own terminal.
    for issuer in [SN, GD, TJ] {
        let token = issue(fed.get(p(issuer)), 1).await;
        for at in [SN, GD, TJ] {
            let terminal = fed.get(p(at)).terminal("checkpoint").await.unwrap();
            let reply = eventually(Duration::from_secs(10), || {
                let mut terminal = terminal.clone();
                let token = token.clone();
                async move {
                    let r = terminal
                        .verify(VerifyRequest {
                            token,
                            policy: None,
                            ..Default::default()
                        })
                        .await
                        .ok()?
                        .into_inner();
                    (r.verdict == Verdict::Valid as i32).then_some(r)
                }
            })
            .await;
            let status = reply.status.unwrap();
            assert_eq!(status.issuer, issuer);
            assert_eq!(
                status.colour,
                common::colour_of(1) as i32,
                "{issuer} code at {at}"
            );
            let source = reply.provenance.unwrap().source;
            if at == issuer {
                assert_eq!(source, Source::Authoritative as i32);
            } else {
                assert!(
                    [Source::Replica as i32, Source::Authoritative as i32].contains(&source),
                    "{issuer} code at {at}: source {source}"
                );
            }
            // A terminal of one province may not ask another province's node:
            // its own province's node answers it.
            if at != issuer {
                let cert = fed
                    .get(p(at))
                    .client_cert(Role::Terminal, "roaming")
                    .unwrap();
                let channel =
                    hufu_node::client::connect(&fed.get(p(issuer)).target().unwrap(), &cert)
                        .await
                        .unwrap();
                let err =
                    hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(
                        channel,
                    )
                    .verify(VerifyRequest {
                        token: token.clone(),
                        policy: None,
                        ..Default::default()
                    })
                    .await
                    .unwrap_err();
                assert_eq!(
                    err.code(),
                    Code::PermissionDenied,
                    "{at} terminal at {issuer}"
                );
            }
        }
    }

    // Replicas are complete: GD's holders answer at SN and TJ from replica.
    let gd_holder = holders[GD][0].clone();
    for at in [SN, TJ] {
        let (colour, _) = eventually(Duration::from_secs(10), || async {
            let r = lookup_colour(fed.get(p(at)), GD, &gd_holder).await?;
            (r.1 == Source::Replica as i32).then_some(r)
        })
        .await;
        assert_eq!(colour, Colour::Green as i32);
    }

    // A downgrade at GD reaches SN and TJ; measure how long it takes.
    let started = Instant::now();
    fed.get(p(GD))
        .admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p(GD), 0, Colour::Red)),
        })
        .await
        .unwrap();
    let mut delays = Vec::new();
    for at in [SN, TJ] {
        eventually(Duration::from_secs(10), || async {
            let (colour, _) = lookup_colour(fed.get(p(at)), GD, &gd_holder).await?;
            (colour == Colour::Red as i32).then_some(())
        })
        .await;
        delays.push((at, started.elapsed()));
    }
    eprintln!("propagation of one change from {GD}: {delays:?}");

    // And the still-valid GD code of holder 0 now verifies red at SN.
    let token = issue(fed.get(p(GD)), 0).await;
    let mut terminal = fed.get(p(SN)).terminal("checkpoint").await.unwrap();
    let reply = terminal
        .verify(VerifyRequest {
            token,
            policy: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status.unwrap().colour, Colour::Red as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_province_down_then_back_and_catch_up_through_a_peer() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let gd_holders = common::import_samples(fed.get(p(GD)), 5).await;
    // Holder 1 is yellow; their code is issued now.
    let token = issue(fed.get(p(GD)), 1).await;
    // Wait until SN and TJ hold GD's feed.
    for at in [SN, TJ] {
        eventually(Duration::from_secs(10), || async {
            let r = lookup_colour(fed.get(p(at)), GD, &gd_holders[4]).await?;
            (r.1 == Source::Replica as i32).then_some(r)
        })
        .await;
    }

    // SN goes down; GD changes a holder; TJ receives it.
    fed.get_mut(p(SN)).stop().await.unwrap();
    fed.get(p(GD))
        .admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p(GD), 1, Colour::Red)),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        let (colour, _) = lookup_colour(fed.get(p(TJ)), GD, &gd_holders[1]).await?;
        (colour == Colour::Red as i32).then_some(())
    })
    .await;

    // GD goes down. SN comes back and catches up on GD's feed from TJ.
    fed.get_mut(p(GD)).stop().await.unwrap();
    fed.get_mut(p(SN)).start().await.unwrap();
    let mut sn_terminal = fed.get(p(SN)).terminal("checkpoint").await.unwrap();
    let reply = eventually(Duration::from_secs(15), || {
        let mut t = sn_terminal.clone();
        let token = token.clone();
        async move {
            let r = t
                .verify(VerifyRequest {
                    token,
                    policy: None,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            // Once GD's last signed head is older than the freshness limit
            // and GD cannot be asked, the answer is the stale replica.
            let stale = r.provenance.as_ref()?.source == Source::ReplicaStale as i32;
            (r.status.as_ref()?.colour == Colour::Red as i32 && stale).then_some(r)
        }
    })
    .await;
    // With its age.
    let provenance = reply.provenance.unwrap();
    assert_eq!(provenance.source, Source::ReplicaStale as i32);
    assert!(provenance.age.unwrap().seconds >= 1, "{provenance:?}");
    assert_eq!(reply.verdict, Verdict::Valid as i32);
    // A policy that demands fresh status fails closed.
    let strict = hufu_proto::v1::Policy {
        require_fresh: true,
        ..Default::default()
    };
    let reply = sn_terminal
        .verify(VerifyRequest {
            token: token.clone(),
            policy: Some(strict),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.policy_met);
    assert!(reply.reason.contains("fresh"), "{}", reply.reason);

    // GD comes back with more changes: feeds resume with no gap or duplicate.
    let gd = fed.get_mut(p(GD));
    gd.start().await.unwrap();
    let mut admin = gd.admin().await.unwrap();
    for n in 10..20 {
        admin
            .put_status(PutStatusRequest {
                status: Some(common::sample_input(p(GD), n, Colour::Yellow)),
            })
            .await
            .unwrap();
    }
    let gd_tail = fed
        .get(p(GD))
        .node
        .as_ref()
        .unwrap()
        .state
        .store
        .last_sequence()
        .await;
    for at in [SN, TJ] {
        let node = fed.get(p(at)).node.as_ref().unwrap();
        eventually(Duration::from_secs(15), || async {
            (node.state.store.tail(p(GD)).await.ok()?.sequence == gd_tail).then_some(())
        })
        .await;
        // Every change 1..=tail held exactly once, chained.
        let changes = node
            .state
            .store
            .changes(p(GD), 0, gd_tail, usize::MAX)
            .unwrap();
        let numbers: Vec<u64> = changes.iter().map(|c| c.0).collect();
        assert_eq!(numbers, (1..=gd_tail).collect::<Vec<_>>(), "at {at}");
        // Fresh again: answered from the replica.
        let (_, source) = eventually(Duration::from_secs(10), || async {
            let r = lookup_colour(fed.get(p(at)), GD, &gd_holders[0]).await?;
            (r.1 == Source::Replica as i32).then_some(r)
        })
        .await;
        assert_eq!(source, Source::Replica as i32);
    }
    // SN applied each change once: those it got before going down, from TJ
    // while GD was down, and the new ones.
    let sn = fed.get(p(SN)).node.as_ref().unwrap();
    assert_eq!(sn.state.metrics.feed_refused.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_are_refused_and_the_node_keeps_serving() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = federation(scratch.path()).await;
    let gd_holders = common::import_samples(fed.get(p(GD)), 3).await;

    // --- Feed batches: take real ones from GD's feed, as a node of TJ. ---
    let tj = fed.get(p(TJ));
    let channel = hufu_node::client::connect(
        &fed.get(p(GD)).target().unwrap(),
        &tj.client_cert(Role::Node, "node-1").unwrap(),
    )
    .await
    .unwrap();
    let mut stream = FederationServiceClient::new(channel)
        .subscribe_changes(SubscribeChangesRequest {
            issuer: GD.into(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let genuine: SubscribeChangesResponse = stream.message().await.unwrap().unwrap();
    assert_eq!(genuine.changes.len(), 3);
    drop(stream);

    // Tampered copies, handed straight to SN's store (as a malicious relay
    // would serve them): each is refused whatever SN already holds.
    let sn = fed.get(p(SN)).node.as_ref().unwrap();
    let log_key = sn
        .state
        .peers
        .members()
        .member(p(GD))
        .unwrap()
        .log_key
        .clone();
    let tj_key = sn
        .state
        .peers
        .members()
        .member(p(TJ))
        .unwrap()
        .log_key
        .clone();

    let mut altered = genuine.clone();
    altered.changes[1].record[5] ^= 1;
    let mut reordered = genuine.clone();
    reordered.changes.swap(0, 1);
    let mut dropped = genuine.clone();
    dropped.changes.remove(1);
    let mut bad_sig = genuine.clone();
    bad_sig.head.as_mut().unwrap().signature[0] ^= 1;
    let mut other_issuer = genuine.clone();
    other_issuer.head.as_mut().unwrap().issuer = TJ.into();
    for (what, batch, key) in [
        ("altered record", &altered, &log_key),
        ("reordered changes", &reordered, &log_key),
        ("dropped change", &dropped, &log_key),
        ("bad signature", &bad_sig, &log_key),
        ("signed with another province's key", &genuine, &tj_key),
        ("head of another province", &other_issuer, &log_key),
    ] {
        let err = sn.state.store.apply_batch(p(GD), batch, key).await;
        assert!(err.is_err(), "{what} was accepted");
    }
    // The genuine batch applies (or was already applied by replication), and
    // replaying an older head is refused.
    eventually(Duration::from_secs(10), || async {
        (sn.state.store.tail(p(GD)).await.ok()?.sequence >= 3).then_some(())
    })
    .await;
    fed.get(p(GD))
        .admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p(GD), 7, Colour::Red)),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        (sn.state.store.tail(p(GD)).await.ok()?.sequence >= 4).then_some(())
    })
    .await;
    let replay = sn.state.store.apply_batch(p(GD), &genuine, &log_key).await;
    assert!(
        matches!(
            replay,
            Err(hufu_node::store::ApplyError::Feed(
                hufu_federation::feed::FeedError::Replayed { .. }
            ))
        ),
        "{replay:?}"
    );

    // --- Trust lists: too few signatures, a bad signature, a rollback. ---
    let gd_node = fed.get(p(GD)).node.as_ref().unwrap();
    let current = gd_node
        .state
        .federation
        .trust
        .lock()
        .await
        .as_ref()
        .unwrap()
        .current()
        .clone();
    let mut next = hufu_node::federation::ops::propose(
        &current.list,
        hufu_node::federation::ops::Proposal {
            endpoints: vec![(p(TJ), vec!["127.0.0.1:1".into()])],
            ..Default::default()
        },
    )
    .unwrap();
    hufu_node::federation::ops::sign(&fed.get(p(TJ)).config, &mut next).unwrap();
    let mut admin_fed =
        FederationServiceClient::new(fed.get(p(GD)).channel(Role::Admin, "admin").await.unwrap());
    let err = admin_fed
        .offer_trust_list(OfferTrustListRequest {
            note: next.note().to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("2 are required"),
        "{}",
        err.message()
    );
    // A corrupted signature line.
    hufu_node::federation::ops::sign(&fed.get(p(SN)).config, &mut next).unwrap();
    let corrupted = corrupt_last_signature(next.note());
    let err = admin_fed
        .offer_trust_list(OfferTrustListRequest { note: corrupted })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::FailedPrecondition | Code::InvalidArgument),
        "{err:?}"
    );
    // Properly signed by two of three: accepted, and gossiped to the others.
    let reply = admin_fed
        .offer_trust_list(OfferTrustListRequest {
            note: next.note().to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.applied);
    assert_eq!(reply.version, 2);
    for at in [SN, TJ] {
        let node = fed.get(p(at)).node.as_ref().unwrap();
        eventually(Duration::from_secs(10), || async {
            (node.state.peers.members().version() == 2).then_some(())
        })
        .await;
    }
    // Offering version 1 again is a rollback.
    let err = admin_fed
        .offer_trust_list(OfferTrustListRequest {
            note: current.note().to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(gd_node.state.metrics.trust_refused.get() >= 3);

    // --- A node certificate of GD claiming to be TJ: refused at the handshake. ---
    let gd_ca = hufu_node::init::load_ca(&fed.get(p(GD)).dir).unwrap();
    let impostor = gd_ca
        .issue_unchecked(
            &Identity::new(p(TJ), Role::Node, "node-1").unwrap(),
            &LeafOptions::default(),
        )
        .unwrap();
    let cert = hufu_node::client::ClientCert {
        cert_pem: impostor.cert_pem,
        key_pem: impostor.key_pem,
    };
    let refused = async {
        let channel = hufu_node::client::connect(&fed.get(p(SN)).target().ok()?, &cert)
            .await
            .ok()?;
        FederationServiceClient::new(channel)
            .subscribe_changes(SubscribeChangesRequest {
                issuer: SN.into(),
                after_sequence: 0,
            })
            .await
            .ok()
    }
    .await;
    assert!(refused.is_none(), "impostor node was served");

    // Everyone still serves.
    let (colour, _) = eventually(Duration::from_secs(10), || {
        lookup_colour(fed.get(p(SN)), GD, &gd_holders[0])
    })
    .await;
    assert_eq!(colour, common::colour_of(0) as i32);
}

fn corrupt_last_signature(note: &str) -> String {
    let mut lines: Vec<String> = note.lines().map(str::to_owned).collect();
    let last = lines.last_mut().unwrap();
    let (head, sig) = last.rsplit_once(' ').unwrap();
    let mut bytes: Vec<u8> = base64_decode(sig);
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    *last = format!("{head} {}", base64_encode(&bytes));
    lines.join("\n") + "\n"
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_in_process_at_once_after_shutdown() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let holders = common::import_samples(fed.get(p(GD)), 50).await;
    // Shaanxi replicates Guangdong: feeds, replicators, gossip and
    // checkpoints all run, and each holds the node's state.
    eventually(Duration::from_secs(10), || {
        lookup_colour(fed.get(p(SN)), GD, &holders[49])
    })
    .await;
    for round in 0..5 {
        for code in [GD, SN] {
            let province = fed.get_mut(p(code));
            province.stop().await.unwrap();
            // At once: the old node's tasks have ended and its storage is
            // closed, or this start could not take the storage's lock.
            province
                .start()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {code} did not restart: {e:#}"));
        }
        let (colour, _) = eventually(Duration::from_secs(10), || {
            lookup_colour(fed.get(p(SN)), GD, &holders[49])
        })
        .await;
        assert_eq!(colour, common::colour_of(49) as i32);
    }
    fed.stop_all().await.unwrap();
}

/// A province may list several endpoints (its replicas): while the first
/// is down, the others replicate its feed from the next one. In a
/// federation of two there is no member to relay through, so without
/// fail-over the replica would never move.
#[tokio::test]
async fn a_feed_is_taken_from_the_next_endpoint_while_the_first_is_down() {
    use hufu_node::federation::ops;
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::init(scratch.path(), &[p(SN), p(GD)], |_| {}).unwrap();
    let sn = fed.get(p(SN));
    let genesis =
        ops::read_note(&sn.config.path(&sn.config.trust_dir).join("v000001.note")).unwrap();
    let real = genesis.list.member(p(GD)).unwrap().endpoints[0].clone();
    // Port 1 on loopback: nothing listens, every dial is refused.
    let change = ops::Proposal {
        endpoints: vec![(p(GD), vec!["127.0.0.1:1".into(), real])],
        ..Default::default()
    };
    let mut next = ops::propose(&genesis.list, change).unwrap();
    for lp in &fed.provinces {
        ops::sign(&lp.config, &mut next).unwrap();
    }
    for lp in &fed.provinces {
        assert_eq!(ops::install(&lp.config, &next).unwrap(), 2);
    }
    fed.start_all().await.unwrap();
    common::import_samples(fed.get(p(GD)), 5).await;
    let replica = fed.get(p(SN)).node.as_ref().unwrap();
    eventually(Duration::from_secs(15), || async {
        (replica.state.store.tail(p(GD)).await.ok()?.sequence >= 5).then_some(())
    })
    .await;
    fed.stop_all().await.unwrap();
}
