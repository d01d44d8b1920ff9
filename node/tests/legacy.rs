//! Provinces' existing codes through the federation, with real nodes on
//! loopback: Guangdong declares a format, links codes to its holders, and
//! Shaanxi's and Tianjin's terminals verify them from their replicas, from
//! Guangdong itself, or from a stale replica when Guangdong is down.

mod common;

use std::time::Duration;

use common::legacy::{self, GD, SN, TJ, code, code_id, link, unlink, url_code};
use common::{verify, verify_as};
use hufu_federation::audit::EntryKind;
use hufu_federation::legacy::CodeHash;
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::{
    Colour, LinkCodeRequest, Policy, Source, Verdict, VerifyRequest, VerifyResponse,
    link_code_request,
};
use tonic::Code;

fn p(code: &str) -> hufu_certs::Province {
    common::province(code)
}

/// Waits until `at` answers `text` with `verdict` from `source`.
async fn verified(
    at: &LocalProvince,
    text: &str,
    verdict: Verdict,
    source: Source,
) -> VerifyResponse {
    common::eventually(Duration::from_secs(10), || async {
        let r = verify(at, text).await;
        let source_now = r.provenance.as_ref().map(|p| p.source);
        (r.verdict == verdict as i32 && source_now == Some(source as i32)).then_some(r)
    })
    .await
}

/// Waits until `at`'s replica of Guangdong holds all of Guangdong's changes.
async fn replicated(fed: &LocalFederation, at: &str) {
    let gd = fed.get(p(GD)).node.as_ref().unwrap().state.clone();
    let replica = fed.get(p(at)).node.as_ref().unwrap().state.clone();
    let want = gd.store.last_sequence().await;
    common::eventually(Duration::from_secs(10), || async {
        (replica.store.tail(p(GD)).await.ok()?.sequence >= want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_code_verifies_at_every_member_from_the_replica() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = legacy::federation(scratch.path(), |_| {}).await;
    let gd = fed.get(p(GD));
    common::import_samples(gd, 3).await;
    let linked = link(gd, &code(1), 1).await;
    assert_eq!(linked.format, "yuekang");
    assert_eq!(linked.holder, common::pseudonym(gd, 1));
    assert!(linked.sequence > 0);
    // Linking again changes nothing.
    assert_eq!(link(gd, &code(1), 1).await.sequence, 0);

    let at_home = verify(gd, &code(1)).await;
    assert_eq!(at_home.verdict, Verdict::Valid as i32, "{}", at_home.reason);
    assert_eq!(
        at_home.provenance.unwrap().source,
        Source::Authoritative as i32
    );
    for at in [SN, TJ] {
        // Both forms of the code are the one code.
        for text in [code(1), url_code(1)] {
            let r = verified(fed.get(p(at)), &text, Verdict::Valid, Source::Replica).await;
            assert_eq!(r.format, "yuekang");
            let status = r.status.unwrap();
            assert_eq!(
                (status.issuer.as_str(), status.holder.as_str()),
                (GD, linked.holder.as_str())
            );
            assert_eq!(status.colour, common::colour_of(1) as i32);
            assert_eq!(r.provenance.unwrap().answered_by, at);
        }
    }
    // Policies apply as for Hufu codes: holder 1 is yellow.
    let r = fed
        .get(p(SN))
        .terminal("gate")
        .await
        .unwrap()
        .verify(VerifyRequest {
            token: code(1),
            policy: Some(Policy {
                max_colour: Colour::Green as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.verdict, Verdict::Valid as i32);
    assert!(!r.policy_met, "{}", r.reason);
    assert!(r.reason.contains("worse than green"), "{}", r.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_linked_only_to_the_province_s_own_formats() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = legacy::federation(scratch.path(), |_| {}).await;
    let ask = |at: &'static str, text: &'static str| {
        let fed = &fed;
        async move {
            fed.get(p(at))
                .admin()
                .await
                .unwrap()
                .link_code(LinkCodeRequest {
                    code: text.into(),
                    subject: Some(link_code_request::Subject::Holder(
                        "MFRGGZDFMZTWQ2LKNNWG23TPOA".into(),
                    )),
                })
                .await
                .unwrap_err()
        }
    };
    let err = ask(GD, "GD1tooshort").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("formats are yuekang"),
        "{}",
        err.message()
    );
    // Shaanxi declares no format: it cannot link Guangdong's codes.
    let err = ask(SN, "GD1ABCDEFGHIJKLMNOPQRST").await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("declares no legacy code formats"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlinking_reaches_the_peers_and_with_the_issuer_down_the_replica_answers_stale() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = legacy::federation(scratch.path(), |_| {}).await;
    let gd = fed.get(p(GD));
    common::import_samples(gd, 4).await;
    link(gd, &code(2), 2).await;
    link(gd, &code(3), 3).await;
    verified(fed.get(p(SN)), &code(2), Verdict::Valid, Source::Replica).await;
    let unlinked = unlink(fed.get(p(GD)), &code(2)).await;
    assert!(unlinked.sequence > 0);
    assert_eq!(unlink(fed.get(p(GD)), &code(2)).await.sequence, 0);
    // At the issuer the code is revoked at once.
    assert_eq!(
        verify(fed.get(p(GD)), &code(2)).await.verdict,
        Verdict::UnknownCode as i32
    );
    replicated(&fed, SN).await;

    fed.get_mut(p(GD)).stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sn = fed.get(p(SN));
    let still = verified(sn, &code(3), Verdict::Valid, Source::ReplicaStale).await;
    let age = still.provenance.unwrap().age.unwrap();
    assert!(age.seconds >= 1, "stale replica's age {age:?}");
    assert_eq!(
        still.status.unwrap().holder,
        common::pseudonym(fed.get(p(GD)), 3)
    );
    // The unlink travelled: the replica alone knows the code is revoked.
    let revoked = verified(sn, &code(2), Verdict::UnknownCode, Source::ReplicaStale).await;
    assert_eq!(revoked.format, "yuekang");
    assert!(revoked.status.is_none());
    assert!(revoked.reason.contains("not bound"), "{}", revoked.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_code_or_a_stale_replica_asks_the_issuer() {
    let scratch = tempfile::tempdir().unwrap();
    // Tianjin's replicas are never fresh enough to answer alone.
    let fed = legacy::federation(scratch.path(), |c| {
        if c.province == p(TJ) {
            c.federation.max_replica_age_secs = 0;
        }
    })
    .await;
    let gd = fed.get(p(GD));
    common::import_samples(gd, 5).await;
    link(gd, &code(4), 4).await;
    let r = verify(fed.get(p(TJ)), &code(4)).await;
    assert_eq!(r.verdict, Verdict::Valid as i32, "{}", r.reason);
    let provenance = r.provenance.unwrap();
    assert_eq!(
        (provenance.source, provenance.answered_by.as_str()),
        (Source::Authoritative as i32, GD)
    );
    assert_eq!(r.status.unwrap().holder, common::pseudonym(gd, 4));

    // Never linked: a fresh replica does not know it, so the issuer is asked.
    let sn = fed.get(p(SN));
    let r = verified(sn, &code(5), Verdict::UnknownCode, Source::Authoritative).await;
    assert_eq!(r.format, "yuekang");
    let hash = CodeHash::of(p(GD), "yuekang", &code_id(5)).to_string();
    let made = common::audit_entries(sn).await;
    assert!(
        made.iter().any(|e| e.kind == EntryKind::LookupMade
            && e.answer.as_deref() == Some("unknown_code")
            && e.detail.as_deref().is_some_and(|d| d.contains(&hash))),
        "{made:?}"
    );
    let served = common::audit_entries(gd).await;
    assert!(
        served.iter().any(|e| e.kind == EntryKind::LookupServed
            && e.detail.as_deref() == Some(&format!("legacy code yuekang {hash}"))),
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_of_no_format_and_a_huge_scan_are_malformed() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = legacy::federation(scratch.path(), |_| {}).await;
    let sn = fed.get(p(SN));
    let r = verify(sn, "GD1abc").await;
    assert_eq!(r.verdict, Verdict::Malformed as i32);
    assert!(r.reason.contains("neither a Hufu code nor"), "{}", r.reason);
    // A megabyte that starts like a code: refused unread, and the node
    // goes on answering.
    let huge = format!("GD1{}", "A".repeat(1 << 20));
    let r = verify(sn, &huge).await;
    assert_eq!(r.verdict, Verdict::Malformed as i32);
    assert!(r.reason.contains("4096"), "{}", r.reason);
    assert_eq!(verify(sn, &code(6)).await.format, "yuekang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_code_id_in_any_stored_byte_or_audit_entry() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = legacy::federation(scratch.path(), |c| {
        if c.province == p(TJ) {
            c.federation.max_replica_age_secs = 0;
        }
    })
    .await;
    let gd = fed.get(p(GD));
    common::import_samples(gd, 4).await;
    for n in 0..4 {
        link(gd, &code(n), n).await;
    }
    unlink(gd, &code(3)).await;
    // Verified from the replica, from the issuer, unknown, revoked.
    for n in 0..6 {
        verify(fed.get(p(SN)), &url_code(n)).await;
        verify(fed.get(p(TJ)), &code(n)).await;
    }
    verified(fed.get(p(SN)), &code(0), Verdict::Valid, Source::Replica).await;
    replicated(&fed, SN).await;
    let mut entries = Vec::new();
    for c in [GD, SN, TJ] {
        entries.extend(common::audit_entries(fed.get(p(c))).await);
    }
    fed.stop_all().await.unwrap();

    let secrets: Vec<String> = (0..6).map(code_id).collect();
    let hashes: Vec<String> = (0..6)
        .map(|n| CodeHash::of(p(GD), "yuekang", &code_id(n)).to_string())
        .collect();
    for entry in &entries {
        let bytes = entry.encode().unwrap();
        for id in &secrets {
            assert!(
                !common::contains(&bytes, id.as_bytes()),
                "code id in {entry:?}"
            );
        }
    }
    // The entries do name the codes, by hash.
    for hash in &hashes {
        assert!(
            entries
                .iter()
                .any(|e| e.detail.as_deref().is_some_and(|d| d.contains(hash))),
            "no entry names {hash}"
        );
    }
    let mut hash_seen = false;
    let raw: Vec<[u8; 32]> = (0..3)
        .map(|n| CodeHash::of(p(GD), "yuekang", &code_id(n)).0)
        .collect();
    for c in [GD, SN, TJ] {
        for file in common::files(&fed.get(p(c)).dir) {
            let bytes = std::fs::read(&file).unwrap();
            for id in &secrets {
                assert!(
                    !common::contains(&bytes, id.as_bytes()),
                    "code id found in {}",
                    file.display()
                );
            }
            hash_seen |= raw.iter().any(|h| common::contains(&bytes, h));
        }
    }
    // The search does look at the bindings: their hashes are there.
    assert!(hash_seen, "no stored binding found");
}

/// Python's grpcio, with stubs generated from the repository's protos at
/// test time, verifies a Guangdong legacy code at Shaanxi's node over
/// mutual TLS and reads the verdict, the format and the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_verifies_a_legacy_code() {
    const SCRIPT: &str = r#"
(text,) = args
stub = status_pb2_grpc.StatusLookupServiceStub(channel)
good = stub.Verify(status_pb2.VerifyRequest(token=text), timeout=10)
bad = stub.Verify(status_pb2.VerifyRequest(token=text[:-1] + "2"), timeout=10)
print(json.dumps({
    "verdict": status_pb2.Verdict.Name(good.verdict),
    "format": good.format,
    "issuer": good.status.issuer,
    "holder": good.status.holder,
    "source": status_pb2.Source.Name(good.provenance.source),
    "unknown": status_pb2.Verdict.Name(bad.verdict),
}))
"#;
    let scratch = tempfile::tempdir().unwrap();
    let fed = legacy::federation(scratch.path(), |_| {}).await;
    let (gd, sn) = (fed.get(p(GD)), fed.get(p(SN)));
    common::import_samples(gd, 2).await;
    // A code whose last character is not 2, so that the altered one differs.
    let n = (0..).find(|n| !code(*n).ends_with('2')).unwrap();
    link(gd, &code(n), 1).await;
    verified(sn, &code(n), Verdict::Valid, Source::Replica).await;
    let seen = common::grpcio(sn, scratch.path(), SCRIPT, &[&code(n)]).await;
    assert_eq!(seen["verdict"], "VERDICT_VALID");
    assert_eq!(seen["format"], "yuekang");
    assert_eq!(seen["issuer"], GD);
    assert_eq!(seen["holder"], common::pseudonym(gd, 1).as_str());
    assert_eq!(seen["source"], "SOURCE_REPLICA");
    assert_eq!(seen["unknown"], "VERDICT_UNKNOWN_CODE");
}

/// Runs `hufu` with `args`; its exit status and output.
async fn hufu(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hufu"))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_declare_formats_and_link_codes_with_the_hufu_command() {
    let scratch = tempfile::tempdir().unwrap();
    let fed = legacy::federation(scratch.path(), |_| {}).await;
    let (gd, tj) = (fed.get(p(GD)), fed.get(p(TJ)));
    let current = tj.config.path(&tj.config.trust_dir).join("v000001.note");
    let current = current.to_str().unwrap();
    let formats = |pattern: &str, example: &str| {
        let path = scratch.path().join(format!("{}.json", pattern.len()));
        std::fs::write(
            &path,
            serde_json::json!([{
                "name": "jinxinban", "prefix": "", "pattern": pattern,
                "max_len": 64, "example": example,
            }])
            .to_string(),
        )
        .unwrap();
        format!("{TJ}={}", path.display())
    };
    let out = scratch.path().join("v2.note");
    let out = out.to_str().unwrap();

    // Tianjin's ids would also take every Guangdong code: refused, naming both.
    let overlapping = formats("([A-Z0-9]{23})", "TJ000000000000000000000");
    let propose = |formats: String| async move {
        hufu(&[
            "federation",
            "propose",
            "--current",
            current,
            "--formats",
            &formats,
            "--out",
            out,
        ])
        .await
    };
    let (ok, _, err) = propose(overlapping).await;
    assert!(!ok);
    assert!(
        err.contains("code format 440000/yuekang can match the same text as 120000/jinxinban (for example \"GD122222222222222222222\")"),
        "{err}"
    );
    let distinct = formats("TJ([0-9]{21})", "TJ000000000000000000001");
    let (ok, _, err) = propose(distinct).await;
    assert!(ok, "{err}");
    let (_, shown, _) = hufu(&["federation", "show", out]).await;
    assert!(shown.contains("legacy format jinxinban"), "{shown}");
    assert!(shown.contains("legacy format yuekang"), "{shown}");

    // Guangdong's operator links and unlinks a code.
    common::import_samples(gd, 1).await;
    let config = gd.dir.join("hufu.toml");
    let config = config.to_str().unwrap();
    let holder = common::pseudonym(gd, 0);
    let (ok, said, err) = hufu(&[
        "codes",
        "link",
        &url_code(7),
        "--holder",
        &holder,
        "--config",
        config,
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        said.contains(&format!("yuekang code bound to holder {holder}")),
        "{said}"
    );
    assert_eq!(verify(gd, &code(7)).await.verdict, Verdict::Valid as i32);
    let (ok, said, err) = hufu(&["codes", "unlink", &code(7), "--config", config]).await;
    assert!(ok, "{err}");
    assert!(said.contains("yuekang code unbound"), "{said}");
    assert_eq!(
        verify(gd, &code(7)).await.verdict,
        Verdict::UnknownCode as i32
    );
    let (ok, _, err) = hufu(&[
        "codes", "link", "nonsense", "--holder", &holder, "--config", config,
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("not a legacy code of this province"), "{err}");

    // An import binds the codes in its legacy_code column; a row whose code
    // is of no format of the province is refused whole, by line.
    let csv = scratch.path().join("statuses.csv");
    let id = |n| hufu_node::sample::national_id(p(GD), n).as_str().to_owned();
    std::fs::write(
        &csv,
        format!(
            "national_id,colour,legacy_code\n{},green,{}\n{},red,GD1nope\n",
            id(1),
            code(8),
            id(2)
        ),
    )
    .unwrap();
    let (ok, said, err) = hufu(&[
        "status",
        "import",
        csv.to_str().unwrap(),
        "--config",
        config,
    ])
    .await;
    assert!(!ok, "a refused line makes the import exit non-zero: {said}");
    let all = format!("{said}{err}");
    assert!(
        all.contains(":3:") && all.contains("not a legacy code"),
        "{all}"
    );
    let r = verify(gd, &code(8)).await;
    assert_eq!(r.verdict, Verdict::Valid as i32, "{}", r.reason);
    assert_eq!(r.status.unwrap().colour, Colour::Green as i32);
}

/// With the province's nodes as replicas on JetStream, a code linked
/// through one replica goes through the province's write log like a status
/// change: every replica and the peer province then verify it, and an
/// unlink through another replica revokes it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_linked_through_one_replica_verifies_at_every_replica_and_peer() {
    use common::replicas::{CONVERGE_WITHIN, PEER, replicated_declaring};
    let (_scratch, mut fed) = replicated_declaring(2, &[legacy::yuekang()]).await;
    fed.start_all().await.unwrap();
    let first = fed.federation.get(fed.province());
    let second = &fed.replicas[0];
    common::import_samples(first, 2).await;
    let linked = link(second, &code(9), 1).await;
    assert!(linked.sequence > 0);
    let peer = fed.federation.get(p(PEER));
    for (at, ca) in [(first, first), (second, first), (peer, peer)] {
        let r = common::eventually(CONVERGE_WITHIN, || async {
            let r = verify_as(at, ca, &url_code(9)).await;
            (r.verdict == Verdict::Valid as i32).then_some(r)
        })
        .await;
        assert_eq!(r.status.unwrap().holder, common::pseudonym(first, 1));
    }
    // Both replicas numbered the binding alike.
    for r in [first, second] {
        let state = &r.node.as_ref().unwrap().state;
        assert!(state.store.last_sequence().await >= linked.sequence);
    }
    assert!(unlink(first, &code(9)).await.sequence > linked.sequence);
    for at in [first, second] {
        common::eventually(CONVERGE_WITHIN, || async {
            let r = verify_as(at, first, &code(9)).await;
            (r.verdict == Verdict::UnknownCode as i32).then_some(())
        })
        .await;
    }
}
