//! How a node answers about a holder, for Hufu codes and legacy codes
//! alike: where an answer came from and how old it is (provenance), and
//! whether the verifier's policy (colour, negative test within N hours,
//! fresh answers only) is met.

use hufu_certs::Province;
use hufu_proto::v1::{Colour, Policy, Provenance, Source, StatusRecord};

use crate::status::{colour_name, seconds};

/// Where an answer came from, how old it is, and which province answered.
pub fn provenance(source: Source, age_ms: Option<i64>, answered_by: Province) -> Provenance {
    Provenance {
        source: source as i32,
        age: age_ms.map(|ms| hufu_proto::Duration {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        answered_by: answered_by.to_string(),
    }
}

fn colour_rank(c: i32) -> i32 {
    match Colour::try_from(c) {
        Ok(Colour::Green) => 1,
        Ok(Colour::Yellow) => 2,
        _ => 3,
    }
}

/// Evaluates a verifier's policy against the effective status.
pub fn evaluate(
    policy: Option<&Policy>,
    status: &StatusRecord,
    provenance: &Provenance,
    now: i64,
) -> (bool, String) {
    let colour = Colour::try_from(status.colour).unwrap_or(Colour::Unspecified);
    let Some(policy) = policy else {
        return (true, format!("valid code; status {}", colour_name(colour)));
    };
    let mut unmet = Vec::new();
    if policy.max_colour != Colour::Unspecified as i32
        && colour_rank(status.colour) > colour_rank(policy.max_colour)
    {
        let max = Colour::try_from(policy.max_colour).unwrap_or(Colour::Unspecified);
        unmet.push(format!(
            "colour {} is worse than {}",
            colour_name(colour),
            colour_name(max)
        ));
    }
    if let Some(max_age) = &policy.max_negative_test_age {
        match seconds(status.last_negative_test.as_ref()) {
            None => unmet.push("no negative test on record".to_string()),
            Some(at) if now - at > max_age.seconds => unmet.push(format!(
                "last negative test {}h ago, policy allows {}h",
                (now - at) / 3600,
                max_age.seconds / 3600
            )),
            Some(_) => {}
        }
    }
    if policy.require_fresh && provenance.source == Source::ReplicaStale as i32 {
        unmet.push("only a stale replica could answer and the policy requires fresh status".into());
    }
    if unmet.is_empty() {
        (true, format!("policy met; status {}", colour_name(colour)))
    } else {
        (false, format!("policy not met: {}", unmet.join("; ")))
    }
}
