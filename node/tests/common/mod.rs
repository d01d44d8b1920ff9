//! Shared set-up for the node's integration tests: real provinces in temp
//! directories, real nodes on 127.0.0.1:0, real mutual TLS.
#![allow(dead_code)]

pub mod browser;
pub mod legacy;
pub mod raw;
pub mod replicas;

use hufu_certs::Province;
use hufu_node::local::LocalProvince;
use hufu_node::sample;
use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::{Colour, ImportStatusesRequest, StatusInput, status_input};

pub fn province(code: &str) -> Province {
    Province::parse(code).unwrap()
}

pub struct Running {
    pub scratch: tempfile::TempDir,
    pub province: LocalProvince,
}

/// A province initialised in a temp dir with its node started.
pub async fn start(code: &str) -> Running {
    let scratch = tempfile::tempdir().unwrap();
    let mut province = LocalProvince::init(scratch.path(), self::province(code)).unwrap();
    province.start().await.unwrap();
    Running { scratch, province }
}

/// Status input for the `n`th sample holder.
pub fn sample_input(p: Province, n: u64, colour: Colour) -> StatusInput {
    StatusInput {
        subject: Some(status_input::Subject::NationalId(
            sample::national_id(p, n).as_str().to_owned(),
        )),
        colour: colour as i32,
        as_of: Some(timestamp(now_unix() - 600)),
        last_negative_test: Some(timestamp(now_unix() - 3600)),
        reason: 0,
    }
}

/// Imports `count` sample holders (colours cycling green, yellow, red) and
/// returns their pseudonyms, computed independently with the province secret.
pub async fn import_samples(province: &LocalProvince, count: u64) -> Vec<String> {
    let p = province.province;
    let rows: Vec<ImportStatusesRequest> = (0..count)
        .map(|n| ImportStatusesRequest {
            line: n + 1,
            status: Some(sample_input(p, n, colour_of(n))),
            legacy_code: String::new(),
        })
        .collect();
    let summary = province
        .admin()
        .await
        .unwrap()
        .import_statuses(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, count);
    assert!(summary.rejected.is_empty(), "{:?}", summary.rejected);
    (0..count).map(|n| pseudonym(province, n)).collect()
}

pub fn colour_of(n: u64) -> Colour {
    match n % 3 {
        0 => Colour::Green,
        1 => Colour::Yellow,
        _ => Colour::Red,
    }
}

/// The pseudonym of the `n`th sample holder, from the province's secret file.
pub fn pseudonym(province: &LocalProvince, n: u64) -> String {
    let bytes = std::fs::read(province.config.path(&province.config.holder_secret)).unwrap();
    hufu_federation::holder::HolderSecret::new(&bytes)
        .unwrap()
        .pseudonym(&sample::national_id(province.province, n))
        .to_string()
}

/// Logs to the test's output when RUST_LOG is set (for debugging).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// What the node logs on the calling thread while the returned guard lives
/// (a current-thread test runtime runs the node there too), as text.
pub fn capture_logs() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(logs.clone())
        .finish();
    (logs.clone(), tracing::subscriber::set_default(subscriber))
}

/// Log text written so far, shared with the subscriber that writes it.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> CapturedLogs {
        self.clone()
    }
}

/// The node's Prometheus text, fetched over plain HTTP from its metrics listener.
pub async fn metrics(province: &LocalProvince) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = province
        .node
        .as_ref()
        .and_then(|n| n.metrics_addr)
        .expect("a running node with a metrics listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// Admin.IssueCode for the `n`th sample holder of `province`, with the
/// holder's `name` as on the identity card (empty: none).
pub async fn issue_code_named(
    province: &LocalProvince,
    n: u64,
    name: &str,
) -> hufu_proto::v1::IssueCodeResponse {
    province
        .admin()
        .await
        .unwrap()
        .issue_code(hufu_proto::v1::IssueCodeRequest {
            subject: Some(hufu_proto::v1::issue_code_request::Subject::NationalId(
                sample::national_id(province.province, n)
                    .as_str()
                    .to_owned(),
            )),
            name: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls `f` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A federation of `codes` under `root`, tuned for quick tests (heartbeats
/// every 100 ms, replicas stale after 1 s), with `tune` applied to each
/// config afterwards; not started.
pub fn quick_federation(
    root: &std::path::Path,
    codes: &[&str],
    tune: impl Fn(&mut hufu_node::config::NodeConfig),
) -> hufu_node::local::LocalFederation {
    let provinces: Vec<Province> = codes.iter().map(|c| province(c)).collect();
    hufu_node::local::LocalFederation::init(root, &provinces, |c| {
        quick(c);
        tune(c);
    })
    .unwrap()
}

/// The quick tests' settings: heartbeats every 100 ms, replicas stale
/// after 1 s, peers given 300 ms, gossip every second.
pub fn quick(c: &mut hufu_node::config::NodeConfig) {
    c.federation.heartbeat_ms = 100;
    c.federation.max_replica_age_secs = 1;
    c.federation.peer_deadline_ms = 300;
    c.federation.gossip_secs = 1;
}

/// Rotates `province`'s code-signing key through its admin.
pub async fn rotate_key(province: &LocalProvince) -> hufu_proto::v1::RotateKeyResponse {
    province
        .admin()
        .await
        .unwrap()
        .rotate_key(hufu_proto::v1::RotateKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Issues a code at `province` for its `n`th sample holder.
pub async fn issue_code(province: &LocalProvince, n: u64) -> hufu_proto::v1::IssueCodeResponse {
    issue_code_named(province, n, "").await
}

/// Runs the built `hufu` command with `args` and returns what it did.
pub async fn hufu<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hufu"))
        .args(args)
        .output()
        .await
        .unwrap()
}

/// Runs the built `hufu` command with `args`; it must succeed.
pub async fn hufu_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let out = hufu(args).await;
    assert!(
        out.status.success(),
        "hufu {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `hufu serve` process; killed when dropped, so none is left behind.
pub struct Serve(pub std::process::Child, std::path::PathBuf);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serve {
    /// Starts `hufu serve --config <config>`, its log in `log`.
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Serve {
        Serve(
            std::process::Command::new(env!("CARGO_BIN_EXE_hufu"))
                .args(["serve", "--config"])
                .arg(config)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
            log.to_path_buf(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Fails the test, with the end of the node's log, if it has ended.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!(
                "`hufu serve` ended ({status}); its log ends:\n{}",
                self.log_tail()
            );
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.1).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A memory figure of process `pid` in KiB: `VmRSS` (resident now) or
/// `VmHWM` (peak resident).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Every entry of `province`'s audit log, flushed first.
pub async fn audit_entries(province: &LocalProvince) -> Vec<hufu_federation::audit::AuditEntry> {
    let state = province.node.as_ref().unwrap().state.clone();
    tokio::task::spawn_blocking(move || {
        let log = state.audit.log().unwrap();
        log.flush().unwrap();
        let size = log.size().unwrap();
        log.entries(0, size)
            .unwrap()
            .into_iter()
            .map(|(_, bytes)| hufu_federation::audit::AuditEntry::decode(&bytes).unwrap())
            .collect()
    })
    .await
    .unwrap()
}

/// Every file under `dir`, recursively.
pub fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir).unwrap() {
        let path = item.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What every grpcio script starts with: stubs generated from the
/// repository's protos, and a mutual-TLS channel to the node (`channel`,
/// `status_pb2`, `status_pb2_grpc` and the script's own `args` in scope).
const GRPCIO_PREAMBLE: &str = r#"
import json, subprocess, sys, tempfile
proto_dir, addr, ca_path, cert_path, key_path = sys.argv[1:6]
args = sys.argv[6:]
stubs = tempfile.mkdtemp()
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
     "--python_out", stubs, "--grpc_python_out", stubs, "hufu/v1/status.proto"],
    check=True,
)
sys.path.insert(0, stubs)
import grpc
from hufu.v1 import status_pb2, status_pb2_grpc
read = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(
    root_certificates=read(ca_path), private_key=read(key_path), certificate_chain=read(cert_path))
channel = grpc.secure_channel(addr, creds)
"#;

/// Runs a Python `script` with grpcio against `at`'s node, as a terminal
/// of its province (a certificate issued for it), with `args`; returns the
/// JSON it prints. Needs `scripts/test`'s Python environment.
pub async fn grpcio(
    at: &LocalProvince,
    scratch: &std::path::Path,
    script: &str,
    args: &[&str],
) -> serde_json::Value {
    let (cert, key) = hufu_node::init::issue_cert(
        &at.dir,
        hufu_certs::Role::Terminal,
        "grpcio",
        &hufu_certs::LeafOptions::default(),
    )
    .unwrap();
    let ca = scratch.join(format!("{}-ca.pem", at.province));
    std::fs::write(&ca, at.ca_pem().unwrap()).unwrap();
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut run = tokio::process::Command::new("python3");
    run.arg("-c")
        .arg(format!("{GRPCIO_PREAMBLE}{script}"))
        .arg(&proto_dir)
        .arg(at.addr().unwrap().to_string())
        .args([&ca, &cert, &key])
        .args(args);
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), run.output())
        .await
        .expect("the grpcio client finishes within a minute")
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): run scripts/test, which installs grpcio")
        });
    assert!(
        output.status.success(),
        "grpcio client failed (run scripts/test once to set up grpcio): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `Verify` of `text` by a terminal of `at`.
pub async fn verify(at: &LocalProvince, text: &str) -> hufu_proto::v1::VerifyResponse {
    verify_as(at, at, text).await
}

/// `Verify` of `text` at `at` by a terminal whose certificate the CA in
/// `ca`'s directory issued (a further replica of a province holds no CA key).
pub async fn verify_as(
    at: &LocalProvince,
    ca: &LocalProvince,
    text: &str,
) -> hufu_proto::v1::VerifyResponse {
    let cert = ca.client_cert(hufu_certs::Role::Terminal, "gate").unwrap();
    hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient::new(
        at.channel_as(&cert).await.unwrap(),
    )
    .verify(hufu_proto::v1::VerifyRequest {
        token: text.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Starts `province`'s node on a runtime of one thread of its own, apart
/// from the test's (where its clients run), so that a test can hold the
/// node's runtime busy: its terminals are served there. Stop it with
/// [`stop_on_own_runtime`].
pub async fn start_on_own_runtime(
    mut province: LocalProvince,
) -> (tokio::runtime::Runtime, LocalProvince) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let province = runtime
        .spawn(async move {
            province.start().await.unwrap();
            province
        })
        .await
        .unwrap();
    (runtime, province)
}

/// Stops a node started by [`start_on_own_runtime`], then its runtime.
pub async fn stop_on_own_runtime(runtime: tokio::runtime::Runtime, mut province: LocalProvince) {
    runtime
        .spawn(async move { province.stop().await })
        .await
        .unwrap()
        .unwrap();
    runtime.shutdown_background();
}
