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
