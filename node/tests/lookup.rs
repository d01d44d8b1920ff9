//! The status-lookup API end to end: real node, real mutual TLS, real sled.

mod common;

use hufu_proto::v1::{BatchLookupRequest, Colour, LookupRequest, Source};
use tonic::Code;

#[tokio::test]
async fn lookup_and_batch_lookup_round_trip_from_a_terminal() {
    let node = common::start("440000").await;
    let holders = common::import_samples(&node.province, 50).await;
    let mut terminal = node.province.terminal("gate-1").await.unwrap();

    for (n, holder) in holders.iter().enumerate().take(10) {
        let reply = terminal
            .lookup(LookupRequest {
                issuer: "440000".into(),
                holder: holder.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let record = reply.record.unwrap();
        assert_eq!(record.holder, *holder);
        assert_eq!(record.issuer, "440000");
        assert_eq!(record.colour, common::colour_of(n as u64) as i32);
        let provenance = reply.provenance.unwrap();
        assert_eq!(provenance.source, Source::Authoritative as i32);
        assert_eq!(provenance.answered_by, "440000");
    }

    // An unknown holder is NOT_FOUND; a malformed pseudonym INVALID_ARGUMENT.
    let unknown = "A".repeat(26);
    let err = terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: "not-a-pseudonym".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A province this node does not serve, and a code that is no province.
    let err = terminal
        .lookup(LookupRequest {
            issuer: "610000".into(),
            holder: holders[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("610000"), "{}", err.message());
    let err = terminal
        .lookup(LookupRequest {
            issuer: "999999".into(),
            holder: holders[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("999999"));

    // Batch: known, unknown and malformed, in request order.
    let mut asked = holders.clone();
    asked.push(unknown.clone());
    asked.push("garbage".into());
    let reply = terminal
        .batch_lookup(BatchLookupRequest {
            issuer: "440000".into(),
            holders: asked.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.entries.len(), asked.len());
    for (n, entry) in reply.entries.iter().enumerate().take(holders.len()) {
        assert_eq!(entry.holder, asked[n]);
        assert_eq!(
            entry.record.as_ref().unwrap().colour,
            common::colour_of(n as u64) as i32
        );
        assert!(entry.error.is_empty());
    }
    assert_eq!(reply.entries[50].error, "no status");
    assert!(reply.entries[51].record.is_none());
    assert!(!reply.entries[51].error.is_empty());

    // 1,000 is the limit; 1,001 is refused with a message that says so.
    let ok = terminal
        .batch_lookup(BatchLookupRequest {
            issuer: "440000".into(),
            holders: vec![holders[1].clone(); 1000],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.entries.len(), 1000);
    assert!(
        ok.entries
            .iter()
            .all(|e| e.record.as_ref().unwrap().colour == Colour::Yellow as i32)
    );
    let err = terminal
        .batch_lookup(BatchLookupRequest {
            issuer: "440000".into(),
            holders: vec![holders[1].clone(); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit of 1000"), "{}", err.message());
}

#[tokio::test]
async fn health_reflection_and_metrics_answer() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let node = common::start("440000").await;
    let channel = node
        .province
        .channel(hufu_certs::Role::Terminal, "probe")
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    // Every service the node serves reports SERVING, not NOT_FOUND.
    for service in [
        "",
        "hufu.v1.StatusLookupService",
        "hufu.v1.AdminService",
        "hufu.v1.FederationService",
        "hufu.v1.AuditService",
        "hufu.v1.WitnessService",
    ] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut terminal = hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(
        channel.clone(),
    );
    let _ = terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: "A".repeat(26),
        })
        .await;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in [
        "hufu.v1.StatusLookupService",
        "hufu.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&wanted), "{names:?}");
    }

    // Prometheus text over plain HTTP counts the calls just made.
    let addr = node.province.node.as_ref().unwrap().metrics_addr.unwrap();
    let body = http_get(addr, "/metrics").await;
    assert!(
        body.contains("hufu_requests_total{method=\"Lookup\",code=\"NotFound\"} 1"),
        "{body}"
    );
    assert!(body.contains("hufu_handshake_failures_total"), "{body}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}
