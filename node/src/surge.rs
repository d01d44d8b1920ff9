//! `hufu bench surge`: what a node does at 1x to 10x of its capacity. The
//! node runs as its own `hufu serve` process (so its memory is its own);
//! the generator offers a fixed rate (open loop: requests are sent on
//! schedule whether or not earlier ones have returned, and latency is
//! measured from the scheduled time, so overload is not under-reported).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hufu_certs::{Province, Role};
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tonic::transport::Channel;

use crate::bench::{BenchArgs, closed_loop, histogram, load_holders};
use crate::client::{self, ClientCert, Target};
use crate::local::{LocalProvince, free_port};

/// Calls a connection may have outstanding: the node's HTTP/2 stream limit.
/// Beyond it a real caller's call would wait for a stream, so the generator
/// counts it as dropped at the caller instead of queueing without bound.
const STREAMS_PER_CONNECTION: u64 = 32;
/// Every call carries this deadline, as a real caller's would.
const DEADLINE: Duration = Duration::from_secs(1);

struct Step {
    offered: f64,
    ok: u64,
    shed: u64,
    errors: u64,
    dropped: u64,
    admitted: Histogram<u64>,
    refused: Histogram<u64>,
    elapsed: Duration,
}

/// The node process; killed when dropped.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl NodeProcess {
    /// (resident now, peak resident) in MiB, from /proc.
    fn memory_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// Offers `rate` lookups a second for `duration`, spread over one worker per
/// connection. Each worker keeps its calls in flight in a `FuturesUnordered`
/// (no task per request: the generator must stay cheaper than the node).
async fn open_loop(
    rate: f64,
    duration: Duration,
    conns: &[StatusLookupServiceClient<Channel>],
    holders: Arc<Vec<String>>,
    issuer: &str,
) -> Step {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;

    let workers = conns.len().max(1);
    let per_worker = rate / workers as f64;
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for (w, client) in conns.iter().enumerate() {
        let client = client.clone();
        let holders = holders.clone();
        let issuer = issuer.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut step = (0u64, 0u64, 0u64, 0u64, 0u64, histogram(), histogram());
            let mut inflight = FuturesUnordered::new();
            let mut sent = 0u64;
            let limit = STREAMS_PER_CONNECTION;
            loop {
                let now = Instant::now();
                let due = if now >= end {
                    (per_worker * duration.as_secs_f64()) as u64
                } else {
                    (per_worker * now.duration_since(started).as_secs_f64()) as u64 + 1
                };
                while sent < due {
                    let scheduled = started + Duration::from_secs_f64(sent as f64 / per_worker);
                    sent += 1;
                    step.0 += 1;
                    if inflight.len() as u64 >= limit {
                        step.4 += 1;
                        continue;
                    }
                    let mut client = client.clone();
                    let mut request = tonic::Request::new(LookupRequest {
                        issuer: issuer.clone(),
                        holder: holders[(sent as usize * workers + w) % holders.len()].clone(),
                    });
                    request.set_timeout(DEADLINE);
                    inflight.push(async move {
                        let result = client.lookup(request).await.map(|_| ()).map_err(|s| s.code());
                        (result, scheduled.elapsed())
                    });
                }
                if now >= end && inflight.is_empty() {
                    break;
                }
                let next = started + Duration::from_secs_f64(sent as f64 / per_worker);
                let wake = if now >= end { now + DEADLINE * 2 } else { next };
                tokio::select! {
                    Some((result, latency)) = inflight.next(), if !inflight.is_empty() => {
                        let micros = latency.as_micros().max(1) as u64;
                        match result {
                            Ok(()) => { step.1 += 1; let _ = step.5.record(micros); }
                            Err(tonic::Code::ResourceExhausted) => { step.2 += 1; let _ = step.6.record(micros); }
                            Err(_) => step.3 += 1,
                        }
                    }
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
            }
            step
        }));
    }
    let mut total = Step {
        offered: rate,
        ok: 0,
        shed: 0,
        errors: 0,
        dropped: 0,
        admitted: histogram(),
        refused: histogram(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        if let Ok((_sent, ok, shed, errors, dropped, admitted, refused)) = t.await {
            total.ok += ok;
            total.shed += shed;
            total.errors += errors;
            total.dropped += dropped;
            let _ = total.admitted.add(admitted);
            let _ = total.refused.add(refused);
        }
    }
    total.elapsed = duration;
    total
}

pub async fn run(args: &BenchArgs, steps: &[f64]) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let p = Province::parse("440000")?;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut opts = crate::init::InitOptions::new(p);
    opts.listen = listen;
    opts.metrics_listen = Some(metrics_addr);
    let dir = scratch.path().join(p.to_string());
    let config_path = crate::init::init_province(&dir, &opts)?;
    let province = LocalProvince {
        province: p,
        dir,
        config: crate::config::NodeConfig::load(&config_path)?,
        node: None,
    };
    let exe = std::env::current_exe()?;
    // With two or more cores, the node gets core 0 and the generator the
    // rest (taskset, where present), so neither starves the other at random.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pin = cores >= 2 && Command::new("taskset").arg("-V").output().is_ok();
    let mut command = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    if pin {
        let _ = Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &format!("1-{}", cores - 1),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
        println!(
            "node pinned to core 0, load generator to cores 1-{}",
            cores - 1
        );
    }
    let node = NodeProcess(
        command
            .arg("serve")
            .arg("--config")
            .arg(province.dir.join("hufu.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let target = Target::with_ca_pem(&listen.to_string(), p, &province.ca_pem()?)?;
    let admin_cert = ClientCert::load(
        &province.dir.join("admin/admin.pem"),
        &province.dir.join("admin/admin.key"),
    )?;
    for _ in 0..200 {
        if client::connect(&target, &admin_cert).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The province as seen from outside: its node is the child process.
    let mut remote = province;
    remote.config.client.endpoint = listen.to_string();
    let holders = Arc::new(load_holders(&remote, 10_000).await?);
    let cert = remote.client_cert(Role::Terminal, "surge")?;
    let mut conns = Vec::new();
    for _ in 0..args.connections.max(1) * 2 {
        conns.push(StatusLookupServiceClient::new(
            client::connect(&target, &cert).await?,
        ));
    }

    // Capacity: closed loop at the configured concurrency.
    let issuer = p.to_string();
    let (c, h, i) = (conns.clone(), holders.clone(), issuer.clone());
    let capacity = closed_loop(
        Duration::from_secs(args.seconds),
        args.concurrency,
        move |k, w| {
            let mut client = c[w % c.len()].clone();
            let request = LookupRequest {
                issuer: i.clone(),
                holder: h[(k % h.len() as u64) as usize].clone(),
            };
            async move { client.lookup(request).await.is_ok() }
        },
    )
    .await;
    let base_p99 = capacity.latency.value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "capacity (closed loop, {} in flight): {:.0} lookups/s, p99 {:.2} ms; node memory {:.0} MiB",
        args.concurrency,
        capacity.rate(),
        base_p99,
        node.memory_mib().0
    );
    println!(
        "open loop, {} connections, {} s per step, deadline {:?} per call\n",
        conns.len(),
        args.seconds,
        DEADLINE
    );
    println!(
        "client view: what callers got (latency from each call's scheduled time, so it includes waiting at the caller)"
    );
    println!(
        "node view: what reached the node, from its own metrics: admitted and refused per second\n"
    );
    println!(
        "{:>5} {:>9} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>10} {:>9} {:>8}",
        "load",
        "offered/s",
        "goodput/s",
        "/cap",
        "errors",
        "dropped",
        "p50 ms",
        "p99 ms",
        "ref p99",
        "admitted/s",
        "shed/s",
        "node MiB"
    );
    for &multiple in steps {
        let rate = capacity.rate() * multiple;
        let before = node_counts(metrics_addr).await;
        let step = open_loop(
            rate,
            Duration::from_secs(args.seconds),
            &conns,
            holders.clone(),
            &issuer,
        )
        .await;
        let after = node_counts(metrics_addr).await;
        let secs = step.elapsed.as_secs_f64();
        let (rss, _) = node.memory_mib();
        println!(
            "{:>4}x {:>9.0} {:>9.0} {:>6.2} {:>8} {:>8} {:>8.2} {:>8.2} {:>8.2} | {:>10.0} {:>9.0} {:>8.0}",
            multiple,
            step.offered,
            step.ok as f64 / secs,
            step.ok as f64 / secs / capacity.rate(),
            step.errors,
            step.dropped,
            step.admitted.value_at_quantile(0.5) as f64 / 1000.0,
            step.admitted.value_at_quantile(0.99) as f64 / 1000.0,
            step.refused.value_at_quantile(0.99) as f64 / 1000.0,
            (after.0 - before.0) / secs,
            (after.1 - before.1) / secs,
            rss
        );
    }
    let (rss, peak) = node.memory_mib();
    println!(
        "\nnode resident memory now {rss:.0} MiB, peak {peak:.0} MiB; node process still alive: {}",
        std::fs::metadata(format!("/proc/{}", node.0.id())).is_ok()
    );
    println!(
        "(goodput counts answered lookups; latency is from each request's scheduled send time; the generator shares the machine with the node)"
    );
    Ok(())
}

/// (admitted, shed) serving-class request counts from the node's /metrics.
async fn node_counts(addr: std::net::SocketAddr) -> (f64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (0.0, 0.0);
    };
    let _ = tcp
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text).await;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("hufu_admitted_total{class=\"serving\"}"),
        value("hufu_shed_total{class=\"serving\"}"),
    )
}
