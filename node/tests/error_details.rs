//! `google.rpc` rich error details as standard gRPC clients see them: a
//! Python grpcio client, its stubs generated from `proto/` by grpc_tools,
//! decodes a `RetryInfo` from an admission refusal and a `BadRequest` naming
//! the field of a national id that fails its checksum; tonic clients read
//! the same details with `tonic-types`.
//!
//! The Python packages come from `scripts/test` (grpcio, grpcio-tools,
//! grpcio-status, googleapis-common-protos).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use hufu_certs::Role;
use hufu_node::local::LocalProvince;
use hufu_node::sample;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{ImportStatusesRequest, LookupRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;

/// Calls `AdminService.PutStatus` once for the national id in argv and
/// prints what the client saw: code, message and decoded error details.
const CLIENT: &str = r#"
import json, sys
stubs, target, ca, cert, key, national_id = sys.argv[1:7]
sys.path.insert(0, stubs)
import grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from hufu.v1 import admin_pb2, admin_pb2_grpc, status_pb2

def read(path):
    with open(path, "rb") as f:
        return f.read()

credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
with grpc.secure_channel(target, credentials) as channel:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    request = admin_pb2.PutStatusRequest(status=admin_pb2.StatusInput(
        national_id=national_id, colour=status_pb2.COLOUR_GREEN))
    try:
        admin.PutStatus(request, timeout=10)
        print(json.dumps({"code": "OK"}))
        sys.exit(0)
    except grpc.RpcError as call:
        status = rpc_status.from_call(call)
        seen = {"code": call.code().name, "message": call.details(), "details": []}
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                seen["details"].append(
                    {"retry_delay_ms": info.retry_delay.ToMilliseconds()})
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                seen["details"].append({"field_violations": [
                    {"field": v.field, "description": v.description}
                    for v in bad.field_violations]})
            else:
                seen["details"].append({"unknown": detail.type_url})
        print(json.dumps(seen))
"#;

/// A grpcio admin client of `province`, with stubs generated from `proto/`.
struct PythonAdmin {
    dir: tempfile::TempDir,
    target: String,
}

impl PythonAdmin {
    async fn new(province: &LocalProvince) -> PythonAdmin {
        let dir = tempfile::tempdir().unwrap();
        let proto = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
        let mut protoc = tokio::process::Command::new("python3");
        protoc
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()));
        for file in ["status", "admin"] {
            protoc.arg(proto.join(format!("hufu/v1/{file}.proto")));
        }
        let output = python(&mut protoc).await;
        assert!(
            output.status.success(),
            "grpc_tools.protoc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cert = province.client_cert(Role::Admin, "grpcio").unwrap();
        let files = [
            ("ca.pem", province.ca_pem().unwrap()),
            ("admin.pem", cert.cert_pem),
            ("admin.key", cert.key_pem),
        ];
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        PythonAdmin {
            dir,
            target: province.addr().unwrap().to_string(),
        }
    }

    /// What the client saw calling PutStatus for `national_id`.
    async fn put_status(&self, national_id: &str) -> serde_json::Value {
        let file = |name: &str| -> PathBuf { self.dir.path().join(name) };
        let output = python(
            tokio::process::Command::new("python3")
                .args(["-c", CLIENT])
                .arg(self.dir.path())
                .arg(&self.target)
                .args([file("ca.pem"), file("admin.pem"), file("admin.key")])
                .arg(national_id),
        )
        .await;
        assert!(
            output.status.success(),
            "the grpcio client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// Runs a Python command, bounded in time.
async fn python(command: &mut tokio::process::Command) -> std::process::Output {
    let run = command.kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("python3 finished within a minute")
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): run scripts/test, which sets up grpcio")
        })
}

/// A national id of `province` whose check character is wrong.
fn bad_national_id(province: &LocalProvince) -> String {
    let good = sample::national_id(province.province, 7)
        .as_str()
        .to_owned();
    let check = if good.ends_with('1') { '2' } else { '1' };
    format!("{}{check}", &good[..17])
}

async fn wait_in_flight(p: &LocalProvince, n: i64) {
    for _ in 0..500 {
        if p.node.as_ref().unwrap().state.metrics.in_flight.get() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the node never had {n} calls in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_sees_bad_request_on_a_bad_national_id_and_retry_info_on_a_refusal() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    // Admin calls may fill half the limit: five open imports fill it.
    gd.config.limits.max_in_flight = 10;
    gd.config.limits.retry_pushback_ms = 250;
    gd.start().await.unwrap();
    let client = PythonAdmin::new(&gd).await;

    let seen = client.put_status(&bad_national_id(&gd)).await;
    assert_eq!(seen["code"], "INVALID_ARGUMENT", "{seen}");
    let violations = &seen["details"][0]["field_violations"];
    assert_eq!(violations[0]["field"], "status.national_id", "{seen}");
    assert!(
        violations[0]["description"]
            .as_str()
            .unwrap()
            .contains("GB 11643 checksum"),
        "{seen}"
    );
    let good = sample::national_id(gd.province, 7).as_str().to_owned();
    assert_eq!(client.put_status(&good).await["code"], "OK");

    let admin = gd.admin().await.unwrap();
    let mut holds = Vec::new();
    let mut imports = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = mpsc::channel::<ImportStatusesRequest>(1);
        let mut admin = admin.clone();
        imports.push(tokio::spawn(async move {
            admin.import_statuses(ReceiverStream::new(rx)).await
        }));
        holds.push(tx);
    }
    wait_in_flight(&gd, 5).await;
    let seen = client.put_status(&good).await;
    assert_eq!(seen["code"], "RESOURCE_EXHAUSTED", "{seen}");
    assert_eq!(
        seen["details"],
        serde_json::json!([{"retry_delay_ms": 250}])
    );

    drop(holds);
    for import in imports {
        import.await.unwrap().expect("held imports finish");
    }
    wait_in_flight(&gd, 0).await;
    assert_eq!(client.put_status(&good).await["code"], "OK");
}

#[tokio::test]
async fn tonic_clients_read_the_field_at_fault() {
    let node = common::start("440000").await;
    let mut terminal = node.province.terminal("gate").await.unwrap();
    let err = terminal
        .lookup(LookupRequest {
            issuer: "440000".into(),
            holder: "not-a-pseudonym".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = err.get_details_bad_request().expect("a BadRequest detail");
    assert_eq!(bad.field_violations.len(), 1);
    assert_eq!(bad.field_violations[0].field, "holder");
    assert_eq!(bad.field_violations[0].description, err.message());

    let channel = node
        .province
        .channel(Role::Terminal, "gate-2")
        .await
        .unwrap();
    let err = StatusLookupServiceClient::new(channel)
        .batch_lookup(hufu_proto::v1::BatchLookupRequest {
            issuer: "4400".into(),
            holders: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = err.get_details_bad_request().expect("a BadRequest detail");
    assert_eq!(bad.field_violations[0].field, "issuer");
}
