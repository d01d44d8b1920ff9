//! Health codes end to end: real keys in temporary directories, signed by a
//! `Keyring`, checked by a `CodeVerifier`, and by PyJWT as an outside opinion.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hufu_certs::Province;
use hufu_federation::codes::{
    CodeAlg, CodeClaims, CodeVerifier, Colour, HealthClaim, Jwks, Keyring, MAX_TOKEN_BYTES,
    RETIRED_KEY_GRACE, Verdict, raw_es256_verify_rate, unix_now,
};
use tempfile::TempDir;

const LIFETIME: Duration = Duration::from_secs(600);
const LEEWAY: Duration = Duration::from_secs(30);
const HOLDER: &str = "MFRGGZDFMZTWQ2LKNNWG23TPOA";

fn guangdong() -> Province {
    Province::parse("440000").unwrap()
}

fn shaanxi() -> Province {
    Province::parse("610000").unwrap()
}

fn keyring(alg: CodeAlg) -> (TempDir, Keyring) {
    let dir = TempDir::new().unwrap();
    let ring = Keyring::open_or_create(&dir.path().join("keys"), alg, LIFETIME).unwrap();
    (dir, ring)
}

fn claims(issuer: Province, now: i64) -> CodeClaims {
    CodeClaims::new(
        issuer,
        HOLDER,
        HealthClaim {
            colour: Colour::Green,
            as_of: now - 3600,
            neg_test: Some(now - 7200),
        },
        now,
        LIFETIME,
    )
}

/// A verifier that trusts `ring` as `province`'s keyring at `now`.
fn verifier_for(province: Province, ring: &Keyring, now: i64) -> CodeVerifier {
    let verifier = CodeVerifier::new(LEEWAY, 1000);
    verifier
        .set_issuer_keys(province, &ring.jwks(now), &ring.revoked_kids())
        .unwrap();
    verifier
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn parts(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

fn assert_malformed(result: Result<impl std::fmt::Debug, Verdict>, needle: &str) {
    match result {
        Err(Verdict::Malformed(reason)) => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected Malformed({needle:?}), got {other:?}"),
    }
}

#[test]
fn round_trip_es256_and_eddsa() {
    for alg in [CodeAlg::Es256, CodeAlg::EdDsa] {
        let (_dir, ring) = keyring(alg);
        let now = unix_now();
        let token = ring.sign(&claims(guangdong(), now)).unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts(&token)[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], alg.jose_name());
        assert_eq!(header["kid"], ring.active_kid());
        // No `typ`: optional, and a QR symbol is better without the bytes.
        assert!(header.get("typ").is_none(), "{header}");

        let verified = verifier_for(guangdong(), &ring, now)
            .verify(&token, now)
            .unwrap();
        assert_eq!(verified.issuer, guangdong());
        assert_eq!(&*verified.kid, ring.active_kid());
        assert_eq!(*verified.claims, claims(guangdong(), now));
        assert!(!verified.cached);
    }
}

#[test]
fn codes_are_compact() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    // Roughly version 10-12 at error-correction level M: comfortable to scan.
    assert!(token.len() < 450, "token is {} bytes: {token}", token.len());
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(&parts(&token)[1]).unwrap()).unwrap();
    assert!(!payload.contains(' '), "{payload}");

    let mut no_test = claims(guangdong(), now);
    no_test.hc.neg_test = None;
    let json = serde_json::to_string(&no_test).unwrap();
    assert!(!json.contains("neg_test"), "{json}");
    assert!(json.contains(r#""colour":"green""#), "{json}");
}

#[test]
fn tampered_payload_is_refused() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    let p = parts(&token);
    let mut red = claims(guangdong(), now);
    red.hc.colour = Colour::Red;
    let forged = format!(
        "{}.{}.{}",
        p[0],
        b64(&serde_json::to_vec(&red).unwrap()),
        p[2]
    );
    assert!(matches!(
        verifier.verify(&forged, now),
        Err(Verdict::BadSignature(_))
    ));
}

#[test]
fn tampered_signature_is_refused() {
    for alg in [CodeAlg::Es256, CodeAlg::EdDsa] {
        let (_dir, ring) = keyring(alg);
        let now = unix_now();
        let verifier = verifier_for(guangdong(), &ring, now);
        let token = ring.sign(&claims(guangdong(), now)).unwrap();
        let p = parts(&token);
        let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
        sig[10] ^= 0x01;
        let forged = format!("{}.{}.{}", p[0], p[1], b64(&sig));
        assert!(matches!(
            verifier.verify(&forged, now),
            Err(Verdict::BadSignature(_))
        ));
        let truncated = format!("{}.{}.{}", p[0], p[1], &p[2][..20]);
        assert!(matches!(
            verifier.verify(&truncated, now),
            Err(Verdict::BadSignature(_))
        ));
    }
}

#[test]
fn alg_none_is_refused() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let header = format!(
        r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#,
        ring.active_kid()
    );
    let payload = serde_json::to_vec(&claims(guangdong(), now)).unwrap();
    for sig in ["", "AAAA"] {
        let token = format!("{}.{}.{sig}", b64(header.as_bytes()), b64(&payload));
        assert_malformed(verifier.verify(&token, now), "\"none\" is refused");
    }
}

#[test]
fn hs256_with_the_public_key_as_secret_is_refused() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let jwks = ring.jwks(now);
    let jwk = &jwks.keys[0];
    // Every plausible encoding an attacker might guess a confused verifier
    // would use as the HMAC secret.
    let mut point = vec![0x04];
    point.extend(URL_SAFE_NO_PAD.decode(&jwk.x).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(jwk.y.as_ref().unwrap()).unwrap());
    let secrets = [
        point,
        serde_json::to_vec(jwk).unwrap(),
        jwk.x.as_bytes().to_vec(),
    ];
    for secret in secrets {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(ring.active_kid().to_owned());
        let token = jsonwebtoken::encode(
            &header,
            &claims(guangdong(), now),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_malformed(verifier.verify(&token, now), "\"HS256\" is refused");
    }
}

#[test]
fn header_alg_must_match_the_key() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    let p = parts(&token);
    let header = format!(
        r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
        ring.active_kid()
    );
    let forged = format!("{}.{}.{}", b64(header.as_bytes()), p[1], p[2]);
    assert!(matches!(
        verifier.verify(&forged, now),
        Err(Verdict::BadSignature(_))
    ));
}

#[test]
fn unknown_kid_is_refused() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let (_other_dir, stranger) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let token = stranger.sign(&claims(guangdong(), now)).unwrap();
    assert_eq!(
        verifier.verify(&token, now).unwrap_err(),
        Verdict::UnknownKey {
            kid: stranger.active_kid().to_owned()
        }
    );
    // A province the verifier has no keys for at all.
    let token = ring.sign(&claims(shaanxi(), now)).unwrap();
    assert!(matches!(
        verifier.verify(&token, now),
        Err(Verdict::UnknownKey { .. })
    ));
}

#[test]
fn a_key_of_one_province_cannot_vouch_for_another() {
    let (_dir_a, guangdong_ring) = keyring(CodeAlg::Es256);
    let (_dir_b, shaanxi_ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &guangdong_ring, now);
    verifier
        .set_issuer_keys(shaanxi(), &shaanxi_ring.jwks(now), &[])
        .unwrap();
    // Guangdong's key, signing a code that claims to come from Shaanxi.
    let token = guangdong_ring.sign(&claims(shaanxi(), now)).unwrap();
    let verdict = verifier.verify(&token, now).unwrap_err();
    assert_eq!(
        verdict,
        Verdict::UnknownKey {
            kid: guangdong_ring.active_kid().to_owned()
        }
    );
    assert!(verdict.to_string().contains("unknown signing key"));
    // Each province's own codes still verify.
    let own = shaanxi_ring.sign(&claims(shaanxi(), now)).unwrap();
    assert_eq!(verifier.verify(&own, now).unwrap().issuer, shaanxi());
}

#[test]
fn expired_and_not_yet_valid() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let c = claims(guangdong(), now);
    let token = ring.sign(&c).unwrap();
    let leeway = LEEWAY.as_secs() as i64;

    // Within the leeway on either side: still valid.
    verifier.verify(&token, c.exp + leeway).unwrap();
    verifier.verify(&token, c.nbf - leeway).unwrap();

    let expired = verifier.verify(&token, c.exp + leeway + 1).unwrap_err();
    assert_eq!(expired, Verdict::Expired { exp: c.exp });
    assert!(expired.to_string().contains("expired"));
    let early = verifier.verify(&token, c.nbf - leeway - 1).unwrap_err();
    assert_eq!(early, Verdict::NotYetValid { nbf: c.nbf });
    assert!(early.to_string().contains("not valid before"));
}

#[test]
fn garbage_is_malformed() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let garbage = [
        "",
        "hello",
        "a.b",
        "a.b.c.d",
        "!!!.@@@.###",
        "\u{0}\u{1}\u{2}.\u{3}.\u{4}",
        "eyJhbGciOiJFUzI1NiJ9.e30.AAAA",
        "e30.e30.AAAA",
    ];
    for token in garbage {
        assert!(
            matches!(verifier.verify(token, now), Err(Verdict::Malformed(_))),
            "{token:?} should be malformed, got {:?}",
            verifier.verify(token, now)
        );
    }
    // Valid header, claims of the wrong shape, wrong issuer format.
    let header = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, ring.active_kid());
    let mut wrong_issuer = serde_json::to_value(claims(guangdong(), now)).unwrap();
    wrong_issuer["iss"] = "guangdong".into();
    let token = format!(
        "{}.{}.AAAA",
        b64(header.as_bytes()),
        b64(wrong_issuer.to_string().as_bytes())
    );
    assert_malformed(verifier.verify(&token, now), "hufu:<province code>");
    wrong_issuer["iss"] = "hufu:999999".into();
    let token = format!(
        "{}.{}.AAAA",
        b64(header.as_bytes()),
        b64(wrong_issuer.to_string().as_bytes())
    );
    assert_malformed(verifier.verify(&token, now), "999999");
    let no_kid = format!(
        "{}.{}.AAAA",
        b64(br#"{"alg":"ES256"}"#),
        b64(&serde_json::to_vec(&claims(guangdong(), now)).unwrap())
    );
    assert_malformed(verifier.verify(&no_kid, now), "no kid");
}

#[test]
fn oversized_token_is_refused_before_parsing() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let huge = "A".repeat(1 << 20);
    assert_malformed(verifier.verify(&huge, now), "1048576 bytes");
    let just_over = format!("{}.{}", "A".repeat(MAX_TOKEN_BYTES), "B");
    assert_malformed(verifier.verify(&just_over, now), "longer than");
}

#[test]
fn rotation_keeps_old_codes_valid_until_their_last_expiry() {
    let (_dir, mut ring) = keyring(CodeAlg::Es256);
    let old_kid = ring.active_kid().to_owned();
    let now = unix_now();
    let old_code = ring.sign(&claims(guangdong(), now)).unwrap();

    let new_kid = ring.rotate(CodeAlg::EdDsa).unwrap();
    assert_ne!(new_kid, old_kid);
    assert_eq!(ring.active_kid(), new_kid);
    assert_eq!(ring.active_alg(), CodeAlg::EdDsa);
    let new_code = ring.sign(&claims(guangdong(), now)).unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts(&new_code)[0]).unwrap()).unwrap();
    assert_eq!(header["kid"], new_kid.as_str());
    assert_eq!(header["alg"], "EdDSA");

    let retired_at = ring
        .keys()
        .iter()
        .find(|k| k.kid == old_kid)
        .unwrap()
        .retired_at
        .expect("old key is retired");
    let kids = |at: i64| -> Vec<String> { ring.jwks(at).keys.into_iter().map(|k| k.kid).collect() };
    // Active key first, then the retired one while its codes may be live.
    assert_eq!(kids(retired_at), [new_kid.as_str(), old_kid.as_str()]);
    let last = retired_at + LIFETIME.as_secs() as i64 + RETIRED_KEY_GRACE.as_secs() as i64;
    assert_eq!(kids(last), [new_kid.as_str(), old_kid.as_str()]);
    assert_eq!(kids(last + 1), [new_kid.as_str()]);
    assert!(ring.revoked_kids().is_empty());

    // Both codes verify against the JWKS published right after rotation.
    let verifier = verifier_for(guangdong(), &ring, retired_at);
    assert_eq!(*verifier.verify(&old_code, now).unwrap().kid, *old_kid);
    assert_eq!(*verifier.verify(&new_code, now).unwrap().kid, *new_kid);

    // Once the old key has left the JWKS, a verifier refreshed from it no
    // longer knows the old key.
    let later = CodeVerifier::new(LEEWAY, 1000);
    later
        .set_issuer_keys(guangdong(), &ring.jwks(last + 1), &ring.revoked_kids())
        .unwrap();
    assert_eq!(
        later.verify(&old_code, now).unwrap_err(),
        Verdict::UnknownKey { kid: old_kid }
    );
    later.verify(&new_code, now).unwrap();
}

#[test]
fn cache_hits_are_reported() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    let first = verifier.verify(&token, now).unwrap();
    assert!(!first.cached);
    assert_eq!(verifier.cache_len(), 1);
    let second = verifier.verify(&token, now + 1).unwrap();
    assert!(second.cached);
    assert_eq!(second.claims, first.claims);
    assert_eq!(second.kid, first.kid);
    // The cache skips the signature, never the clock.
    let exp = first.claims.exp;
    assert_eq!(
        verifier.verify(&token, exp + 3600).unwrap_err(),
        Verdict::Expired { exp }
    );
    // A verifier without a cache verifies every time.
    let uncached = CodeVerifier::new(LEEWAY, 0);
    uncached
        .set_issuer_keys(guangdong(), &ring.jwks(now), &[])
        .unwrap();
    assert!(!uncached.verify(&token, now).unwrap().cached);
    assert!(!uncached.verify(&token, now).unwrap().cached);
}

#[test]
fn revocation_wins_over_the_cache() {
    let (_dir, mut ring) = keyring(CodeAlg::Es256);
    let old_kid = ring.active_kid().to_owned();
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    verifier.verify(&token, now).unwrap();
    assert!(verifier.verify(&token, now).unwrap().cached);

    ring.rotate(CodeAlg::Es256).unwrap();
    ring.revoke(&old_kid).unwrap();
    assert_eq!(ring.revoked_kids(), [old_kid.as_str()]);
    assert!(ring.jwks(now).find(&old_kid).is_none());
    verifier
        .set_issuer_keys(guangdong(), &ring.jwks(now), &ring.revoked_kids())
        .unwrap();

    let verdict = verifier.verify(&token, now).unwrap_err();
    assert_eq!(
        verdict,
        Verdict::RevokedKey {
            kid: old_kid.clone()
        }
    );
    assert!(verdict.to_string().contains("revoked"));
    // Revoking twice is harmless.
    ring.revoke(&old_kid).unwrap();

    // A key dropped from the JWKS without revocation also stops cached codes.
    let fresh = ring.sign(&claims(guangdong(), now)).unwrap();
    verifier.verify(&fresh, now).unwrap();
    assert!(verifier.verify(&fresh, now).unwrap().cached);
    verifier
        .set_issuer_keys(guangdong(), &Jwks::default(), &[])
        .unwrap();
    assert!(matches!(
        verifier.verify(&fresh, now),
        Err(Verdict::UnknownKey { .. })
    ));
}

#[test]
fn revoking_the_active_key_or_an_unknown_kid_is_refused() {
    let (_dir, mut ring) = keyring(CodeAlg::Es256);
    let active = ring.active_kid().to_owned();
    let err = ring.revoke(&active).unwrap_err().to_string();
    assert!(err.contains("rotate first"), "{err}");
    assert!(ring.revoked_kids().is_empty());
    let err = ring.revoke("no-such-kid").unwrap_err().to_string();
    assert!(err.contains("unknown key"), "{err}");
}

#[test]
fn metadata_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("keys");
    let (first_kid, second_kid, third_kid, keys, jwks) = {
        let mut ring = Keyring::open_or_create(&path, CodeAlg::Es256, LIFETIME).unwrap();
        let first = ring.active_kid().to_owned();
        let second = ring.rotate(CodeAlg::EdDsa).unwrap();
        let third = ring.rotate(CodeAlg::Es256).unwrap();
        ring.revoke(&first).unwrap();
        let jwks = ring.jwks(unix_now());
        (first, second, third, ring.keys().to_vec(), jwks)
    };
    // The alg argument only matters for a new keyring.
    let ring = Keyring::open_or_create(&path, CodeAlg::EdDsa, LIFETIME).unwrap();
    assert_eq!(ring.active_kid(), third_kid);
    assert_eq!(ring.active_alg(), CodeAlg::Es256);
    assert_eq!(ring.keys(), keys);
    assert_eq!(ring.revoked_kids(), [first_kid.as_str()]);
    assert_eq!(ring.jwks(unix_now()), jwks);
    assert!(jwks.find(&second_kid).is_some());
    assert!(jwks.find(&first_kid).is_none());

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("keys.json")).unwrap()).unwrap();
    let first = &meta["keys"][0];
    assert_eq!(first["kid"], first_kid.as_str());
    assert_eq!(first["alg"], "ES256");
    assert!(first["created_at"].is_i64());
    assert!(first["retired_at"].is_i64());
    assert!(first["revoked_at"].is_i64());
    assert!(meta["keys"][2]["retired_at"].is_null());
    assert!(!path.join("keys.json.tmp").exists());

    // The reopened keyring signs codes that verify.
    let now = unix_now();
    let token = ring.sign(&claims(guangdong(), now)).unwrap();
    verifier_for(guangdong(), &ring, now)
        .verify(&token, now)
        .unwrap();
}

#[test]
fn corrupt_metadata_is_reported() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("keys");
    Keyring::open_or_create(&path, CodeAlg::Es256, LIFETIME).unwrap();
    std::fs::write(path.join("keys.json"), b"{not json").unwrap();
    let err = Keyring::open_or_create(&path, CodeAlg::Es256, LIFETIME)
        .unwrap_err()
        .to_string();
    assert!(err.contains("keys.json"), "{err}");
    assert!(err.contains("restore it from a backup"), "{err}");
}

#[test]
fn private_keys_are_owner_only() {
    let (dir, mut ring) = keyring(CodeAlg::Es256);
    ring.rotate(CodeAlg::EdDsa).unwrap();
    let keys = dir.path().join("keys");
    let mut pems = 0;
    for entry in std::fs::read_dir(&keys).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pem") {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
            pems += 1;
        }
    }
    assert_eq!(pems, 2);
    let dir_mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
}

/// The public key of a keyring's PEM file, read without any Hufu code.
fn public_key_from_pem(path: &Path, alg: CodeAlg) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    match alg {
        CodeAlg::Es256 => EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec(),
        CodeAlg::EdDsa => Ed25519KeyPair::from_pkcs8(&der)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec(),
    }
}

fn sha256_b64(text: &str) -> String {
    b64(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

#[test]
fn kid_is_the_rfc7638_thumbprint() {
    // EC: {"crv":"P-256","kty":"EC","x":…,"y":…}, members sorted, no spaces.
    let (dir, ring) = keyring(CodeAlg::Es256);
    let kid = ring.active_kid();
    let public = public_key_from_pem(
        &dir.path().join("keys").join(format!("{kid}.pem")),
        CodeAlg::Es256,
    );
    assert_eq!(public.len(), 65);
    let json = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        b64(&public[1..33]),
        b64(&public[33..])
    );
    assert_eq!(kid, sha256_b64(&json));

    // The published JWK is the standard shape, and jsonwebtoken agrees on
    // the thumbprint.
    let jwk = serde_json::to_value(&ring.jwks(unix_now()).keys[0]).unwrap();
    let mut members: Vec<&str> = jwk
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    assert_eq!(members, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
    assert_eq!(jwk["use"], "sig");
    assert_eq!(jwk["alg"], "ES256");
    let theirs: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
    assert_eq!(
        theirs
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap(),
        kid
    );

    // OKP: {"crv":"Ed25519","kty":"OKP","x":…}.
    let (dir, ring) = keyring(CodeAlg::EdDsa);
    let kid = ring.active_kid();
    let public = public_key_from_pem(
        &dir.path().join("keys").join(format!("{kid}.pem")),
        CodeAlg::EdDsa,
    );
    let json = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(&public));
    assert_eq!(kid, sha256_b64(&json));
    let jwk = serde_json::to_value(&ring.jwks(unix_now()).keys[0]).unwrap();
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    assert!(jwk.get("y").is_none());
}

#[test]
fn jwks_with_a_wrong_kid_is_refused() {
    let (_dir, ring) = keyring(CodeAlg::Es256);
    let mut jwks = ring.jwks(unix_now());
    jwks.keys[0].kid = "not-the-thumbprint".into();
    let verifier = CodeVerifier::new(LEEWAY, 10);
    let err = verifier
        .set_issuer_keys(guangdong(), &jwks, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("thumbprint"), "{err}");

    let mut off_curve = ring.jwks(unix_now());
    off_curve.keys[0].y = Some(b64(&[7u8; 32]));
    off_curve.keys[0].kid = off_curve.keys[0].thumbprint().unwrap();
    let err = verifier
        .set_issuer_keys(guangdong(), &off_curve, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a p-256 public key"), "{err}");
}

#[test]
fn code_alg_and_colour_parse() {
    assert_eq!(CodeAlg::default(), CodeAlg::Es256);
    assert_eq!("es256".parse::<CodeAlg>().unwrap(), CodeAlg::Es256);
    assert_eq!("eddsa".parse::<CodeAlg>().unwrap(), CodeAlg::EdDsa);
    assert_eq!("EdDSA".parse::<CodeAlg>().unwrap(), CodeAlg::EdDsa);
    assert!(
        "rs256"
            .parse::<CodeAlg>()
            .unwrap_err()
            .to_string()
            .contains("es256 or eddsa")
    );
    for colour in [Colour::Green, Colour::Yellow, Colour::Red] {
        assert_eq!(colour.to_string().parse::<Colour>().unwrap(), colour);
        assert_eq!(
            serde_json::to_string(&colour).unwrap(),
            format!("\"{colour}\"")
        );
    }
    assert!("blue".parse::<Colour>().is_err());
}

#[test]
fn raw_verify_rate_is_measured() {
    let rate = raw_es256_verify_rate(Duration::from_millis(50));
    assert!(rate.is_finite() && rate > 100.0, "{rate}");
}

/// Verifies `token` with PyJWT from the JWKS, in a separate process.
fn pyjwt_verify(jwks: &Jwks, token: &str, alg: &str, issuer: &str) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
try:
    import jwt
except ImportError:
    sys.exit("pyjwt is not installed: run pip install 'pyjwt[crypto]'")
jwks_path, token_path, alg, issuer = sys.argv[1:5]
with open(jwks_path) as f:
    keyset = jwt.PyJWKSet.from_dict(json.load(f))
with open(token_path) as f:
    token = f.read().strip()
kid = jwt.get_unverified_header(token)["kid"]
key = keyset[kid]
claims = jwt.decode(
    token,
    key.key,
    algorithms=[alg],
    issuer=issuer,
    options={"require": ["exp", "iat", "nbf", "iss", "sub"]},
)
print(json.dumps(claims))
"#;
    let dir = TempDir::new().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    let token_path = dir.path().join("token.jwt");
    std::fs::write(&jwks_path, serde_json::to_vec(jwks).unwrap()).unwrap();
    std::fs::write(&token_path, token).unwrap();
    let output = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&jwks_path)
        .arg(&token_path)
        .arg(alg)
        .arg(issuer)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install python3 and pip install 'pyjwt[crypto]'")
        });
    assert!(
        output.status.success(),
        "pyjwt refused a hufu {alg} code: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn pyjwt_verifies_codes_from_the_published_jwks() {
    for alg in [CodeAlg::Es256, CodeAlg::EdDsa] {
        let (_dir, mut ring) = keyring(alg);
        // Publish a retired key too, so PyJWT must pick the right one by kid.
        ring.rotate(alg).unwrap();
        let now = unix_now();
        let token = ring.sign(&claims(guangdong(), now)).unwrap();
        let decoded = pyjwt_verify(&ring.jwks(now), &token, alg.jose_name(), "hufu:440000");
        assert_eq!(decoded["iss"], "hufu:440000");
        assert_eq!(decoded["sub"], HOLDER);
        assert_eq!(decoded["hc"]["colour"], "green");
        assert_eq!(decoded["exp"], now + LIFETIME.as_secs() as i64);
    }
}

/// Signs `header` (JSON text) and `claims` with the ES256 key file of `kid`
/// in `dir`, the way an issuer holding the key could.
fn sign_raw(dir: &Path, kid: &str, header: &str, claims: &CodeClaims) -> String {
    let text = std::fs::read_to_string(dir.join("keys").join(format!("{kid}.pem"))).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).unwrap();
    let message = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(&serde_json::to_vec(claims).unwrap())
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signature = pair.sign(&rng, message.as_bytes()).unwrap();
    format!("{message}.{}", b64(signature.as_ref()))
}

#[test]
fn a_crit_header_is_refused_whatever_its_value() {
    let (dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let kid = ring.active_kid();
    let c = claims(guangdong(), now);
    // The same signing path without crit verifies, so only crit is refused.
    let plain = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}"}}"#);
    verifier
        .verify(&sign_raw(dir.path(), kid, &plain, &c), now)
        .unwrap();
    for crit in ["null", "[]", r#"["exp"]"#, "{}", "0"] {
        let header = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}","crit":{crit}}}"#);
        let token = sign_raw(dir.path(), kid, &header, &c);
        assert_malformed(verifier.verify(&token, now), "critical extensions");
    }
}

#[test]
fn a_code_issued_in_the_future_is_not_yet_valid() {
    let (dir, ring) = keyring(CodeAlg::Es256);
    let now = unix_now();
    let verifier = verifier_for(guangdong(), &ring, now);
    let kid = ring.active_kid();
    let header = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}"}}"#);
    let leeway = LEEWAY.as_secs() as i64;
    // An issuer a day ahead, with nbf left at the real time: only iat says so.
    let mut c = claims(guangdong(), now);
    c.iat = now + 86_400;
    let token = sign_raw(dir.path(), kid, &header, &c);
    let verdict = verifier.verify(&token, now).unwrap_err();
    assert_eq!(verdict, Verdict::NotYetValid { nbf: c.iat });
    // The leeway applies to iat as to nbf.
    c.iat = now + leeway;
    let token = sign_raw(dir.path(), kid, &header, &c);
    verifier.verify(&token, now).unwrap();
    c.iat = now + leeway + 5;
    let token = sign_raw(dir.path(), kid, &header, &c);
    assert!(matches!(
        verifier.verify(&token, now),
        Err(Verdict::NotYetValid { .. })
    ));
}
