//! Health codes end to end: issued by a real node, verified over real mutual
//! TLS from a terminal certificate, checked by PyJWT from the JWKS the node
//! publishes, and rendered as QR codes by the real `hufu` binary.

mod common;

use std::path::Path;
use std::time::Duration;

use data_encoding::BASE64URL_NOPAD;
use hufu_certs::{LeafOptions, Role};
use hufu_federation::codes::{CodeAlg, CodeClaims, Colour as CodeColour, HealthClaim, Keyring};
use hufu_node::local::LocalProvince;
use hufu_node::sample;
use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    Colour, GetJwksRequest, GetJwksResponse, IssueCodeResponse, Policy, PutStatusRequest, Reason,
    RevokeKeyRequest, RotateKeyRequest, Source, StatusInput, Verdict, VerifyRequest,
    VerifyResponse, status_input,
};
use tonic::Code;
use tonic::transport::Channel;

const HOURS: i64 = 3600;

/// The name codes are issued with, and how they show it.
const HOLDER_NAME: &str = "张小三";
const MASKED_NAME: &str = "张*三";

/// A name whose masked form is as long as any (25 bytes): three words of
/// four-byte characters (𠮷 is a real surname character).
const LONGEST_NAME: &str = "𠮷𠮷𠮷𠮷·𠮷𠮷𠮷𠮷·𠮷𠮷𠮷𠮷";

fn national_id(province: &LocalProvince, n: u64) -> String {
    sample::national_id(province.province, n)
        .as_str()
        .to_owned()
}

/// Admin.IssueCode for the `n`th sample holder.
async fn issue(province: &LocalProvince, n: u64) -> IssueCodeResponse {
    common::issue_code_named(province, n, HOLDER_NAME).await
}

/// Admin.PutStatus for the `n`th sample holder.
async fn put_status(
    province: &LocalProvince,
    n: u64,
    colour: Colour,
    as_of: i64,
    negative_test: Option<i64>,
    reason: Reason,
) {
    province
        .admin()
        .await
        .unwrap()
        .put_status(PutStatusRequest {
            status: Some(StatusInput {
                subject: Some(status_input::Subject::NationalId(national_id(province, n))),
                colour: colour as i32,
                as_of: Some(timestamp(as_of)),
                last_negative_test: negative_test.map(timestamp),
                reason: reason as i32,
            }),
        })
        .await
        .unwrap();
}

async fn verify(
    terminal: &mut StatusLookupServiceClient<Channel>,
    token: &str,
    policy: Option<Policy>,
) -> VerifyResponse {
    terminal
        .verify(VerifyRequest {
            token: token.to_owned(),
            policy,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn jwks(terminal: &mut StatusLookupServiceClient<Channel>) -> (GetJwksResponse, Vec<String>) {
    let reply = terminal
        .get_jwks(GetJwksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let set: serde_json::Value = serde_json::from_str(&reply.jwks_json).unwrap();
    let kids = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    (reply, kids)
}

fn verdict(reply: &VerifyResponse) -> Verdict {
    Verdict::try_from(reply.verdict).unwrap()
}

fn assert_valid(reply: &VerifyResponse) {
    assert_eq!(verdict(reply), Verdict::Valid, "{}", reply.reason);
}

/// A refusal: the verdict, a reason, and nothing else (proto contract).
fn assert_refused(what: &str, reply: &VerifyResponse, expected: Verdict) {
    assert_eq!(
        verdict(reply),
        expected,
        "{what}: got {:?} ({})",
        verdict(reply),
        reply.reason
    );
    assert!(!reply.reason.is_empty(), "{what}: empty reason");
    assert!(reply.status.is_none(), "{what}: status on a refusal");
    assert!(
        reply.provenance.is_none(),
        "{what}: provenance on a refusal"
    );
    assert!(reply.kid.is_empty(), "{what}: kid on a refusal");
    assert!(reply.expires.is_none(), "{what}: expiry on a refusal");
    assert!(!reply.policy_met, "{what}: policy met on a refusal");
}

fn colour_of(reply: &VerifyResponse) -> Colour {
    Colour::try_from(reply.status.as_ref().unwrap().colour).unwrap()
}

fn within_hours(hours: i64) -> Policy {
    Policy {
        max_negative_test_age: Some(hufu_proto::Duration {
            seconds: hours * HOURS,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn at_most(colour: Colour) -> Policy {
    Policy {
        max_colour: colour as i32,
        ..Default::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    BASE64URL_NOPAD.encode(bytes)
}

fn unb64(part: &str) -> Vec<u8> {
    BASE64URL_NOPAD.decode(part.as_bytes()).unwrap()
}

/// A token's three parts, decoded: header json, claims json, signature bytes.
fn split(token: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    (
        serde_json::from_slice(&unb64(parts[0])).unwrap(),
        serde_json::from_slice(&unb64(parts[1])).unwrap(),
        unb64(parts[2]),
    )
}

fn join(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// The node's own keyring, opened from the directory the node uses: signing
/// only reads it.
fn node_keyring(province: &LocalProvince) -> Keyring {
    Keyring::open_or_create(
        &province.config.path(&province.config.codes.keys_dir),
        CodeAlg::Es256,
        province.config.code_lifetime(),
    )
    .unwrap()
}

/// Claims for `holder` from `nbf` to `exp`.
fn claims(province: &LocalProvince, holder: &str, nbf: i64, exp: i64) -> CodeClaims {
    CodeClaims {
        iss: format!("hufu:{}", province.province),
        sub: holder.to_owned(),
        iat: nbf,
        nbf,
        exp,
        hc: HealthClaim {
            colour: CodeColour::Green,
            as_of: nbf - HOURS,
            neg_test: Some(nbf - 2 * HOURS),
        },
        hn: None,
        hi: None,
    }
}

#[tokio::test]
async fn issue_and_verify_round_trip_from_a_terminal() {
    let node = common::start("440000").await;
    let province = &node.province;
    // 0 green, 1 yellow, 2 red; negative tests an hour ago.
    let holders = common::import_samples(province, 3).await;
    // Holder 3: green, but the last negative test was three days ago.
    let now = now_unix();
    put_status(
        province,
        3,
        Colour::Green,
        now - 600,
        Some(now - 72 * HOURS),
        Reason::None,
    )
    .await;
    let mut terminal = province.terminal("gate-1").await.unwrap();

    let issued = issue(province, 0).await;
    assert!(!issued.kid.is_empty());
    let lifetime = province.config.codes.lifetime_secs as i64;
    let expires = issued.expires.unwrap().seconds;
    assert!(
        (now + lifetime..=now_unix() + lifetime).contains(&expires),
        "expires {expires}, now {now}, lifetime {lifetime}"
    );
    let signed = issued.status.as_ref().unwrap();
    assert_eq!(signed.holder, holders[0]);
    assert_eq!(signed.colour, Colour::Green as i32);
    // The code names the holder by pseudonym only: no national id inside.
    let (header, payload, _) = split(&issued.token);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], issued.kid.as_str());
    assert_eq!(payload["iss"], "hufu:440000");
    assert_eq!(payload["sub"], holders[0].as_str());
    assert_eq!(payload["exp"], expires);
    assert!(!issued.token.contains(&national_id(province, 0)));
    assert!(!payload.to_string().contains(&national_id(province, 0)));

    let reply = verify(&mut terminal, &issued.token, None).await;
    assert_valid(&reply);
    assert!(reply.policy_met, "no policy is always met");
    assert!(!reply.reason.is_empty());
    assert_eq!(reply.kid, issued.kid);
    assert_eq!(reply.expires.unwrap().seconds, expires);
    let status = reply.status.as_ref().unwrap();
    assert_eq!(status.issuer, "440000");
    assert_eq!(status.holder, holders[0]);
    assert_eq!(status.colour, Colour::Green as i32);
    assert_eq!(status.as_of, signed.as_of);
    assert_eq!(status.last_negative_test, signed.last_negative_test);
    // The issuing province's own node answers from its own records.
    let provenance = reply.provenance.as_ref().unwrap();
    assert_eq!(
        provenance.source,
        Source::Authoritative as i32,
        "{provenance:?}"
    );
    assert_eq!(provenance.answered_by, "440000");
    assert_eq!(status.reason, Reason::None as i32);

    // A negative test within 48 h: met by a test an hour old...
    let reply = verify(&mut terminal, &issued.token, Some(within_hours(48))).await;
    assert_valid(&reply);
    assert!(reply.policy_met, "{}", reply.reason);
    // ...and not by one three days old, though the code itself is good.
    let stale_test = issue(province, 3).await;
    let reply = verify(&mut terminal, &stale_test.token, Some(within_hours(48))).await;
    assert_valid(&reply);
    assert!(!reply.policy_met, "{}", reply.reason);
    assert!(reply.reason.contains("negative test"), "{}", reply.reason);
    let reply = verify(&mut terminal, &stale_test.token, Some(within_hours(96))).await;
    assert!(reply.policy_met, "{}", reply.reason);

    // Green only: a yellow holder does not meet it, green or yellow does.
    let yellow = issue(province, 1).await;
    let reply = verify(&mut terminal, &yellow.token, Some(at_most(Colour::Green))).await;
    assert_valid(&reply);
    assert_eq!(colour_of(&reply), Colour::Yellow);
    assert!(!reply.policy_met, "{}", reply.reason);
    assert!(reply.reason.contains("yellow"), "{}", reply.reason);
    let reply = verify(&mut terminal, &yellow.token, Some(at_most(Colour::Yellow))).await;
    assert!(reply.policy_met, "{}", reply.reason);
    let red = issue(province, 2).await;
    let reply = verify(&mut terminal, &red.token, Some(at_most(Colour::Yellow))).await;
    assert_eq!(colour_of(&reply), Colour::Red);
    assert!(!reply.policy_met, "{}", reply.reason);

    // Verify is for terminals: the admin certificate is refused.
    let admin = province
        .channel(Role::Admin, "ops")
        .await
        .map(StatusLookupServiceClient::new)
        .unwrap()
        .verify(VerifyRequest {
            token: issued.token.clone(),
            policy: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied, "{admin:?}");
}

/// Verifies `token` with PyJWT from `jwks_json`, in a separate process, and
/// returns the decoded claims. `tampered` must be refused by PyJWT too.
async fn pyjwt_decode(jwks_json: &str, token: &str, tampered: &str) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
try:
    import jwt
except ImportError:
    sys.exit("pyjwt is not installed: run pip install 'pyjwt[crypto]'")
jwks_path, token_path, tampered_path = sys.argv[1:4]
with open(jwks_path) as f:
    keyset = jwt.PyJWKSet.from_dict(json.load(f))
def decode(path):
    with open(path) as f:
        token = f.read().strip()
    key = keyset[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        issuer="hufu:440000",
        options={"verify_aud": False, "require": ["exp", "iat", "nbf", "iss", "sub"]},
    )
claims = decode(token_path)
try:
    decode(tampered_path)
    sys.exit("pyjwt accepted a tampered code")
except jwt.InvalidSignatureError:
    pass
print(json.dumps(claims))
"#;
    let dir = tempfile::tempdir().unwrap();
    let paths = [
        (dir.path().join("jwks.json"), jwks_json),
        (dir.path().join("token.jwt"), token),
        (dir.path().join("tampered.jwt"), tampered),
    ];
    for (path, text) in &paths {
        std::fs::write(path, text).unwrap();
    }
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(paths.iter().map(|(p, _)| p))
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install python3 and pip install 'pyjwt[crypto]'")
        });
    assert!(
        output.status.success(),
        "pyjwt did not verify a code of this node from its GetJwks keys: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn pyjwt_verifies_a_code_from_the_jwks_served_over_get_jwks() {
    let node = common::start("440000").await;
    let province = &node.province;
    let holders = common::import_samples(province, 2).await;
    let mut terminal = province.terminal("gate-1").await.unwrap();
    // Two published keys, so PyJWT must pick the right one by kid.
    let old = issue(province, 1).await;
    common::rotate_key(province).await;
    let issued = issue(province, 0).await;
    let (reply, kids) = jwks(&mut terminal).await;
    assert_eq!(kids, [issued.kid.clone(), old.kid.clone()]);

    let (header, mut payload, signature) = split(&issued.token);
    payload["hc"]["colour"] = "red".into();
    let tampered = join(&header, &payload, &signature);
    let decoded = pyjwt_decode(&reply.jwks_json, &issued.token, &tampered).await;
    assert_eq!(decoded["iss"], "hufu:440000");
    assert_eq!(decoded["sub"], holders[0].as_str());
    assert_eq!(decoded["hc"]["colour"], "green");
    assert_eq!(decoded["exp"], issued.expires.unwrap().seconds);
    // The display claims are signed like the rest, and PyJWT reads them.
    let id = national_id(province, 0);
    assert_eq!(decoded["hn"], MASKED_NAME);
    assert_eq!(
        decoded["hi"],
        format!("{}**********{}", &id[..4], &id[14..])
    );
    let decoded = pyjwt_decode(&reply.jwks_json, &old.token, &tampered).await;
    assert_eq!(decoded["sub"], holders[1].as_str());
    assert_eq!(decoded["hc"]["colour"], "yellow");
}

#[tokio::test]
async fn forged_and_broken_codes_get_their_verdicts_and_the_node_keeps_serving() {
    let node = common::start("440000").await;
    let province = &node.province;
    let holders = common::import_samples(province, 3).await;
    let mut terminal = province.terminal("gate-1").await.unwrap();
    let good = issue(province, 0).await;
    let red = issue(province, 2).await;
    let (header, payload, signature) = split(&red.token);
    let now = now_unix();
    let mut cases: Vec<(&str, String, Verdict)> = Vec::new();

    // A red holder turning their code green.
    let mut greener = payload.clone();
    greener["hc"]["colour"] = "green".into();
    cases.push((
        "tampered payload",
        join(&header, &greener, &signature),
        Verdict::BadSignature,
    ));
    let mut longer = payload.clone();
    longer["exp"] = (now + 365 * 24 * HOURS).into();
    cases.push((
        "extended expiry",
        join(&header, &longer, &signature),
        Verdict::BadSignature,
    ));
    let mut flipped = signature.clone();
    flipped[10] ^= 0x01;
    cases.push((
        "tampered signature",
        join(&header, &payload, &flipped),
        Verdict::BadSignature,
    ));
    cases.push((
        "truncated signature",
        join(&header, &payload, &signature[..32]),
        Verdict::BadSignature,
    ));
    // A header whose alg disagrees with the key its kid names.
    let mut eddsa = header.clone();
    eddsa["alg"] = "EdDSA".into();
    cases.push((
        "alg EdDSA on an ES256 key",
        join(&eddsa, &payload, &signature),
        Verdict::BadSignature,
    ));

    // Algorithms no code is ever signed with are refused from the header,
    // before any key is looked at: MALFORMED ("not a well-formed compact JWS
    // of a Hufu code"), as the federation verifier decides.
    let mut none = header.clone();
    none["alg"] = "none".into();
    cases.push((
        "alg none, no signature",
        join(&none, &greener, &[]),
        Verdict::Malformed,
    ));
    cases.push((
        "alg none, old signature",
        join(&none, &greener, &signature),
        Verdict::Malformed,
    ));
    // HS256 keyed with the public key, as a confused verifier would check it.
    let (jwks_reply, _) = jwks(&mut terminal).await;
    let set: serde_json::Value = serde_json::from_str(&jwks_reply.jwks_json).unwrap();
    let jwk = &set["keys"][0];
    let mut point = vec![0x04];
    point.extend(unb64(jwk["x"].as_str().unwrap()));
    point.extend(unb64(jwk["y"].as_str().unwrap()));
    let mut hs256 = header.clone();
    hs256["alg"] = "HS256".into();
    for secret in [
        point,
        jwk.to_string().into_bytes(),
        jwks_reply.jwks_json.into_bytes(),
    ] {
        let message = format!(
            "{}.{}",
            b64(hs256.to_string().as_bytes()),
            b64(greener.to_string().as_bytes())
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, message.as_bytes());
        cases.push((
            "HS256 with the public key as secret",
            format!("{message}.{}", b64(tag.as_ref())),
            Verdict::Malformed,
        ));
    }

    // Keys this province never published.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = Keyring::open_or_create(
        &stranger_dir.path().join("keys"),
        CodeAlg::Es256,
        Duration::from_secs(3600),
    )
    .unwrap();
    cases.push((
        "signed by an unknown key",
        stranger
            .sign(&claims(province, &holders[0], now, now + HOURS))
            .unwrap(),
        Verdict::UnknownKey,
    ));
    let mut unknown_kid = header.clone();
    unknown_kid["kid"] = "A".repeat(43).into();
    cases.push((
        "unknown kid",
        join(&unknown_kid, &payload, &signature),
        Verdict::UnknownKey,
    ));

    // Signed by the node's own key, outside their validity (leeway is 60 s).
    let ring = node_keyring(province);
    assert_eq!(ring.active_kid(), good.kid);
    cases.push((
        "expired",
        ring.sign(&claims(province, &holders[0], now - 3 * HOURS, now - HOURS))
            .unwrap(),
        Verdict::Expired,
    ));
    cases.push((
        "not yet valid",
        ring.sign(&claims(province, &holders[0], now + HOURS, now + 2 * HOURS))
            .unwrap(),
        Verdict::NotYetValid,
    ));

    for garbage in [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "...",
        "a.b.c.d",
        "\u{1F42F}.\u{7B26}.\u{0}",
        &format!("{}.{}", good.token, good.token),
    ] {
        cases.push(("garbage", garbage.to_owned(), Verdict::Malformed));
    }
    let mut not_json = good.token.split('.').map(str::to_owned).collect::<Vec<_>>();
    not_json[1] = b64(b"{\"sub\": ");
    cases.push(("claims not json", not_json.join("."), Verdict::Malformed));
    let mut wrong_issuer = payload.clone();
    wrong_issuer["iss"] = "province 440000".into();
    cases.push((
        "issuer not hufu:<code>",
        join(&header, &wrong_issuer, &signature),
        Verdict::Malformed,
    ));

    // 1 MiB: under the node's 2 MiB message limit, so it reaches the
    // verifier, which refuses it by size before decoding anything.
    let huge = "A".repeat(1 << 20);
    cases.push(("1 MiB of A", huge.clone(), Verdict::Malformed));
    cases.push((
        "1 MiB claims",
        format!(
            "{}.{huge}.{}",
            b64(header.to_string().as_bytes()),
            b64(&signature)
        ),
        Verdict::Malformed,
    ));

    for (what, token, expected) in &cases {
        let reply = verify(&mut terminal, token, Some(at_most(Colour::Yellow))).await;
        assert_refused(what, &reply, *expected);
        if token.len() >= 1 << 20 {
            assert!(reply.reason.contains("bytes"), "{what}: {}", reply.reason);
        }
    }
    // The reasons name what was wrong.
    let reply = verify(&mut terminal, &cases[0].1, None).await;
    assert!(reply.reason.contains("signature"), "{}", reply.reason);

    // Still serving, and the good code still verifies.
    let reply = verify(&mut terminal, &good.token, None).await;
    assert_valid(&reply);
    assert_eq!(reply.kid, good.kid);
    let reply = verify(&mut terminal, &red.token, None).await;
    assert_valid(&reply);
    assert_eq!(colour_of(&reply), Colour::Red);
}

#[tokio::test]
async fn rotation_keeps_old_codes_valid_and_revocation_refuses_them() {
    let node = common::start("440000").await;
    let province = &node.province;
    common::import_samples(province, 3).await;
    let mut terminal = province.terminal("gate-1").await.unwrap();
    let mut admin = province.admin().await.unwrap();

    let seen = issue(province, 0).await;
    let unseen = issue(province, 1).await;
    let old_kid = seen.kid.clone();
    assert_eq!(unseen.kid, old_kid);
    // Verified once, so the node's verified-token cache holds it.
    assert_valid(&verify(&mut terminal, &seen.token, None).await);

    let rotated = admin
        .rotate_key(RotateKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.previous_kid, old_kid);
    assert_ne!(rotated.kid, old_kid);
    let new_kid = rotated.kid;

    // Codes signed before the rotation stay valid until they expire.
    let reply = verify(&mut terminal, &seen.token, None).await;
    assert_valid(&reply);
    assert_eq!(reply.kid, old_kid);
    let fresh = issue(province, 2).await;
    assert_eq!(fresh.kid, new_kid);
    assert_eq!(split(&fresh.token).0["kid"], new_kid.as_str());
    let reply = verify(&mut terminal, &fresh.token, None).await;
    assert_valid(&reply);
    assert_eq!(reply.kid, new_kid);
    let (reply, kids) = jwks(&mut terminal).await;
    assert_eq!(kids, [new_kid.clone(), old_kid.clone()]);
    assert!(reply.revoked_kids.is_empty());

    // The active key cannot be revoked: nothing would sign codes.
    let err = admin
        .revoke_key(RevokeKeyRequest {
            kid: new_kid.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("rotate"), "{}", err.message());
    assert_valid(&verify(&mut terminal, &fresh.token, None).await);

    // Revoking the old key refuses its codes at once, whether the node had
    // verified (and cached) them or never seen them.
    admin
        .revoke_key(RevokeKeyRequest {
            kid: old_kid.clone(),
        })
        .await
        .unwrap();
    for (what, token) in [("cached", &seen.token), ("never seen", &unseen.token)] {
        let reply = verify(&mut terminal, token, None).await;
        assert_refused(what, &reply, Verdict::RevokedKey);
        assert!(reply.reason.contains(&old_kid), "{what}: {}", reply.reason);
    }
    let reply = verify(&mut terminal, &fresh.token, None).await;
    assert_valid(&reply);
    assert_eq!(reply.kid, new_kid);
    let (reply, kids) = jwks(&mut terminal).await;
    assert_eq!(kids, std::slice::from_ref(&new_kid));
    assert_eq!(reply.revoked_kids, std::slice::from_ref(&old_kid));
    // New codes are signed with the surviving key.
    let after = issue(province, 1).await;
    assert_eq!(after.kid, new_kid);
    assert_valid(&verify(&mut terminal, &after.token, None).await);
}

#[tokio::test]
async fn a_status_downgraded_after_issuance_wins_over_the_code() {
    let node = common::start("440000").await;
    let province = &node.province;
    let holders = common::import_samples(province, 1).await;
    let mut terminal = province.terminal("gate-1").await.unwrap();
    let issued = issue(province, 0).await;
    let reply = verify(&mut terminal, &issued.token, Some(at_most(Colour::Green))).await;
    assert_valid(&reply);
    assert!(reply.policy_met, "{}", reply.reason);

    // Tested positive after the code was issued.
    let now = now_unix();
    put_status(province, 0, Colour::Red, now, None, Reason::PositiveTest).await;
    let reply = verify(&mut terminal, &issued.token, Some(at_most(Colour::Green))).await;
    assert_valid(&reply);
    let status = reply.status.as_ref().unwrap();
    assert_eq!(status.holder, holders[0]);
    assert_eq!(status.colour, Colour::Red as i32, "{status:?}");
    assert_eq!(status.reason, Reason::PositiveTest as i32);
    assert_eq!(status.as_of.unwrap().seconds, now);
    assert_eq!(
        reply.provenance.unwrap().source,
        Source::Authoritative as i32
    );
    assert!(!reply.policy_met, "{}", reply.reason);
    assert!(reply.reason.contains("red"), "{}", reply.reason);
    // The code itself still says green: only the node knows better.
    assert_eq!(split(&issued.token).1["hc"]["colour"], "green");
    assert_eq!(reply.kid, issued.kid);
}

/// `--config` and `--endpoint` for the running node: the config on disk says
/// port 0, where it was told to listen.
fn conn_args(province: &LocalProvince) -> Vec<std::ffi::OsString> {
    vec![
        "--config".into(),
        province.dir.join("hufu.toml").into(),
        "--endpoint".into(),
        province.addr().unwrap().to_string().into(),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn decode_qr(path: &Path) -> (usize, String) {
    let image = image::open(path).unwrap().to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(image);
    let grids = prepared.detect_grids();
    assert_eq!(
        grids.len(),
        1,
        "{} QR codes in {}",
        grids.len(),
        path.display()
    );
    let (meta, content) = grids[0].decode().unwrap();
    (meta.version.0, content)
}

#[tokio::test]
async fn code_issue_writes_a_qr_code_that_scans_back_to_the_token_at_version_15_level_m() {
    let node = common::start("440000").await;
    let province = &node.province;
    common::import_samples(province, 1).await;
    let id = national_id(province, 0);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("code.png");

    let mut args: Vec<std::ffi::OsString> = vec![
        "code".into(),
        "issue".into(),
        "--id".into(),
        id.clone().into(),
        "--qr".into(),
        png.clone().into(),
        "--name".into(),
        LONGEST_NAME.into(),
    ];
    args.extend(conn_args(province));
    let output = common::hufu(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>()).await;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let token = text(&output.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");

    // stderr: "kid …; expires …; 490 bytes, QR version 15 (level M)". With
    // the longest masked name a code is about 490 bytes: in numeric form it
    // still fits version 15 at level M, which scans comfortably.
    let version: i16 = stderr
        .split("QR version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no QR version in {stderr:?}"));
    assert!(
        (1..=15).contains(&version),
        "QR version {version}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{} bytes", token.len())),
        "{stderr}"
    );
    assert!(stderr.contains("(level M)"), "{stderr}");

    let (scanned_version, scanned) = decode_qr(&png);
    assert_eq!(scanned_version, version as usize);
    assert!(scanned.starts_with("HUFU:/"), "{scanned}");
    assert_eq!(
        hufu_federation::codes::qr::from_scanned(&scanned).unwrap(),
        token
    );
    // What the QR code carries is a good code of this node, as scanned.
    let mut terminal = province.terminal("gate-1").await.unwrap();
    let reply = verify(&mut terminal, &scanned, None).await;
    assert_valid(&reply);
    assert_eq!(colour_of(&reply), Colour::Green);
    assert_eq!(reply.masked_name, "𠮷***·𠮷***·𠮷***");

    // `hufu verify` shows the masked name and id, and with the card's id
    // says whether the code is the holder's.
    let masked_id = format!("{}**********{}", &id[..4], &id[14..]);
    let other = national_id(province, 1);
    let (cert, key) = hufu_node::init::issue_cert(
        &province.dir,
        Role::Terminal,
        "gate-2",
        &LeafOptions::default(),
    )
    .unwrap();
    for (card, says, code) in [(&id, "true", 0), (&other, "false", 5)] {
        let mut verify_args: Vec<std::ffi::OsString> = vec![
            "verify".into(),
            scanned.clone().into(),
            "--id".into(),
            card.into(),
        ];
        verify_args.extend(conn_args(province));
        verify_args.extend(["--cert".into(), cert.clone().into()]);
        verify_args.extend(["--key".into(), key.clone().into()]);
        let output = common::hufu(
            &verify_args
                .iter()
                .map(|a| a.as_os_str())
                .collect::<Vec<_>>(),
        )
        .await;
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{stdout}{}",
            text(&output.stderr)
        );
        assert!(
            stdout.contains("name:               𠮷***·𠮷***·𠮷***"),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("national id:        {masked_id}")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("holder match:       {says}")),
            "{stdout}"
        );
        assert!(!stdout.contains(card.as_str()), "{stdout}");
    }

    // SVG, chosen by the extension; and half blocks on the terminal.
    let svg = out.path().join("code.svg");
    args[5] = svg.clone().into();
    let mut with_terminal = args.clone();
    with_terminal.push("--qr-terminal".into());
    let output = common::hufu(
        &with_terminal
            .iter()
            .map(|a| a.as_os_str())
            .collect::<Vec<_>>(),
    )
    .await;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.contains("<svg"), "{drawing}");
    assert!(drawing.trim_end().ends_with("</svg>"));
    assert!(
        stderr.contains('\u{2580}') || stderr.contains('\u{2584}'),
        "{stderr}"
    );

    // Anything else is refused with a message that says what is wanted.
    args[5] = out.path().join("code.gif").into();
    let output = common::hufu(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>()).await;
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains(".png or .svg"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test]
async fn hufu_verify_exits_zero_only_for_a_good_code() {
    let node = common::start("440000").await;
    let province = &node.province;
    let holders = common::import_samples(province, 2).await;
    let (cert, key) = hufu_node::init::issue_cert(
        &province.dir,
        Role::Terminal,
        "gate-1",
        &LeafOptions::default(),
    )
    .unwrap();
    let green = issue(province, 0).await;
    let yellow = issue(province, 1).await;
    let now = now_unix();
    let expired = node_keyring(province)
        .sign(&claims(province, &holders[0], now - 3 * HOURS, now - HOURS))
        .unwrap();

    let run = |token: String, extra: &'static [&'static str]| {
        let mut args: Vec<std::ffi::OsString> = vec!["verify".into(), token.into()];
        args.extend(extra.iter().map(Into::into));
        args.extend(conn_args(province));
        args.extend(["--cert".into(), cert.clone().into()]);
        args.extend(["--key".into(), key.clone().into()]);
        async move { common::hufu(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>()).await }
    };

    let output = run(green.token.clone(), &[]).await;
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("verdict:            valid"), "{stdout}");
    assert!(stdout.contains("colour:             green"), "{stdout}");
    assert!(stdout.contains(&holders[0]), "{stdout}");
    assert!(stdout.contains("policy met:         true"), "{stdout}");

    let output = run(expired, &[]).await;
    let stdout = text(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("verdict:            expired"), "{stdout}");
    assert!(
        stdout.contains("reason:             code expired"),
        "{stdout}"
    );

    let output = run("garbage".into(), &[]).await;
    assert!(!output.status.success());
    assert!(text(&output.stdout).contains("verdict:            malformed"));

    // A good code whose holder does not meet the policy fails too.
    let output = run(yellow.token.clone(), &["--max-colour", "green"]).await;
    let stdout = text(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("verdict:            valid"), "{stdout}");
    assert!(stdout.contains("policy met:         false"), "{stdout}");
    let output = run(yellow.token, &["--max-colour", "yellow"]).await;
    assert!(output.status.success(), "{}", text(&output.stdout));
}
