//! What the load generators of `hufu bench` and `hufu bench surge` share:
//! a closed-loop driver with its figures, latency histograms, sample holders
//! and codes loaded into a province, and the machine's name.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hufu_certs::Role;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{
    ImportStatusesRequest, IssueCodeRequest, StatusInput, issue_code_request, status_input,
};
use tonic::transport::Channel;

use crate::output::outln;
use hufu_node::local::LocalProvince;
use hufu_node::sample;
use hufu_node::status::{now_unix, timestamp};

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

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn print(&self, label: &str, baseline: Option<f64>) {
        let ratio = baseline
            .map(|b| format!("{:>5.2}x echo", self.rate() / b))
            .unwrap_or_default();
        outln!(
            "{label:<36} {:>9.0}/s  p50 {:>6.2}ms  p99 {:>6.2}ms  p99.9 {:>6.2}ms  errors {:<4} {ratio}",
            self.rate(),
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.errors
        );
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `call(i, worker)` from `concurrency` tasks for `duration`: a closed
/// loop, each task issuing its next call when the previous one returns.
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
            let mut hist = histogram();
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
    let mut latency = histogram();
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

/// Imports `n` sample holders and returns their pseudonyms.
pub async fn load_holders(province: &LocalProvince, n: u64) -> anyhow::Result<Vec<String>> {
    let p = province.province;
    let now = now_unix();
    let mut admin = province.admin().await?;
    let mut start = 0;
    while start < n {
        let end = (start + 50_000).min(n);
        let rows: Vec<ImportStatusesRequest> = (start..end)
            .map(|i| ImportStatusesRequest {
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
                legacy_code: String::new(),
            })
            .collect();
        let summary = admin
            .import_statuses(tokio_stream::iter(rows))
            .await?
            .into_inner();
        anyhow::ensure!(summary.rejected.is_empty(), "sample import rejected rows");
        start = end;
    }
    let secret_bytes = std::fs::read(province.config.path(&province.config.holder_secret))?;
    let secret = hufu_federation::holder::HolderSecret::new(&secret_bytes)?;
    Ok((0..n)
        .map(|i| secret.pseudonym(&sample::national_id(p, i)).to_string())
        .collect())
}

pub async fn clients(
    province: &LocalProvince,
    n: usize,
) -> anyhow::Result<Vec<StatusLookupServiceClient<Channel>>> {
    let cert = province.client_cert(Role::Terminal, "bench")?;
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(StatusLookupServiceClient::new(
            province.channel_as(&cert).await?,
        ));
    }
    Ok(out)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let build = if cfg!(debug_assertions) {
        "debug build (use --release for figures)"
    } else {
        "release build"
    };
    format!("{cores} cores, {cpu}; {build}")
}

pub async fn issue_tokens(
    province: &LocalProvince,
    ids: &[String],
    count: u64,
) -> anyhow::Result<Vec<String>> {
    let mut admin = province.admin().await?;
    let mut list = Vec::with_capacity(count as usize);
    for i in 0..count {
        let reply = admin
            .issue_code(IssueCodeRequest {
                subject: Some(issue_code_request::Subject::Holder(
                    ids[(i as usize) % ids.len()].clone(),
                )),
                ..Default::default()
            })
            .await?
            .into_inner();
        list.push(reply.token);
    }
    Ok(list)
}
