//! `hufu status import` as an operator runs it: the real binary against a
//! real node, with bad rows reported by line and good rows stored.

mod common;

use std::process::Command;

use hufu_node::sample;
use hufu_proto::v1::{Colour, GetStatusRequest, get_status_request};

fn hufu() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hufu"))
}

#[tokio::test]
async fn import_reports_bad_rows_and_keeps_good_ones() {
    let node = common::start("440000").await;
    let p = node.province.province;
    let id = |n| sample::national_id(p, n).as_str().to_owned();
    let mut bad_checksum = id(2);
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == '0' { '1' } else { '0' });

    let csv = format!(
        "national_id,colour,as_of,last_negative_test,reason\n\
         {},green,2022-01-10T08:00:00Z,2022-01-09T08:00:00Z,\n\
         \n\
         {bad_checksum},red,,,positive_test\n\
         {},purple,,,\n\
         {},red,1641801600,,close_contact\n\
         {},yellow,not-a-time,,\n",
        id(1),
        id(3),
        id(4),
        id(5),
    );
    let file = node.scratch.path().join("statuses.csv");
    std::fs::write(&file, csv).unwrap();
    let out = import_file(&node, file).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("imported 2 of 6 rows"), "{stdout}");
    assert!(stdout.contains("4 rejected"), "{stdout}");
    assert!(stderr.contains("statuses.csv:3: empty line"), "{stderr}");
    assert!(
        stderr.contains("statuses.csv:4: national id check character"),
        "{stderr}"
    );
    assert!(
        stderr.contains("statuses.csv:5: unknown colour \"purple\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("statuses.csv:7: bad time \"not-a-time\""),
        "{stderr}"
    );

    // Lines 2 and 6 were stored; the others were not.
    let mut admin = node.province.admin().await.unwrap();
    let get = |n: u64| GetStatusRequest {
        subject: Some(get_status_request::Subject::NationalId(id(n))),
    };
    let one = admin
        .get_status(get(1))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(one.colour, Colour::Green as i32);
    assert_eq!(one.as_of.unwrap().seconds, 1_641_801_600);
    assert_eq!(one.last_negative_test.unwrap().seconds, 1_641_715_200);
    let five = admin
        .get_status(get(4))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(five.colour, Colour::Red as i32);
    for n in [3, 5] {
        assert_eq!(
            admin.get_status(get(n)).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
    }

    // The same rows as JSON Lines; an older as_of than stored is refused.
    let jsonl = format!(
        "{{\"national_id\":\"{}\",\"colour\":\"yellow\",\"as_of\":\"2022-01-11T08:00:00Z\",\"reason\":\"missing_test\"}}\n\
         {{\"national_id\":\"{}\",\"colour\":\"green\",\"as_of\":\"2021-01-01T00:00:00Z\"}}\n\
         {{\"colour\":\"green\"}}\n",
        id(1),
        id(4),
    );
    let file = node.scratch.path().join("more.jsonl");
    std::fs::write(&file, jsonl).unwrap();
    let config = node.province.dir.join("hufu.toml");
    let addr = node.province.addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        hufu()
            .args(["status", "import"])
            .arg(&file)
            .arg("--config")
            .arg(&config)
            .args(["--endpoint", &addr])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("imported 1 of 3 rows"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("more.jsonl:2: stored status is newer"),
        "{stderr}"
    );
    assert!(
        stderr.contains("more.jsonl:3: no national_id or holder"),
        "{stderr}"
    );
    let one = admin
        .get_status(get(1))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(one.colour, Colour::Yellow as i32);
}

#[tokio::test]
async fn no_national_id_is_stored() {
    let node = common::start("440000").await;
    common::import_samples(&node.province, 200).await;
    node.province
        .node
        .as_ref()
        .unwrap()
        .state
        .store
        .flush()
        .await
        .unwrap();
    let p = node.province.province;
    // Search every byte under the data directory for every imported id.
    let ids: Vec<String> = (0..200)
        .map(|n| sample::national_id(p, n).as_str().to_owned())
        .collect();
    let mut files = vec![
        node.province.config.path(&node.province.config.data_dir),
        node.province.config.audit_dir(),
    ];
    let mut seen = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        seen += bytes.len();
        for id in &ids {
            assert!(
                !bytes.windows(id.len()).any(|w| w == id.as_bytes()),
                "national id found in {}",
                path.display()
            );
        }
    }
    assert!(seen > 0, "the data directory holds the imported statuses");
}

/// Rows the grpcio import streams: a million when asked
/// (`HUFU_GRPCIO_ROWS=1000000`), fewer by default so the debug build's test
/// stays near 20 seconds. Past the budget of h2's small-frame check either
/// way: that was cut off after 1,000 to 11,000 rows.
fn grpcio_rows() -> u64 {
    std::env::var("HUFU_GRPCIO_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

#[tokio::test]
async fn a_grpcio_client_streams_a_large_import() {
    let node = common::start("440000").await;
    let scratch = node.scratch.path();
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let stubs = scratch.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let protoc = tokio::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", proto])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .args(["hufu/v1/admin.proto", "hufu/v1/status.proto"])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): run scripts/test, which sets up grpcio")
        });
    assert!(
        protoc.status.success(),
        "grpc_tools.protoc failed (run scripts/test, which installs grpcio-tools): {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let admin = node
        .province
        .client_cert(hufu_certs::Role::Admin, "ops")
        .unwrap();
    let (ca, cert, key) = (
        scratch.join("ca.pem"),
        scratch.join("ops.pem"),
        scratch.join("ops.key"),
    );
    std::fs::write(&ca, node.province.ca_pem().unwrap()).unwrap();
    std::fs::write(&cert, &admin.cert_pem).unwrap();
    std::fs::write(&key, &admin.key_pem).unwrap();

    let rows = grpcio_rows();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/import_rows.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(&stubs)
            .arg(node.province.addr().unwrap().to_string())
            .args([&ca, &cert, &key])
            .arg(rows.to_string())
            .output(),
    )
    .await
    .expect("the import finishes")
    .unwrap();
    assert!(
        out.status.success(),
        "grpcio import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted"], rows, "{summary}");
    assert_eq!(summary["rejected_count"], 0, "{summary}");
    eprintln!(
        "grpcio imported {rows} rows in {:.1} s",
        summary["seconds"].as_f64().unwrap()
    );
    // The last row is stored.
    let state = &node.province.node.as_ref().unwrap().state;
    assert_eq!(state.store.last_sequence().await, rows);
    // Stopped as an operator would: storage flushed and closed by the
    // node's shutdown, not dropped with the test's runtime.
    let mut node = node;
    node.province.stop().await.unwrap();
}

/// Runs `hufu status import FILE` against `node`.
async fn import_file(node: &common::Running, file: std::path::PathBuf) -> std::process::Output {
    let config = node.province.dir.join("hufu.toml");
    let addr = node.province.addr().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        hufu()
            .args(["status", "import"])
            .arg(&file)
            .arg("--config")
            .arg(&config)
            .args(["--endpoint", &addr])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_import_of_many_bad_rows_is_summarised_and_keeps_the_good_ones() {
    let node = common::start("440000").await;
    let p = node.province.province;
    let id = |n| sample::national_id(p, n).as_str().to_owned();
    // 80,000 rows the node refuses (a wrong check character): listed in
    // full, their reasons would outgrow the largest reply.
    let mut csv = String::from("national_id,colour\n");
    for n in 0..80_010u64 {
        let mut national_id = id(n);
        if n >= 10 {
            let last = national_id.pop().unwrap();
            national_id.push(if last == '0' { '1' } else { '0' });
        }
        csv.push_str(&format!("{national_id},green\n"));
    }
    // One line that is not UTF-8, refused here before sending.
    let mut bytes = csv.into_bytes();
    bytes.extend_from_slice(b"\xff\xfe,green\n");
    let file = node.scratch.path().join("many-bad.csv");
    std::fs::write(&file, bytes).unwrap();

    let out = import_file(&node, file).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("imported 10 of 80011 rows from") && stdout.contains("; 80001 rejected"),
        "{stdout}"
    );
    assert!(
        stderr.contains("many-bad.csv:12: national id check character"),
        "{}",
        &stderr[..stderr.len().min(500)]
    );
    assert!(
        stderr.contains(
            "many-bad.csv:80012: byte 0xff at column 1 is not UTF-8: save the file as UTF-8"
        ),
        "{}",
        &stderr[stderr.len().saturating_sub(500)..]
    );
    assert!(stderr.contains("79000 more rejected lines not listed"));
    // Not a terminal: no progress lines.
    assert!(!stderr.contains("rows sent"));

    for n in [0, 9] {
        assert_eq!(stored(&node, id(n)).await.colour, Colour::Green as i32);
    }
}

/// The status stored for `national_id`, read through the admin service.
async fn stored(node: &common::Running, national_id: String) -> hufu_proto::v1::StatusRecord {
    let request = GetStatusRequest {
        subject: Some(get_status_request::Subject::NationalId(national_id)),
    };
    let mut admin = node.province.admin().await.unwrap();
    let response = admin.get_status(request).await.unwrap();
    response.into_inner().record.unwrap()
}

/// After a restart (the node's filter of the holders it holds built again),
/// rows of holders already stored are decided by what is stored, as an
/// import always did: the same status unchanged, an older one refused, a
/// newer one stored; only the new and newer ones are changes.
#[tokio::test]
async fn an_import_after_a_restart_decides_rows_of_stored_holders_by_what_is_stored() {
    let mut node = common::start("440000").await;
    let p = node.province.province;
    let id = |n| sample::national_id(p, n).as_str().to_owned();
    let csv = |rows: &[(std::ops::Range<u64>, &str, &str)]| {
        let mut csv = String::from("national_id,colour,as_of\n");
        for (range, colour, as_of) in rows {
            for n in range.clone() {
                csv.push_str(&format!("{},{colour},{as_of}\n", id(n)));
            }
        }
        csv
    };
    let (old, then, later) = (
        "2021-06-01T00:00:00Z",
        "2022-01-10T08:00:00Z",
        "2022-02-01T08:00:00Z",
    );
    let first = node.scratch.path().join("first.csv");
    std::fs::write(&first, csv(&[(0..300, "green", then)])).unwrap();
    let out = import_file(&node, first).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("imported 300 of 300 rows"), "{stdout}");

    node.province.stop().await.unwrap();
    node.province.start().await.unwrap();
    let second = node.scratch.path().join("second.csv");
    std::fs::write(
        &second,
        csv(&[
            (0..100, "green", then),
            (100..200, "red", old),
            (200..300, "yellow", later),
            (300..400, "red", then),
        ]),
    )
    .unwrap();
    let out = import_file(&node, second).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("imported 300 of 400 rows") && stdout.contains("100 rejected"),
        "{stdout}\n{stderr}"
    );
    for line in [102, 201] {
        assert!(
            stderr.contains(&format!("second.csv:{line}: stored status is newer")),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("second.csv:101:"), "{stderr}");

    for (n, colour) in [
        (0, Colour::Green),
        (150, Colour::Green),
        (250, Colour::Yellow),
        (350, Colour::Red),
    ] {
        let record = stored(&node, id(n)).await;
        assert_eq!(record.colour, colour as i32, "holder {n}");
    }
    let mut admin = node.province.admin().await.unwrap();
    // 300 changes, then 100 newer and 100 new: the unchanged and the
    // refused rows are none.
    let put = admin
        .put_status(hufu_proto::v1::PutStatusRequest {
            status: Some(common::sample_input(p, 1_000, Colour::Green)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.sequence, 501);
    node.province.stop().await.unwrap();
}

#[tokio::test]
async fn an_empty_file_is_refused_before_dialling() {
    let scratch = tempfile::tempdir().unwrap();
    // Nothing listens on this port: an attempt to dial would say so.
    let endpoint = format!("127.0.0.1:{}", hufu_node::ports::free_port().unwrap());
    for (name, text) in [("empty.csv", ""), ("header.csv", "national_id,colour\n")] {
        let file = scratch.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = hufu()
            .args(["status", "import"])
            .arg(&file)
            .args(["--endpoint", &endpoint, "--province", "440000"])
            .args(["--ca", "/nonexistent"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("nothing to import"), "{name}: {stderr}");
    }
}
