//! What an operator meets on ordinary days: `hufu config check`, trust
//! lists installed only into stopped nodes, gauges right after a restart,
//! logs without colour codes that say when a peer's feed goes down and comes
//! back, error messages that say what to do, shell completions, and a
//! backup restored into a working node.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hufu_certs::Role;
use hufu_node::config::NodeConfig;
use hufu_node::federation::ops;
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::{
    GetStatusRequest, IssueCodeRequest, PutStatusRequest, Verdict, VerifyRequest,
};
use hufu_proto::v1::{get_status_request, issue_code_request};
use tokio::io::AsyncBufReadExt;

fn hufu() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hufu"));
    command.env("RUST_LOG", "info").kill_on_drop(true);
    command
}

/// Writes `config` over the province's hufu.toml.
fn save(province: &LocalProvince, config: &NodeConfig) -> std::path::PathBuf {
    let path = province.dir.join("hufu.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn config_check_finds_what_serve_would_trip_over() {
    let scratch = tempfile::tempdir().unwrap();
    let gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    let sn = LocalProvince::init(scratch.path(), common::province("610000")).unwrap();
    let path = gd.dir.join("hufu.toml");
    // A fixed port, as an operator's config has: the check binds it itself,
    // so it is picked free just before.
    let mut config = gd.config.clone();
    config.listen = format!("127.0.0.1:{}", hufu_node::ports::free_port().unwrap())
        .parse()
        .unwrap();
    config.metrics_listen = None;
    config.client.endpoint = config.listen.to_string();
    save(&gd, &config);
    let report = hufu_node::config_check::check(&path).await;
    assert!(report.passed(), "{:?}", report.findings);

    // Limits that start silently and then fail every call are refused, by
    // the check and by serve.
    let mut bad = config.clone();
    bad.limits.max_concurrent_streams = 0;
    bad.limits.max_message_bytes = 0;
    bad.limits.terminals_nice = 20;
    save(&gd, &bad);
    let report = hufu_node::config_check::check(&path).await;
    let problems: Vec<&str> = report.problems().collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].starts_with("limits.max_concurrent_streams = 0"));
    assert!(problems[1].starts_with("limits.max_message_bytes = 0"));
    assert!(problems[2].starts_with("limits.terminals_nice = 20 is out of range"));
    let err = hufu_node::server::start(&NodeConfig::load(&path).unwrap())
        .await
        .err()
        .expect("serve refuses a stream limit of 0");
    assert!(
        format!("{err:#}").contains("limits.max_concurrent_streams = 0"),
        "{err:#}"
    );

    // Another province's node certificate, an unreadable secret, a port in
    // use: each named.
    let mut bad = config.clone();
    bad.node_cert = sn.config.path(&sn.config.node_cert);
    bad.node_key = sn.config.path(&sn.config.node_key);
    bad.holder_secret = "secret/missing".into();
    save(&gd, &bad);
    let taken = std::net::TcpListener::bind(config.listen).unwrap();
    let report = hufu_node::config_check::check(&path).await;
    let problems: Vec<&str> = report.problems().collect();
    assert!(
        problems.iter().any(|p| p.contains(
            "is for spiffe://hufu/province/610000/node/node-1, not a node of province 440000"
        )),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("TLS handshake")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("cannot read holder secret")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("is in use by another process")),
        "{problems:?}"
    );
    drop(taken);

    // The command: one line per check, exit status 2.
    let out = hufu()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL node certificate"), "{stdout}");
    assert!(stdout.contains("ok   limits can serve"), "{stdout}");
}

/// The README's first step: a node for a public name, listening on all
/// addresses. The commands on its own host dial localhost, so its
/// certificate names localhost too and `config check` passes.
#[tokio::test]
async fn a_node_initialised_for_its_public_name_passes_config_check() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("gd");
    let free = || hufu_node::ports::free_port().unwrap();
    let out = hufu()
        .args(["init", "--province", "440000", "--dir"])
        .arg(&dir)
        .args(["--listen", &format!("0.0.0.0:{}", free())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free())])
        .args(["--host", "gd-node-1.example.cn"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = hufu()
        .args(["config", "check", "--config"])
        .arg(dir.join("hufu.toml"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // Named for callers elsewhere and for the commands on its own host.
    let der = rustls::pki_types::pem::PemObject::from_pem_file(dir.join("node/node.pem"))
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    for name in ["gd-node-1.example.cn", "localhost"] {
        assert!(
            der.windows(name.len()).any(|w| w == name.as_bytes()),
            "the node certificate does not name {name}"
        );
    }
}

#[tokio::test]
async fn federation_install_refuses_while_the_node_runs() {
    let scratch = tempfile::tempdir().unwrap();
    let codes = [common::province("610000"), common::province("440000")];
    let mut fed = LocalFederation::init(scratch.path(), &codes, |_| {}).unwrap();
    // v2, signed by both members.
    let genesis = ops::read_note(
        &fed.provinces[0]
            .config
            .path(&fed.provinces[0].config.trust_dir)
            .join("v000001.note"),
    )
    .unwrap();
    let change = ops::Proposal {
        witness_quorum: Some(1),
        threshold: Some(1),
        ..Default::default()
    };
    let mut next = ops::propose(&genesis.list, change).unwrap();
    for lp in &fed.provinces {
        ops::sign(&lp.config, &mut next).unwrap();
    }

    let sn = fed.get_mut(codes[0]);
    sn.start().await.unwrap();
    let err = ops::install(&sn.config, &next).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("the node of province 610000 is running") && text.contains("stop it"),
        "{text}"
    );
    assert!(
        !sn.config
            .path(&sn.config.trust_dir)
            .join("v000002.note")
            .exists(),
        "nothing written while the node runs"
    );

    // Stopped, it installs; started again, the node holds v2.
    sn.stop().await.unwrap();
    assert_eq!(ops::install(&sn.config, &next).unwrap(), 2);
    sn.start().await.unwrap();
    let body = common::metrics(sn).await;
    assert!(body.contains("hufu_trust_list_version 2"), "{body}");
    sn.stop().await.unwrap();
}

#[tokio::test]
async fn gauges_say_what_is_on_disk_right_after_a_restart() {
    let mut node = common::start("440000").await;
    common::import_samples(&node.province, 7).await;
    let body = common::metrics(&node.province).await;
    assert!(body.contains("hufu_change_log_sequence 7"), "{body}");

    node.province.stop().await.unwrap();
    node.province.start().await.unwrap();
    let body = common::metrics(&node.province).await;
    assert!(body.contains("hufu_change_log_sequence 7"), "{body}");
    assert!(body.contains("hufu_audit_log_size 7"), "{body}");
    node.province.stop().await.unwrap();
}

/// A scraper's idle keep-alive connection to the console holds the node's
/// state: shutdown closes it with the node's other tasks, so the storage is
/// free for a restart at once.
#[tokio::test]
async fn an_idle_console_connection_does_not_outlive_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut node = common::start("440000").await;
    let console = node.province.node.as_ref().unwrap().metrics_addr.unwrap();
    let mut scraper = tokio::net::TcpStream::connect(console).await.unwrap();
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut status = [0u8; 15];
    scraper.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200 OK");

    node.province.stop().await.unwrap();
    node.province
        .start()
        .await
        .expect("a restart at once: the console's connection let the storage go");
    // The node closed the connection; it did not wait for the scraper.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), scraper.read_to_end(&mut rest))
        .await
        .expect("the console connection is closed")
        .unwrap();
    node.province.stop().await.unwrap();
}

/// A `hufu serve` process whose stderr is collected line by line.
struct Served {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(config: &std::path::Path) -> Served {
        let mut child = hufu()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut reader = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Served { child, lines }
    }

    /// Waits (at most 30 s) for a line containing every one of `words`.
    async fn wait_for(&self, words: &[&str]) -> String {
        for _ in 0..600 {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return line.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no log line with {words:?} in:\n{}",
            self.lines.lock().unwrap().join("\n")
        );
    }

    async fn stop(mut self) -> Vec<String> {
        self.child.kill().await.unwrap();
        self.lines.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn logs_are_plain_in_a_pipe_and_say_when_a_feed_goes_down_and_comes_back() {
    let scratch = tempfile::tempdir().unwrap();
    let codes = [common::province("610000"), common::province("440000")];
    let fed = LocalFederation::init(scratch.path(), &codes, |c| {
        c.federation.heartbeat_ms = 100;
    })
    .unwrap();
    let configs: Vec<_> = fed
        .provinces
        .iter()
        .map(|lp| save(lp, &lp.config))
        .collect();
    // The processes bind the ports the federation reserved.
    drop(fed);
    let sn = Served::start(&configs[0]);
    let gd = Served::start(&configs[1]);
    sn.wait_for(&["node serving"]).await;

    // Give the feed time to connect once, then take Guangdong down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gd.stop().await;
    let down = sn
        .wait_for(&["feed from province 440000 interrupted"])
        .await;
    assert!(down.contains("INFO"), "{down}");
    let gd = Served::start(&configs[1]);
    let back = sn.wait_for(&["feed from province 440000 is back"]).await;
    assert!(back.contains("INFO"), "{back}");

    let mut lines = sn.stop().await;
    lines.extend(gd.stop().await);
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "colour code in a pipe: {line:?}");
    }
}

/// A terminal's certificate and key, written under a scratch directory,
/// from a province the node does not trust.
struct Stranger {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn stranger(dir: &std::path::Path) -> Stranger {
    let other = LocalProvince::init(dir, common::province("610000")).unwrap();
    let cert = other.client_cert(Role::Terminal, "gate-1").unwrap();
    let stranger = Stranger {
        cert: dir.join("t.pem"),
        key: dir.join("t.key"),
    };
    std::fs::write(&stranger.cert, cert.cert_pem).unwrap();
    std::fs::write(&stranger.key, cert.key_pem).unwrap();
    stranger
}

impl Stranger {
    /// `hufu lookup` with this certificate, against the node of `config`.
    async fn lookup(&self, config: &std::path::Path) -> std::process::Output {
        hufu()
            .args(["lookup", &"A".repeat(26), "--config"])
            .arg(config)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .output()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn cli_errors_say_what_to_do() {
    let mut node = common::start("440000").await;
    let config = save(&node.province, &node.province.config);
    let stderr = |out: std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // A refusal is its message, not tonic's Display.
    let out = hufu()
        .args(["status", "get", "--holder", "BADHOLDER", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let text = stderr(out);
    assert!(
        text.starts_with("hufu: invalid argument: holder id must be 26 base32 characters"),
        "{text}"
    );
    assert!(!text.contains("code: '"), "{text}");

    // A terminal of a province the node does not trust.
    let stranger = stranger(node.scratch.path());
    let text = stderr(stranger.lookup(&config).await);
    assert!(text.contains("does not trust your certificate"), "{text}");

    // The node stopped: refused once, with the hint.
    let endpoint = node.province.addr().unwrap().to_string();
    node.province.stop().await.unwrap();
    let out = hufu()
        .args(["status", "get", "--holder", &"A".repeat(26), "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let text = stderr(out);
    assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    assert!(
        text.contains(&format!(
            "the node at {endpoint} (province 440000) may not be running"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_hufu()"),
        ("zsh", "#compdef hufu"),
        ("fish", "complete -c hufu"),
    ] {
        let out = hufu().args(["completions", shell]).output().await.unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("federation"), "{shell}");
    }
}

#[tokio::test]
async fn a_command_piped_into_a_reader_that_stops_early_ends_quietly() {
    // As `hufu completions bash | head -1`: the reader closes the pipe
    // after its first bytes, and the command's next write meets no reader.
    let mut child = hufu()
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "nothing to say: {stderr}");
    // Ended with the status a shell gives a command SIGPIPE ended (as
    // `cat` or `grep` would be), or done before it.
    assert!(
        out.status.success() || out.status.code() == Some(141),
        "{:?}",
        out.status
    );
}

/// A node that refuses a caller's certificate hangs up on it, often while
/// the caller is still writing: its side of the TLS 1.3 handshake is over
/// before the node has checked its certificate, and it goes on to send its
/// first call. That write fails; it must fail as an error the command
/// explains, never as a SIGPIPE that ends it without a word (as it did
/// while the command line let SIGPIPE end a command whose output reader
/// goes away). The race is lost only sometimes, hence the repeats.
#[tokio::test]
async fn a_command_the_node_hangs_up_on_always_says_why() {
    let mut node = common::start("440000").await;
    let config = save(&node.province, &node.province.config);
    let stranger = stranger(node.scratch.path());
    for attempt in 0..40 {
        let out = stranger.lookup(&config).await;
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "attempt {attempt}: {:?}: {text}",
            out.status
        );
        assert!(
            text.contains("does not trust your certificate"),
            "attempt {attempt}: {text}"
        );
    }
    node.province.stop().await.unwrap();
}

/// Copies a directory tree (a backup as `cp -a` or any file copy makes it).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_backup_restores_into_a_working_node() {
    let mut node = common::start("440000").await;
    let holders = common::import_samples(&node.province, 20).await;
    let token = node
        .province
        .admin()
        .await
        .unwrap()
        .issue_code(IssueCodeRequest {
            subject: Some(issue_code_request::Subject::Holder(holders[4].clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // As the guide says: stop the node, copy the province directory.
    node.province.stop().await.unwrap();
    let restored_dir = node.scratch.path().join("restored");
    copy_tree(&node.province.dir, &restored_dir);
    drop(node.province);

    let config = NodeConfig::load(&restored_dir.join("hufu.toml")).unwrap();
    let mut restored = LocalProvince {
        province: config.province,
        dir: restored_dir,
        config,
        node: None,
    };
    restored.start().await.unwrap();
    // Statuses, the holder secret, the code-signing keys and the audit log
    // all came back.
    let mut admin = restored.admin().await.unwrap();
    for (n, holder) in holders.iter().enumerate().take(5) {
        let record = admin
            .get_status(GetStatusRequest {
                subject: Some(get_status_request::Subject::NationalId(
                    hufu_node::sample::national_id(restored.province, n as u64)
                        .as_str()
                        .to_owned(),
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        assert_eq!(&record.holder, holder);
        assert_eq!(record.colour, common::colour_of(n as u64) as i32);
    }
    let reply = restored
        .terminal("gate-1")
        .await
        .unwrap()
        .verify(VerifyRequest {
            token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.verdict, Verdict::Valid as i32, "{}", reply.reason);
    let body = common::metrics(&restored).await;
    assert!(body.contains("hufu_change_log_sequence 20"), "{body}");
    assert!(body.contains("hufu_audit_log_size 20"), "{body}");
    // And it takes new writes after them.
    let reply = admin
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(
                restored.province,
                20,
                hufu_proto::v1::Colour::Green,
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.sequence, 21);
    restored.stop().await.unwrap();
}
