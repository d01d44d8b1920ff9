//! `hufu bench`: load generators that print figures. Nodes run in-process on
//! loopback with real certificates, storage and mutual TLS; callers use
//! separate connections. Every figure is also given as a ratio to a bare
//! tonic service (the standard health check) behind the same mutual TLS,
//! measured in the same run, because absolute rates on a shared machine are
//! noisy.

mod audit;
mod footprint;
mod legacy;
mod replicas;
mod scale;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hufu_certs::{Province, Role};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    BatchLookupRequest, LookupRequest, PutStatusRequest, StatusInput, Verdict, VerifyRequest,
    status_input,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::loadgen::{
    Figures, clients, closed_loop, histogram, issue_tokens, load_holders, machine,
};
use crate::output::outln;
use hufu_node::local::{LocalFederation, LocalProvince};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5, global = true)]
    pub seconds: u64,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64, global = true)]
    pub concurrency: usize,
    /// Client connections (default 4; `surge`: 1,000).
    #[arg(long, global = true)]
    pub connections: Option<usize>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchWhat {
    /// Lookup and BatchLookup throughput and latency, against the bare echo.
    Lookup {
        #[arg(long, default_value_t = 10_000)]
        holders: u64,
    },
    /// Verify: unique tokens against the raw ES256 verify rate, and repeated
    /// (cached) tokens; with `--legacy`, another province's legacy codes
    /// from the replica against Lookup at the same node.
    Verify {
        #[arg(long, default_value_t = 20_000)]
        tokens: u64,
        /// Legacy codes instead: `--tokens` of them, linked at one province
        /// and verified at another.
        #[arg(long)]
        legacy: bool,
    },
    /// Two provinces: feed replication throughput, propagation delay under
    /// load, and cross-province verify from replica against local verify.
    Federation {
        /// Changes replicated in the throughput run.
        #[arg(long, default_value_t = 200_000)]
        changes: u64,
        /// Status writes per second offered during the propagation run.
        #[arg(long, default_value_t = 2_000)]
        write_rate: u64,
    },
    /// One province as three node replicas on a loopback JetStream cluster
    /// (needs nats-server): acknowledged writes per second, delay from
    /// acknowledgement to visibility at the other replicas, and Lookup at a
    /// replica against a single node.
    Replicas {
        /// Holders loaded for the Lookup comparison.
        #[arg(long, default_value_t = 10_000)]
        holders: u64,
    },
    /// What a province of N holders costs: import and replication rates,
    /// bytes per holder on disk, both nodes' peak RSS, and Lookup and Verify
    /// rates at N beside a small N (nodes in processes of their own).
    Scale {
        /// Holders imported at the issuer and replicated.
        #[arg(long, default_value_t = 1_000_000)]
        holders: u64,
        /// Holders of the small run the figures stand beside.
        #[arg(long, default_value_t = 10_000)]
        small: u64,
    },
    /// Open-loop surge from many connections against a node in its own
    /// process, held to a CPU share: offered load stepped from 0.5x to 10x
    /// of its measured capacity and back, beside a bare tonic echo server
    /// under identical conditions.
    Surge(crate::surge::SurgeArgs),
    /// The bare tonic echo server the surge baseline runs (internal).
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Lookup, verify and federation, in one run.
    All,
}

/// A bare tonic server (only the standard health service) behind the same
/// mutual TLS as a node, with the node's certificates: the baseline.
async fn bare_echo(
    province: &LocalProvince,
    stop: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let config = &province.config;
    let anchors =
        hufu_certs::TrustAnchors::new([rustls::pki_types::pem::PemObject::from_pem_slice(
            province.ca_pem()?.as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("CA: {e}"))?])?;
    let tls = hufu_certs::server_config(
        anchors,
        &config.read(&config.node_cert)?,
        &config.read(&config.node_key)?,
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = hufu_node::net::incoming(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        hufu_node::net::DoorLimits {
            max_connections: 10_000,
            max_handshakes: 256,
            handshakes_per_source: 10_000,
            first_byte_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            // The echo baseline is the bare stack: no places.
            scheduling_delay_target: Duration::ZERO,
            caller_streams: config_streams(),
            surge_streams: config_streams(),
        },
        stop.clone(),
        hufu_node::metrics::Metrics::new(),
        // The echo lives as long as the bench: its tasks need no joining.
        &tokio_util::task::TaskTracker::new(),
        None,
    );
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let _keep = _reporter;
        let _ = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(config_streams()))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    });
    Ok(addr)
}

fn config_streams() -> u32 {
    hufu_node::config::LimitsConfig::default().max_concurrent_streams
}

async fn echo_figures(
    province: &LocalProvince,
    args: &BenchArgs,
    duration: Duration,
) -> anyhow::Result<Figures> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let stop = CancellationToken::new();
    let addr = bare_echo(province, stop.clone()).await?;
    let target = hufu_node::client::Target::with_ca_pem(
        &addr.to_string(),
        province.province,
        &province.ca_pem()?,
    )?;
    let cert = province.client_cert(Role::Terminal, "bench-echo")?;
    let mut conns = Vec::new();
    for _ in 0..args.connections.unwrap_or(4).max(1) {
        conns.push(HealthClient::new(
            hufu_node::client::connect(&target, &cert).await?,
        ));
    }
    let figures = closed_loop(duration, args.concurrency, move |_, w| {
        let mut client = conns[w % conns.len()].clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        }
    })
    .await;
    stop.cancel();
    Ok(figures)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let BenchWhat::EchoServer { config } = &args.what {
        return crate::surge::echo_server(config).await;
    }
    outln!("hufu bench on {}", machine());
    if let BenchWhat::Surge(surge) = &args.what {
        let shape = crate::surge::Shape {
            seconds: args.seconds,
            concurrency: args.concurrency,
            connections: args.connections,
        };
        return crate::surge::run(shape, surge).await;
    }
    if let BenchWhat::Scale { holders, small } = args.what {
        return scale::scale(&args, holders, small).await;
    }
    outln!(
        "closed loop, {} requests in flight over {} mutual-TLS connections, {} s per figure\n",
        args.concurrency,
        args.connections.unwrap_or(4),
        args.seconds
    );
    if let BenchWhat::Replicas { holders } = args.what {
        return replicas::replicas(&args, holders).await;
    }
    let all = matches!(args.what, BenchWhat::All);
    if all || matches!(args.what, BenchWhat::Lookup { .. }) {
        let holders = match args.what {
            BenchWhat::Lookup { holders } => holders,
            _ => 10_000,
        };
        lookup(&args, holders).await?;
    }
    if let BenchWhat::Verify {
        tokens,
        legacy: true,
    } = args.what
    {
        return legacy::legacy(&args, tokens).await;
    }
    if all || matches!(args.what, BenchWhat::Verify { .. }) {
        let tokens = match args.what {
            BenchWhat::Verify { tokens, .. } => tokens,
            _ => 20_000,
        };
        verify(&args, tokens).await?;
    }
    if all || matches!(args.what, BenchWhat::Federation { .. }) {
        let (changes, rate) = match args.what {
            BenchWhat::Federation {
                changes,
                write_rate,
            } => (changes, write_rate),
            _ => (200_000, 2_000),
        };
        federation(&args, changes, rate).await?;
        audit::audit_cost(&args).await?;
    }
    Ok(())
}

async fn single_province() -> anyhow::Result<(tempfile::TempDir, LocalProvince)> {
    let scratch = tempfile::tempdir()?;
    let mut province = LocalProvince::init(scratch.path(), Province::parse("440000")?)?;
    province.start().await?;
    Ok((scratch, province))
}

async fn lookup(args: &BenchArgs, holders: u64) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let (_scratch, mut province) = single_province().await?;
    let ids = Arc::new(load_holders(&province, holders).await?);
    let echo = echo_figures(&province, args, duration).await?;
    echo.print("bare tonic echo (health check)", None);
    let conns = clients(&province, args.connections.unwrap_or(4)).await?;
    let issuer = province.province.to_string();
    let lookup = closed_loop(
        duration,
        args.concurrency,
        lookup_call(conns.clone(), ids.clone(), issuer.clone()),
    )
    .await;
    lookup.print("Lookup", Some(echo.rate()));
    let (c, i, n) = (conns.clone(), issuer.clone(), ids.clone());
    let batch = closed_loop(duration, args.concurrency.min(16), move |k, w| {
        let mut client = c[w % c.len()].clone();
        let start = ((k * 1000) % n.len() as u64) as usize;
        let holders: Vec<String> = (0..1000).map(|j| n[(start + j) % n.len()].clone()).collect();
        let issuer = i.clone();
        async move {
            matches!(client.batch_lookup(BatchLookupRequest { issuer, holders }).await, Ok(r) if r.get_ref().entries.len() == 1000)
        }
    })
    .await;
    batch.print("BatchLookup (1,000 holders a call)", Some(echo.rate()));
    outln!(
        "{:<36} {:>9.0} holders/s\n",
        "  BatchLookup holders",
        batch.rate() * 1000.0
    );
    province.stop().await?;
    Ok(())
}

/// One `Lookup` of `issuer`'s holders `ids` per call, in turn.
fn lookup_call(
    conns: Vec<StatusLookupServiceClient<Channel>>,
    ids: Arc<Vec<String>>,
    issuer: String,
) -> impl Fn(u64, usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
+ Send
+ Sync
+ 'static {
    move |k: u64, w: usize| {
        let mut client = conns[w % conns.len()].clone();
        let holder = ids[(k % ids.len() as u64) as usize].clone();
        let issuer = issuer.clone();
        Box::pin(async move {
            client
                .lookup(LookupRequest { issuer, holder })
                .await
                .is_ok()
        })
    }
}

fn verify_call(
    tokens: Arc<Vec<String>>,
    conns: Vec<StatusLookupServiceClient<Channel>>,
    repeat: bool,
) -> impl Fn(u64, usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
+ Send
+ Sync
+ 'static {
    move |i: u64, w: usize| {
        let mut client = conns[w % conns.len()].clone();
        let token = if repeat {
            tokens[(i % 16) as usize].clone()
        } else {
            tokens[(i % tokens.len() as u64) as usize].clone()
        };
        Box::pin(async move {
            matches!(client.verify(VerifyRequest { token, policy: None, ..Default::default() }).await, Ok(r) if r.get_ref().verdict == Verdict::Valid as i32)
        })
    }
}

async fn verify(args: &BenchArgs, tokens: u64) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let (_scratch, mut province) = single_province().await?;
    let ids = load_holders(&province, tokens.min(5_000)).await?;
    let list = Arc::new(issue_tokens(&province, &ids, tokens).await?);
    let raw = tokio::task::spawn_blocking(|| {
        hufu_federation::codes::raw_es256_verify_rate(Duration::from_secs(2))
    })
    .await?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let echo = echo_figures(&province, args, duration).await?;
    echo.print("bare tonic echo (health check)", None);
    // Unique codes: the node restarted with its verified-code cache off, so
    // every call checks a signature however often the codes repeat.
    let cache = province.config.codes.cache_entries;
    province.stop().await?;
    province.config.codes.cache_entries = 0;
    province.start().await?;
    let conns = clients(&province, args.connections.unwrap_or(4)).await?;
    let unique = closed_loop(
        duration,
        args.concurrency,
        verify_call(list.clone(), conns.clone(), false),
    )
    .await;
    unique.print("Verify, unique tokens (no cache)", Some(echo.rate()));
    province.stop().await?;
    province.config.codes.cache_entries = cache;
    province.start().await?;
    let conns = clients(&province, args.connections.unwrap_or(4)).await?;
    let repeated = closed_loop(
        duration,
        args.concurrency,
        verify_call(list.clone(), conns.clone(), true),
    )
    .await;
    repeated.print("Verify, repeated tokens (cache)", Some(echo.rate()));
    outln!(
        "{:<36} {:>9.0}/s on one core; {:.0}/s on {cores} cores",
        "raw ES256 verify (aws-lc-rs)",
        raw,
        raw * cores
    );
    outln!(
        "Verify unique / raw ES256 on one core: {:.2}  (the node, TLS, HTTP/2 and the load generator share the {cores} cores)\n",
        unique.rate() / raw,
    );
    province.stop().await?;
    Ok(())
}

async fn federation(args: &BenchArgs, changes: u64, write_rate: u64) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let (a, b) = (Province::parse("440000")?, Province::parse("610000")?);
    let mut fed = LocalFederation::init(scratch.path(), &[a, b], |c| {
        c.federation.heartbeat_ms = 200;
        c.federation.max_replica_age_secs = 5;
    })?;
    // Replication throughput: A holds `changes` changes before B starts;
    // time B's catch-up (each batch durable on arrival).
    fed.get_mut(a).start().await?;
    let ids = load_holders(fed.get(a), changes).await?;
    let started = Instant::now();
    fed.get_mut(b).start().await?;
    let b_state = fed.get(b).node.as_ref().expect("running").state.clone();
    // The stream's rate is timed from the first batch stored to the last,
    // apart from B's start-up (TLS connection, first subscription).
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let seq = b_state.store.tail(a).await?.sequence;
        if first.is_none() && seq > 0 {
            first = Some((Instant::now(), seq));
        }
        if seq >= changes {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "replication did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let (t0, s0) = first.unwrap_or((started, 0));
    let streaming = t0.elapsed().as_secs_f64().max(1e-6);
    outln!(
        "feed replication to one peer: {changes} changes in {:.2}s from B's start = {:.0} changes/s; streaming after the first batch: {:.0} changes/s (each batch durable on arrival)",
        took.as_secs_f64(),
        changes as f64 / took.as_secs_f64(),
        (changes - s0) as f64 / streaming
    );

    // Propagation delay under load: writes at a fixed rate to A, each timed
    // from its acknowledgement at A to its arrival at B.
    let acked: Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Default::default();
    let mut seen_at_b = b_state.store.watch(a);
    // The watch may trail the stored head by the last batch's flush.
    let base = b_state.store.tail(a).await?.sequence;
    let total = write_rate * args.seconds;
    // B records when each change arrived (durably); joined with the
    // acknowledgement times at the end, since B may hold a change before
    // the writer has even heard A's acknowledgement.
    let watcher = tokio::spawn(async move {
        let mut arrivals = Vec::new();
        let mut last = base;
        while last < base + total && seen_at_b.changed().await.is_ok() {
            let now = Instant::now();
            let seq = *seen_at_b.borrow();
            if seq > last {
                arrivals.extend(((last + 1)..=seq).map(|s| (s, now)));
                last = seq;
            }
        }
        arrivals
    });
    let admin = fed.get(a).admin().await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / write_rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let mut admin = admin.clone();
        let acked = acked.clone();
        let holder = ids[(i % ids.len() as u64) as usize].clone();
        inflight.spawn(async move {
            let status = StatusInput {
                subject: Some(status_input::Subject::Holder(holder)),
                colour: 1 + (i % 3) as i32,
                as_of: None,
                last_negative_test: None,
                reason: 0,
            };
            if let Ok(r) = admin
                .put_status(PutStatusRequest {
                    status: Some(status),
                })
                .await
            {
                let t = Instant::now();
                acked
                    .lock()
                    .expect("lock")
                    .insert(r.into_inner().sequence, t);
            }
        });
    }
    while inflight.join_next().await.is_some() {}
    let arrivals = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mut delays = histogram();
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    for (seq, arrived) in arrivals {
        if let Some(ack) = acked.get(&seq) {
            let _ =
                delays.record(arrived.saturating_duration_since(*ack).as_micros().max(1) as u64);
        }
    }
    outln!(
        "propagation A→B under {write_rate} writes/s: p50 {:.2}ms  p99 {:.2}ms  max {:.2}ms  ({} changes)",
        delays.value_at_quantile(0.5) as f64 / 1000.0,
        delays.value_at_quantile(0.99) as f64 / 1000.0,
        delays.max() as f64 / 1000.0,
        delays.len()
    );

    // Cross-province verify from the replica against local verify, at B.
    let duration = Duration::from_secs(args.seconds);
    let local_ids = load_holders(fed.get(b), 2_000).await?;
    let local_tokens = Arc::new(issue_tokens(fed.get(b), &local_ids, 20_000).await?);
    let foreign_tokens =
        Arc::new(issue_tokens(fed.get(a), &ids[..2_000.min(ids.len())], 20_000).await?);
    let conns = clients(fed.get(b), args.connections.unwrap_or(4)).await?;
    let sample = conns[0]
        .clone()
        .verify(VerifyRequest {
            token: foreign_tokens[0].clone(),
            policy: None,
            ..Default::default()
        })
        .await?
        .into_inner();
    let provenance = sample.provenance.unwrap_or_default();
    outln!(
        "a code of A verified at B: source {:?}, age {:?}",
        hufu_proto::v1::Source::try_from(provenance.source).unwrap_or_default(),
        provenance
            .age
            .map(|a| Duration::new(a.seconds as u64, a.nanos as u32))
            .unwrap_or_default()
    );
    let local = closed_loop(
        duration,
        args.concurrency,
        verify_call(local_tokens, conns.clone(), false),
    )
    .await;
    local.print("Verify at B, B's codes (local)", None);
    let foreign = closed_loop(
        duration,
        args.concurrency,
        verify_call(foreign_tokens, conns, false),
    )
    .await;
    foreign.print("Verify at B, A's codes (replica)", None);
    outln!(
        "cross-province / local verify: {:.2}\n",
        foreign.rate() / local.rate()
    );
    fed.stop_all().await?;
    Ok(())
}
