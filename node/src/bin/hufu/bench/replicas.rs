//! `hufu bench replicas`: one province as three node replicas on a
//! three-server JetStream cluster on loopback. Prints acknowledged status
//! writes per second (each durable on a JetStream quorum and applied at the
//! replica that took it), the delay from a write's acknowledgement to its
//! visibility at the other replicas, and Lookup at one replica against a
//! single node without replication, measured in the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hufu_certs::{Province, Role};
use hufu_node::config::ReplicationConfig;
use hufu_node::local::LocalProvince;
use hufu_node::local::replicas::ReplicatedFederation;
use hufu_node::replication::cluster::{missing_nats_server, nats_server_version};
use hufu_node::sample;
use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{Colour, LookupRequest, PutStatusRequest, StatusInput, status_input};

use super::BenchArgs;
use crate::loadgen::{Figures, closed_loop, histogram, load_holders};
use crate::output::outln;

/// Replicas of the province in the benchmark.
const REPLICAS: usize = 3;

pub async fn replicas(args: &BenchArgs, holders: u64) -> anyhow::Result<()> {
    let version = nats_server_version().ok_or_else(|| anyhow::anyhow!(missing_nats_server()))?;
    let duration = Duration::from_secs(args.seconds);
    let scratch = tempfile::tempdir()?;
    let p = Province::parse("440000")?;
    let mut fed = ReplicatedFederation::init(
        &scratch.path().join("replicated"),
        &[p],
        REPLICAS,
        ReplicationConfig::new,
        |_| {},
    )
    .await?;
    fed.start_all().await?;
    outln!(
        "province {p}: {REPLICAS} node replicas, write log on a 3-server JetStream cluster ({version}), stream replicas 3\n"
    );

    // Every replica follows the log before anything is measured: one write,
    // seen everywhere.
    warm_up(&fed).await?;
    let (written, visible) = writes(&fed, args, duration).await?;
    written.print("PutStatus, acknowledged", None);
    for (i, delays) in visible.iter().enumerate() {
        outln!(
            "{:<36} p50 {:>6.2}ms  p99 {:>6.2}ms  ({} writes)",
            format!("  ack -> visible at node-{}", i + 2),
            delays.value_at_quantile(0.5) as f64 / 1000.0,
            delays.value_at_quantile(0.99) as f64 / 1000.0,
            delays.len()
        );
    }

    // Lookup at one replica, against a single node holding the same holders.
    let first = fed.federation.get(p);
    let ids = Arc::new(load_holders(first, holders).await?);
    let replica = &fed.replicas[0];
    let state = replica.node.as_ref().expect("running").state.clone();
    let target = first
        .node
        .as_ref()
        .expect("running")
        .state
        .store
        .last_sequence()
        .await;
    while state.store.tail(p).await?.sequence < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let single_dir = scratch.path().join("single");
    let mut single = LocalProvince::init(&single_dir, p)?;
    single.start().await?;
    // Its own holder secret: the same holders under other pseudonyms.
    let single_ids = Arc::new(load_holders(&single, holders).await?);
    let cert = first.client_cert(Role::Terminal, "bench")?;
    let single_cert = single.client_cert(Role::Terminal, "bench")?;
    // Single, replica, single: the ratio is to the mean of the two single
    // runs, so that a drift of the shared machine does not favour either.
    let single_before = lookups(&single, &single_cert, &single_ids, args, duration).await?;
    let at_replica = lookups(replica, &cert, &ids, args, duration).await?;
    let single_after = lookups(&single, &single_cert, &single_ids, args, duration).await?;
    single_before.print("Lookup at a single node", None);
    at_replica.print("Lookup at replica node-2", None);
    single_after.print("Lookup at a single node, again", None);
    outln!(
        "{:<36} {:>9.2}x a single node",
        "  replica / single",
        2.0 * at_replica.rate() / (single_before.rate() + single_after.rate())
    );
    single.stop().await?;
    fed.stop_all().await?;
    Ok(())
}

/// Writes one status through node-1 and waits until every replica holds it.
async fn warm_up(fed: &ReplicatedFederation) -> anyhow::Result<()> {
    let first = fed.federation.get(fed.province());
    let p = first.province;
    let status = StatusInput {
        subject: Some(status_input::Subject::NationalId(
            sample::national_id(p, 999_999).as_str().to_owned(),
        )),
        colour: Colour::Green as i32,
        as_of: Some(timestamp(now_unix() - 60)),
        last_negative_test: None,
        reason: 0,
    };
    let sequence = first
        .admin()
        .await?
        .put_status(PutStatusRequest {
            status: Some(status),
        })
        .await?
        .into_inner()
        .sequence;
    let started = Instant::now();
    for r in &fed.replicas {
        let store = &r.node.as_ref().expect("running").state.store;
        while store.tail(p).await?.sequence < sequence {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "replica {} did not follow the write log within 60s",
                r.config.node_name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Closed-loop PutStatus of distinct holders through node-1; returns the
/// figures and, per other replica, the delays from each acknowledgement to
/// the moment that replica held the change.
async fn writes(
    fed: &ReplicatedFederation,
    args: &BenchArgs,
    duration: Duration,
) -> anyhow::Result<(Figures, Vec<hdrhistogram::Histogram<u64>>)> {
    let first = fed.federation.get(fed.province());
    let p = first.province;
    // When each other replica reached each sequence: (sequence, when).
    let mut watchers = Vec::new();
    for r in &fed.replicas {
        let mut rx = r.node.as_ref().expect("running").state.store.watch(p);
        let seen = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let at = *rx.borrow_and_update();
                log.lock().expect("seen lock").push((at, Instant::now()));
            }
        });
        watchers.push((seen, task));
    }
    let acked = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
    let mut admins = Vec::new();
    for _ in 0..args.connections.unwrap_or(4).max(1) {
        admins.push(first.admin().await?);
    }
    let log = acked.clone();
    let now = now_unix();
    let figures = closed_loop(duration, args.concurrency.min(32), move |k, w| {
        let mut admin = admins[w % admins.len()].clone();
        let log = log.clone();
        async move {
            let status = StatusInput {
                subject: Some(status_input::Subject::NationalId(
                    sample::national_id(p, 1_000_000 + k).as_str().to_owned(),
                )),
                colour: Colour::Green as i32,
                as_of: Some(timestamp(now - 60)),
                last_negative_test: None,
                reason: 0,
            };
            match admin
                .put_status(PutStatusRequest {
                    status: Some(status),
                })
                .await
            {
                Ok(reply) => {
                    let at = Instant::now();
                    log.lock()
                        .expect("acked lock")
                        .push((reply.into_inner().sequence, at));
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    // Let the other replicas finish applying what was acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = acked.lock().expect("acked lock").clone();
    let mut delays = Vec::new();
    for (seen, task) in watchers {
        task.abort();
        let seen = seen.lock().expect("seen lock").clone();
        let mut hist = histogram();
        for (sequence, acked_at) in &acked {
            // The first moment the replica held this change or a later one.
            let i = seen.partition_point(|(s, _)| s < sequence);
            if let Some((_, at)) = seen.get(i) {
                let delay = at.saturating_duration_since(*acked_at);
                let _ = hist.record(delay.as_micros().max(1) as u64);
            }
        }
        delays.push(hist);
    }
    Ok((figures, delays))
}

async fn lookups(
    at: &LocalProvince,
    cert: &hufu_node::client::ClientCert,
    holders: &Arc<Vec<String>>,
    args: &BenchArgs,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let mut conns = Vec::new();
    for _ in 0..args.connections.unwrap_or(4).max(1) {
        conns.push(StatusLookupServiceClient::new(at.channel_as(cert).await?));
    }
    let issuer = at.province.to_string();
    let holders = holders.clone();
    Ok(closed_loop(duration, args.concurrency, move |k, w| {
        let mut client = conns[w % conns.len()].clone();
        let holder = holders[(k % holders.len() as u64) as usize].clone();
        let issuer = issuer.clone();
        async move {
            client
                .lookup(LookupRequest { issuer, holder })
                .await
                .is_ok()
        }
    })
    .await)
}
