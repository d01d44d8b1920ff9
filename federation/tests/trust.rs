//! The trust list end to end: real province CAs from `hufu-certs`, real
//! governance keys, real code-signing keyrings, signed notes parsed back from
//! text, and a trust store in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hufu_certs::{CertificateAuthority, Province};
use hufu_federation::codes::{CodeAlg, Jwks, Keyring};
use hufu_federation::trust::{
    GovernanceKey, MAX_NOTE_BYTES, Member, SignedTrustList, TrustError, TrustList, TrustStore,
    governance_key_name,
};
use tempfile::TempDir;

const NOW: i64 = 1_700_000_000;

fn province(code: &str) -> Province {
    Province::parse(code).unwrap()
}

/// A province's own parts: its CA, its governance key, its member entry.
struct Setup {
    ca: CertificateAuthority,
    key: GovernanceKey,
    member: Member,
}

fn make(code: &str) -> Setup {
    let p = province(code);
    let ca = CertificateAuthority::generate(p).unwrap();
    let key = GovernanceKey::generate(p).unwrap();
    let member = Member {
        province: p,
        name: p.name().to_owned(),
        ca_cert_pem: ca.cert_pem(),
        jwks: Jwks::default(),
        revoked_kids: Vec::new(),
        log_key: String::new(),
        governance_key: key.verifier_key(),
        endpoints: vec![format!("node1.{code}.example:7443")],
        legacy_formats: Vec::new(),
    };
    Setup { ca, key, member }
}

/// Beijing, Guangdong and Shaanxi found a federation with threshold 2.
struct Federation {
    bj: Setup,
    gd: Setup,
    sn: Setup,
    genesis: SignedTrustList,
}

fn federation() -> Federation {
    let (bj, gd, sn) = (make("110000"), make("440000"), make("610000"));
    // Given out of order: genesis sorts them.
    let list = TrustList::genesis(
        vec![sn.member.clone(), bj.member.clone(), gd.member.clone()],
        2,
        NOW,
    )
    .unwrap();
    let mut genesis = SignedTrustList::unsigned(list);
    for f in [&bj, &gd, &sn] {
        genesis.sign(&f.key).unwrap();
    }
    Federation {
        bj,
        gd,
        sn,
        genesis,
    }
}

impl Federation {
    /// v2: Shanghai joins.
    fn with_shanghai(&self) -> (Setup, TrustList) {
        let sh = make("310000");
        let mut next = self.genesis.list.successor(NOW + 60);
        next.add_member(sh.member.clone()).unwrap();
        (sh, next)
    }
}

fn signed(list: &TrustList, keys: &[&GovernanceKey]) -> SignedTrustList {
    let mut s = SignedTrustList::unsigned(list.clone());
    for key in keys {
        s.sign(key).unwrap();
    }
    s
}

#[test]
fn genesis_signed_by_all_founders_verifies() {
    let f = federation();
    f.genesis.verify_genesis().unwrap();
    let list = &f.genesis.list;
    assert_eq!(list.version, 1);
    assert_eq!(list.threshold, 2);
    assert_eq!(list.witness_quorum, 1);
    assert_eq!(
        list.provinces(),
        [province("110000"), province("440000"), province("610000")]
    );
    assert_eq!(list.member(province("440000")).unwrap().name, "Guangdong");
    assert!(list.member(province("310000")).is_none());
    assert_eq!(
        f.genesis.valid_signers(list),
        [province("110000"), province("440000"), province("610000")]
    );

    // The note is a C2SP signed note: text, blank line, one line per key.
    let note = f.genesis.note();
    assert!(
        note.starts_with("hufu trust list v1\n{\"version\":1,"),
        "{note}"
    );
    let (text, sigs) = note.rsplit_once("\n\n").unwrap();
    assert_eq!(format!("{text}\n"), list.note_text());
    let lines: Vec<&str> = sigs.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("\u{2014} hufu-governance-110000 "));
    let sig = STANDARD
        .decode(lines[0].rsplit_once(' ').unwrap().1)
        .unwrap();
    assert_eq!(sig.len(), 4 + 64);
    let key = f.bj.key.verifier_key();
    let (name, rest) = key.split_once('+').unwrap();
    assert_eq!(name, governance_key_name(province("110000")));
    assert_eq!(rest.split_once('+').unwrap().0, hex(&sig[..4]));
}

#[test]
fn genesis_missing_a_founder_is_refused() {
    let f = federation();
    let partial = signed(&f.genesis.list, &[&f.bj.key, &f.sn.key]);
    let err = partial.verify_genesis().unwrap_err();
    assert!(
        matches!(&err, TrustError::MissingFounderSignatures { missing } if missing == &[province("440000")]),
        "{err}"
    );
    assert!(err.to_string().contains("440000"), "{err}");

    let (_, v2) = f.with_shanghai();
    let err = signed(&v2, &[&f.bj.key]).verify_genesis().unwrap_err();
    assert!(
        matches!(err, TrustError::NotGenesis { version: 2 }),
        "{err}"
    );
}

#[test]
fn successor_needs_the_threshold_of_current_members() {
    let f = federation();
    let (sh, v2) = f.with_shanghai();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.members.len(), 4);

    signed(&v2, &[&f.gd.key, &f.sn.key])
        .verify_successor(&f.genesis.list)
        .unwrap();

    let err = signed(&v2, &[&f.gd.key])
        .verify_successor(&f.genesis.list)
        .unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::TooFewSignatures {
                version: 2,
                valid: 1,
                previous: 1,
                required: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "trust list v2 has 1 valid signature of members of v1; 2 are required"
    );

    // The newcomer is not a member of v1: its signature does not count.
    let with_newcomer = signed(&v2, &[&f.gd.key, &sh.key]);
    assert_eq!(
        with_newcomer.valid_signers(&f.genesis.list),
        [province("440000")]
    );
    assert!(with_newcomer.verify_successor(&f.genesis.list).is_err());
    // But it is a member of v2, for v3.
    assert_eq!(
        with_newcomer.valid_signers(&v2),
        [province("310000"), province("440000")]
    );
}

#[test]
fn signatures_of_non_members_and_impostors_do_not_count() {
    let f = federation();
    let (_, v2) = f.with_shanghai();
    let outsider = GovernanceKey::generate(province("130000")).unwrap();
    // A key named like Guangdong's but not Guangdong's.
    let impostor = GovernanceKey::generate(province("440000")).unwrap();
    let s = signed(&v2, &[&f.bj.key, &outsider, &impostor]);
    assert_eq!(s.valid_signers(&f.genesis.list), [province("110000")]);
    let err = s.verify_successor(&f.genesis.list).unwrap_err();
    assert!(
        matches!(err, TrustError::TooFewSignatures { valid: 1, .. }),
        "{err}"
    );

    // Signing twice with one key replaces the line: still one signature.
    let mut twice = signed(&v2, &[&f.bj.key]);
    twice.sign(&f.bj.key).unwrap();
    assert_eq!(twice.note().matches('\u{2014}').count(), 1);
    assert!(twice.verify_successor(&f.genesis.list).is_err());
}

#[test]
fn tampered_text_is_refused() {
    let f = federation();
    let (_, v2) = f.with_shanghai();
    let good = signed(&v2, &[&f.bj.key, &f.gd.key, &f.sn.key]);
    let note = good.note();
    let tampered = note.replace("node1.440000.example:7443", "evil.example:7443");
    assert_ne!(tampered, note);
    // Still a canonical list, so it parses; its signatures no longer verify.
    let parsed = SignedTrustList::parse(&tampered).unwrap();
    assert!(parsed.valid_signers(&f.genesis.list).is_empty());
    let err = parsed.verify_successor(&f.genesis.list).unwrap_err();
    assert!(
        matches!(err, TrustError::BadSignature { version: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("does not verify"), "{err}");

    // Editing the struct after signing is caught too.
    let mut edited = good.clone();
    edited.list.threshold = 1;
    let err = edited.verify_successor(&f.genesis.list).unwrap_err();
    assert!(
        matches!(err, TrustError::EditedAfterSigning { version: 2 }),
        "{err}"
    );
    let err = edited.sign(&f.bj.key).unwrap_err();
    assert!(
        matches!(err, TrustError::EditedAfterSigning { .. }),
        "{err}"
    );
}

#[test]
fn a_corrupt_signature_line_is_not_counted_and_refuses_the_note() {
    let f = federation();
    let (_, v2) = f.with_shanghai();
    let good = signed(&v2, &[&f.bj.key, &f.gd.key, &f.sn.key]);
    let note = good.note().to_owned();
    // Flip one bit in Guangdong's signature.
    let line = note
        .lines()
        .find(|l| l.starts_with("\u{2014} hufu-governance-440000 "))
        .unwrap();
    let (prefix, b64) = line.rsplit_once(' ').unwrap();
    let mut sig = STANDARD.decode(b64).unwrap();
    sig[10] ^= 1;
    let corrupt = note.replace(line, &format!("{prefix} {}", STANDARD.encode(&sig)));

    let parsed = SignedTrustList::parse(&corrupt).unwrap();
    assert_eq!(
        parsed.valid_signers(&f.genesis.list),
        [province("110000"), province("610000")]
    );
    let err = parsed.verify_successor(&f.genesis.list).unwrap_err();
    assert!(
        matches!(&err, TrustError::BadSignature { key, .. } if key == "hufu-governance-440000"),
        "{err}"
    );

    // A line by an unknown key is ignored, as the spec requires.
    let mut unknown = note.clone();
    unknown.push_str(&format!(
        "\u{2014} somebody.example {}\n",
        STANDARD.encode([7u8; 68])
    ));
    let parsed = SignedTrustList::parse(&unknown).unwrap();
    parsed.verify_successor(&f.genesis.list).unwrap();
    assert_eq!(SignedTrustList::parse(&unknown).unwrap().note(), unknown);
}

#[test]
fn rollbacks_and_gaps_are_refused() {
    let f = federation();
    let (_, v2) = f.with_shanghai();
    let v2_signed = signed(&v2, &[&f.bj.key, &f.gd.key]);

    let err = f.genesis.verify_successor(&v2).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Rollback {
                offered: 1,
                current: 2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("v1") && err.to_string().contains("v2"));
    let err = v2_signed.verify_successor(&v2).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Rollback {
                offered: 2,
                current: 2
            }
        ),
        "{err}"
    );

    let v4 = v2.successor(NOW + 120).successor(NOW + 180);
    let err = signed(&v4, &[&f.bj.key, &f.gd.key])
        .verify_successor(&v2)
        .unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Gap {
                offered: 4,
                current: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "trust list v4 cannot follow v2 directly: fetch and apply v3 first"
    );
}

#[test]
fn notes_round_trip() {
    let f = federation();
    let parsed = SignedTrustList::parse(f.genesis.note()).unwrap();
    assert_eq!(parsed, f.genesis);
    parsed.verify_genesis().unwrap();

    let unsigned = SignedTrustList::unsigned(f.genesis.list.clone());
    assert_eq!(SignedTrustList::parse(unsigned.note()).unwrap(), unsigned);
    assert!(matches!(
        unsigned.verify_genesis().unwrap_err(),
        TrustError::MissingFounderSignatures { missing } if missing.len() == 3
    ));

    // One list, one text: any other spelling of the JSON is refused.
    let text = f.genesis.list.note_text();
    let spaced = text.replacen("{\"version\":1,", "{\"version\": 1,", 1);
    let err = SignedTrustList::parse(&format!("{spaced}\n")).unwrap_err();
    assert!(matches!(err, TrustError::MalformedList(_)), "{err}");
    let err = SignedTrustList::parse("hufu trust list v1\n{}\n\n").unwrap_err();
    assert!(matches!(err, TrustError::MalformedList(_)), "{err}");
    let err = SignedTrustList::parse(&text).unwrap_err();
    assert!(matches!(err, TrustError::MalformedNote(_)), "{err}");
}

#[test]
fn signatures_from_several_provinces_merge() {
    let f = federation();
    let (_, v2) = f.with_shanghai();
    let mut proposal = signed(&v2, &[&f.bj.key]);
    let from_gd = signed(&v2, &[&f.gd.key]);
    let from_sn = signed(&v2, &[&f.sn.key, &f.bj.key]);
    proposal.merge_signatures(&from_gd).unwrap();
    proposal.merge_signatures(&from_sn).unwrap();
    // Merging again changes nothing.
    let before = proposal.clone();
    proposal.merge_signatures(&from_sn).unwrap();
    assert_eq!(proposal, before);
    assert_eq!(
        proposal.valid_signers(&f.genesis.list),
        [province("110000"), province("440000"), province("610000")]
    );
    assert_eq!(proposal.note().matches('\u{2014}').count(), 3);
    proposal.verify_successor(&f.genesis.list).unwrap();

    let mut other = v2.clone();
    other.set_threshold(3).unwrap();
    let err = proposal
        .merge_signatures(&signed(&other, &[&f.gd.key]))
        .unwrap_err();
    assert!(matches!(err, TrustError::DifferentText { .. }), "{err}");
}

#[test]
fn a_member_with_another_provinces_ca_is_refused() {
    let f = federation();
    let mut liar = make("310000").member;
    liar.ca_cert_pem = f.gd.ca.cert_pem();
    let foreign = |err: TrustError| {
        assert!(
            matches!(err, TrustError::ForeignCa { member, ca } if member == province("310000") && ca == province("440000")),
            "{err}"
        );
    };
    foreign(TrustList::genesis(vec![f.bj.member.clone(), liar.clone()], 1, NOW).unwrap_err());
    let mut next = f.genesis.list.successor(NOW);
    foreign(next.add_member(liar.clone()).unwrap_err());
    foreign(Member::from_json(&liar.to_json()).unwrap_err());
    let err = next
        .set_ca(province("110000"), f.sn.ca.cert_pem())
        .unwrap_err();
    assert!(
        matches!(err, TrustError::ForeignCa { member, ca } if member == province("110000") && ca == province("610000")),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "member 110000 gives the ca certificate of province 610000: give 110000's own ca certificate"
    );

    // A list signed by enough members is still refused if malformed.
    next.members.insert(1, liar);
    let err = signed(&next, &[&f.bj.key, &f.gd.key])
        .verify_successor(&f.genesis.list)
        .unwrap_err();
    foreign(err);
}

#[test]
fn lists_are_checked_when_edited() {
    let f = federation();
    let mut next = f.genesis.list.successor(NOW);
    let gd = province("440000");

    let err = next.add_member(f.gd.member.clone()).unwrap_err();
    assert!(
        matches!(err, TrustError::AlreadyMember(p) if p == gd),
        "{err}"
    );
    let err = next
        .set_endpoints(province("310000"), vec!["a.example:1".into()])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "province 310000 is not a member of trust list v2"
    );
    assert!(next.set_endpoints(gd, vec!["no-port".into()]).is_err());
    next.set_endpoints(gd, vec!["[::1]:7443".into(), "10.0.0.1:7443".into()])
        .unwrap();
    assert!(next.set_threshold(0).is_err());
    assert!(next.set_threshold(4).is_err());
    assert!(next.set_witness_quorum(3).is_err());
    next.set_witness_quorum(2).unwrap();

    // Governance keys: right name, one per province.
    let err = next
        .set_governance_key(gd, f.bj.key.verifier_key())
        .unwrap_err();
    assert!(matches!(err, TrustError::InvalidMember { .. }), "{err}");
    assert!(next.set_governance_key(gd, "nonsense".into()).is_err());
    let new_key = GovernanceKey::generate(gd).unwrap();
    next.set_governance_key(gd, new_key.verifier_key()).unwrap();
    assert!(next.set_log_key(gd, "not a key".into()).is_err());
    next.set_log_key(gd, GovernanceKey::generate(gd).unwrap().verifier_key())
        .unwrap();

    // Removal keeps the threshold reachable.
    next.set_threshold(3).unwrap();
    let err = next.remove_member(gd).unwrap_err();
    assert!(
        err.to_string().contains("lower the threshold first"),
        "{err}"
    );
    next.set_threshold(2).unwrap();
    next.set_witness_quorum(1).unwrap();
    next.remove_member(gd).unwrap();
    assert_eq!(next.provinces(), [province("110000"), province("610000")]);
    next.validate().unwrap();
}

#[test]
fn member_files_carry_real_code_signing_keys() {
    let dir = TempDir::new().unwrap();
    let mut ring = Keyring::open_or_create(
        &dir.path().join("keys"),
        CodeAlg::Es256,
        Duration::from_secs(600),
    )
    .unwrap();
    let old = ring.active_kid().to_owned();
    ring.rotate(CodeAlg::EdDsa).unwrap();
    ring.revoke(&old).unwrap();

    let mut gd = make("440000").member;
    gd.jwks = ring.jwks(NOW);
    gd.revoked_kids = ring.revoked_kids();
    let json = gd.to_json();
    assert_eq!(Member::from_json(&json).unwrap(), gd);

    let mut list = TrustList::genesis(vec![gd.clone()], 1, NOW).unwrap();
    assert_eq!(list.witness_quorum, 0, "nobody to witness a lone province");
    // A published key that is also revoked is a contradiction.
    let mut both = ring.revoked_kids();
    both.push(ring.active_kid().to_owned());
    assert!(list.set_jwks(gd.province, ring.jwks(NOW), both).is_err());

    let err = Member::from_json("{\"province\":\"440000\"}").unwrap_err();
    assert!(matches!(err, TrustError::MemberFile(_)), "{err}");
}

#[test]
fn governance_keys_round_trip_through_private_files() {
    let dir = TempDir::new().unwrap();
    let key = GovernanceKey::generate(province("440000")).unwrap();
    let path = dir.path().join("gov/governance.key");
    key.save(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let loaded = GovernanceKey::load(&path).unwrap();
    assert_eq!(loaded.province(), province("440000"));
    assert_eq!(loaded.verifier_key(), key.verifier_key());
    let pem = key.to_pkcs8_pem();
    assert!(pem.starts_with("hufu-governance-440000\n-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(
        GovernanceKey::from_pkcs8_pem(&pem).unwrap().verifier_key(),
        key.verifier_key()
    );
    assert!(!format!("{key:?}").contains("PRIVATE"));

    let unnamed = pem.split_once('\n').unwrap().1;
    let err = GovernanceKey::from_pkcs8_pem(unnamed).unwrap_err();
    assert!(err.to_string().contains("hufu-governance-"), "{err}");
    let ca = CertificateAuthority::generate(province("440000")).unwrap();
    let not_ed25519 = format!("hufu-governance-440000\n{}", ca.key_pem());
    assert!(GovernanceKey::from_pkcs8_pem(&not_ed25519).is_err());
}

#[test]
fn one_key_for_two_provinces_is_refused() {
    let f = federation();
    let shared = f.bj.key.verifier_key();
    // Same Ed25519 key, relabelled for Guangdong: it would sign twice.
    let (_, id_and_key) = shared.split_once('+').unwrap();
    let b64 = id_and_key.split_once('+').unwrap().1;
    let public = &STANDARD.decode(b64).unwrap()[1..];
    let relabelled = relabel(province("440000"), public);
    let mut next = f.genesis.list.successor(NOW);
    let err = next
        .set_governance_key(province("440000"), relabelled)
        .unwrap_err();
    assert!(
        matches!(err, TrustError::SharedGovernanceKey { .. }),
        "{err}"
    );
}

#[test]
fn the_store_keeps_and_rechecks_the_chain() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("trust");
    let f = federation();
    let mut store = TrustStore::init_genesis(&path, &f.genesis).unwrap();
    assert_eq!(store.version(), 1);
    // init again with the same genesis: harmless.
    TrustStore::init_genesis(&path, &f.genesis).unwrap();

    let (_, v2) = f.with_shanghai();
    let v2 = signed(&v2, &[&f.gd.key, &f.sn.key]);
    assert!(store.apply(v2.clone()).unwrap());
    assert_eq!(store.version(), 2);
    assert_eq!(store.current(), &v2);
    // Gossip repeats itself: the current version again is a no-op.
    assert!(!store.apply(v2.clone()).unwrap());
    assert!(
        !store
            .apply(SignedTrustList::parse(v2.note()).unwrap())
            .unwrap()
    );

    // An older version, or a different v2, is refused.
    let err = store.apply(f.genesis.clone()).unwrap_err();
    assert!(matches!(err, TrustError::Rollback { .. }), "{err}");
    let mut fork = f.genesis.list.successor(NOW + 99);
    fork.set_threshold(3).unwrap();
    let err = store
        .apply(signed(&fork, &[&f.bj.key, &f.gd.key]))
        .unwrap_err();
    assert!(matches!(err, TrustError::Conflict { version: 2 }), "{err}");
    // A rival v2 that is not validly signed is merely invalid.
    let err = store.apply(signed(&fork, &[&f.bj.key])).unwrap_err();
    assert!(matches!(err, TrustError::TooFewSignatures { .. }), "{err}");
    assert_eq!(store.version(), 2);

    let reopened = TrustStore::open(&path).unwrap();
    assert_eq!(reopened.version(), 2);
    assert_eq!(reopened.get(1), Some(&f.genesis));
    assert_eq!(reopened.get(2), Some(&v2));
    assert_eq!(reopened.get(0), None);
    assert_eq!(reopened.get(3), None);
    let mut files: Vec<String> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["v000001.note", "v000002.note"]);

    // Another genesis cannot take over this directory.
    let other = federation();
    let err = TrustStore::init_genesis(&path, &other.genesis).unwrap_err();
    assert!(
        matches!(err, TrustError::StoreExists { version: 2, .. }),
        "{err}"
    );

    let err = TrustStore::open(&dir.path().join("empty")).unwrap_err();
    assert!(matches!(err, TrustError::StoreEmpty { .. }), "{err}");
}

#[test]
fn the_store_refuses_a_tampered_file_on_open() {
    let dir = TempDir::new().unwrap();
    let f = federation();
    let mut store = TrustStore::init_genesis(dir.path(), &f.genesis).unwrap();
    let (_, v2) = f.with_shanghai();
    store.apply(signed(&v2, &[&f.gd.key, &f.sn.key])).unwrap();

    let file = dir.path().join("v000002.note");
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        original.replace("node1.610000.example", "evil.example"),
    )
    .unwrap();
    let err = TrustStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, TrustError::BrokenChain { source, .. } if matches!(**source, TrustError::BadSignature { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("v000002.note"), "{err}");

    // A v2 signed by only one member, slipped in by hand, is refused too.
    std::fs::write(&file, signed(&v2, &[&f.gd.key]).note()).unwrap();
    let err = TrustStore::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("1 valid signature"), "{err}");

    // A hole in the chain.
    std::fs::write(&file, original).unwrap();
    TrustStore::open(dir.path()).unwrap();
    std::fs::rename(&file, dir.path().join("v000003.note")).unwrap();
    let err = TrustStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, TrustError::MissingVersion { version: 2, .. }),
        "{err}"
    );
}

#[test]
fn oversized_notes_are_refused_unread() {
    let f = federation();
    let mut huge = f.genesis.note().to_owned();
    huge.push_str(&"x".repeat(MAX_NOTE_BYTES));
    let err = SignedTrustList::parse(&huge).unwrap_err();
    assert!(matches!(err, TrustError::NoteTooLarge { .. }), "{err}");

    let mut big = f.genesis.list.successor(NOW);
    big.set_endpoints(
        province("440000"),
        (0..60_000)
            .map(|i| format!("n{i}.gd.example:7443"))
            .collect(),
    )
    .unwrap();
    let err = SignedTrustList::unsigned(big).sign(&f.gd.key).unwrap_err();
    assert!(matches!(err, TrustError::NoteTooLarge { .. }), "{err}");
}

/// A governance verifier key of `province` for the Ed25519 key `public`.
fn relabel(province: Province, public: &[u8]) -> String {
    use aws_lc_rs::digest;
    let name = governance_key_name(province);
    let mut data = name.as_bytes().to_vec();
    data.extend_from_slice(&[b'\n', 1]);
    data.extend_from_slice(public);
    let hash = digest::digest(&digest::SHA256, &data);
    let mut key = vec![1u8];
    key.extend_from_slice(public);
    format!(
        "{name}+{}+{}",
        hex(&hash.as_ref()[..4]),
        STANDARD.encode(key)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
