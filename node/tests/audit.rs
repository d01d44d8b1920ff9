//! The audit log in a real federation: three provinces on loopback with
//! real certificates, sled and mutual TLS. Cross-province calls leave
//! entries, the other provinces witness each node's checkpoints, an auditor
//! fetches and verifies every log with the real `hufu` binary, tampering is
//! caught and named, and a province that forks its log gets no cosignature
//! and leaves evidence behind.

mod common;

use common::eventually;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::{Identity, Province, Role};
use hufu_federation::audit::{
    AnswerSource, AuditEntry, AuditLog, EntryKind, LogSigner, SignedCheckpoint, TreeHash,
    leaf_hash, verify_consistency, verify_inclusion,
};
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_proto::v1::audit_service_client::AuditServiceClient;
use hufu_proto::v1::witness_service_client::WitnessServiceClient;
use hufu_proto::v1::{
    AddCheckpointRequest, BatchLookupRequest, Colour, GetCheckpointsRequest,
    GetConsistencyProofRequest, GetEntriesRequest, GetInclusionProofRequest, LookupRequest,
    PutStatusRequest, RotateKeyRequest, Source, Verdict, VerifyRequest, add_checkpoint_response,
};
use serde_json::Value;
use tonic::Code;

const SN: &str = "610000";
const GD: &str = "440000";
const TJ: &str = "120000";

fn p(code: &str) -> Province {
    common::province(code)
}

/// Three provinces checkpointing every 0.3 s. Shaanxi never trusts its
/// replicas (maximum age 0), so its lookups of other provinces' holders go
/// to the issuer: lookups made there, lookups served there.
async fn federation(root: &Path) -> LocalFederation {
    common::logs();
    let mut fed = LocalFederation::init(root, &[p(SN), p(GD), p(TJ)], |c| {
        c.federation.heartbeat_ms = 100;
        c.federation.max_replica_age_secs = 1;
        c.federation.peer_deadline_ms = 1000;
        c.federation.gossip_secs = 1;
        c.audit.checkpoint_secs = 0.3;
    })
    .unwrap();
    fed.get_mut(p(SN)).config.federation.max_replica_age_secs = 0;
    fed.start_all().await.unwrap();
    fed
}

/// A code for the `n`th sample holder of `province`.
async fn issue(province: &LocalProvince, n: u64) -> String {
    common::issue_code(province, n).await.token
}

/// Runs the real `hufu` binary: exit code, stdout, stderr.
async fn hufu(args: &[&str]) -> (i32, String, String) {
    let out = common::hufu(args).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// The running node's state.
fn state(province: &LocalProvince) -> &Arc<hufu_node::state::NodeState> {
    &province.node.as_ref().unwrap().state
}

/// Waits until `province`'s whole log is covered by a published checkpoint.
async fn published_all(province: &LocalProvince) -> u64 {
    let state = state(province).clone();
    let flushed = state.clone();
    tokio::task::spawn_blocking(move || flushed.audit.log().unwrap().flush().unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || {
        let state = state.clone();
        async move {
            let size = state.audit.log().unwrap().size().unwrap();
            let published = state.audit.log().unwrap().latest_published().unwrap()?;
            (size > 0 && published.checkpoint().size == size).then_some(size)
        }
    })
    .await
}

/// The entries of a fetched directory, decoded.
fn entries(dir: &Path) -> Vec<AuditEntry> {
    std::fs::read_to_string(dir.join("entries.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            AuditEntry::decode(&STANDARD.decode(v["entry"].as_str().unwrap()).unwrap()).unwrap()
        })
        .collect()
}

fn has(
    entries: &[AuditEntry],
    kind: EntryKind,
    caller: &str,
    province: &str,
    holder: &str,
) -> Vec<AuditEntry> {
    entries
        .iter()
        .filter(|e| {
            e.kind == kind
                && e.caller.uri() == caller
                && e.province.to_string() == province
                && e.holder.as_ref().map(|h| h.as_str()) == Some(holder)
        })
        .cloned()
        .collect()
}

/// A copy of a fetched directory, changed by `change`.
fn tampered(good: &Path, name: &str, change: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let dir = good.parent().unwrap().join(name);
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    for item in std::fs::read_dir(good.join("checkpoints")).unwrap() {
        let item = item.unwrap();
        std::fs::copy(item.path(), dir.join("checkpoints").join(item.file_name())).unwrap();
    }
    let mut lines: Vec<String> = std::fs::read_to_string(good.join("entries.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    change(&mut lines);
    std::fs::write(dir.join("entries.jsonl"), lines.join("\n") + "\n").unwrap();
    dir
}

/// The first and last entry a verification failure names ("entry 7" or
/// "entries 3 to 9").
fn named_entries(message: &str) -> (u64, u64) {
    let number = |s: &str| s.trim_end_matches(':').parse::<u64>().unwrap();
    let words: Vec<&str> = message.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "entry" || *w == "entries")
        .unwrap_or_else(|| panic!("no entry named in {message}"));
    if words[at] == "entry" {
        let n = number(words[at + 1]);
        (n, n)
    } else {
        (number(words[at + 1]), number(words[at + 3]))
    }
}

/// The cross-province calls whose entries the tests below look for. A TJ
/// checkpoint terminal (gate-7) verifies holder 1's GD code, from TJ's
/// replica once it answers, and a forged one; a SN desk (desk-3) looks GD
/// holders 0, 2, 3 and 4 up, which SN asks GD about; GD's admin sets holder
/// 5's status and rotates its key. Returns GD's six holders.
async fn make_audited_calls(fed: &LocalFederation) -> Vec<String> {
    let (sn, gd, tj) = (fed.get(p(SN)), fed.get(p(GD)), fed.get(p(TJ)));
    let gd_holders = common::import_samples(gd, 6).await;
    // Checkpoints between the steps, so that verification can name entries.
    published_all(gd).await;

    let token = issue(gd, 1).await;
    let mut gate = tj.terminal("gate-7").await.unwrap();
    let verified = eventually(Duration::from_secs(10), || {
        let mut gate = gate.clone();
        let token = token.clone();
        async move {
            let r = gate
                .verify(VerifyRequest {
                    token,
                    policy: None,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let source = r.provenance.as_ref()?.source;
            (r.verdict == Verdict::Valid as i32 && source == Source::Replica as i32).then_some(r)
        }
    })
    .await;
    assert_eq!(verified.status.unwrap().colour, Colour::Yellow as i32);
    // A refused GD code is audited too, under the issuer it claims.
    let mut forged = token.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    let refused = gate
        .verify(VerifyRequest {
            token: forged,
            policy: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(refused.verdict, Verdict::Valid as i32);

    // SN's replicas are never fresh enough, so SN asks GD, one by one and
    // in a batch. Until SN's circuit to GD is closed, SN answers from its
    // replica instead: ask again then.
    let desk = sn.terminal("desk-3").await.unwrap();
    eventually(Duration::from_secs(10), || {
        let mut desk = desk.clone();
        let holder = gd_holders[0].clone();
        async move {
            let reply = desk
                .lookup(LookupRequest {
                    issuer: GD.into(),
                    holder,
                })
                .await
                .ok()?
                .into_inner();
            (reply.provenance?.source == Source::Authoritative as i32).then_some(())
        }
    })
    .await;
    eventually(Duration::from_secs(10), || {
        let mut desk = desk.clone();
        let holders = gd_holders[2..5].to_vec();
        async move {
            let reply = desk
                .batch_lookup(BatchLookupRequest {
                    issuer: GD.into(),
                    holders,
                })
                .await
                .ok()?
                .into_inner();
            (reply.entries.len() == 3 && reply.provenance?.source == Source::Authoritative as i32)
                .then_some(())
        }
    })
    .await;

    let mut admin = gd.admin().await.unwrap();
    admin
        .put_status(PutStatusRequest {
            status: Some(common::sample_input(p(GD), 5, Colour::Green)),
        })
        .await
        .unwrap();
    published_all(gd).await;
    admin
        .rotate_key(RotateKeyRequest {
            algorithm: String::new(),
        })
        .await
        .unwrap();
    gd_holders
}

/// What an auditor of Tianjin fetched with the real binary.
struct Fetched {
    /// The trust list the auditor holds: the one Tianjin installed.
    trust_note: String,
    /// Each province's fetched log directory.
    dirs: HashMap<Province, PathBuf>,
    /// Each province's log size when fetched.
    sizes: HashMap<Province, u64>,
}

/// Waits until every log is checkpointed, cosigned and published, then has
/// an auditor of Tianjin (alice) fetch each node's log with `hufu audit fetch`.
async fn fetch_all(scratch: &Path, fed: &LocalFederation) -> Fetched {
    let provinces = [fed.get(p(SN)), fed.get(p(GD)), fed.get(p(TJ))];
    let mut sizes = HashMap::new();
    for lp in provinces {
        sizes.insert(lp.province, published_all(lp).await);
    }
    let tj = fed.get(p(TJ));
    let (code, _, err) = hufu(&[
        "certs",
        "issue",
        "--dir",
        &s(&tj.dir),
        "--role",
        "auditor",
        "--name",
        "alice",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let cert = s(&tj.dir.join("auditor/alice.pem"));
    let key = s(&tj.dir.join("auditor/alice.key"));
    let mut dirs = HashMap::new();
    for lp in provinces {
        let out = scratch.join(format!("fetched-{}", lp.province));
        let config = s(&lp.dir.join("hufu.toml"));
        let (code, stdout, stderr) = hufu(&[
            "audit",
            "fetch",
            "--out",
            &s(&out),
            "--config",
            &config,
            "--cert",
            &cert,
            "--key",
            &key,
        ])
        .await;
        assert_eq!(code, 0, "fetch {}: {stdout}{stderr}", lp.province);
        assert!(
            stdout.contains(&format!(
                "fetched hufu.audit/{}/node-1: {} entries",
                lp.province, sizes[&lp.province]
            )),
            "{stdout}"
        );
        dirs.insert(lp.province, out);
    }
    Fetched {
        trust_note: s(&tj.dir.join("trust/v000001.note")),
        dirs,
        sizes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_log_verifies_offline_and_holds_the_cross_province_calls() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let gd_holders = make_audited_calls(&fed).await;
    let fetched = fetch_all(scratch.path(), &fed).await;

    for (province, dir) in &fetched.dirs {
        let (code, stdout, stderr) =
            hufu(&["audit", "verify", &s(dir), "--trust", &fetched.trust_note]).await;
        assert_eq!(code, 0, "verify {province}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!(
                "hufu.audit/{province}/node-1: {} entries and",
                fetched.sizes[province]
            )) && !stdout.contains("cosigned by at least 0"),
            "{stdout}"
        );
    }
    // A trust directory works too: its chain is checked from the genesis.
    let tj = fed.get(p(TJ));
    let (code, _, stderr) = hufu(&[
        "audit",
        "verify",
        &s(&fetched.dirs[&p(GD)]),
        "--trust",
        &s(&tj.dir.join("trust")),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");

    // The entries are the calls made. At TJ: the verify of holder 1's GD
    // code by gate-7, from the replica; found by the auditor's query.
    let tj_dir = &fetched.dirs[&p(TJ)];
    let gate_uri = "spiffe://hufu/province/120000/terminal/gate-7";
    let (code, stdout, stderr) = hufu(&[
        "audit",
        "export",
        &s(tj_dir),
        "--format",
        "jsonl",
        "--holder",
        &gd_holders[1],
        "--kind",
        "verify_served",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!rows.is_empty(), "no verify of {} at TJ", gd_holders[1]);
    assert!(rows.iter().all(|r| r["holder"] == gd_holders[1].as_str()));
    let replica_row = rows
        .iter()
        .find(|r| r["source"] == "replica" && r["answer"] == "yellow")
        .unwrap_or_else(|| panic!("no replica answer among {rows:?}"));
    assert_eq!(replica_row["caller"], gate_uri);
    assert_eq!(replica_row["province"], GD);
    assert_eq!(replica_row["kind"], "verify_served");
    assert!(
        rows.iter()
            .any(|r| r["answer"] == "bad_signature" && r["source"].is_null()),
        "{rows:?}"
    );
    let (code, stdout, _) = hufu(&[
        "audit",
        "query",
        &s(tj_dir),
        "--caller",
        "terminal/gate-7",
        "--province",
        GD,
        "--holder",
        &gd_holders[1],
    ])
    .await;
    assert_eq!(code, 0);
    assert!(
        stdout.lines().count() >= 2
            && stdout
                .lines()
                .all(|l| l.contains(gate_uri) && l.contains("\tverify_served\t")),
        "{stdout}"
    );
    let (code, stdout, _) = hufu(&[
        "audit",
        "export",
        &s(tj_dir),
        "--format",
        "csv",
        "--kind",
        "lookup_served",
        "--caller",
        "nobody",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        "index,time,time_utc,kind,caller,province,holder,answer,source,detail"
    );
    // TJ's own terminal verifies are not cross-province: nothing else there
    // but GD's codes.
    assert!(
        entries(tj_dir)
            .iter()
            .all(|e| e.province == p(GD) && e.caller.uri() == gate_uri)
    );

    // At SN: desk-3's lookups, served and made; at GD: SN's node asking.
    let sn_entries = entries(&fetched.dirs[&p(SN)]);
    let desk_uri = "spiffe://hufu/province/610000/terminal/desk-3";
    let sn_node = "spiffe://hufu/province/610000/node/node-1";
    for n in [0, 2, 4] {
        let holder = &gd_holders[n];
        let colour = hufu_node::status::colour_name(common::colour_of(n as u64));
        for kind in [EntryKind::LookupServed, EntryKind::LookupMade] {
            let found = has(&sn_entries, kind, desk_uri, GD, holder);
            assert!(
                found.iter().any(|e| e.answer.as_deref() == Some(colour)
                    && e.source == Some(AnswerSource::Authoritative)),
                "{kind:?} of {holder} at SN: {found:?}"
            );
        }
    }
    let gd_entries = entries(&fetched.dirs[&p(GD)]);
    for holder in [&gd_holders[0], &gd_holders[3]] {
        let found = has(&gd_entries, EntryKind::LookupServed, sn_node, GD, holder);
        assert!(
            !found.is_empty(),
            "lookup of {holder} at GD: {gd_entries:?}"
        );
    }
    // At GD: the admin's changes (six imported, one set) and the rotation.
    let gd_admin = "spiffe://hufu/province/440000/admin/admin";
    for (n, holder) in gd_holders.iter().enumerate() {
        let changes = has(&gd_entries, EntryKind::StatusChanged, gd_admin, GD, holder);
        let expected = if n == 5 { 2 } else { 1 };
        assert_eq!(changes.len(), expected, "status changes of holder {n}");
        assert_eq!(
            changes[0].answer.as_deref(),
            Some(hufu_node::status::colour_name(common::colour_of(n as u64)))
        );
    }
    assert_eq!(
        gd_entries
            .iter()
            .filter(|e| e.kind == EntryKind::KeyRotated && e.caller.uri() == gd_admin)
            .count(),
        1
    );
    fed.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_api_proves_what_it_publishes() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let (gd, tj) = (fed.get(p(GD)), fed.get(p(TJ)));
    // Three published checkpoints at least: one per batch of changes.
    for n in 0..3 {
        common::import_samples(gd, 2 * (n + 1)).await;
        published_all(gd).await;
    }
    let size = published_all(gd).await;
    let alice = tj.client_cert(Role::Auditor, "alice").unwrap();
    let mut api = AuditServiceClient::new(gd.channel_as(&alice).await.unwrap());
    let published = api
        .get_checkpoints(GetCheckpointsRequest { after_size: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.origin, "hufu.audit/440000/node-1");
    assert!(!published.more && published.checkpoints.len() >= 3);
    let first = SignedCheckpoint::parse(&published.checkpoints[0]).unwrap();
    let last = SignedCheckpoint::parse(published.checkpoints.last().unwrap()).unwrap();
    let (old, new) = (first.checkpoint(), last.checkpoint());
    let later = api
        .get_checkpoints(GetCheckpointsRequest {
            after_size: old.size,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later.checkpoints.len(), published.checkpoints.len() - 1);
    let hashes = |hashes: Vec<Vec<u8>>| -> Vec<TreeHash> {
        hashes
            .iter()
            .map(|h| TreeHash::from_slice(h).unwrap())
            .collect()
    };
    let consistency = api
        .get_consistency_proof(GetConsistencyProofRequest {
            old_size: old.size,
            new_size: new.size,
        })
        .await
        .unwrap()
        .into_inner();
    verify_consistency(
        &hashes(consistency.hashes),
        old.size,
        old.root,
        new.size,
        new.root,
    )
    .unwrap();
    let page = api
        .get_entries(GetEntriesRequest {
            start: 2,
            end: u64::MAX,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(page.len() as u64, size - 2);
    assert_eq!(page[0].index, 2);
    let inclusion = api
        .get_inclusion_proof(GetInclusionProofRequest {
            index: 2,
            tree_size: new.size,
        })
        .await
        .unwrap()
        .into_inner();
    verify_inclusion(
        &hashes(inclusion.hashes),
        2,
        leaf_hash(&page[0].entry),
        new.size,
        new.root,
    )
    .unwrap();
    let err = api
        .get_inclusion_proof(GetInclusionProofRequest {
            index: 2,
            tree_size: new.size + 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    fed.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampering_with_a_fetched_log_is_caught_and_named() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    make_audited_calls(&fed).await;
    let fetched = fetch_all(scratch.path(), &fed).await;
    let gd_dir = &fetched.dirs[&p(GD)];
    let gd_entries = entries(gd_dir);
    let verify_fails = |dir: PathBuf| {
        let trust_note = fetched.trust_note.clone();
        async move {
            let (code, stdout, stderr) =
                hufu(&["audit", "verify", &s(&dir), "--trust", &trust_note]).await;
            assert_eq!(
                code,
                2,
                "tampered {} verified: {stdout}{stderr}",
                dir.display()
            );
            assert!(stderr.contains("FAILED"), "{stderr}");
            eprint!("{stderr}");
            stderr
        }
    };
    let count = gd_entries.len();
    assert!(count >= 12, "{count}");
    // One entry changed: holder 1's yellow becomes green, canonically.
    let changed_at = gd_entries
        .iter()
        .position(|e| e.answer.as_deref() == Some("yellow"))
        .unwrap();
    let changed = tampered(gd_dir, "changed", |lines| {
        let mut e = gd_entries[changed_at].clone();
        e.answer = Some("green".into());
        lines[changed_at] = format!(
            "{{\"index\":{changed_at},\"entry\":\"{}\"}}",
            STANDARD.encode(e.encode().unwrap())
        );
    });
    let err = verify_fails(changed).await;
    let (first, last) = named_entries(&err);
    assert!(
        first <= changed_at as u64 && changed_at as u64 <= last && err.contains("match checkpoint"),
        "entry {changed_at} changed: {err}"
    );
    // The key rotation, alone after the checkpoint before it, is named
    // exactly.
    let rotated = count - 1;
    assert_eq!(gd_entries[rotated].kind, EntryKind::KeyRotated);
    let changed = tampered(gd_dir, "rotation-changed", |lines| {
        let e = gd_entries[rotated].clone().with_detail("new kid forged");
        lines[rotated] = format!(
            "{{\"index\":{rotated},\"entry\":\"{}\"}}",
            STANDARD.encode(e.encode().unwrap())
        );
    });
    let err = verify_fails(changed).await;
    assert!(
        err.contains(&format!(
            "entry {rotated}: leaf hash does not match checkpoint"
        )),
        "{err}"
    );
    // One entry dropped.
    let dropped = tampered(gd_dir, "dropped", |lines| {
        lines.remove(7);
    });
    let err = verify_fails(dropped).await;
    assert!(
        err.contains("line 8 holds entry 8 where entry 7 belongs"),
        "{err}"
    );
    // Two entries swapped, numbers kept.
    let swapped = tampered(gd_dir, "swapped", |lines| {
        let entry = |line: &str| line.split("\"entry\":").nth(1).unwrap().to_owned();
        let (a, b) = (entry(&lines[3]), entry(&lines[9]));
        lines[3] = format!("{{\"index\":3,\"entry\":{b}");
        lines[9] = format!("{{\"index\":9,\"entry\":{a}");
    });
    let err = verify_fails(swapped).await;
    let (first, last) = named_entries(&err);
    assert!(first <= 3 && 3 <= last, "entries 3 and 9 swapped: {err}");
    // Two lines swapped whole.
    let reordered = tampered(gd_dir, "reordered", |lines| lines.swap(4, 5));
    let err = verify_fails(reordered).await;
    assert!(err.contains("holds entry 5 where entry 4 belongs"), "{err}");
    // A checkpoint stripped of its cosignature falls short of the quorum.
    let uncosigned = tampered(gd_dir, "uncosigned", |_| {});
    let note_path = uncosigned.join("checkpoints/000001.note");
    let note = std::fs::read_to_string(&note_path).unwrap();
    let kept: Vec<&str> = note
        .lines()
        .filter(|l| !l.contains("hufu.witness/"))
        .collect();
    std::fs::write(&note_path, kept.join("\n") + "\n").unwrap();
    let err = verify_fails(uncosigned).await;
    assert!(
        err.contains("checkpoint 1: 0 valid cosignatures, quorum is 1"),
        "{err}"
    );
    fed.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_national_id_reaches_a_log_or_a_database() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let gd_holders = make_audited_calls(&fed).await;
    let fetched = fetch_all(scratch.path(), &fed).await;
    let provinces = [fed.get(p(SN)), fed.get(p(GD)), fed.get(p(TJ))];
    let ids: Vec<String> = (0..6)
        .map(|n| hufu_node::sample::national_id(p(GD), n).as_str().to_owned())
        .collect();
    for lp in provinces {
        let flushed = state(lp).clone();
        tokio::task::spawn_blocking(move || flushed.audit.log().unwrap().flush().unwrap())
            .await
            .unwrap();
        state(lp).store.flush().await.unwrap();
    }
    // Not in what the auditor fetched, raw or decoded.
    let mut searched = Vec::new();
    for dir in fetched.dirs.values() {
        searched.extend(common::files(dir));
        let decoded: String = entries(dir)
            .iter()
            .map(|e| String::from_utf8(e.encode().unwrap()).unwrap())
            .collect();
        for id in &ids {
            assert!(!decoded.contains(id.as_str()), "{id} in {}", dir.display());
        }
    }
    // Not in any node's database or audit log.
    for lp in provinces {
        searched.extend(common::files(&lp.config.path(&lp.config.data_dir)));
        searched.extend(common::files(&lp.config.audit_dir()));
    }
    let mut pseudonym_seen = false;
    for file in &searched {
        let bytes = std::fs::read(file).unwrap();
        for id in &ids {
            assert!(
                !common::contains(&bytes, id.as_bytes()),
                "national id {id} found in {}",
                file.display()
            );
        }
        pseudonym_seen |= common::contains(&bytes, gd_holders[1].as_bytes());
    }
    // The nodes' audit logs keep their entries compressed: searched decoded.
    for lp in provinces {
        for entry in common::audit_entries(lp).await {
            let text = String::from_utf8(entry.encode().unwrap()).unwrap();
            for id in &ids {
                assert!(!text.contains(id.as_str()), "national id {id} in {text}");
            }
            pseudonym_seen |= text.contains(gd_holders[1].as_str());
        }
    }
    // The search does look at the data: the pseudonym is there.
    assert!(pseudonym_seen, "searched {searched:?}");
    fed.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forked_checkpoint_gets_no_cosignature_and_is_kept_as_evidence() {
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = federation(scratch.path()).await;
    let (sn, gd, tj) = (fed.get(p(SN)), fed.get(p(GD)), fed.get(p(TJ)));
    common::import_samples(gd, 4).await;
    published_all(gd).await;
    let origin = "hufu.audit/440000/node-1";
    // SN's witness holds a GD checkpoint it cosigned.
    let have = eventually(Duration::from_secs(10), || async {
        let cp = state(sn).audit.witness().unwrap().latest(origin).unwrap()?;
        Some(cp.checkpoint().size)
    })
    .await;
    assert!(have >= 4);

    // GD's log key signs a second history: other entries, one log.
    let forked_db = sled::open(scratch.path().join("forked")).unwrap();
    let forked = AuditLog::open(forked_db.open_tree("audit").unwrap()).unwrap();
    let signer = LogSigner::load(&gd.dir.join("secret/log.key")).unwrap();
    let mallory = Identity::new(p(GD), Role::Admin, "mallory").unwrap();
    for i in 0..have + 3 {
        forked
            .append(
                AuditEntry::new(
                    1_700_000_000_000 + i,
                    EntryKind::KeyRevoked,
                    mallory.clone(),
                    p(GD),
                )
                .with_detail("rewritten history"),
            )
            .unwrap();
    }
    forked.flush().unwrap();
    let fork = forked.checkpoint(&signer).unwrap();
    assert_eq!(fork.checkpoint().origin, origin);

    // Submitted to SN's witness as GD's node.
    let gd_node = gd.client_cert(Role::Node, "node-1").unwrap();
    let mut witness = WitnessServiceClient::new(sn.channel_as(&gd_node).await.unwrap());
    let reply = witness
        .add_checkpoint(AddCheckpointRequest {
            checkpoint: fork.note(),
            old_size: 0,
            proof: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // Told where to prove from: the size it last cosigned (GD may have
    // grown since, the witness with it).
    let Some(add_checkpoint_response::Outcome::WitnessSize(from)) = reply.outcome else {
        panic!("expected the witness's size, got {reply:?}");
    };
    assert!(from >= have && from < have + 3, "{from}");
    let proof = forked.consistency_proof(from, have + 3).unwrap();
    let err = witness
        .add_checkpoint(AddCheckpointRequest {
            checkpoint: fork.note(),
            old_size: from,
            proof: proof.iter().map(|h| h.as_bytes().to_vec()).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("refused to cosign")
            && err.message().contains("not consistent")
            && err.message().contains("evidence"),
        "{}",
        err.message()
    );

    // Counted in the metric, evidence kept: both signed checkpoints.
    let metrics = state(sn).metrics.render();
    let conflicts: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hufu_audit_conflicts "))
        .unwrap_or_else(|| panic!("no hufu_audit_conflicts in {metrics}"))
        .parse()
        .unwrap();
    assert!(conflicts >= 1.0, "{conflicts}");
    let evidence = state(sn).audit.witness().unwrap().evidence().unwrap();
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    assert_eq!(evidence[0].origin, origin);
    assert_eq!(evidence[0].offered, fork.note());
    let known = SignedCheckpoint::parse(&evidence[0].known).unwrap();
    assert_eq!(known.checkpoint().size, from);
    // The same fork at the same size as a cosigned checkpoint is a conflict
    // without any proof.
    let witnessed = state(sn)
        .audit
        .witness()
        .unwrap()
        .latest(origin)
        .unwrap()
        .unwrap();
    let same_size_db = sled::open(scratch.path().join("same-size")).unwrap();
    let same_size = AuditLog::open(same_size_db.open_tree("audit").unwrap()).unwrap();
    for i in 0..witnessed.checkpoint().size {
        same_size
            .append(AuditEntry::new(
                i,
                EntryKind::KeyRevoked,
                mallory.clone(),
                p(GD),
            ))
            .unwrap();
    }
    same_size.flush().unwrap();
    let err = witness
        .add_checkpoint(AddCheckpointRequest {
            checkpoint: same_size.checkpoint(&signer).unwrap().note(),
            old_size: witnessed.checkpoint().size,
            proof: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        state(sn).audit.witness().unwrap().evidence().unwrap().len(),
        2
    );

    // Only a province's own nodes may submit its log, and only nodes.
    let tj_node = tj.client_cert(Role::Node, "node-1").unwrap();
    let err = WitnessServiceClient::new(sn.channel_as(&tj_node).await.unwrap())
        .add_checkpoint(AddCheckpointRequest {
            checkpoint: fork.note(),
            old_size: 0,
            proof: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("own province's log"), "{err:?}");
    let gd_auditor = gd.client_cert(Role::Auditor, "eve").unwrap();
    let err = WitnessServiceClient::new(sn.channel_as(&gd_auditor).await.unwrap())
        .add_checkpoint(AddCheckpointRequest {
            checkpoint: fork.note(),
            old_size: 0,
            proof: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // And the audit API is for auditors only.
    let err = AuditServiceClient::new(sn.channel(Role::Terminal, "gate").await.unwrap())
        .get_checkpoints(GetCheckpointsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // GD's real history goes on being witnessed: SN's state was not moved
    // by the fork. (Quorum is one: should TJ alone cosign a round, GD's log
    // grows again.)
    let before = state(gd).audit.log().unwrap().size().unwrap();
    let mut admin = gd.admin().await.unwrap();
    let mut cosigned = false;
    for attempt in 0..5 {
        let mut input = common::sample_input(p(GD), 0, Colour::Red);
        input.as_of = Some(hufu_node::status::timestamp(
            hufu_node::status::now_unix() - 500 + attempt,
        ));
        admin
            .put_status(PutStatusRequest {
                status: Some(input),
            })
            .await
            .unwrap();
        let size = published_all(gd).await;
        let latest = state(gd)
            .audit
            .log()
            .unwrap()
            .latest_published()
            .unwrap()
            .unwrap();
        if latest
            .cosignatures()
            .iter()
            .any(|c| c.witness() == "hufu.witness/610000")
        {
            assert!(size > before);
            assert_eq!(
                state(sn)
                    .audit
                    .witness()
                    .unwrap()
                    .latest(origin)
                    .unwrap()
                    .unwrap()
                    .checkpoint()
                    .size,
                size
            );
            assert_eq!(
                state(sn).audit.witness().unwrap().evidence().unwrap().len(),
                2
            );
            cosigned = true;
            break;
        }
    }
    assert!(
        cosigned,
        "SN cosigned none of GD's checkpoints after the fork"
    );

    // SN's operator reads the evidence from the stopped node's database.
    let sn_config = s(&sn.dir.join("hufu.toml"));
    fed.get_mut(p(SN)).stop().await.unwrap();
    let (code, stdout, stderr) = hufu(&["audit", "evidence", "--config", &sn_config]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("2 pieces of evidence") && stderr.contains("hufu.witness/610000"),
        "{stderr}"
    );
    let kept: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0]["origin"], origin);
    assert_eq!(kept[0]["offered"], fork.note());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_a_node_records_but_publishes_nothing_and_auditing_can_be_off() {
    let scratch = tempfile::tempdir().unwrap();
    let mut alone = LocalProvince::init(&scratch.path().join("alone"), p(GD)).unwrap();
    alone.config.audit.checkpoint_secs = 0.05;
    alone.start().await.unwrap();
    let mut off = LocalProvince::init(&scratch.path().join("off"), p(TJ)).unwrap();
    off.config.audit.enabled = false;
    off.start().await.unwrap();

    common::import_samples(&alone, 3).await;
    common::import_samples(&off, 3).await;
    for lp in [&alone, &off] {
        let flushed = state(lp).clone();
        tokio::task::spawn_blocking(move || flushed.audit.log().unwrap().flush().unwrap())
            .await
            .unwrap();
    }
    assert_eq!(state(&alone).audit.log().unwrap().size().unwrap(), 3);
    assert_eq!(state(&off).audit.log().unwrap().size().unwrap(), 0);

    // Without a trust list there is no witness quorum to publish under.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let auditor = alone.client_cert(Role::Auditor, "alice").unwrap();
    let reply = AuditServiceClient::new(alone.channel_as(&auditor).await.unwrap())
        .get_checkpoints(GetCheckpointsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.log_size, 3);
    assert!(reply.checkpoints.is_empty());
    assert_eq!(reply.origin, "hufu.audit/440000/node-1");
}
