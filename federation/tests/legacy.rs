//! Legacy code formats in the trust list: declared, matched, refused when
//! they overlap or are too costly, with real province CAs and governance
//! keys and lists signed and parsed back from their text.

use hufu_certs::{CertificateAuthority, Province};
use hufu_federation::codes::Jwks;
use hufu_federation::legacy::{CodeFormats, CodeHash, LegacyFormat, MAX_SCAN_BYTES, Scan};
use hufu_federation::trust::{GovernanceKey, Member, SignedTrustList, TrustError, TrustList};

const NOW: i64 = 1_700_000_000;

fn member(code: &str, formats: Vec<LegacyFormat>) -> (Member, GovernanceKey) {
    let p = Province::parse(code).unwrap();
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
        legacy_formats: formats,
    };
    (member, key)
}

fn format(name: &str, prefix: &str, pattern: &str, example: &str) -> LegacyFormat {
    LegacyFormat {
        name: name.into(),
        prefix: prefix.into(),
        pattern: pattern.into(),
        max_len: 128,
        example: example.into(),
    }
}

/// Guangdong's codes: `GD1` and 20 base32 characters, or a URL carrying the
/// same id.
fn yuekang() -> LegacyFormat {
    format(
        "yuekang",
        "",
        r"(?:GD1|https://jkm\.gd\.example/c/)([A-Z2-7]{20})",
        "GD1ABCDEFGHIJKLMNOPQRST",
    )
}

fn list_of(members: Vec<Member>) -> Result<TrustList, TrustError> {
    TrustList::genesis(members, 1, NOW)
}

#[test]
fn formats_travel_in_the_signed_list_and_match_their_issuer_only() {
    let (gd, gd_key) = member("440000", vec![yuekang()]);
    let (sn, sn_key) = member(
        "610000",
        vec![format("yimatong", "SXYMT:", "", "SXYMT:0001")],
    );
    let list = list_of(vec![gd, sn]).unwrap();
    let mut note = SignedTrustList::unsigned(list);
    note.sign(&gd_key).unwrap();
    note.sign(&sn_key).unwrap();
    let parsed = SignedTrustList::parse(note.note()).unwrap();
    parsed.verify_genesis().unwrap();

    let formats = CodeFormats::new(&parsed.list);
    let id = "ABCDEFGHIJKLMNOPQRST";
    for text in [format!("GD1{id}"), format!("https://jkm.gd.example/c/{id}")] {
        let Scan::Legacy(m) = formats.scan(&text) else {
            panic!("{text} not matched");
        };
        assert_eq!(
            (m.issuer.to_string().as_str(), m.format, m.id),
            ("440000", "yuekang", id)
        );
        // Both forms of one id are one code.
        assert_eq!(m.hash(), CodeHash::of(m.issuer, "yuekang", id));
    }
    let Scan::Legacy(m) = formats.scan("SXYMT:42") else {
        panic!("shaanxi code not matched")
    };
    assert_eq!((m.issuer.to_string().as_str(), m.id), ("610000", "42"));
    assert!(matches!(formats.scan("GD1abc"), Scan::Unmatched));
    assert!(matches!(formats.scan("eyJ.eyJ.sig"), Scan::Hufu));
    assert!(matches!(formats.scan("HUFU:/0102"), Scan::Hufu));
    let huge = "G".repeat(1 << 20);
    assert!(matches!(formats.scan(&huge), Scan::TooLong { bytes } if bytes == 1 << 20));
    assert!(matches!(
        formats.scan(&"G".repeat(MAX_SCAN_BYTES)),
        Scan::Unmatched
    ));
}

#[test]
fn a_list_without_formats_keeps_its_signed_text() {
    let (gd, _) = member("440000", Vec::new());
    let list = list_of(vec![gd]).unwrap();
    assert!(!list.note_text().contains("legacy_formats"));
}

#[test]
fn overlapping_formats_of_two_members_are_refused_naming_both() {
    let (gd, _) = member("440000", vec![yuekang()]);
    // Tianjin's pattern also takes every GD1 code.
    let (tj, _) = member(
        "120000",
        vec![format(
            "jinxinban",
            "",
            r"([A-Z0-9]{23})",
            "TJ000000000000000000000",
        )],
    );
    let err = list_of(vec![gd, tj]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TrustError::FormatOverlap { .. }), "{msg}");
    assert!(
        msg.contains("440000/yuekang") && msg.contains("120000/jinxinban"),
        "{msg}"
    );
    // The example text is one both formats match.
    assert!(msg.contains("\"GD1"), "{msg}");
}

#[test]
fn formats_that_only_overlap_beyond_their_length_bounds_are_accepted() {
    let mut short = format("short", "X", "([0-9]+)", "X12");
    short.max_len = 6;
    let long = format("long", "X", "([0-9]{10,})", "X1234567890");
    // Any text of `long` has 11 bytes or more: `short` never takes one.
    let (sn, _) = member("610000", vec![short.clone(), long.clone()]);
    list_of(vec![sn]).unwrap();
    short.max_len = 11;
    let (sn, _) = member("610000", vec![short, long]);
    let err = list_of(vec![sn]).unwrap_err().to_string();
    assert!(
        err.contains("610000/long") && err.contains("610000/short"),
        "{err}"
    );
    assert!(err.contains("X0000000000"), "{err}");
}

#[test]
fn a_format_matching_hufu_codes_is_refused() {
    for f in [
        format("jws", "", r"([A-Za-z0-9._-]+)", "abc"),
        format("qr", "HUFU:/", "", "HUFU:/12"),
        format("lower", "hufu:/", "", "hufu:/12"),
    ] {
        let (gd, _) = member("440000", vec![f]);
        let err = list_of(vec![gd]).unwrap_err().to_string();
        assert!(err.contains("Hufu's own codes"), "{err}");
    }
}

#[test]
fn a_proposal_adding_an_overlapping_format_is_refused() {
    let (gd, _) = member("440000", vec![yuekang()]);
    let (sn, _) = member("610000", Vec::new());
    let list = list_of(vec![gd, sn]).unwrap();
    let mut next = list.successor(NOW + 60);
    let err = next
        .set_legacy_formats(
            Province::parse("610000").unwrap(),
            vec![format("copy", "GD1", "", "GD1X")],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("610000/copy") && err.contains("440000/yuekang"),
        "{err}"
    );
    next.set_legacy_formats(
        Province::parse("610000").unwrap(),
        vec![format("yimatong", "SXYMT:", "", "SXYMT:1")],
    )
    .unwrap();
    next.validate().unwrap();
}

#[test]
fn pathological_patterns_are_refused_cleanly() {
    for (pattern, says) in [
        // Compiles to more than the size limit.
        (r"((?:a{1,100}){1,100}){1,100}", "more simply"),
        // Linear to match, but its DFA explodes: cannot be checked.
        (r"((?:a|b)*a(?:a|b){18})", "too complex to check"),
    ] {
        let example = format!("Z{}", "a".repeat(19));
        let (gd, _) = member("440000", vec![format("bad", "Z", pattern, &example)]);
        let err = list_of(vec![gd]).unwrap_err().to_string();
        assert!(err.contains(says), "{pattern}: {err}");
    }
}
