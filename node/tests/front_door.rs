//! Attacks on the front door: sockets that never speak, or stop in the
//! middle of their TLS handshake, cannot lock other clients out; a request
//! body is never read beyond the size limit, nor at all for a caller who
//! may not call the method; and requests one caller never finishes hold
//! only its share of the node's buffer.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hufu_certs::Role;
use hufu_node::client::{ClientCert, Target};
use hufu_node::init::{InitOptions, init_province};
use hufu_node::local::LocalProvince;
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A TCP connection from `source` (any address in 127/8 is loopback) that
/// never sends a byte.
async fn silent_socket(source: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Twelve new terminals connect from 127.0.0.1, one after another, and
/// each is served within 3 s of starting to connect.
async fn new_clients_are_served_at_once(gd: &LocalProvince, holder: &str) {
    for i in 0..12 {
        let served = tokio::time::timeout(Duration::from_secs(3), async {
            let mut terminal = gd.terminal(&format!("gate-{i}")).await.expect("connects");
            terminal
                .lookup(LookupRequest {
                    issuer: "440000".into(),
                    holder: holder.to_owned(),
                })
                .await
                .expect("served during the attack");
        })
        .await;
        assert!(
            served.is_ok(),
            "new client {i} waited over 3 s behind the attack"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_lock_other_clients_out() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    gd.config.limits.first_byte_timeout_ms = 1_000;
    gd.start().await.unwrap();
    let addr = gd.addr().unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);

    // 1,000 sockets from one address that connect and say nothing.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(silent_socket(Ipv4Addr::new(127, 0, 0, 2), addr).await);
    }
    // New clients from elsewhere connect and are served while they wait.
    new_clients_are_served_at_once(&gd, &holder).await;
    // The node closes every silent socket soon after its first-byte deadline.
    let started = Instant::now();
    for mut socket in silent {
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent socket was kept open: {closed:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    gd.stop().await.unwrap();
}

/// The first flight of a TLS 1.3 client: a whole ClientHello.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(config.into(), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

/// A connection from `source` that sends `bytes` (part of a handshake) and
/// then nothing, never reading what the node answers.
async fn stalled_socket(source: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    let mut socket = silent_socket(source, to).await;
    // The node may already have closed a connection over its address's
    // limit: that is the defence, not a failure.
    let _ = socket.write_all(bytes).await;
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_stall_mid_handshake_do_not_lock_other_clients_out() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    // Few enough connections that one address holding them all would lock
    // everyone out; eight handshake permits, as by default.
    gd.config.limits.max_connections = 300;
    gd.config.limits.max_handshakes = 8;
    gd.start().await.unwrap();
    let addr = gd.addr().unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);
    let hello = client_hello();
    let half = &hello[..hello.len() / 2];

    // From one address, 600 connections that stop in the middle of their
    // ClientHello or right after it (the node answers, they never reply).
    let mut stalled = Vec::new();
    for i in 0..600 {
        let bytes = if i % 2 == 0 { half } else { &hello[..] };
        stalled.push(stalled_socket(Ipv4Addr::new(127, 0, 0, 2), addr, bytes).await);
    }
    // From eight more, sixteen each: under any one address's limit, more
    // than the node's handshake permits.
    for source in 3..11 {
        for i in 0..16 {
            let bytes = if i % 2 == 0 { half } else { &hello[..] };
            stalled.push(stalled_socket(Ipv4Addr::new(127, 0, 0, source), addr, bytes).await);
        }
    }
    // New clients connect and are served at once while every stalled
    // handshake is still within its 10 s deadline.
    new_clients_are_served_at_once(&gd, &holder).await;
    drop(stalled);
    gd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_refused_before_they_are_read() {
    let scratch = tempfile::tempdir().unwrap();
    let p = common::province("440000");
    let dir = scratch.path().join("gd");
    let port = hufu_node::ports::free_port().unwrap();
    let mut opts = InitOptions::new(p);
    opts.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let config = init_province(&dir, &opts).unwrap();
    let node = common::Serve::start(&config, &scratch.path().join("node.log"));
    let province = LocalProvince {
        province: p,
        dir: dir.clone(),
        config: hufu_node::config::NodeConfig::load(&config).unwrap(),
        node: None,
    };
    let target =
        Target::with_ca_pem(&opts.listen.to_string(), p, &province.ca_pem().unwrap()).unwrap();
    let connect = |cert: ClientCert| {
        let target = target.clone();
        async move {
            for _ in 0..200 {
                if let Ok(channel) = hufu_node::client::connect(&target, &cert).await {
                    return StatusLookupServiceClient::new(channel)
                        .max_encoding_message_size(usize::MAX);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("node did not come up");
        }
    };
    let auditor = connect(province.client_cert(Role::Auditor, "audit-1").unwrap()).await;
    let terminal = connect(province.client_cert(Role::Terminal, "gate").unwrap()).await;
    let before = common::memory_kib(node.pid(), "VmHWM") as f64 / 1024.0;

    // Eight 64 MB lookups from an auditor, who may not call Lookup at all,
    // and eight from a terminal, who may but over the 2 MiB limit.
    let huge = "x".repeat(64 << 20);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..16 {
        let mut client = if i % 2 == 0 {
            auditor.clone()
        } else {
            terminal.clone()
        };
        let holder = huge.clone();
        calls.spawn(async move {
            let err = client
                .lookup(LookupRequest {
                    issuer: "440000".into(),
                    holder,
                })
                .await
                .unwrap_err();
            (i % 2 == 0, err)
        });
    }
    // A terminal's call is refused by whichever limit it reaches first:
    // its own size (2 MiB), or, while its other calls hold bytes too, what
    // one caller may have buffered at the node at once (8 MiB).
    let mut too_large = 0;
    while let Some(r) = calls.join_next().await {
        let (from_auditor, err) = r.unwrap();
        if from_auditor {
            assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        } else if err.code() == Code::OutOfRange {
            assert!(err.message().contains("too large"), "{err:?}");
            too_large += 1;
        } else {
            assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
            assert!(err.message().contains("request bytes in flight"), "{err:?}");
        }
    }
    assert!(too_large > 0, "no call was refused for its size");
    let after = common::memory_kib(node.pid(), "VmHWM") as f64 / 1024.0;
    assert!(
        after < before + 48.0,
        "node peak memory {before:.0} MiB before, {after:.0} MiB after a gigabyte of bodies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_one_caller_never_finishes_do_not_take_the_nodes_buffer() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    gd.config.limits.max_buffered_bytes = 16 << 20;
    gd.start().await.unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);
    let mut terminal = gd.terminal("gate").await.unwrap();

    // A stolen terminal certificate: on four connections, eight lookups
    // each whose request is one message framed in exactly 2 MiB (under the
    // limit) followed by nothing, the call never ended: 64 MiB offered,
    // four times the node's budget for buffered request bytes, which eight
    // of them fill to the byte.
    let mallory = gd.client_cert(Role::Terminal, "mallory").unwrap();
    let mut senders = Vec::new();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let channel = gd.channel_as(&mallory).await.unwrap();
        for _ in 0..8 {
            let (tx, rx) = mpsc::channel::<Vec<u8>>(1);
            tx.send(vec![0x0a; (2 << 20) - 5]).await.unwrap();
            senders.push(tx);
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            calls.spawn(async move {
                grpc.ready().await.unwrap();
                grpc.client_streaming(
                    tonic::Request::new(ReceiverStream::new(rx)),
                    http::uri::PathAndQuery::from_static("/hufu.v1.StatusLookupService/Lookup"),
                    common::raw::RawCodec,
                )
                .await
                .map(|_| ())
            });
        }
    }
    // Everyone else is served all along, with the node's buffer to share.
    for _ in 0..30 {
        terminal
            .lookup(LookupRequest {
                issuer: "440000".into(),
                holder: holder.clone(),
            })
            .await
            .expect("a terminal served while another caller stalls its requests");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The caller that holds its share is told so.
    let mut refused = 0;
    while let Some(Ok(Err(status))) = calls.try_join_next() {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        refused += 1;
    }
    assert!(refused > 0, "no stalled call was refused");
    drop(senders);
    while calls.join_next().await.is_some() {}
    gd.stop().await.unwrap();
}
