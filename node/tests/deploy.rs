//! What ships for monitoring: the Prometheus alert rules parse with
//! `promtool` and pass its unit tests, and every metric the Grafana
//! dashboard and the rules name is one a running node exports.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::browser::http_get;
use hufu_node::local::LocalFederation;
use hufu_proto::v1::ImportStatusesRequest;
use tokio_stream::wrappers::ReceiverStream;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// `hufu_…` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("hufu_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Sample names a node exports: those with values, and those its families
/// declare (a family with labels has no sample until its first value).
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_owned());
        }
    }
    names
}

/// Runs `promtool <args>` in deploy/prometheus and asserts it succeeds.
fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .expect("promtool not found: install Debian's prometheus package (scripts/test does)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", "alerts.yml"]);
}

/// The rules fire on the series they are about, and not on healthy ones
/// (deploy/prometheus/alerts_test.yml).
#[test]
fn alert_rules_fire_when_they_should() {
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// Scrapes a node of a two-province federation after it has done what
/// every labelled metric counts: served calls, shed one, replicated, and
/// had a checkpoint go unwitnessed (its peer stopped). A labelled family
/// has no sample until then.
async fn busy_node_exposition() -> String {
    let root = tempfile::tempdir().unwrap();
    let (bj, tj) = (common::province("110000"), common::province("120000"));
    let mut fed = LocalFederation::init(root.path(), &[bj, tj], |c| {
        c.federation.heartbeat_ms = 100;
        c.audit.checkpoint_secs = 0.2;
        c.limits.max_in_flight = 10;
    })
    .unwrap();
    fed.start_all().await.unwrap();
    let console = fed.get(bj).node.as_ref().unwrap().metrics_addr.unwrap();
    common::import_samples(fed.get(bj), 2).await;
    // Once Tianjin has replicated, it stops: Beijing's next checkpoints go
    // unwitnessed.
    let replicated = "hufu_replica_sequence{province=\"110000\"} 2";
    let tj_console = fed.get(tj).node.as_ref().unwrap().metrics_addr.unwrap();
    let started = std::time::Instant::now();
    while !http_get(tj_console, "/metrics")
        .await
        .1
        .contains(replicated)
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    fed.get_mut(tj).stop().await.unwrap();
    common::import_samples(fed.get(bj), 1).await;
    // Bulk work may fill half the limit: five open imports, the sixth is shed.
    let admin = fed.get(bj).admin().await.unwrap();
    let mut holds = Vec::new();
    for _ in 0..6 {
        let (tx, rx) = tokio::sync::mpsc::channel::<ImportStatusesRequest>(1);
        let mut admin = admin.clone();
        tokio::spawn(async move { admin.import_statuses(ReceiverStream::new(rx)).await });
        holds.push(tx);
    }
    let wanted = [
        "hufu_shed_total{",
        "hufu_audit_witness_failures_total{",
        "hufu_replica_age_seconds{",
    ];
    let started = std::time::Instant::now();
    loop {
        let (code, exposition) = http_get(console, "/metrics").await;
        assert_eq!(code, 200);
        if wanted.iter().all(|w| exposition.contains(w)) {
            drop(holds);
            fed.stop_all().await.unwrap();
            return exposition;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "not all of {wanted:?} within 20 s:\n{exposition}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_metrics_the_node_exports() {
    let exported = exported(&busy_node_exposition().await);

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/hufu.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("dashboard panels");
    let mut queries = String::new();
    for target in panels.iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        queries.push_str(target["expr"].as_str().expect("a query per target"));
        queries.push('\n');
    }
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let rule_exprs: String = rules
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("groups:"))
        .filter(|l| {
            !l.trim_start().starts_with("description:") && !l.trim_start().starts_with("summary:")
        })
        .collect::<Vec<_>>()
        .join("\n");

    for (what, names) in [
        ("dashboard", metric_names(&queries)),
        ("alert rules", metric_names(&rule_exprs)),
    ] {
        assert!(names.len() >= 8, "{what} names few metrics: {names:?}");
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} name metrics the node does not export: {unknown:?}"
        );
    }
}
