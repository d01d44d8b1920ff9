//! Attacks on the front door: sockets that never speak cannot lock other
//! clients out, and a request body is never read beyond the size limit, nor
//! at all for a caller who may not call the method.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hufu_certs::Role;
use hufu_node::client::{ClientCert, Target};
use hufu_node::init::{InitOptions, init_province};
use hufu_node::local::LocalProvince;
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tokio::io::AsyncReadExt;
use tonic::Code;

/// A TCP connection from `source` (any address in 127/8 is loopback) that
/// never sends a byte.
async fn silent_socket(source: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(to).await.unwrap()
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
    for i in 0..12 {
        let mut terminal = gd.terminal(&format!("gate-{i}")).await.expect("connects");
        terminal
            .lookup(LookupRequest {
                issuer: "440000".into(),
                holder: holder.clone(),
            })
            .await
            .expect("served during the attack");
    }
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_refused_before_they_are_read() {
    let scratch = tempfile::tempdir().unwrap();
    let p = common::province("440000");
    let dir = scratch.path().join("gd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    while let Some(r) = calls.join_next().await {
        let (from_auditor, err) = r.unwrap();
        if from_auditor {
            assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        } else {
            assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
            assert!(err.message().contains("too large"), "{err:?}");
        }
    }
    let after = common::memory_kib(node.pid(), "VmHWM") as f64 / 1024.0;
    assert!(
        after < before + 48.0,
        "node peak memory {before:.0} MiB before, {after:.0} MiB after a gigabyte of bodies"
    );
}
