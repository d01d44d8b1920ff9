//! A full disk, for real: the node's storage on an 8 MiB tmpfs, filled up
//! while the node runs. A refused write is never visible, health says
//! NOT_SERVING while nothing can be written, the node writes again by
//! itself once there is room, and it stops cleanly while the disk is full;
//! a node started on a full disk says so, and starts once there is room.
//! Needs root (to mount the tmpfs): without it the test fails, loudly.
//! Statuses that keep failing to merge into storage refuse writes the
//! same way.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_node::local::LocalProvince;
use hufu_node::store::TREE;
use hufu_node::store::bucket::BUCKET;
use hufu_proto::v1::{
    Colour, GetStatusRequest, ImportStatusesRequest, PutStatusRequest, get_status_request,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// An 8 MiB tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(at)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "THIS TEST NEEDS ROOT: cannot mount an 8 MiB tmpfs at {} to fill a disk for real ({}); run it as root",
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: files a failed test left open do not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a filler file until the disk is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        if file.write_all(&block).is_err() {
            break;
        }
    }
    // Byte by byte to the very end.
    while file.write_all(&[0]).is_ok() {}
    path
}

fn national_id(p: Province, n: u64) -> String {
    hufu_node::sample::national_id(p, n).as_str().to_owned()
}

async fn put(province: &LocalProvince, n: u64) -> Result<u64, tonic::Status> {
    let mut admin = province.admin().await.unwrap();
    admin
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(province.province, n, Colour::Red)),
        })
        .await
        .map(|r| r.into_inner().sequence)
}

/// Whether holder `n` has a status: None while the store cannot be read
/// (reopening after its own write failed, on a disk still full).
async fn stored(province: &LocalProvince, n: u64) -> Option<bool> {
    let mut admin = province.admin().await.unwrap();
    let reply = admin
        .get_status(GetStatusRequest {
            subject: Some(get_status_request::Subject::NationalId(national_id(
                province.province,
                n,
            ))),
        })
        .await;
    match reply {
        Ok(_) => Some(true),
        Err(e) if e.code() == tonic::Code::NotFound => Some(false),
        Err(e) if e.code() == tonic::Code::Unavailable => None,
        Err(e) => panic!("reading holder {n}: {e}"),
    }
}

async fn health(province: &LocalProvince) -> ServingStatus {
    let channel = province
        .channel(hufu_certs::Role::Admin, "ops")
        .await
        .unwrap();
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    reply.into_inner().status()
}

/// Polls until `want` health, for at most 10 s.
async fn until_health(province: &LocalProvince, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(province).await != want {
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes new holders from `*next` on until one is refused; returns the
/// acknowledged ones and the refused one.
async fn write_until_refused(province: &LocalProvince, next: &mut u64) -> (Vec<u64>, u64) {
    let mut acknowledged = Vec::new();
    for _ in 0..5000 {
        let n = *next;
        *next += 1;
        match put(province, n).await {
            Ok(_) => acknowledged.push(n),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
                assert!(e.message().contains("disk"), "{}", e.message());
                return (acknowledged, n);
            }
        }
    }
    panic!("5000 writes on a full disk were all acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_invisibly_and_the_node_recovers_by_itself() {
    common::logs();
    let scratch = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&scratch.path().join("disk"));
    let p = common::province("440000");
    let mut province = LocalProvince::init(scratch.path(), p).unwrap();
    province.config.data_dir = disk.0.join("data");
    province.start().await.unwrap();
    assert_eq!(health(&province).await, ServingStatus::Serving);
    let mut next = 0;
    put(&province, next).await.unwrap();
    next += 1;

    // Full: writes are refused, and a refused write is never read back.
    let filler = fill(&disk.0);
    let (acknowledged, refused) = write_until_refused(&province, &mut next).await;
    until_health(&province, ServingStatus::NotServing).await;
    assert_ne!(
        stored(&province, refused).await,
        Some(true),
        "a refused write is visible"
    );
    for &n in acknowledged.iter().chain([&0]) {
        assert_ne!(
            stored(&province, n).await,
            Some(false),
            "acknowledged holder {n} lost"
        );
    }
    // An import on the full disk ends, refused, saying what it stored:
    // the node does not wait forever to read the rest of it.
    let rows: Vec<ImportStatusesRequest> = (0..5_000u64)
        .map(|i| ImportStatusesRequest {
            line: i + 1,
            status: Some(common::sample_input(p, 1_000_000 + i, Colour::Red)),
            legacy_code: String::new(),
        })
        .collect();
    let mut admin = province.admin().await.unwrap();
    let import = admin.import_statuses(tokio_stream::iter(rows));
    let err = tokio::time::timeout(Duration::from_secs(30), import)
        .await
        .expect("an import on a full disk ends")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("import stopped after"), "{err}");

    // Still full: refused again, quickly, and still not visible.
    let again = next;
    next += 1;
    assert_eq!(
        put(&province, again).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    assert_ne!(stored(&province, again).await, Some(true));

    // Room again: the node writes by itself, no restart.
    std::fs::remove_file(&filler).unwrap();
    until_health(&province, ServingStatus::Serving).await;
    let after = next;
    next += 1;
    put(&province, after).await.unwrap();
    assert_eq!(stored(&province, after).await, Some(true));
    assert_eq!(stored(&province, refused).await, Some(false));
    for &n in acknowledged.iter().chain([&0]) {
        assert_eq!(
            stored(&province, n).await,
            Some(true),
            "acknowledged holder {n} lost"
        );
    }

    // Full again, then a clean stop; after a restart with room, what was
    // acknowledged is there and what was refused is not.
    let filler = fill(&disk.0);
    let (acknowledged, refused) = write_until_refused(&province, &mut next).await;
    province.stop().await.expect("a clean stop on a full disk");
    std::fs::remove_file(&filler).unwrap();
    province.start().await.unwrap();
    for &n in acknowledged.iter().chain([&0, &after]) {
        assert_eq!(
            stored(&province, n).await,
            Some(true),
            "acknowledged holder {n} lost"
        );
    }
    assert_eq!(stored(&province, refused).await, Some(false));
    province.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_started_on_a_full_disk_says_so_and_starts_once_there_is_room() {
    let scratch = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&scratch.path().join("disk"));
    let mut province = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    province.config.data_dir = disk.0.join("data");
    province.config.listen = "127.0.0.1:0".parse().unwrap();
    province.config.metrics_listen = None;
    let config = province.dir.join("hufu.toml");
    std::fs::write(&config, toml::to_string(&province.config).unwrap()).unwrap();
    let filler = fill(&disk.0);
    let serve = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_hufu"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let out = tokio::time::timeout(Duration::from_secs(60), serve().wait_with_output())
        .await
        .expect("a node on a full disk stops at once")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = format!(
        "the disk holding {} is full (0 KiB free)",
        disk.0.join("data").display()
    );
    assert!(stderr.contains(&said), "{stderr}");
    assert!(stderr.contains("free space on it"), "{stderr}");
    // With room again, the same node starts (sled's half-written start
    // on the full disk is not taken for damage).
    std::fs::remove_file(&filler).unwrap();
    let mut node = serve();
    let mut stdout = tokio::io::BufReader::new(node.stdout.take().unwrap());
    let mut line = String::new();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        use tokio::io::AsyncBufReadExt;
        loop {
            line.clear();
            if stdout.read_line(&mut line).await.unwrap() == 0 {
                return false;
            }
            if line.contains("serving on") {
                return true;
            }
        }
    })
    .await
    .expect("the node starts");
    assert!(started, "the node ended: {line}");
    node.start_kill().unwrap();
    let _ = node.wait().await;
}

/// Damages every bucket of `province`'s own statuses in its running
/// node's store, once all its statuses are merged into them: a merge into
/// any of them fails from then on.
async fn damage_buckets(province: &LocalProvince) {
    let store = &province.node.as_ref().unwrap().state.store;
    store.merge().await.unwrap();
    let tree = store.db().unwrap().open_tree(TREE).unwrap();
    let mut prefix = vec![BUCKET];
    prefix.extend_from_slice(&province.province.code().to_be_bytes());
    let buckets: Vec<_> = tree
        .scan_prefix(&prefix)
        .keys()
        .map(|k| k.unwrap())
        .collect();
    assert!(!buckets.is_empty());
    for key in buckets {
        // Not even one holder's 16 bytes.
        tree.insert(key, &[0xff; 3][..]).unwrap();
    }
}

/// Statuses that keep failing to merge into their buckets (here buckets
/// damaged under the running node) make the node refuse writes, with an
/// error that says so, health NOT_SERVING and `hufu_store_writable` 0,
/// instead of writers piling statuses up in memory or waiting for room
/// without a word. What was written before is still read.
#[tokio::test]
async fn statuses_that_keep_failing_to_merge_make_the_node_refuse_writes_and_say_so() {
    let mut node = common::start("440000").await;
    let province = &mut node.province;
    for n in 0..10 {
        put(province, n).await.unwrap();
    }
    damage_buckets(province).await;

    // A new holder's write reads no bucket: durable in the change log, it
    // is accepted, to be merged later. (One the node's filter of stored
    // holders takes for stored, 1 in 100, reads its damaged bucket and is
    // refused at once: the next is taken.)
    let mut accepted = None;
    for n in 100..110 {
        if put(province, n).await.is_ok() {
            accepted = Some(n);
            break;
        }
    }
    let accepted = accepted.expect("no new holder's write accepted");
    until_health(province, ServingStatus::NotServing).await;
    let refused = put(province, 200).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(
        refused
            .message()
            .contains("cannot merge statuses into its storage"),
        "{}",
        refused.message()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::metrics(province)
        .await
        .lines()
        .any(|l| l == "hufu_store_writable 0")
    {
        assert!(Instant::now() < deadline, "hufu_store_writable never 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored(province, accepted).await, Some(true));
    province.stop().await.unwrap();
}
