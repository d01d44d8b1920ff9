//! An audit log outlives the federation's membership: checkpoints cosigned
//! by a member that later left are judged by the trust list in force when
//! they were cosigned, so `hufu audit verify` passes an untouched log after
//! the change, with the trust directory as the nodes keep it. The change is
//! made as operators make it, with the real `hufu` binary.

mod common;

use std::path::Path;
use std::time::Duration;

use hufu_certs::Province;
use hufu_node::local::{LocalFederation, LocalProvince};

const SN: &str = "610000";
const GD: &str = "440000";
const TJ: &str = "120000";

fn p(code: &str) -> Province {
    common::province(code)
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `hufu`: exit code and what it printed.
async fn hufu(args: &[&str]) -> (i32, String) {
    let out = common::hufu(args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Waits until `province`'s whole log is covered by a published
/// checkpoint; returns the provinces that cosigned it.
async fn published_all(province: &LocalProvince) -> Vec<Option<Province>> {
    let state = province.node.as_ref().unwrap().state.clone();
    common::eventually(Duration::from_secs(20), || {
        let state = state.clone();
        async move {
            let log = state.audit.log().ok()?;
            let size = tokio::task::spawn_blocking({
                let log = log.clone();
                move || log.flush().and_then(|()| log.size())
            })
            .await
            .ok()?
            .ok()?;
            let published = log.latest_published().ok()??;
            (size > 0 && published.checkpoint().size == size).then(|| {
                published
                    .cosignatures()
                    .iter()
                    .map(|c| c.province())
                    .collect()
            })
        }
    })
    .await
}

#[tokio::test]
async fn a_log_cosigned_by_a_member_that_left_still_verifies() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = LocalFederation::init(scratch.path(), &[p(SN), p(GD), p(TJ)], |c| {
        c.federation.heartbeat_ms = 100;
        c.audit.checkpoint_secs = 0.2;
    })
    .unwrap();
    // Tianjin stays down: Shaanxi alone witnesses Guangdong's log.
    fed.start(p(SN)).await.unwrap();
    fed.start(p(GD)).await.unwrap();
    common::import_samples(fed.get(p(GD)), 5).await;
    let cosigners = published_all(fed.get(p(GD))).await;
    assert_eq!(cosigners, [Some(p(SN))]);

    // An auditor of Guangdong fetches its log.
    let gd_dir = fed.get(p(GD)).dir.clone();
    let (code, out) = hufu(&[
        "certs",
        "issue",
        "--dir",
        &s(&gd_dir),
        "--role",
        "auditor",
        "--name",
        "alice",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let fetched = scratch.path().join("fetched");
    let (code, out) = hufu(&[
        "audit",
        "fetch",
        "--out",
        &s(&fetched),
        "--config",
        &s(&gd_dir.join("hufu.toml")),
        "--cert",
        &s(&gd_dir.join("auditor/alice.pem")),
        "--key",
        &s(&gd_dir.join("auditor/alice.key")),
    ])
    .await;
    assert_eq!(code, 0, "{out}");

    // Guangdong and Tianjin remove Shaanxi (threshold 2 of 3), and
    // Guangdong installs version 2 with its node stopped.
    fed.stop_all().await.unwrap();
    let trust = gd_dir.join("trust");
    let v2 = s(&scratch.path().join("v2.note"));
    let (code, out) = hufu(&[
        "federation",
        "propose",
        "--current",
        &s(&trust.join("v000001.note")),
        "--remove",
        SN,
        "--out",
        &v2,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    for province in [GD, TJ] {
        let config = fed.get(p(province)).dir.join("hufu.toml");
        let (code, out) = hufu(&["federation", "sign", &v2, "--config", &s(&config)]).await;
        assert_eq!(code, 0, "{out}");
    }
    let (code, out) = hufu(&[
        "federation",
        "install",
        &v2,
        "--config",
        &s(&gd_dir.join("hufu.toml")),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(trust.join("v000002.note").exists());

    // The untouched log verifies against the trust directory: each
    // checkpoint by the list in force when it was cosigned.
    let (code, out) = hufu(&["audit", "verify", &s(&fetched), "--trust", &s(&trust)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("every checkpoint cosigned by at least 1 other province"),
        "{out}"
    );
    // Judged by the newest list alone, as before, it would not.
    let (code, out) = hufu(&[
        "audit",
        "verify",
        &s(&fetched),
        "--trust",
        &s(&trust.join("v000002.note")),
    ])
    .await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("0 valid cosignatures"), "{out}");
}
