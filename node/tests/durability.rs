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

/// Guangdong's node directory, made by `init` for a `hufu serve` process
/// (no metrics listener), with its admin's client certificate.
struct Node {
    p: hufu_certs::Province,
    config: std::path::PathBuf,
    target: Target,
    cert: ClientCert,
}

impl Node {
    fn init(scratch: &std::path::Path) -> Node {
        let p = common::province("440000");
        let dir = scratch.join("gd");
        let mut opts = InitOptions::new(p);
        // The node is a `hufu serve` process (so that it can be killed),
        // which binds its port itself: one picked free just before.
        let port = hufu_node::ports::free_port().unwrap();
        opts.listen = format!("127.0.0.1:{port}").parse().unwrap();
        opts.metrics_listen = None;
        let config = init_province(&dir, &opts).unwrap();
        let ca = std::fs::read_to_string(dir.join("ca/ca.pem")).unwrap();
        let target = Target::with_ca_pem(&opts.listen.to_string(), p, &ca).unwrap();
        let cert =
            ClientCert::load(&dir.join("admin/admin.pem"), &dir.join("admin/admin.key")).unwrap();
        Node {
            p,
            config,
            target,
            cert,
        }
    }
}

#[tokio::test]
async fn acknowledged_statuses_survive_kill_9() {
    let scratch = tempfile::tempdir().unwrap();
    let Node {
        p,
        config,
        target,
        cert,
    } = Node::init(scratch.path());

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
                    // Streams opened before the node's SETTINGS arrive can
                    // be refused unprocessed (REFUSED_STREAM): safe to retry.
                    Err(e) if format!("{e:?}").contains("REFUSED_STREAM") => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
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
            legacy_code: String::new(),
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

/// Runs `hufu` with `args` and returns its exit status and output.
async fn hufu(args: Vec<std::ffi::OsString>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hufu"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn acknowledged_changes_keep_their_audit_entries_through_kill_9() {
    use hufu_federation::audit::{EntryKind, Filter, query};
    use hufu_node::local::LocalFederation;

    let scratch = tempfile::tempdir().unwrap();
    let p = common::province("440000");
    // A federation of one: its checkpoints need no witness, so they are
    // published at once and `hufu audit verify` can check the whole log.
    let mut fed = LocalFederation::init(scratch.path(), &[p], |_| {}).unwrap();
    // Served by a `hufu serve` process: the federation lets its port go.
    let province = &*fed.get_mut(p);
    let config = province.dir.join("hufu.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("# [audit]", "[audit]\ncheckpoint_secs = 0.2"),
    )
    .unwrap();
    let target = province.target().unwrap();
    let cert = province
        .client_cert(hufu_certs::Role::Admin, "ops")
        .unwrap();

    let mut child = serve(&config);
    let client = admin(&target, &cert).await;

    // Eight writers write as fast as they are acknowledged; the node is
    // killed while they still write. Every acknowledgement is kept.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let mut client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let n = w * 1_000_000 + i;
                let request = PutStatusRequest {
                    status: Some(common::sample_input(p, n, common::colour_of(n))),
                };
                match client.put_status(request).await {
                    Ok(reply) => acked.lock().unwrap().push(reply.into_inner().sequence),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acknowledged = acked.lock().unwrap().clone();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = {
        // Replies that arrived between the copy and the kill count too.
        let mut all = acked.lock().unwrap().clone();
        all.sort();
        assert!(all.len() >= acknowledged.len());
        all
    };
    assert!(
        acknowledged.len() > 50,
        "only {} writes acknowledged",
        acknowledged.len()
    );

    // Restarted, the node publishes a checkpoint of everything it holds.
    let _child = serve(&config);
    let _ = admin(&target, &cert).await;
    let dir = scratch.path().join("fetched");
    let auditor = province
        .client_cert(hufu_certs::Role::Auditor, "alice")
        .unwrap();
    let (cert_file, key_file) = (
        scratch.path().join("alice.pem"),
        scratch.path().join("alice.key"),
    );
    std::fs::write(&cert_file, &auditor.cert_pem).unwrap();
    std::fs::write(&key_file, &auditor.key_pem).unwrap();
    let conn = |args: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        for (flag, path) in [
            ("--config", &config),
            ("--cert", &cert_file),
            ("--key", &key_file),
        ] {
            v.extend([flag.into(), path.clone().into_os_string()]);
        }
        v
    };
    let mut fetched = None;
    let mut last = String::new();
    for _ in 0..100 {
        let _ = std::fs::remove_dir_all(&dir);
        let out = hufu(conn(&["audit", "fetch", "--out", dir.to_str().unwrap()])).await;
        let entries = std::fs::read_to_string(dir.join("entries.jsonl")).unwrap_or_default();
        // Nothing is written after the restart: once two fetches agree,
        // the newest checkpoint covers the whole log.
        let count = entries.lines().count();
        if out.status.success() && fetched == Some(count) {
            break;
        }
        fetched = out.status.success().then_some(count);
        last = format!(
            "{} entries; {}{}",
            entries.lines().count(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        fetched.is_some(),
        "no checkpoint covering the log after restart: {last}"
    );

    let trust = province.config.path(&province.config.trust_dir);
    let out = hufu(vec![
        "audit".into(),
        "verify".into(),
        dir.clone().into_os_string(),
        "--trust".into(),
        trust.into_os_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every acknowledged change number has its status_changed entry.
    let filter = Filter {
        kind: Some(EntryKind::StatusChanged),
        ..Filter::default()
    };
    let audited: std::collections::HashSet<u64> = query(&dir, &filter)
        .unwrap()
        .iter()
        .filter_map(|r| {
            let detail = r.entry.detail.as_deref()?;
            detail.rsplit("change ").next()?.parse().ok()
        })
        .collect();
    let missing: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|s| !audited.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged changes have no audit entry after kill -9: {:?}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test]
async fn an_import_cut_off_by_kill_9_says_so_and_runs_again_safely() {
    let scratch = tempfile::tempdir().unwrap();
    let Node {
        p,
        config,
        target,
        cert,
    } = Node::init(scratch.path());
    let rows = 20_000u64;
    let id = |n| hufu_node::sample::national_id(p, n).as_str().to_owned();
    let mut csv = String::from("national_id,colour,as_of\n");
    for n in 0..rows {
        csv.push_str(&format!("{},red,2022-01-10T08:00:00Z\n", id(n)));
    }
    let file = scratch.path().join("statuses.csv");
    std::fs::write(&file, csv).unwrap();

    let mut node = serve(&config);
    let mut client = admin(&target, &cert).await;
    let import = || import_csv(&file, &config);
    let cli = import();
    // Killed once the first thousand rows are in, long before the end.
    let stored = |n: u64| GetStatusRequest {
        subject: Some(get_status_request::Subject::NationalId(id(n))),
    };
    let mut committed = false;
    for _ in 0..600 {
        if client.get_status(stored(999)).await.is_ok() {
            committed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(committed, "the import did not start");
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rows were sent"), "{stderr}");
    assert!(
        stderr.contains("running the same import again is safe"),
        "{stderr}"
    );

    // Run again: every row stored, none refused, the first ones unchanged.
    let _node = serve(&config);
    let mut client = admin(&target, &cert).await;
    let cli = import();
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("imported {rows} of {rows} rows")),
        "{stdout}"
    );
    for n in [0, 999, rows - 1] {
        let record = client.get_status(stored(n)).await.unwrap().into_inner();
        assert_eq!(record.record.unwrap().colour, Colour::Red as i32);
    }
}

/// Runs `hufu status import` of `file` against the node of `config`.
fn import_csv(file: &std::path::Path, config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hufu"))
        .args(["status", "import"])
        .arg(file)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_node_killed_while_merging_statuses_comes_back_with_its_change_logs_statuses() {
    let scratch = tempfile::tempdir().unwrap();
    let Node {
        p,
        config,
        target,
        cert,
    } = Node::init(scratch.path());
    // So few statuses held unmerged that merges run through the whole
    // import: the kill below lands in one, or between two.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("# [storage]", "[storage]\nunmerged_statuses = 1000"),
    )
    .unwrap();
    let id = |n: u64| hufu_node::sample::national_id(p, n).as_str().to_owned();
    let csv = |rows: u64, colour: &str, day: u32| {
        let mut csv = String::from("national_id,colour,as_of\n");
        for n in 0..rows {
            csv.push_str(&format!("{},{colour},2022-01-{day}T08:00:00Z\n", id(n)));
        }
        let file = scratch.path().join(format!("{colour}.csv"));
        std::fs::write(&file, csv).unwrap();
        file
    };
    let (merged, rows) = (3_000u64, 8_000u64);
    let (green, red) = (csv(merged, "green", 10), csv(rows, "red", 11));

    let mut node = serve(&config);
    let mut client = admin(&target, &cert).await;
    let out = tokio::task::spawn_blocking({
        let (green, config) = (green.clone(), config.clone());
        move || import_csv(&green, &config).wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every holder turned red in order, changes 3001 on: killed halfway.
    let cli = import_csv(&red, &config);
    let status = |n: u64| GetStatusRequest {
        subject: Some(get_status_request::Subject::NationalId(id(n))),
    };
    let mut halfway = false;
    for _ in 0..1_500 {
        if let Ok(r) = client.get_status(status(rows / 2)).await
            && r.into_inner().record.unwrap().colour == Colour::Red as i32
        {
            halfway = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(halfway, "the import did not get halfway");
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    let _ = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap()).await;

    // Holders 0..k are red, the rest as before, for one k: the change log's
    // statuses through its head, change 3000 + k.
    let node = serve(&config);
    let mut client = admin(&target, &cert).await;
    let mut red_through = None;
    for n in 0..rows {
        let colour = match client.get_status(status(n)).await {
            Ok(r) => Some(r.into_inner().record.unwrap().colour),
            Err(e) if e.code() == tonic::Code::NotFound => None,
            Err(e) => panic!("holder {n}: {e}"),
        };
        if red_through.is_none() && colour != Some(Colour::Red as i32) {
            red_through = Some(n);
        }
        let want = match red_through {
            None => Some(Colour::Red as i32),
            Some(_) if n < merged => Some(Colour::Green as i32),
            Some(_) => None,
        };
        assert_eq!(colour, want, "holder {n} after kill -9");
    }
    let k = red_through.unwrap_or(rows);
    assert!(k > rows / 2, "{k} red of the {} seen red", rows / 2 + 1);
    let next = client
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p, 90_000, Colour::Green)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.sequence, merged + k + 1, "the feed head after kill -9");
    drop(node);
}
