//! `hufu bench verify --legacy`: a province's legacy codes verified at
//! another province's node from its replica, against `Lookup` of the same
//! holders at the same node in the same run. Both answers come from the
//! replica and are audited as cross-province calls; the legacy path adds
//! matching the scanned text against the members' formats, hashing the
//! code id and reading its binding.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_proto::v1::{LinkCodeRequest, Source, Verdict, VerifyRequest, link_code_request};

use super::BenchArgs;
use crate::loadgen::{clients, closed_loop, load_holders};
use crate::output::outln;
use hufu_node::local::LocalFederation;
use hufu_node::sample;

/// The `n`th code: `GD1` and a sample id.
fn code(n: u64) -> String {
    format!("GD1{}", sample::legacy_code_id(n))
}

pub async fn legacy(args: &BenchArgs, holders: u64) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let scratch = tempfile::tempdir()?;
    let (gd, sn) = (Province::parse("440000")?, Province::parse("610000")?);
    let mut fed = LocalFederation::init_declaring(
        scratch.path(),
        &[gd, sn],
        &[(gd, vec![sample::legacy_format()])],
        |c| {
            c.federation.heartbeat_ms = 200;
            c.federation.max_replica_age_secs = 30;
        },
    )?;
    fed.start_all().await?;
    let ids = Arc::new(load_holders(fed.get(gd), holders).await?);
    let started = Instant::now();
    let admin = fed.get(gd).admin().await?;
    let mut links = tokio::task::JoinSet::new();
    for chunk in (0..holders)
        .collect::<Vec<_>>()
        .chunks(holders.div_ceil(16).max(1) as usize)
    {
        let (mut admin, chunk, ids) = (admin.clone(), chunk.to_vec(), ids.clone());
        links.spawn(async move {
            for n in chunk {
                admin
                    .link_code(LinkCodeRequest {
                        code: code(n),
                        subject: Some(link_code_request::Subject::Holder(ids[n as usize].clone())),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = links.join_next().await {
        done??;
    }
    outln!(
        "{holders} legacy codes linked at {gd} in {:.2}s (one LinkCode call each, 16 at a time)",
        started.elapsed().as_secs_f64()
    );
    let gd_state = fed.get(gd).node.as_ref().expect("running").state.clone();
    let sn_state = fed.get(sn).node.as_ref().expect("running").state.clone();
    let want = gd_state.store.last_sequence().await;
    while sn_state.store.tail(gd).await?.sequence < want {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "replication did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let conns = clients(fed.get(sn), args.connections.unwrap_or(4)).await?;
    let sample = conns[0]
        .clone()
        .verify(VerifyRequest {
            token: code(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        sample.verdict == Verdict::Valid as i32
            && sample.provenance.as_ref().map(|p| p.source) == Some(Source::Replica as i32),
        "a linked code did not verify from the replica: {}",
        sample.reason
    );
    let lookup = closed_loop(
        duration,
        args.concurrency,
        super::lookup_call(conns.clone(), ids.clone(), gd.to_string()),
    )
    .await;
    lookup.print("Lookup at B, A's holders (replica)", None);
    let c = conns.clone();
    let verify = closed_loop(duration, args.concurrency, move |k, w| {
        let mut client = c[w % c.len()].clone();
        let token = code(k % holders);
        async move {
            matches!(client.verify(VerifyRequest { token, ..Default::default() }).await,
                Ok(r) if r.get_ref().verdict == Verdict::Valid as i32)
        }
    })
    .await;
    verify.print("Verify at B, A's legacy codes (replica)", None);
    outln!(
        "legacy verify / Lookup at the same node: {:.2}\n",
        verify.rate() / lookup.rate()
    );
    fed.stop_all().await?;
    Ok(())
}
