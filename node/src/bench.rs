//! `hufu bench`: load generators that print figures. Nodes run in-process on
//! loopback with real mutual TLS; callers are separate connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hufu_certs::{Province, Role};
use hufu_proto::v1::status_lookup_client::StatusLookupClient;
use hufu_proto::v1::{
    ImportRow, IssueCodeRequest, LookupRequest, StatusInput, Verdict, VerifyRequest,
    issue_code_request, status_input,
};
use tonic::transport::Channel;

use crate::local::LocalProvince;
use crate::sample;
use crate::status::{now_unix, timestamp};

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
    /// Client connections.
    #[arg(long, default_value_t = 4, global = true)]
    pub connections: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchWhat {
    /// Lookup throughput and latency (closed loop).
    Lookup {
        #[arg(long, default_value_t = 10_000)]
        holders: u64,
    },
    /// Verify: unique tokens vs the raw ES256 verify rate, and repeated (cached) tokens.
    Verify {
        #[arg(long, default_value_t = 20_000)]
        tokens: u64,
    },
}

pub struct Figures {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn print(&self, label: &str) {
        println!(
            "{label:<34} {:>10.0}/s  p50 {:>7.2}ms  p99 {:>7.2}ms  p99.9 {:>7.2}ms  errors {}",
            self.rate(),
            self.latency.value_at_quantile(0.5) as f64 / 1000.0,
            self.latency.value_at_quantile(0.99) as f64 / 1000.0,
            self.latency.value_at_quantile(0.999) as f64 / 1000.0,
            self.errors
        );
    }
}

/// Runs `call(i)` from `concurrency` tasks over `channels` for `duration`.
pub async fn closed_loop<F, Fut>(duration: Duration, concurrency: usize, call: F) -> Figures
where
    F: Fn(u64, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let call = call.clone();
        let counter = counter.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut ok = 0u64;
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if call(i, worker).await {
                    ok += 1;
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            (ok, hist)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut ok = 0;
    for t in tasks {
        if let Ok((n, h)) = t.await {
            ok += n;
            let _ = latency.add(h);
        }
    }
    Figures {
        ok,
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency,
    }
}

async fn load_holders(province: &LocalProvince, n: u64) -> anyhow::Result<Vec<String>> {
    let p = province.province;
    let now = now_unix();
    let mut admin = province.admin().await?;
    let rows: Vec<ImportRow> = (0..n)
        .map(|i| ImportRow {
            line: i + 1,
            status: Some(StatusInput {
                subject: Some(status_input::Subject::NationalId(
                    sample::national_id(p, i).as_str().to_owned(),
                )),
                colour: 1 + (i % 3) as i32,
                as_of: Some(timestamp(now - 60)),
                last_negative_test: Some(timestamp(now - 3600)),
                reason: 0,
            }),
        })
        .collect();
    let summary = admin
        .import_statuses(tokio_stream::iter(rows))
        .await?
        .into_inner();
    anyhow::ensure!(summary.rejected.is_empty(), "sample import rejected rows");
    let secret_bytes = std::fs::read(province.config.path(&province.config.holder_secret))?;
    let secret = hufu_federation::holder::HolderSecret::new(&secret_bytes)?;
    Ok((0..n)
        .map(|i| secret.pseudonym(&sample::national_id(p, i)).to_string())
        .collect())
}

async fn clients(
    province: &LocalProvince,
    n: usize,
) -> anyhow::Result<Vec<StatusLookupClient<Channel>>> {
    let cert = province.client_cert(Role::Terminal, "bench")?;
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(StatusLookupClient::new(province.channel_as(&cert).await?));
    }
    Ok(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let p = Province::parse("440000")?;
    let mut province = LocalProvince::init(scratch.path(), p)?;
    province.start().await?;
    println!("machine: {}", machine());
    let duration = Duration::from_secs(args.seconds);
    match args.what {
        BenchWhat::Lookup { holders } => {
            let ids = Arc::new(load_holders(&province, holders).await?);
            let conns = clients(&province, args.connections).await?;
            let issuer = p.to_string();
            let figures = closed_loop(duration, args.concurrency, move |i, w| {
                let mut client = conns[w % conns.len()].clone();
                let holder = ids[(i % ids.len() as u64) as usize].clone();
                let issuer = issuer.clone();
                async move {
                    client
                        .lookup(LookupRequest { issuer, holder })
                        .await
                        .is_ok()
                }
            })
            .await;
            figures.print("lookup");
        }
        BenchWhat::Verify { tokens } => {
            let n = tokens.min(5_000);
            let ids = load_holders(&province, n).await?;
            let mut admin = province.admin().await?;
            let mut list = Vec::with_capacity(tokens as usize);
            for i in 0..tokens {
                let reply = admin
                    .issue_code(IssueCodeRequest {
                        subject: Some(issue_code_request::Subject::Holder(
                            ids[(i % n) as usize].clone(),
                        )),
                    })
                    .await?
                    .into_inner();
                list.push(reply.token);
            }
            let list = Arc::new(list);
            let raw = tokio::task::spawn_blocking(move || {
                hufu_federation::codes::raw_es256_verify_rate(Duration::from_secs(2))
            })
            .await?;
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64;
            println!(
                "raw ES256 verify (aws-lc-rs, 1 thread): {raw:.0}/s; x{cores} cores = {:.0}/s",
                raw * cores
            );
            let conns = clients(&province, args.connections).await?;
            let verify = |tokens: Arc<Vec<String>>,
                          conns: Vec<StatusLookupClient<Channel>>,
                          repeat: bool| {
                move |i: u64, w: usize| {
                    let mut client = conns[w % conns.len()].clone();
                    let token = if repeat {
                        tokens[(i % 16) as usize].clone()
                    } else {
                        tokens[(i % tokens.len() as u64) as usize].clone()
                    };
                    async move {
                        matches!(client.verify(VerifyRequest { token, policy: None }).await, Ok(r) if r.get_ref().verdict == Verdict::Valid as i32)
                    }
                }
            };
            let unique = closed_loop(
                duration,
                args.concurrency,
                verify(list.clone(), conns.clone(), false),
            )
            .await;
            unique.print("verify, unique tokens");
            let repeated = closed_loop(
                duration,
                args.concurrency,
                verify(list.clone(), conns.clone(), true),
            )
            .await;
            repeated.print("verify, repeated tokens (cache)");
            println!(
                "unique-token verify / raw ES256 on one core: {:.2}; / all cores: {:.2}",
                unique.rate() / raw,
                unique.rate() / (raw * cores)
            );
            if unique.ok < list.len() as u64 {
                println!(
                    "(all {} unique tokens were fresh: none repeated within the run)",
                    unique.ok
                );
            } else {
                println!(
                    "note: the run cycled through the {} tokens; later passes hit the cache",
                    list.len()
                );
            }
        }
    }
    province.stop().await?;
    Ok(())
}
