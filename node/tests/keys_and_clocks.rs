//! What one province publishes about another, and how far an issuer's
//! word is taken, against real federations on loopback: GetJwks answers
//! with the keys Verify uses, and an issuer whose clock runs ahead cannot
//! make its replica look fresh once it stops.

mod common;

use std::time::Duration;

use hufu_node::local::LocalProvince;
use hufu_proto::v1::{
    GetJwksRequest, LookupRequest, Policy, RevokeKeyRequest, Source, Verdict, VerifyRequest,
};

const SN: &str = "610000";
const GD: &str = "440000";

async fn verdict(at: &LocalProvince, token: &str) -> Option<i32> {
    let mut terminal = at.terminal("gate").await.ok()?;
    let reply = terminal
        .verify(VerifyRequest {
            token: token.to_owned(),
            ..Default::default()
        })
        .await
        .ok()?;
    Some(reply.into_inner().verdict)
}

/// What PyJWT makes of each token with a JWKS and revoked kids as GetJwks
/// returned them: "accepted" or "refused: why".
async fn pyjwt_opinions(jwks_json: &str, revoked: &[String], tokens: &[&str]) -> Vec<String> {
    const SCRIPT: &str = r#"
import json, sys
import jwt
jwks_path, revoked_path = sys.argv[1:3]
keyset = jwt.PyJWKSet.from_dict(json.load(open(jwks_path)))
revoked = set(json.load(open(revoked_path)))
out = []
for path in sys.argv[3:]:
    token = open(path).read().strip()
    kid = jwt.get_unverified_header(token)["kid"]
    if kid in revoked:
        out.append("refused: revoked kid")
        continue
    try:
        key = keyset[kid]
        jwt.decode(token, key.key, algorithms=["ES256", "EdDSA"], issuer="hufu:440000",
                   options={"require": ["exp", "iat", "nbf", "iss", "sub"]})
        out.append("accepted")
    except Exception as e:
        out.append("refused: " + type(e).__name__)
print(json.dumps(out))
"#;
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    let revoked_path = dir.path().join("revoked.json");
    std::fs::write(&jwks_path, jwks_json).unwrap();
    std::fs::write(&revoked_path, serde_json::to_vec(revoked).unwrap()).unwrap();
    let mut args = vec![jwks_path, revoked_path];
    for (i, token) in tokens.iter().enumerate() {
        let path = dir.path().join(format!("{i}.jwt"));
        std::fs::write(&path, token).unwrap();
        args.push(path);
    }
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(&args)
        .output()
        .await
        .expect("python3 with PyJWT: run scripts/test --no-run once to set it up");
    assert!(
        output.status.success(),
        "pyjwt script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_jwks_for_another_province_answers_with_the_keys_verify_uses() {
    common::logs();
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = common::quick_federation(scratch.path(), &[SN, GD], |_| {});
    fed.start_all().await.unwrap();
    let (sn, gd) = (fed.get(common::province(SN)), fed.get(common::province(GD)));
    common::import_samples(gd, 2).await;

    // Guangdong rotates, then revokes the key its older code was signed with.
    let old = common::issue_code(gd, 0).await;
    let mut admin = gd.admin().await.unwrap();
    let new_kid = common::rotate_key(gd).await.kid;
    let new = common::issue_code(gd, 1).await;
    assert_eq!(new.kid, new_kid);
    admin
        .revoke_key(RevokeKeyRequest {
            kid: old.kid.clone(),
        })
        .await
        .unwrap();

    // Shaanxi's Verify follows within seconds (keys travel with the feed).
    common::eventually(Duration::from_secs(10), || async {
        let refused = verdict(sn, &old.token).await? == Verdict::RevokedKey as i32;
        let valid = verdict(sn, &new.token).await? == Verdict::Valid as i32;
        (refused && valid).then_some(())
    })
    .await;

    // Shaanxi's GetJwks about Guangdong says the same.
    let reply = sn
        .terminal("gate")
        .await
        .unwrap()
        .get_jwks(GetJwksRequest {
            province: GD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let jwks: serde_json::Value = serde_json::from_str(&reply.jwks_json).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&new_kid.as_str()), "{kids:?}");
    assert_eq!(reply.revoked_kids, std::slice::from_ref(&old.kid));

    // An outside verifier using that answer agrees with Verify.
    let opinions = pyjwt_opinions(
        &reply.jwks_json,
        &reply.revoked_kids,
        &[&old.token, &new.token],
    )
    .await;
    assert!(opinions[0].starts_with("refused"), "{opinions:?}");
    assert_eq!(opinions[1], "accepted", "{opinions:?}");
    fed.stop_all().await.unwrap();
}

/// Provenance of a Lookup at `at` of a Guangdong holder.
async fn replica_lookup(at: &LocalProvince, holder: &str) -> Option<hufu_proto::v1::Provenance> {
    let reply = at
        .terminal("gate")
        .await
        .ok()?
        .lookup(LookupRequest {
            issuer: GD.into(),
            holder: holder.to_owned(),
        })
        .await
        .ok()?
        .into_inner();
    reply.provenance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_with_its_clock_ahead_does_not_make_a_dead_replica_look_fresh() {
    common::logs();
    let scratch = tempfile::tempdir().unwrap();
    let mut fed = common::quick_federation(scratch.path(), &[SN, GD], |_| {});
    // Guangdong's clock runs a day ahead for the heads it signs.
    fed.get_mut(common::province(GD))
        .config
        .federation
        .clock_offset_secs = 86_400;
    fed.start_all().await.unwrap();
    let holders = common::import_samples(fed.get(common::province(GD)), 1).await;
    let token = common::issue_code(fed.get(common::province(GD)), 0)
        .await
        .token;
    let sn = fed.get(common::province(SN));
    // While Guangdong runs, Shaanxi's replica is fresh.
    common::eventually(Duration::from_secs(10), || async {
        let p = replica_lookup(sn, &holders[0]).await?;
        (p.source == Source::Replica as i32).then_some(())
    })
    .await;
    // The skew is exported (set just after the batch is stored).
    let skew = common::eventually(Duration::from_secs(5), || async {
        let metrics = sn.node.as_ref()?.state.metrics.render();
        metrics
            .lines()
            .find(|l| l.starts_with("hufu_replica_clock_skew_ms{province=\"440000\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
    })
    .await;
    assert!(skew > 86_000_000, "skew {skew} ms");

    // Guangdong stops. Beyond max_replica_age the replica is stale, though
    // its last head claims a time a day from now.
    fed.get_mut(common::province(GD)).stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sn = fed.get(common::province(SN));
    let provenance = replica_lookup(sn, &holders[0])
        .await
        .expect("lookup answered");
    assert_eq!(
        provenance.source,
        Source::ReplicaStale as i32,
        "{provenance:?}"
    );
    assert!(provenance.age.unwrap().seconds >= 1, "{provenance:?}");
    let reply = sn
        .terminal("gate")
        .await
        .unwrap()
        .verify(VerifyRequest {
            token,
            policy: Some(Policy {
                require_fresh: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.verdict, Verdict::Valid as i32);
    assert!(!reply.policy_met, "{}", reply.reason);
    fed.stop_all().await.unwrap();
}
