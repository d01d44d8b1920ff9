//! A replica's mutual TLS to NATS: against a real nats-server whose client
//! port asks for TLS and verifies client certificates (`verify: true`), a
//! replica given the CA and a client certificate from it writes through the
//! province's write log and reads its write back; the same replica without
//! a client certificate, or with one from another CA, is refused: its
//! writes fail with UNAVAILABLE and a message naming the TLS settings to
//! check, while lookups go on from its store.
//!
//! One nats-server with JetStream is enough here: what is tested is the
//! client's TLS, which is the same for every server of a cluster.

mod common;

use std::path::{Path, PathBuf};

use common::province;
use common::replicas::{colour_of, put};
use hufu_certs::{CertificateAuthority, Identity, LeafOptions, Role};
use hufu_node::config::ReplicationConfig;
use hufu_node::local::LocalProvince;
use hufu_node::replication::cluster::{NatsCluster, NatsTls};
use hufu_proto::v1::Colour;

/// Writes a certificate and key for `name` issued by `ca` under `dir`,
/// valid for 127.0.0.1 (what the NATS server is dialled as).
fn issue(ca: &CertificateAuthority, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let identity = Identity::new(ca.province(), Role::Node, name).unwrap();
    let issued = ca.issue(&identity, &LeafOptions::for_node(&[])).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    issued.write(&cert, &key).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_writes_over_mutual_tls_to_nats_and_says_so_when_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = scratch.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let nats_ca = CertificateAuthority::generate(province("440000")).unwrap();
    let ca_file = pki.join("nats-ca.crt");
    std::fs::write(&ca_file, nats_ca.cert_pem()).unwrap();
    let (server_cert, server_key) = issue(&nats_ca, &pki, "nats");
    let (client_cert, client_key) = issue(&nats_ca, &pki, "gd-1");
    let other_ca = CertificateAuthority::generate(province("110000")).unwrap();
    let (stranger_cert, stranger_key) = issue(&other_ca, &pki, "stranger");

    let tls = NatsTls {
        ca: ca_file.clone(),
        cert: server_cert,
        key: server_key,
        client_cert: client_cert.clone(),
        client_key: client_key.clone(),
    };
    let nats = NatsCluster::start_with_tls(&scratch.path().join("nats"), 1, &tls)
        .await
        .unwrap();
    let mut gd = LocalProvince::init(&scratch.path().join("gd"), province("440000")).unwrap();
    common::quick(&mut gd.config);
    let mut replication = ReplicationConfig::new(nats.urls());
    replication.replicas = 1;
    replication.ack_timeout_ms = 2000;
    replication.tls_ca = Some(ca_file);
    replication.tls_cert = Some(client_cert);
    replication.tls_key = Some(client_key);
    gd.config.replication = Some(replication.clone());

    // (1) The CA and a client certificate from it: the write is
    // acknowledged and read back.
    gd.start().await.unwrap();
    assert_eq!(put(&gd, 1, Colour::Green).await.unwrap(), 1);
    assert_eq!(colour_of(&gd, 1).await, Colour::Green as i32);
    gd.stop().await.unwrap();

    // (2) No client certificate, then one from another CA: refused, and
    // what the replica holds is still answered.
    let without = ReplicationConfig {
        tls_cert: None,
        tls_key: None,
        ..replication.clone()
    };
    let stranger = ReplicationConfig {
        tls_cert: Some(stranger_cert),
        tls_key: Some(stranger_key),
        ..replication
    };
    for (case, config) in [("no client certificate", without), ("another CA", stranger)] {
        gd.config.replication = Some(config);
        gd.start().await.unwrap();
        let refused = put(&gd, 2, Colour::Red).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::Unavailable,
            "{case}: {refused:?}"
        );
        for words in [
            "cannot connect to NATS",
            "replication.tls_ca",
            "replication.tls_cert",
            "replication.tls_key",
        ] {
            assert!(
                refused.message().contains(words),
                "{case}: {}",
                refused.message()
            );
        }
        assert_eq!(colour_of(&gd, 1).await, Colour::Green as i32, "{case}");
        gd.stop().await.unwrap();
    }
    drop(nats);
}
