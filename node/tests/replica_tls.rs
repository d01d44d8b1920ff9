//! A replica's mutual TLS to NATS: against a real nats-server whose client
//! port asks for TLS and verifies client certificates (`verify: true`), a
//! replica given the CA and a client certificate from it writes through the
//! province's write log and reads its write back; the same replica without
//! a client certificate, or with one from another CA, is refused: its
//! writes fail with UNAVAILABLE and a message naming the TLS settings to
//! check, while lookups go on from its store.
//!
//! A second test runs three servers whose routes to each other are mutual
//! TLS too, as a province spread over several places would run them: the
//! cluster places a stream of three copies only once every route is up,
//! and a replica's writes are acknowledged by a quorum reached over those
//! routes, with one server down as well.

mod common;

use std::path::{Path, PathBuf};

use common::province;
use common::replicas::{colour_of, put, put_until_taken};
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

/// A CA for NATS under `dir`/pki, a server certificate (also what the
/// servers show each other on their routes) and a replica's client
/// certificate from it; and the pki directory.
fn nats_pki(dir: &Path) -> (NatsTls, PathBuf) {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let nats_ca = CertificateAuthority::generate(province("440000")).unwrap();
    let ca = pki.join("nats-ca.crt");
    std::fs::write(&ca, nats_ca.cert_pem()).unwrap();
    let (cert, key) = issue(&nats_ca, &pki, "nats");
    let (client_cert, client_key) = issue(&nats_ca, &pki, "gd-1");
    let tls = NatsTls {
        ca,
        cert,
        key,
        client_cert,
        client_key,
    };
    (tls, pki)
}

/// The CA, client certificate and key a replica is given.
fn client_files(tls: &NatsTls) -> (PathBuf, PathBuf, PathBuf) {
    (
        tls.ca.clone(),
        tls.client_cert.clone(),
        tls.client_key.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_writes_over_mutual_tls_to_nats_and_says_so_when_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let (tls, pki) = nats_pki(scratch.path());
    let (ca_file, client_cert, client_key) = client_files(&tls);
    let other_ca = CertificateAuthority::generate(province("110000")).unwrap();
    let (stranger_cert, stranger_key) = issue(&other_ca, &pki, "stranger");

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
    assert_eq!(put_until_taken(&gd, 1, Colour::Green).await, 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_whose_routes_are_mutual_tls_takes_a_replicas_writes_with_a_server_down() {
    let scratch = tempfile::tempdir().unwrap();
    let (tls, _) = nats_pki(scratch.path());
    let (ca_file, client_cert, client_key) = client_files(&tls);
    // Ready only once a stream of three copies can be placed: every route
    // between the three servers up, over mutual TLS.
    let mut nats = NatsCluster::start_with_tls(&scratch.path().join("nats"), 3, &tls)
        .await
        .unwrap();
    // A route port speaking plain NATS greets whoever connects with its
    // INFO line; these say nothing before a TLS handshake.
    let addrs = nats.route_addrs();
    let greetings = futures::future::join_all(addrs.iter().map(|&a| plain_greeting(a))).await;
    for (addr, said) in addrs.iter().zip(greetings) {
        assert!(said.is_empty(), "{addr} spoke before TLS: {said}");
    }

    let mut gd = LocalProvince::init(&scratch.path().join("gd"), province("440000")).unwrap();
    common::quick(&mut gd.config);
    let mut replication = ReplicationConfig::new(nats.urls());
    replication.ack_timeout_ms = 5000;
    replication.tls_ca = Some(ca_file);
    replication.tls_cert = Some(client_cert);
    replication.tls_key = Some(client_key);
    assert_eq!(replication.replicas, 3, "three copies, one per server");
    gd.config.replication = Some(replication);
    // The node makes the stream of three copies as it starts (or at the
    // first write), and the stream elects its leader over the TLS routes.
    gd.start().await.unwrap();
    assert_eq!(put_until_taken(&gd, 1, Colour::Green).await, 1);
    assert_eq!(colour_of(&gd, 1).await, Colour::Green as i32);

    // One server down: the other two still make a quorum over their route
    // (once they have elected a new leader, if the lost one led: a write
    // meanwhile fails with UNAVAILABLE).
    nats.kill(2);
    let sequence = put_until_taken(&gd, 2, Colour::Red).await;
    assert!(sequence >= 2, "sequence {sequence}");
    assert_eq!(colour_of(&gd, 2).await, Colour::Red as i32);
    gd.stop().await.unwrap();
    drop(nats);
}

/// What a NATS server sends, unasked, to a plain TCP connection on its
/// route port within 3 s (a plain route port sends its INFO at once).
async fn plain_greeting(addr: std::net::SocketAddr) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut said = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        stream.read_to_end(&mut said),
    )
    .await;
    String::from_utf8_lossy(&said).into_owned()
}
