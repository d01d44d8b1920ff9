//! Garbage and oversized requests get a clear status code, and the node
//! keeps serving.

mod common;

use common::raw::RawCodec;
use hufu_proto::v1::{BatchLookupRequest, LookupRequest};
use tonic::Code;

async fn raw_call(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("garbage must not succeed")
}

#[tokio::test]
async fn garbage_and_oversized_requests_are_refused_cleanly() {
    let node = common::start("440000").await;
    let holders = common::import_samples(&node.province, 3).await;
    let channel = node
        .province
        .channel(hufu_certs::Role::Terminal, "fuzz")
        .await
        .unwrap();

    // Not protobuf at all: a truncated varint and an invalid wire type.
    for body in [
        vec![0x0a, 0xff, 0xff, 0xff],
        vec![0x0f, 0x01, 0x02],
        b"\xff\xfe garbage".to_vec(),
    ] {
        let status = raw_call(channel.clone(), "/hufu.v1.StatusLookupService/Lookup", body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("malformed LookupRequest"),
            "{}",
            status.message()
        );
    }
    let status = raw_call(
        channel.clone(),
        "/hufu.v1.AdminService/PutStatus",
        vec![0x0a, 0x05, 0x01],
    )
    .await;
    // Authorization comes before a byte of the body is read: an
    // unauthorised caller learns nothing about its bytes.
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // An unknown method.
    let status = raw_call(channel.clone(), "/hufu.v1.StatusLookupService/Nope", vec![]).await;
    assert_eq!(status.code(), Code::Unimplemented);

    // Larger than the 2 MiB limit.
    let mut client = hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(
        channel.clone(),
    );
    let err = client
        .batch_lookup(BatchLookupRequest {
            issuer: "440000".into(),
            holders: vec!["A".repeat(1024); 3 * 1024],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("too large"), "{}", err.message());

    // Still serving, on the same connection and on a new one.
    for channel in [
        channel,
        node.province
            .channel(hufu_certs::Role::Terminal, "after")
            .await
            .unwrap(),
    ] {
        let mut client =
            hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(channel);
        let reply = client
            .lookup(LookupRequest {
                issuer: "440000".into(),
                holder: holders[0].clone(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().record.unwrap().holder, holders[0]);
    }
}

#[tokio::test]
async fn a_silent_client_does_not_block_others() {
    // Connections that never start a TLS handshake must not stall the accept
    // loop for well-behaved callers.
    let node = common::start("440000").await;
    let addr = node.province.addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let holders = common::import_samples(&node.province, 1).await;
    let mut terminal = node.province.terminal("gate").await.unwrap();
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        terminal.lookup(LookupRequest {
            issuer: "440000".into(),
            holder: holders[0].clone(),
        }),
    )
    .await
    .expect("answered while idle connections wait")
    .unwrap();
    assert!(reply.into_inner().record.is_some());
    drop(idle);
}
