//! `hufu demo --replicas N`: one province as N node replicas sharing a
//! write log on a three-server NATS JetStream cluster on loopback, beside a
//! peer province: writes through any replica, numbered alike everywhere, a
//! key rotated at all of them, and what losing NATS servers does.

use std::time::{Duration, Instant};

use crate::output::outln;
use hufu_certs::{Province, Role};
use hufu_node::config::ReplicationConfig;
use hufu_node::local::LocalProvince;
use hufu_node::local::replicas::ReplicatedFederation;
use hufu_node::replication::cluster::{missing_nats_server, nats_server_version};
use hufu_node::sample;
use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    Colour, ImportStatusesRequest, IssueCodeRequest, LookupRequest, PutStatusRequest,
    RotateKeyRequest, StatusInput, VerifyRequest, issue_code_request, status_input,
};

const HOLDERS: u64 = 1000;

fn input(p: Province, n: u64, colour: Colour) -> StatusInput {
    StatusInput {
        subject: Some(status_input::Subject::NationalId(
            sample::national_id(p, n).as_str().to_owned(),
        )),
        colour: colour as i32,
        as_of: Some(timestamp(now_unix() - 60)),
        last_negative_test: None,
        reason: 0,
    }
}

async fn put(r: &LocalProvince, n: u64, colour: Colour) -> anyhow::Result<u64> {
    Ok(r.admin()
        .await?
        .put_status(PutStatusRequest {
            status: Some(input(r.province, n, colour)),
        })
        .await?
        .into_inner()
        .sequence)
}

/// Each replica's newest change number and chain hash (its first bytes).
async fn heads(fed: &ReplicatedFederation) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for r in fed.all_replicas() {
        let store = &r.node.as_ref().expect("running").state.store;
        let tail = store.tail(r.province).await?;
        out.push((
            tail.sequence,
            data_encoding::HEXLOWER.encode(&tail.hash[..6]),
        ));
    }
    Ok(out)
}

/// Waits until every replica holds change `sequence`; returns how long.
async fn converged(fed: &ReplicatedFederation, sequence: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while heads(fed).await?.iter().any(|(s, _)| *s < sequence) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the replicas did not reach change {sequence} within 30s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

fn print_heads(heads: &[(u64, String)]) {
    for (i, (sequence, hash)) in heads.iter().enumerate() {
        outln!("   node-{}: change {sequence}, chain {hash}…", i + 1);
    }
}

pub async fn run(replicas: u8, duration: Option<u64>) -> anyhow::Result<()> {
    let version = nats_server_version().ok_or_else(|| anyhow::anyhow!(missing_nats_server()))?;
    let scratch = crate::demo::scratch_dir()?;
    let gd = Province::parse("440000")?;
    let sn = Province::parse("610000")?;
    outln!(
        "Hufu demo: province {gd} {} as {replicas} node replicas sharing one write log on a 3-server NATS JetStream cluster ({version}), beside {sn} {} (data in {})\n",
        gd.name(),
        sn.name(),
        scratch.path().display()
    );
    let mut fed = ReplicatedFederation::init(
        scratch.path(),
        &[gd, sn],
        replicas.into(),
        ReplicationConfig::new,
        |c| {
            c.federation.heartbeat_ms = 200;
            c.federation.max_replica_age_secs = 2;
        },
    )
    .await?;
    fed.start_all().await?;
    for (i, r) in fed.all_replicas().iter().enumerate() {
        outln!("   node-{} at {}", i + 1, r.addr()?);
    }
    outln!("   NATS servers at {}", fed.nats.urls().join(", "));

    // 1. An import through one replica.
    let started = Instant::now();
    let first = fed.federation.get(gd);
    let rows: Vec<ImportStatusesRequest> = (0..HOLDERS)
        .map(|n| ImportStatusesRequest {
            line: n + 1,
            status: Some(input(gd, n, Colour::Green)),
            legacy_code: String::new(),
        })
        .collect();
    first
        .admin()
        .await?
        .import_statuses(tokio_stream::iter(rows))
        .await?;
    let imported = started.elapsed();
    let spread = converged(&fed, HOLDERS).await?;
    outln!(
        "\n1. {HOLDERS} holders imported through node-1, acknowledged in {:.2}s (each chunk durable on a JetStream quorum and applied at node-1); every replica held all of them {:.0} ms later.",
        imported.as_secs_f64(),
        spread.as_secs_f64() * 1000.0
    );

    // 2. Writes through the other replicas.
    outln!(
        "\n2. Status changes written through each replica are numbered once, in one order, at all of them:"
    );
    let mut last = HOLDERS;
    for (i, r) in fed.all_replicas().iter().enumerate() {
        last = put(r, i as u64, Colour::Yellow).await?;
        outln!("   through node-{}: change {last}", i + 1);
    }
    converged(&fed, last).await?;
    print_heads(&heads(&fed).await?);

    // 3. A key rotated through the last replica.
    let rotator = fed.all_replicas().len();
    let rotated = fed
        .all_replicas()
        .last()
        .expect("at least one replica")
        .admin()
        .await?
        .rotate_key(RotateKeyRequest::default())
        .await?
        .into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let code = first
        .admin()
        .await?
        .issue_code(IssueCodeRequest {
            subject: Some(issue_code_request::Subject::NationalId(
                sample::national_id(gd, 7).as_str().to_owned(),
            )),
            ..Default::default()
        })
        .await?
        .into_inner();
    let verdict = fed
        .federation
        .get(sn)
        .terminal("checkpoint-1")
        .await?
        .verify(VerifyRequest {
            token: code.token.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    outln!(
        "\n3. Code-signing key rotated through node-{rotator}: {} (was {}). A code issued at node-1 carries kid {} and verifies at {sn}: {}.",
        rotated.kid,
        rotated.previous_kid,
        code.kid,
        verdict.verdict().as_str_name().to_lowercase()
    );

    // 4. NATS servers lost.
    fed.nats.kill(0);
    let through = &fed.replicas.first().unwrap_or(first);
    let sequence = put(through, 11, Colour::Red).await?;
    outln!(
        "\n4. One NATS server killed (SIGKILL): a write through node-2 is still acknowledged (change {sequence})."
    );
    fed.nats.kill(1);
    match put(through, 12, Colour::Red).await {
        Ok(s) => outln!("   a second one killed: the write was taken anyway (change {s})"),
        Err(err) => outln!(
            "   A second one killed, no quorum: writes fail with UNAVAILABLE:\n   \"{}\"",
            err.downcast_ref::<tonic::Status>()
                .map(|s| s.message().to_owned())
                .unwrap_or_else(|| err.to_string())
        ),
    }
    let cert = first.client_cert(Role::Terminal, "checkpoint-1")?;
    let looked_up = StatusLookupServiceClient::new(through.channel_as(&cert).await?)
        .lookup(LookupRequest {
            issuer: gd.to_string(),
            holder: code.status.map(|s| s.holder).unwrap_or_default(),
        })
        .await?
        .into_inner();
    outln!(
        "   Lookups go on meanwhile: node-2 answers for the holder of the code ({}).",
        hufu_node::status::colour_name(looked_up.record.map(|r| r.colour()).unwrap_or_default())
    );
    fed.nats.start_server(0)?;
    fed.nats.start_server(1)?;
    fed.nats.wait_ready(Duration::from_secs(30)).await?;
    let back = Instant::now();
    let sequence = loop {
        match put(through, 12, Colour::Red).await {
            Ok(s) => break s,
            Err(_) if back.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => return Err(err),
        }
    };
    outln!(
        "   Both restarted: writes are acknowledged again after {:.1}s (change {sequence}).",
        back.elapsed().as_secs_f64()
    );

    outln!(
        "\nthe province keeps running; Ctrl-C to stop{}",
        duration
            .map(|s| format!(" (or after {s}s)"))
            .unwrap_or_default()
    );
    match duration {
        Some(s) => {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                _ = crate::cli::signal::shutdown_signal() => {}
            }
        }
        None => crate::cli::signal::shutdown_signal().await,
    }
    fed.stop_all().await?;
    outln!("stopped");
    Ok(())
}
