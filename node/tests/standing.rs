//! A caller's standing is checked on every call, not only at the handshake,
//! against real federations on loopback: a member removed from the trust
//! list loses its open connections and feed streams; a revoked certificate
//! is refused by every member's node within seconds, open connections too.

mod common;

use std::time::Duration;

use hufu_certs::Role;
use hufu_node::client::ClientCert;
use hufu_node::federation::ops;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::audit_service_client::AuditServiceClient;
use hufu_proto::v1::federation_service_client::FederationServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    Colour, GetCheckpointsRequest, GetJwksRequest, LookupRequest, OfferTrustListRequest,
    PutStatusRequest, SubscribeChangesRequest,
};
use tonic::transport::Channel;

const SN: &str = "610000";
const GD: &str = "440000";
const TJ: &str = "120000";

fn lookup(holder: &str, issuer: &str) -> LookupRequest {
    LookupRequest {
        issuer: issuer.into(),
        holder: holder.into(),
    }
}

/// A channel to `at`, connected now, holding `cert`.
async fn open(at: &LocalProvince, cert: &ClientCert) -> Channel {
    hufu_node::client::connect(&at.target().unwrap(), cert)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_loses_its_open_connections_and_feed_streams() {
    common::logs();
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = common::quick_federation(scratch.path(), &[SN, GD, TJ], |_| {});
    fed.start_all().await.unwrap();
    let sn = fed.get(common::province(SN));
    let holders = common::import_samples(sn, 2).await;

    // Tianjin's node certificate, connected to Shaanxi before the removal:
    // a lookup and a subscription to Shaanxi's feed.
    let tj_node = fed
        .get(common::province(TJ))
        .client_cert(Role::Node, "node-1")
        .unwrap();
    let channel = open(sn, &tj_node).await;
    let mut lookups = StatusLookupServiceClient::new(channel.clone());
    lookups.lookup(lookup(&holders[0], SN)).await.unwrap();
    let mut feed = FederationServiceClient::new(channel.clone())
        .subscribe_changes(SubscribeChangesRequest {
            issuer: SN.into(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = feed.message().await.unwrap().unwrap();
    let held = first.head.unwrap().sequence;
    assert_eq!(held, 2);

    // Shaanxi and Guangdong (the threshold) sign v2 without Tianjin, and
    // Shaanxi's admin puts it in force.
    let genesis = ops::read_note(
        &std::fs::read_dir(sn.config.path(&sn.config.trust_dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "note"))
            .unwrap(),
    )
    .unwrap();
    let mut v2 = ops::propose(
        &genesis.list,
        ops::Proposal {
            remove: vec![common::province(TJ)],
            ..Default::default()
        },
    )
    .unwrap();
    ops::sign(&sn.config, &mut v2).unwrap();
    ops::sign(&fed.get(common::province(GD)).config, &mut v2).unwrap();
    let admin = ClientCert::load(
        &sn.config.path(&sn.config.client.admin_cert),
        &sn.config.path(&sn.config.client.admin_key),
    )
    .unwrap();
    let applied = FederationServiceClient::new(open(sn, &admin).await)
        .offer_trust_list(OfferTrustListRequest {
            note: v2.note().to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.version, 2);

    // A change made after the removal never reaches Tianjin's stream: the
    // stream ends.
    sn.admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(sn.province, 0, Colour::Red)),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match feed.message().await {
                Ok(Some(batch)) => {
                    let seq = batch.head.map(|h| h.sequence).unwrap_or(0);
                    assert!(seq <= held, "change {seq} reached a removed member");
                }
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the removed member's feed stream stayed open"
    );

    // The open connection answers no more calls.
    let err = lookups
        .lookup(lookup(&holders[1], SN))
        .await
        .expect_err("a removed member's open connection still got an answer");
    assert_ne!(err.code(), tonic::Code::Ok);
    fed.stop_all().await.unwrap();
}

/// Writes `cert` as `dir/name.pem` and `.key`; returns the certificate path.
fn save(dir: &std::path::Path, name: &str, cert: &ClientCert) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, &cert.cert_pem).unwrap();
    std::fs::write(path.with_extension("key"), &cert.key_pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_by_every_member_within_seconds() {
    common::logs();
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = common::quick_federation(scratch.path(), &[SN, GD], |_| {});
    fed.start_all().await.unwrap();
    let (sn, gd) = (fed.get(common::province(SN)), fed.get(common::province(GD)));
    let holders = common::import_samples(gd, 1).await;

    // A Guangdong terminal and a Guangdong auditor certificate, then stolen:
    // the terminal is connected to its own node, the auditor to Shaanxi's.
    let terminal = gd.client_cert(Role::Terminal, "gate-9").unwrap();
    let auditor = gd.client_cert(Role::Auditor, "audit-2").unwrap();
    let mut at_gd = StatusLookupServiceClient::new(open(gd, &terminal).await);
    at_gd.lookup(lookup(&holders[0], GD)).await.unwrap();
    let mut at_sn = AuditServiceClient::new(open(sn, &auditor).await);
    at_sn
        .get_checkpoints(GetCheckpointsRequest::default())
        .await
        .unwrap();

    // Guangdong's operator revokes both, one by file, one by serial.
    let files = tempfile::tempdir().unwrap();
    let dir = gd.dir.as_os_str();
    let file = save(files.path(), "gate-9", &terminal);
    common::hufu_ok(&[
        "certs".as_ref(),
        "revoke".as_ref(),
        "--dir".as_ref(),
        dir,
        "--cert".as_ref(),
        file.as_os_str(),
        "--reason".as_ref(),
        "stolen".as_ref(),
    ])
    .await;
    let der = <rustls::pki_types::CertificateDer<'_> as rustls::pki_types::pem::PemObject>::from_pem_slice(
        auditor.cert_pem.as_bytes(),
    )
    .unwrap();
    let serial = hufu_certs::certificate_serial(&der).unwrap();
    let upper = serial.to_uppercase();
    common::hufu_ok(&[
        "certs".as_ref(),
        "revoke".as_ref(),
        "--dir".as_ref(),
        dir,
        "--serial".as_ref(),
        upper.as_ref(),
        "--reason".as_ref(),
        "stolen".as_ref(),
    ])
    .await;

    // Within seconds both nodes refuse them, on the connections already open.
    common::eventually(Duration::from_secs(5), || async {
        let gd_refuses = at_gd.clone().lookup(lookup(&holders[0], GD)).await.is_err();
        let sn_refuses = at_sn
            .clone()
            .get_checkpoints(GetCheckpointsRequest::default())
            .await
            .is_err();
        (gd_refuses && sn_refuses).then_some(())
    })
    .await;
    // And on new connections.
    let again = hufu_node::client::connect(&sn.target().unwrap(), &auditor).await;
    if let Ok(channel) = again {
        AuditServiceClient::new(channel)
            .get_checkpoints(GetCheckpointsRequest::default())
            .await
            .expect_err("a revoked auditor certificate got an answer on a new connection");
    }
    // Shaanxi publishes what it enforces, as Guangdong signed it.
    let reply = sn
        .terminal("gate")
        .await
        .unwrap()
        .get_jwks(GetJwksRequest {
            province: GD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.revoked_serials.len(), 2, "{reply:?}");
    assert!(reply.revoked_serials.contains(&serial));

    // Other certificates of Guangdong are unaffected.
    let mut fresh = gd.terminal("gate-10").await.unwrap();
    fresh.lookup(lookup(&holders[0], GD)).await.unwrap();

    // Shaanxi restarted while Guangdong is down still refuses them.
    fed.get_mut(common::province(GD)).stop().await.unwrap();
    let sn = fed.get_mut(common::province(SN));
    sn.stop().await.unwrap();
    sn.start().await.unwrap();
    if let Ok(channel) = hufu_node::client::connect(&sn.target().unwrap(), &auditor).await {
        AuditServiceClient::new(channel)
            .get_checkpoints(GetCheckpointsRequest::default())
            .await
            .expect_err("a revoked certificate was forgotten at a restart");
    }
    fed.stop_all().await.unwrap();
}
