//! The audit log end to end: real sled databases in temporary directories,
//! real Ed25519 log keys, witnesses of other provinces, a trust list of real
//! province CAs, and the auditor's offline checks of a fetched directory,
//! including what they say when the directory was tampered with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::{CertificateAuthority, Identity, Province, Role};
use hufu_federation::audit::{
    AnswerSource, AuditEntry, AuditError, AuditLog, BatchConfig, Cosignature, EMPTY_ROOT,
    EntryKind, ExportFormat, Filter, LogSigner, SignedCheckpoint, TRUST_ADOPTION_GRACE_SECS,
    TreeHash, Witness, WitnessError, export, leaf_hash, log_origin, parse_log_origin, query,
    verify_consistency, verify_cosignature, verify_dir, verify_dir_history, verify_inclusion,
    witness_name, witness_verifier_key,
};
use hufu_federation::codes::Jwks;
use hufu_federation::holder::{HolderId, HolderSecret, NationalId};
use hufu_federation::trust::{GovernanceKey, Member, TrustList};
use tempfile::TempDir;

const NOW: i64 = 1_700_000_000;
const NOW_MS: u64 = 1_700_000_000_000;

fn province(code: &str) -> Province {
    Province::parse(code).unwrap()
}

fn holder(n: u64) -> HolderId {
    let secret = HolderSecret::new(&[7u8; 32]).unwrap();
    let id = NationalId::with_check_character(&format!("110105194912{n:05}")).unwrap();
    secret.pseudonym(&id)
}

/// Entry `i` of a test log: Shaanxi's node asks Guangdong about holders.
fn entry(i: u64) -> AuditEntry {
    let caller = Identity::new(province("610000"), Role::Node, "sn-1").unwrap();
    let kinds = [
        EntryKind::LookupServed,
        EntryKind::VerifyServed,
        EntryKind::LookupMade,
    ];
    AuditEntry::new(
        NOW_MS + i * 1000,
        kinds[(i % 3) as usize],
        caller,
        province("440000"),
    )
    .with_holder(holder(i % 50))
    .with_answer(if i.is_multiple_of(7) { "red" } else { "green" })
    .with_source(AnswerSource::Replica)
}

fn open_log(dir: &TempDir, name: &str) -> (sled::Db, AuditLog) {
    let db = sled::open(dir.path().join(name)).unwrap();
    let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
    (db, log)
}

fn append_all(log: &AuditLog, entries: impl IntoIterator<Item = AuditEntry>) {
    for e in entries {
        log.append(&e).unwrap();
    }
    log.flush().unwrap();
}

/// A member province with its audit log key.
struct Setup {
    signer: Arc<LogSigner>,
    member: Member,
}

fn make(code: &str) -> Setup {
    let p = province(code);
    let ca = CertificateAuthority::generate(p).unwrap();
    let governance = GovernanceKey::generate(p).unwrap();
    let signer = LogSigner::generate(p, &format!("node-{code}")).unwrap();
    let member = Member {
        province: p,
        name: p.name().to_owned(),
        ca_cert_pem: ca.cert_pem(),
        jwks: Jwks::default(),
        revoked_kids: Vec::new(),
        log_key: signer.verifier_key(),
        governance_key: governance.verifier_key(),
        endpoints: vec![format!("node1.{code}.example:7443")],
        legacy_formats: Vec::new(),
    };
    Setup {
        signer: Arc::new(signer),
        member,
    }
}

/// Guangdong keeps the log; Beijing and Shaanxi witness it. Quorum 1.
struct Federation {
    bj: Setup,
    gd: Setup,
    sn: Setup,
    trust: TrustList,
}

fn federation() -> Federation {
    let (bj, gd, sn) = (make("110000"), make("440000"), make("610000"));
    let trust = TrustList::genesis(
        vec![bj.member.clone(), gd.member.clone(), sn.member.clone()],
        2,
        NOW,
    )
    .unwrap();
    assert_eq!(trust.witness_quorum, 1);
    Federation { bj, gd, sn, trust }
}

// An independent RFC 6962 reference, straight from section 2.1 of the RFC,
// hashing with aws-lc rather than the sha2 crate the log uses.

fn sha256(parts: &[&[u8]]) -> TreeHash {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    TreeHash::from_slice(ctx.finish().as_ref()).unwrap()
}

fn ref_leaf(entry: &[u8]) -> TreeHash {
    sha256(&[&[0], entry])
}

fn split(n: usize) -> usize {
    // The largest power of two smaller than n.
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

fn mth(leaves: &[TreeHash]) -> TreeHash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            sha256(&[&[1], &mth(&leaves[..k]).0, &mth(&leaves[k..]).0])
        }
    }
}

fn ref_path(m: usize, leaves: &[TreeHash]) -> Vec<TreeHash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut path, other) = if m < k {
        (ref_path(m, &leaves[..k]), mth(&leaves[k..]))
    } else {
        (ref_path(m - k, &leaves[k..]), mth(&leaves[..k]))
    };
    path.push(other);
    path
}

fn ref_subproof(m: usize, leaves: &[TreeHash], complete: bool) -> Vec<TreeHash> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![mth(leaves)]
        };
    }
    let k = split(n);
    let (mut proof, other) = if m <= k {
        (ref_subproof(m, &leaves[..k], complete), mth(&leaves[k..]))
    } else {
        (ref_subproof(m - k, &leaves[k..], false), mth(&leaves[..k]))
    };
    proof.push(other);
    proof
}

#[test]
fn entries_have_one_canonical_encoding() {
    let e = entry(1).with_detail("trust list v7");
    let bytes = e.encode().unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert_eq!(
        text,
        format!(
            "{{\"v\":1,\"time\":1700000001000,\"kind\":\"verify_served\",\"caller\":\"spiffe://hufu/province/610000/node/sn-1\",\"province\":\"440000\",\"holder\":\"{}\",\"answer\":\"green\",\"source\":\"replica\",\"detail\":\"trust list v7\"}}",
            holder(1)
        )
    );
    assert_eq!(AuditEntry::decode(&bytes).unwrap(), e);

    // Absent fields are written null, so a bare entry has one spelling too.
    let bare = AuditEntry::new(
        NOW_MS,
        EntryKind::TrustListChanged,
        Identity::new(province("440000"), Role::Admin, "ops").unwrap(),
        province("440000"),
    );
    let bare_text = String::from_utf8(bare.encode().unwrap()).unwrap();
    assert!(
        bare_text.ends_with("\"holder\":null,\"answer\":null,\"source\":null,\"detail\":null}")
    );

    // Any other spelling of the same entry is refused.
    for other in [
        text.replace(
            "{\"v\":1,\"time\":1700000001000,",
            "{\"time\":1700000001000,\"v\":1,",
        ),
        text.replace(",\"detail\"", ", \"detail\""),
        text.replace(
            "\"detail\":\"trust list v7\"}",
            "\"detail\":\"trust list v7\",\"x\":1}",
        ),
        text.replace("\"v\":1", "\"v\":2"),
        text.replace(",\"detail\":\"trust list v7\"", ""),
        text.replace("\"holder\":\"", "\"holder\":\" "),
    ] {
        assert!(AuditEntry::decode(other.as_bytes()).is_err(), "{other}");
    }
}

/// Data minimisation: only pseudonyms, codes, identities, enums and short
/// words fit in an entry; the free-text detail refuses the digit runs of a
/// national id or a phone number.
#[test]
fn entries_cannot_carry_a_national_id() {
    let national = "11010519491231002X";
    assert!(NationalId::parse(national).is_ok());
    // Not a holder id: pseudonyms are 26 base32 characters.
    assert!(national.parse::<HolderId>().is_err());
    // Not an answer: answers are words of letters.
    let err = entry(1).with_answer(national).encode().unwrap_err();
    assert!(err.to_string().contains("not a word"), "{err}");
    for detail in [
        format!("holder {national}"),
        "call 13800138000".to_owned(),
        "id １１０１０５１９４９１２３１００２".to_owned(),
    ] {
        let err = entry(1).with_detail(detail.as_str()).encode().unwrap_err();
        assert!(err.to_string().contains("national id"), "{detail}: {err}");
    }
    // Ordinary details pass.
    entry(1)
        .with_detail("kid 3f9a, trust list v12")
        .encode()
        .unwrap();
    assert!(entry(1).with_detail("a".repeat(300)).encode().is_err());
    assert!(entry(1).with_detail("two\nlines").encode().is_err());
    // Decoding applies the same checks.
    let smuggled = String::from_utf8(entry(1).encode().unwrap())
        .unwrap()
        .replace(
            "\"answer\":\"green\"",
            &format!("\"answer\":\"{national}\""),
        );
    assert!(AuditEntry::decode(smuggled.as_bytes()).is_err());
}

#[test]
fn batched_appends_give_rfc6962_roots_and_proofs() {
    let dir = TempDir::new().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    // A small batch size so that the 1000 entries span many batches.
    let log = Arc::new(
        AuditLog::open_with(
            db.open_tree("audit").unwrap(),
            BatchConfig {
                queue: 64,
                max_batch: 37,
            },
        )
        .unwrap(),
    );
    assert_eq!(log.size().unwrap(), 0);
    assert_eq!(log.root().unwrap(), EMPTY_ROOT);

    // Four threads append at once, as request handlers do.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..250 {
                    log.append(entry(t * 250 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    log.flush().unwrap();
    assert_eq!(log.size().unwrap(), 1000);

    let stored = log.entries(0, 2000).unwrap();
    assert_eq!(stored.len(), 1000);
    let mut seen: Vec<u64> = stored
        .iter()
        .map(|(i, bytes)| {
            assert_eq!(*i, stored[*i as usize].0);
            AuditEntry::decode(bytes).unwrap().time
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..1000).map(|i| NOW_MS + i * 1000).collect::<Vec<_>>()
    );
    assert_eq!(log.entries(998, 1005).unwrap().len(), 2);

    let leaves: Vec<TreeHash> = stored.iter().map(|(_, b)| ref_leaf(b)).collect();
    assert_eq!(leaves[0], leaf_hash(&stored[0].1));
    assert_eq!(log.root().unwrap(), mth(&leaves));

    let sizes = [1u64, 2, 3, 7, 8, 9, 100, 255, 256, 257, 511, 999, 1000];
    for &size in &sizes {
        let root = log.root_at(size).unwrap();
        assert_eq!(root, mth(&leaves[..size as usize]), "root at {size}");
        for index in [0, size / 3, size / 2, size - 1] {
            let proof = log.inclusion_proof(index, size).unwrap();
            assert_eq!(proof, ref_path(index as usize, &leaves[..size as usize]));
            verify_inclusion(&proof, index, leaves[index as usize], size, root).unwrap();
            // The wrong leaf, index or root fails.
            let other = leaves[(index as usize + 1) % size as usize];
            if other != leaves[index as usize] {
                assert!(verify_inclusion(&proof, index, other, size, root).is_err());
            }
            assert!(
                verify_inclusion(&proof, index, leaves[index as usize], size, EMPTY_ROOT).is_err()
            );
        }
    }
    assert!(log.inclusion_proof(5, 5).is_err());
    assert!(log.inclusion_proof(0, 1001).is_err());

    for &old in &sizes {
        for &new in sizes.iter().filter(|&&s| s >= old) {
            let proof = log.consistency_proof(old, new).unwrap();
            let expected = if old == new {
                Vec::new()
            } else {
                ref_subproof(old as usize, &leaves[..new as usize], true)
            };
            assert_eq!(proof, expected, "{old} -> {new}");
            let (old_root, new_root) = (log.root_at(old).unwrap(), log.root_at(new).unwrap());
            verify_consistency(&proof, old, old_root, new, new_root).unwrap();
            if old < new {
                assert!(verify_consistency(&proof, old, new_root, new, new_root).is_err());
                assert!(verify_consistency(&proof, old, old_root, new, old_root).is_err());
            }
        }
    }
    assert!(log.consistency_proof(0, 1000).unwrap().is_empty());
    verify_consistency(&[], 0, EMPTY_ROOT, 1000, log.root().unwrap()).unwrap();
    assert!(log.consistency_proof(10, 5).is_err());
    assert!(log.consistency_proof(10, 1001).is_err());

    // Reopened, the log goes on where it was.
    let root = log.root().unwrap();
    drop(Arc::into_inner(log).unwrap());
    let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
    assert_eq!((log.size().unwrap(), log.root().unwrap()), (1000, root));
    append_all(&log, (1000..1010).map(entry));
    let mut leaves = leaves;
    leaves.extend(
        log.entries(1000, 1010)
            .unwrap()
            .iter()
            .map(|(_, b)| ref_leaf(b)),
    );
    assert_eq!(log.root().unwrap(), mth(&leaves));
}

#[test]
fn dropping_the_log_writes_what_is_queued() {
    let dir = TempDir::new().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
    for i in 0..500 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
    assert_eq!(log.size().unwrap(), 500);
}

#[test]
fn log_keys_save_load_and_name_their_roles() {
    let dir = TempDir::new().unwrap();
    let signer = LogSigner::generate(province("440000"), "gd-1").unwrap();
    assert_eq!(signer.origin(), "hufu.audit/440000/gd-1");
    assert_eq!(signer.witness_name(), "hufu.witness/440000");
    assert!(signer.verifier_key().starts_with("hufu.audit/440000/gd-1+"));
    assert_eq!(
        witness_verifier_key(&signer.verifier_key()).unwrap(),
        signer.witness_verifier_key()
    );
    assert!(
        signer
            .witness_verifier_key()
            .starts_with("hufu.witness/440000+")
    );

    let path = dir.path().join("keys/log.key");
    signer.save(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let loaded = LogSigner::load(&path).unwrap();
    assert_eq!(loaded.verifier_key(), signer.verifier_key());
    assert!(!format!("{loaded:?}").contains("PRIVATE"));

    assert_eq!(
        parse_log_origin("hufu.audit/440000/gd-1").unwrap(),
        (province("440000"), "gd-1".to_owned())
    );
    for bad in ["", "gd 1", "GD", "a/b", &"x".repeat(65)] {
        assert!(log_origin(province("440000"), bad).is_err(), "{bad:?}");
    }
    for bad in ["hufu.audit/440000", "hufu.audit/999999/n", "other/440000/n"] {
        assert!(parse_log_origin(bad).is_err(), "{bad}");
    }
    // A witness key is not a log key, and the trust list refuses it as one.
    assert!(witness_verifier_key(&signer.witness_verifier_key()).is_err());
    let f = federation();
    let mut trust = f.trust.clone();
    assert!(
        trust
            .set_log_key(province("440000"), signer.witness_verifier_key())
            .is_err()
    );
}

/// Replicas of one province keep one audit log each, under origins naming
/// them, signed with the province's one log key: a checkpoint of another
/// node of the province verifies with the key the trust list names after
/// the first node, one of another province's origin does not.
#[test]
fn a_provinces_log_key_signs_each_of_its_nodes_logs_under_its_own_origin() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let (_db, log) = open_log(&dir, "gd-replica");
    append_all(&log, (0..3).map(entry));
    let replica = f.gd.signer.for_node("node-2").unwrap();
    let cp = log.checkpoint(&replica).unwrap();
    assert_eq!(cp.checkpoint().origin, "hufu.audit/440000/node-2");
    let parsed = SignedCheckpoint::parse(&cp.note()).unwrap();
    parsed
        .verify_log_signature(&f.gd.signer.verifier_key())
        .unwrap();

    // Shaanxi's key signing under a Guangdong origin is not Guangdong's log,
    // though the signature is Shaanxi's own: the origin's province and the
    // key's must be one.
    let pem = f.sn.signer.to_pkcs8_pem();
    let pretender = LogSigner::from_pkcs8_pem(&pem.replacen(
        "hufu.audit/610000/node-610000",
        "hufu.audit/440000/node-2",
        1,
    ))
    .unwrap();
    let other_dir = TempDir::new().unwrap();
    let (_db2, other) = open_log(&other_dir, "pretender");
    append_all(&other, (0..3).map(entry));
    let forged = SignedCheckpoint::parse(&other.checkpoint(&pretender).unwrap().note()).unwrap();
    let err = forged
        .verify_log_signature(&f.sn.signer.verifier_key())
        .unwrap_err();
    assert!(
        err.to_string().contains("nor another node of its province"),
        "{err}"
    );
}

#[test]
fn checkpoints_are_c2sp_signed_notes() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let (_db, log) = open_log(&dir, "gd");
    append_all(&log, (0..3).map(entry));

    let cp = log.checkpoint(&f.gd.signer).unwrap();
    let note = cp.note();
    let root = log.root().unwrap();
    assert!(
        note.starts_with(&format!(
            "hufu.audit/440000/node-440000\n3\n{root}\n\n\u{2014} hufu.audit/440000/node-440000 "
        )),
        "{note}"
    );
    let parsed = SignedCheckpoint::parse(&note).unwrap();
    assert_eq!(parsed, cp);
    assert_eq!(parsed.checkpoint().size, 3);
    assert_eq!(parsed.checkpoint().province().unwrap(), province("440000"));
    parsed
        .verify_log_signature(&f.gd.signer.verifier_key())
        .unwrap();
    let err = parsed
        .verify_log_signature(&f.sn.signer.verifier_key())
        .unwrap_err();
    assert!(err.to_string().contains("log signature invalid"), "{err}");

    // The text was altered: the signature no longer verifies.
    let forged = note.replacen("\n3\n", "\n2\n", 1);
    let err = SignedCheckpoint::parse(&forged)
        .unwrap()
        .verify_log_signature(&f.gd.signer.verifier_key())
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");

    // Extension lines and other shapes are refused.
    for bad in [
        note.replacen("\n\n", "\nextension\n\n", 1),
        note.replacen("\n3\n", "\n03\n", 1),
        note.replacen(&root.to_string(), "not-base64", 1),
    ] {
        assert!(SignedCheckpoint::parse(&bad).is_err(), "{bad}");
    }

    // A log speaks under one origin only.
    let other = LogSigner::generate(province("440000"), "gd-2").unwrap();
    let err = log.checkpoint(&other).unwrap_err();
    assert!(matches!(err, AuditError::OriginMismatch { .. }), "{err}");
}

/// A witness checkpoint flow: first contact, a consistent successor, stale
/// and rolled-back requests, then a forked log with the same key.
#[test]
fn witness_cosigns_consistent_checkpoints_and_keeps_forks_as_evidence() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let (_db, log) = open_log(&dir, "gd");
    let wdb = sled::open(dir.path().join("sn-witness")).unwrap();
    let witness = Witness::open(wdb.open_tree("witness").unwrap(), Arc::clone(&f.sn.signer));
    assert_eq!(witness.name(), "hufu.witness/610000");
    let gd_key = f.gd.signer.verifier_key();
    let sn_witness_key = witness_verifier_key(&f.sn.signer.verifier_key()).unwrap();

    // First contact: from size 0, an empty proof.
    append_all(&log, (0..10).map(entry));
    let cp10 = log.checkpoint(&f.gd.signer).unwrap();
    let cosig = witness.witness(&cp10.note(), &gd_key, 0, &[]).unwrap();
    assert_eq!(cosig.witness(), "hufu.witness/610000");
    assert_eq!(cosig.province(), Some(province("610000")));
    assert!(cosig.time() > 1_700_000_000);
    assert!(cosig.line().starts_with("\u{2014} hufu.witness/610000 "));
    verify_cosignature(&cp10, &cosig.line(), &sn_witness_key).unwrap();
    // Not valid for another checkpoint, nor under another witness's key.
    append_all(&log, (10..15).map(entry));
    let cp15 = log.checkpoint(&f.gd.signer).unwrap();
    assert!(verify_cosignature(&cp15, &cosig.line(), &sn_witness_key).is_err());
    let bj_witness_key = witness_verifier_key(&f.bj.signer.verifier_key()).unwrap();
    assert!(verify_cosignature(&cp10, &cosig.line(), &bj_witness_key).is_err());
    assert_eq!(
        Cosignature::parse_line(&format!("{}\n", cosig.line())).unwrap(),
        cosig
    );

    // A consistent successor.
    let proof = log.consistency_proof(10, 15).unwrap();
    witness.witness(&cp15.note(), &gd_key, 10, &proof).unwrap();
    let latest = witness.latest(f.gd.signer.origin()).unwrap().unwrap();
    assert_eq!(latest.checkpoint(), cp15.checkpoint());
    // The same checkpoint again is cosigned again.
    witness.witness(&cp15.note(), &gd_key, 15, &[]).unwrap();

    // The log guessed the witness's size wrong: told the right one.
    append_all(&log, (15..20).map(entry));
    let cp20 = log.checkpoint(&f.gd.signer).unwrap();
    let err = witness
        .witness(
            &cp20.note(),
            &gd_key,
            10,
            &log.consistency_proof(10, 20).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(err, WitnessError::OldSize { have: 15, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("send a consistency proof from size 15"),
        "{err}"
    );
    // An older checkpoint is refused, and is no conflict.
    let err = witness.witness(&cp10.note(), &gd_key, 15, &[]).unwrap_err();
    assert!(
        matches!(err, WitnessError::Rollback { .. }) && !err.is_conflict(),
        "{err}"
    );
    // Someone else's key, or the witness's own log, are refused.
    let err = witness
        .witness(&cp20.note(), &f.bj.signer.verifier_key(), 15, &[])
        .unwrap_err();
    assert!(matches!(err, WitnessError::BadLogSignature { .. }), "{err}");
    let (_sndb, sn_log) = open_log(&dir, "sn");
    let own = sn_log.checkpoint(&f.sn.signer).unwrap();
    let err = witness
        .witness(&own.note(), &f.sn.signer.verifier_key(), 0, &[])
        .unwrap_err();
    assert!(matches!(err, WitnessError::OwnLog { .. }), "{err}");
    // A first contact must start from the empty tree.
    let bdb = sled::open(dir.path().join("bj-witness")).unwrap();
    let bj_witness = Witness::open(bdb.open_tree("witness").unwrap(), Arc::clone(&f.bj.signer));
    let err = bj_witness
        .witness(
            &cp20.note(),
            &gd_key,
            0,
            &log.consistency_proof(10, 20).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(err, WitnessError::Malformed(_)) && !err.is_conflict(),
        "{err}"
    );
    let err = bj_witness
        .witness(&cp20.note(), &gd_key, 0, &vec![TreeHash::default(); 1000])
        .unwrap_err();
    assert!(
        err.to_string().contains("more than any proof needs"),
        "{err}"
    );
    assert_eq!(witness.conflicts().unwrap(), 0);
    assert_eq!(bj_witness.conflicts().unwrap(), 0);

    // A fork: the same key and origin, the same first 12 entries, then
    // others. Its proof from 15 cannot match what the witness cosigned.
    let (_fdb, fork) = open_log(&dir, "fork");
    append_all(&fork, (0..12).map(entry));
    append_all(&fork, (12..20).map(|i| entry(i).with_answer("yellow")));
    let forked = fork.checkpoint(&f.gd.signer).unwrap();
    let err = witness
        .witness(
            &forked.note(),
            &gd_key,
            15,
            &fork.consistency_proof(15, 20).unwrap(),
        )
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("kept as evidence"), "{err}");
    let evidence = witness.evidence().unwrap();
    assert_eq!(evidence.len(), 1);
    assert_eq!(evidence[0].origin, f.gd.signer.origin());
    assert_eq!(
        SignedCheckpoint::parse(&evidence[0].known)
            .unwrap()
            .checkpoint(),
        cp15.checkpoint()
    );
    assert_eq!(evidence[0].offered, forked.note());
    // Both are signed by the log: the evidence stands on its own.
    for note in [&evidence[0].known, &evidence[0].offered] {
        SignedCheckpoint::parse(note)
            .unwrap()
            .verify_log_signature(&gd_key)
            .unwrap();
    }
    // The state did not move.
    let latest = witness.latest(f.gd.signer.origin()).unwrap().unwrap();
    assert_eq!(latest.checkpoint().size, 15);

    // Two roots for the size the witness holds: a conflict without proof.
    let (_f2db, fork15) = open_log(&dir, "fork15");
    append_all(&fork15, (0..15).map(|i| entry(i).with_answer("yellow")));
    let forked15 = fork15.checkpoint(&f.gd.signer).unwrap();
    let err = witness
        .witness(&forked15.note(), &gd_key, 0, &[])
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(witness.conflicts().unwrap(), 2);

    // The honest log goes on being witnessed.
    witness
        .witness(
            &cp20.note(),
            &gd_key,
            15,
            &log.consistency_proof(15, 20).unwrap(),
        )
        .unwrap();
    // The state survives reopening.
    drop(witness);
    let witness = Witness::open(wdb.open_tree("witness").unwrap(), Arc::clone(&f.sn.signer));
    assert_eq!(
        witness
            .latest(f.gd.signer.origin())
            .unwrap()
            .unwrap()
            .checkpoint()
            .size,
        20
    );
    assert_eq!(witness.evidence().unwrap().len(), 2);
}

/// Cosigns `checkpoint` by the witnesses in `witnesses`, each from scratch.
fn cosign(
    checkpoint: &mut SignedCheckpoint,
    log_key: &str,
    witnesses: &[(&Witness, u64, Vec<TreeHash>)],
) {
    for (witness, old, proof) in witnesses {
        let c = witness
            .witness(&checkpoint.note(), log_key, *old, proof)
            .unwrap();
        checkpoint.add_cosignature(&c).unwrap();
    }
}

#[test]
fn a_checkpoint_is_published_with_the_quorum_of_cosignatures() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let (_db, log) = open_log(&dir, "gd");
    append_all(&log, (0..5).map(entry));
    let gd_key = f.gd.signer.verifier_key();
    let mut cp = log.checkpoint(&f.gd.signer).unwrap();

    let err = log.publish(&cp, &f.trust).unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint hufu.audit/440000/node-440000 at size 5: 0 valid cosignatures, quorum is 1: collect cosignatures from more member provinces' witnesses"
    );
    assert!(log.published().unwrap().is_empty());

    let wdb = sled::open(dir.path().join("witnesses")).unwrap();
    let sn = Witness::open(wdb.open_tree("sn").unwrap(), Arc::clone(&f.sn.signer));
    let bj = Witness::open(wdb.open_tree("bj").unwrap(), Arc::clone(&f.bj.signer));
    cosign(&mut cp, &gd_key, &[(&sn, 0, vec![])]);
    assert_eq!(cp.verify(&f.trust).unwrap(), [province("610000")]);
    log.publish(&cp, &f.trust).unwrap();

    // Beijing's cosignature, collected on a separate copy, merges in.
    let mut other = log.checkpoint(&f.gd.signer).unwrap();
    cosign(&mut other, &gd_key, &[(&bj, 0, vec![])]);
    log.publish(&other, &f.trust).unwrap();
    let published = log.latest_published().unwrap().unwrap();
    assert_eq!(
        published.verify(&f.trust).unwrap(),
        [province("110000"), province("610000")]
    );
    assert_eq!(published.cosignatures().len(), 2);

    // A quorum of 2 needs both.
    let mut strict = f.trust.clone();
    strict.set_witness_quorum(2).unwrap();
    published.verify(&strict).unwrap();
    let err = cp.verify(&strict).unwrap_err();
    assert!(
        err.to_string().contains("1 valid cosignature, quorum is 2"),
        "{err}"
    );

    // A cosignature by a key outside the trust list does not count.
    let stranger = LogSigner::generate(province("310000"), "sh-1").unwrap();
    let sdb = sled::open(dir.path().join("stranger")).unwrap();
    let stranger = Witness::open(sdb.open_tree("w").unwrap(), Arc::new(stranger));
    let mut lonely = log.checkpoint(&f.gd.signer).unwrap();
    cosign(&mut lonely, &gd_key, &[(&stranger, 0, vec![])]);
    assert!(matches!(
        lonely.verify(&f.trust),
        Err(AuditError::Quorum { valid: 0, .. })
    ));

    // A member's cosignature that does not verify spoils the checkpoint.
    let line = cp.cosignatures()[0].line();
    let mut sig = STANDARD.decode(line.rsplit_once(' ').unwrap().1).unwrap();
    sig[20] ^= 1;
    let bad = Cosignature::parse_line(&format!(
        "{} {}",
        line.rsplit_once(' ').unwrap().0,
        STANDARD.encode(sig)
    ))
    .unwrap();
    let mut spoiled = log.checkpoint(&f.gd.signer).unwrap();
    spoiled.add_cosignature(&bad).unwrap();
    let err = spoiled.verify(&f.trust).unwrap_err();
    assert!(
        err.to_string()
            .contains("cosignature by hufu.witness/610000 does not verify"),
        "{err}"
    );

    // Not this log's checkpoint: refused.
    let (_odb, other_log) = open_log(&dir, "other");
    append_all(&other_log, (100..105).map(entry));
    let foreign = other_log.checkpoint(&f.gd.signer).unwrap();
    let err = log.publish(&foreign, &f.trust).unwrap_err();
    assert!(
        err.to_string().contains("not a checkpoint of this log"),
        "{err}"
    );
}

/// Guangdong's log with 1000 entries and checkpoints at 100, 101, 250, 600
/// and 1000, each cosigned by Beijing and Shaanxi, exported to `out`.
fn exported(f: &Federation, dir: &TempDir, out: &Path) -> AuditLog {
    let (_db, log) = open_log(dir, "gd");
    let wdb = sled::open(dir.path().join("witnesses")).unwrap();
    let sn = Witness::open(wdb.open_tree("sn").unwrap(), Arc::clone(&f.sn.signer));
    let bj = Witness::open(wdb.open_tree("bj").unwrap(), Arc::clone(&f.bj.signer));
    let gd_key = f.gd.signer.verifier_key();
    let mut last = 0;
    for size in [100, 101, 250, 600, 1000] {
        append_all(&log, (last..size).map(entry));
        let mut cp = log.checkpoint(&f.gd.signer).unwrap();
        let proof = log.consistency_proof(last, size).unwrap();
        cosign(
            &mut cp,
            &gd_key,
            &[(&sn, last, proof.clone()), (&bj, last, proof)],
        );
        log.publish(&cp, &f.trust).unwrap();
        last = size;
    }
    assert_eq!(log.export(out).unwrap(), 5);
    log
}

/// A copy of the exported directory to tamper with.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to.join("checkpoints")).unwrap();
    fs::copy(from.join("entries.jsonl"), to.join("entries.jsonl")).unwrap();
    for item in fs::read_dir(from.join("checkpoints")).unwrap() {
        let item = item.unwrap();
        fs::copy(item.path(), to.join("checkpoints").join(item.file_name())).unwrap();
    }
}

fn tampered(good: &Path, name: &str, change: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = good.parent().unwrap().join(name);
    copy_dir(good, &dir);
    change(&dir);
    dir
}

fn edit_lines(path: &Path, change: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    change(&mut lines);
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The entries.jsonl line of `entry` at `index`.
fn entry_line(index: u64, entry: &AuditEntry) -> String {
    format!(
        "{{\"index\":{index},\"entry\":\"{}\"}}",
        STANDARD.encode(entry.encode().unwrap())
    )
}

fn verify_error(dir: &Path, trust: &TrustList) -> String {
    verify_dir(dir, trust).unwrap_err().to_string()
}

#[test]
fn auditors_verify_a_fetched_directory_offline() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("good");
    let log = exported(&f, &dir, &good);

    let report = verify_dir(&good, &f.trust).unwrap();
    assert_eq!(report.origin, "hufu.audit/440000/node-440000");
    assert_eq!(report.province, province("440000"));
    assert_eq!((report.entries, report.checkpoints), (1000, 5));
    assert_eq!(report.root, log.root().unwrap());
    assert_eq!(report.min_cosignatures, 2);
    assert!(
        report
            .to_string()
            .contains("1000 entries and 5 checkpoints verified")
    );

    // One entry changed, in a stretch one entry long: named exactly.
    let stored = log.entries(0, 1000).unwrap();
    let original = |i: u64| AuditEntry::decode(&stored[i as usize].1).unwrap();
    let changed = tampered(&good, "changed-one", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l[100] = entry_line(100, &original(100).with_answer("yellow"));
        })
    });
    assert_eq!(
        verify_error(&changed, &f.trust),
        "entry 100: leaf hash does not match checkpoint 2 (size 101): the entry was altered, or one was dropped or reordered"
    );
    // In a longer stretch: the stretch between the checkpoints is named.
    let changed = tampered(&good, "changed", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l[300] = entry_line(300, &original(300).with_answer("yellow"));
        })
    });
    let err = verify_error(&changed, &f.trust);
    assert!(
        err.starts_with("entries 250 to 599: leaf hashes do not match checkpoint 4 (size 600)"),
        "{err}"
    );

    // One entry dropped.
    let dropped = tampered(&good, "dropped", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l.remove(500);
        })
    });
    assert_eq!(
        verify_error(&dropped, &f.trust),
        "entries.jsonl line 501 holds entry 501 where entry 500 belongs: an entry was dropped, added or reordered there"
    );

    // Two entries reordered, lines and all.
    let swapped = tampered(&good, "swapped", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| l.swap(700, 701))
    });
    assert!(
        verify_error(&swapped, &f.trust)
            .starts_with("entries.jsonl line 701 holds entry 701 where entry 700 belongs"),
    );
    // Reordered and renumbered to hide it: the hashes catch it.
    let renumbered = tampered(&good, "renumbered", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l[700] = entry_line(700, &original(701));
            l[701] = entry_line(701, &original(700));
        })
    });
    assert!(
        verify_error(&renumbered, &f.trust)
            .starts_with("entries 600 to 999: leaf hashes do not match checkpoint 5 (size 1000)"),
    );

    // An entry that is not canonical.
    let garbled = tampered(&good, "garbled", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l[42] = format!(
                "{{\"index\":42,\"entry\":\"{}\"}}",
                STANDARD.encode(b"{\"v\":1}")
            );
        })
    });
    assert!(verify_error(&garbled, &f.trust).starts_with("entry 42: audit entry refused"));

    // Entries missing at the end, or beyond the last checkpoint.
    let short = tampered(&good, "short", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| l.truncate(990))
    });
    assert!(
        verify_error(&short, &f.trust).contains("entries 990 to 999 are missing"),
        "{}",
        verify_error(&short, &f.trust)
    );
    let long = tampered(&good, "long", |d| {
        edit_lines(&d.join("entries.jsonl"), |l| {
            l.push(entry_line(1000, &entry(1000)))
        })
    });
    assert!(
        verify_error(&long, &f.trust)
            .starts_with("entries from 1000 on are not covered by checkpoint 5")
    );

    // A log signature altered.
    let bad_sig = tampered(&good, "bad-sig", |d| {
        let path = d.join("checkpoints/000002.note");
        let note = fs::read_to_string(&path).unwrap();
        let (text, sigs) = note.split_once("\n\n").unwrap();
        let (first, rest) = sigs.split_once('\n').unwrap();
        let (name, b64) = first.rsplit_once(' ').unwrap();
        let mut bytes = STANDARD.decode(b64).unwrap();
        bytes[10] ^= 1;
        fs::write(
            &path,
            format!("{text}\n\n{name} {}\n{rest}", STANDARD.encode(bytes)),
        )
        .unwrap();
    });
    assert!(
        verify_error(&bad_sig, &f.trust).starts_with("checkpoint 2: log signature invalid"),
        "{}",
        verify_error(&bad_sig, &f.trust)
    );
    // Verified against another province's key: the same.
    let mut wrong_key = f.trust.clone();
    let other = LogSigner::generate(province("440000"), "node-440000").unwrap();
    wrong_key
        .set_log_key(province("440000"), other.verifier_key())
        .unwrap();
    assert!(verify_error(&good, &wrong_key).starts_with("checkpoint 1: log signature invalid"));

    // The cosignatures stripped from one checkpoint.
    let uncosigned = tampered(&good, "uncosigned", |d| {
        let path = d.join("checkpoints/000005.note");
        let note = fs::read_to_string(&path).unwrap();
        let first_line_end = note.find("\n\n").unwrap() + 2;
        let log_line_end = first_line_end + note[first_line_end..].find('\n').unwrap() + 1;
        fs::write(&path, &note[..log_line_end]).unwrap();
    });
    assert_eq!(
        verify_error(&uncosigned, &f.trust),
        "checkpoint 5: 0 valid cosignatures, quorum is 1: collect cosignatures from more member provinces' witnesses"
    );
    // A quorum the directory does not meet.
    let mut strict = f.trust.clone();
    strict.set_witness_quorum(2).unwrap();
    verify_dir(&good, &strict).unwrap();
    let mut no_bj = f.trust.clone();
    no_bj
        .set_log_key(province("110000"), String::new())
        .unwrap();
    no_bj.set_witness_quorum(2).unwrap();
    assert!(
        verify_error(&good, &no_bj).starts_with("checkpoint 1: 1 valid cosignature, quorum is 2")
    );

    // A proof that does not join two checkpoints.
    let bad_proof = tampered(&good, "bad-proof", |d| {
        fs::copy(
            d.join("checkpoints/000003.proof"),
            d.join("checkpoints/000004.proof"),
        )
        .unwrap();
    });
    assert!(
        verify_error(&bad_proof, &f.trust)
            .starts_with("checkpoint 4 is not consistent with checkpoint 3"),
        "{}",
        verify_error(&bad_proof, &f.trust)
    );
    // A checkpoint file missing from the sequence.
    let gap = tampered(&good, "gap", |d| {
        fs::remove_file(d.join("checkpoints/000002.note")).unwrap();
    });
    assert!(verify_error(&gap, &f.trust).contains("000002.note: missing"));
}

/// A forked checkpoint in the fetched directory: validly signed and even
/// cosigned by a witness that never saw the honest log, but no proof joins
/// it to the checkpoint before.
#[test]
fn a_forked_checkpoint_in_a_directory_is_inconsistent() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("good");
    let _log = exported(&f, &dir, &good);

    let (_db, fork) = open_log(&dir, "fork");
    append_all(&fork, (0..250).map(|i| entry(i).with_answer("yellow")));
    let wdb = sled::open(dir.path().join("naive-witness")).unwrap();
    let naive = Witness::open(wdb.open_tree("w").unwrap(), Arc::clone(&f.sn.signer));
    let mut forked = fork.checkpoint(&f.gd.signer).unwrap();
    cosign(
        &mut forked,
        &f.gd.signer.verifier_key(),
        &[(&naive, 0, vec![])],
    );
    let forked_dir = tampered(&good, "forked", |d| {
        fs::write(d.join("checkpoints/000003.note"), forked.note()).unwrap();
    });
    assert!(
        verify_error(&forked_dir, &f.trust)
            .starts_with("checkpoint 3 is not consistent with checkpoint 2"),
        "{}",
        verify_error(&forked_dir, &f.trust)
    );
}

#[test]
fn auditors_query_and_export() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("good");
    let _log = exported(&f, &dir, &good);

    let all = query(&good, &Filter::default()).unwrap();
    assert_eq!(all.len(), 1000);
    assert_eq!(all[10].index, 10);

    let by_holder = query(
        &good,
        &Filter {
            holder: Some(holder(3)),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(by_holder.len(), 20);
    assert!(by_holder.iter().all(|r| r.entry.holder == Some(holder(3))));

    let window = query(
        &good,
        &Filter {
            since: Some(NOW_MS + 100_000),
            until: Some(NOW_MS + 200_000),
            kind: Some(EntryKind::LookupServed),
            caller: Some("/node/sn-".into()),
            province: Some(province("440000")),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(
        window.iter().map(|r| r.index).collect::<Vec<_>>(),
        (100..200)
            .filter(|i: &u64| i.is_multiple_of(3))
            .collect::<Vec<_>>()
    );
    let none = Filter {
        province: Some(province("610000")),
        ..Filter::default()
    };
    assert!(query(&good, &none).unwrap().is_empty());

    let mut jsonl = Vec::new();
    export(&window, ExportFormat::JsonLines, &mut jsonl).unwrap();
    let jsonl = String::from_utf8(jsonl).unwrap();
    assert_eq!(jsonl.lines().count(), window.len());
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(first["index"], 102);
    assert_eq!(first["time_utc"], "2023-11-14T22:15:02Z");
    assert_eq!(first["kind"], "lookup_served");
    assert_eq!(first["province"], "440000");
    assert_eq!(first["source"], "replica");
    assert_eq!(first["detail"], serde_json::Value::Null);

    let mut csv = Vec::new();
    export(&window, ExportFormat::Csv, &mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "index,time,time_utc,kind,caller,province,holder,answer,source,detail"
    );
    assert!(lines.next().unwrap().starts_with(&format!(
        "102,1700000102000,2023-11-14T22:15:02Z,lookup_served,spiffe://hufu/province/610000/node/sn-1,440000,{},green,replica,",
        holder(2)
    )));
    assert_eq!(csv.lines().count(), window.len() + 1);

    let mut empty = Vec::new();
    export(&[], ExportFormat::Csv, &mut empty).unwrap();
    assert_eq!(
        String::from_utf8(empty).unwrap(),
        "index,time,time_utc,kind,caller,province,holder,answer,source,detail\n"
    );
}

#[test]
fn witness_names_follow_the_trust_list() {
    let f = federation();
    assert_eq!(witness_name(province("610000")), "hufu.witness/610000");
    for s in [&f.bj, &f.gd, &f.sn] {
        let member = f.trust.member(s.signer.province()).unwrap();
        assert_eq!(
            witness_verifier_key(&member.log_key).unwrap(),
            s.signer.witness_verifier_key()
        );
    }
}

#[test]
fn checkpoints_are_judged_by_the_trust_list_in_force_when_cosigned() {
    let f = federation();
    let dir = TempDir::new().unwrap();
    let (_db, log) = open_log(&dir, "gd");
    let wdb = sled::open(dir.path().join("witnesses")).unwrap();
    let sn = Witness::open(wdb.open_tree("sn").unwrap(), Arc::clone(&f.sn.signer));
    let gd_key = f.gd.signer.verifier_key();
    // Two checkpoints cosigned by Shaanxi alone (the quorum is 1).
    let mut last = 0;
    for size in [10, 20] {
        append_all(&log, (last..size).map(entry));
        let mut cp = log.checkpoint(&f.gd.signer).unwrap();
        let proof = log.consistency_proof(last, size).unwrap();
        cosign(&mut cp, &gd_key, &[(&sn, last, proof)]);
        log.publish(&cp, &f.trust).unwrap();
        last = size;
    }
    let out = dir.path().join("fetched");
    log.export(&out).unwrap();
    let cosigned = log.published().unwrap()[1].cosignatures()[0].time() as i64;

    // Shaanxi is removed by version 2, issued after it cosigned.
    let without_sn = |issued_at: i64| {
        let mut next = f.trust.successor(issued_at);
        next.remove_member(province("610000")).unwrap();
        next
    };
    let later = without_sn(cosigned + 60);
    let report = verify_dir_history(&out, &[f.trust.clone(), later.clone()]).unwrap();
    assert_eq!((report.checkpoints, report.min_cosignatures), (2, 1));
    // Judged against the newest list alone, the untouched log fails.
    assert!(
        verify_error(&out, &later).contains("0 valid cosignatures"),
        "{}",
        verify_error(&out, &later)
    );

    // Removed long before it cosigned, Shaanxi does not count...
    let earlier = without_sn(cosigned - 2 * TRUST_ADOPTION_GRACE_SECS as i64);
    let err = verify_dir_history(&out, &[f.trust.clone(), earlier]).unwrap_err();
    assert!(err.to_string().contains("0 valid cosignatures"), "{err}");
    // ...but just before, its node may not have adopted the list yet.
    let just_before = without_sn(cosigned - 60);
    verify_dir_history(&out, &[f.trust.clone(), just_before]).unwrap();
}
