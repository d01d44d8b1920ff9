//! Acknowledged writes survive `kill -9`, and SIGTERM shuts down cleanly:
//! the real `hufu serve` process, killed and restarted.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hufu_node::client::{ClientCert, Target};
use hufu_node::init::{InitOptions, init_province};
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{
    Colour, GetStatusRequest, ImportStatusesRequest, PutStatusRequest, get_status_request,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `hufu serve` process; killed if the test fails, so none is left behind.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(config: &std::path::Path) -> Serve {
    Serve(
        Command::new(env!("CARGO_BIN_EXE_hufu"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn admin(
    target: &Target,
    cert: &ClientCert,
) -> AdminServiceClient<tonic::transport::Channel> {
    for _ in 0..200 {
        if let Ok(channel) = hufu_node::client::connect(target, cert).await {
            let mut client = AdminServiceClient::new(channel);
            // One round trip first, so that the client knows the node's
            // stream limit (its HTTP/2 SETTINGS) and queues a burst of calls
            // instead of opening streams the node must refuse.
            let _ = client.get_status(GetStatusRequest::default()).await;
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node did not come up");
}

#[tokio::test]
async fn acknowledged_statuses_survive_kill_9() {
    let scratch = tempfile::tempdir().unwrap();
    let p = common::province("440000");
    let dir = scratch.path().join("gd");
    let mut opts = InitOptions::new(p);
    opts.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    opts.metrics_listen = None;
    let config = init_province(&dir, &opts).unwrap();
    let ca = std::fs::read_to_string(dir.join("ca/ca.pem")).unwrap();
    let target = Target::with_ca_pem(&opts.listen.to_string(), p, &ca).unwrap();
    let cert =
        ClientCert::load(&dir.join("admin/admin.pem"), &dir.join("admin/admin.key")).unwrap();

    let mut child = serve(&config);
    let mut client = admin(&target, &cert).await;

    // Concurrent single writes, each acknowledged. A well-behaved client
    // honours the node's push-back when admission control sheds a burst.
    let mut tasks = Vec::new();
    for n in 0..100u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let request = PutStatusRequest {
                    status: Some(common::sample_input(p, n, common::colour_of(n))),
                };
                match client.put_status(request).await {
                    Ok(r) => return Ok(r.into_inner().sequence),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        let ms: u64 = e
                            .metadata()
                            .get("grpc-retry-pushback-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(100);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }));
    }
    let mut sequences = Vec::new();
    for t in tasks {
        sequences.push(t.await.unwrap().unwrap());
    }
    sequences.sort();
    assert_eq!(
        sequences,
        (1..=100).collect::<Vec<u64>>(),
        "change numbers have no gaps"
    );
    // ...and a bulk import, acknowledged by its summary.
    let rows: Vec<ImportStatusesRequest> = (100..2100u64)
        .map(|n| ImportStatusesRequest {
            line: n,
            status: Some(common::sample_input(p, n, Colour::Red)),
        })
        .collect();
    let summary = client
        .import_statuses(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 2000);

    // No graceful anything: SIGKILL straight after the acknowledgements.
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let mut child = serve(&config);
    let mut client = admin(&target, &cert).await;
    for n in (0..2100u64).step_by(7).chain([2099]) {
        let record = client
            .get_status(GetStatusRequest {
                subject: Some(get_status_request::Subject::NationalId(
                    hufu_node::sample::national_id(p, n).as_str().to_owned(),
                )),
            })
            .await
            .unwrap_or_else(|e| panic!("holder {n} lost after kill -9: {e}"))
            .into_inner()
            .record
            .unwrap();
        let want = if n < 100 {
            common::colour_of(n)
        } else {
            Colour::Red
        };
        assert_eq!(record.colour, want as i32, "holder {n}");
    }
    // The change log continues where it stopped.
    let next = client
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p, 5000, Colour::Green)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.sequence, 2101);

    // SIGTERM: a clean exit.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "serve exited with {exit:?} after SIGTERM");
}
