//! `hufu bench surge`: what a node does at 1x to 10x of its capacity. The
//! node runs as its own `hufu serve` process (so its memory is its own);
//! the generator offers a fixed rate (open loop: requests are sent on
//! schedule whether or not earlier ones have returned, and latency is
//! measured from the scheduled time, so overload is not under-reported).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hufu_certs::{Province, Role};
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_client::StatusLookupClient;
use tonic::transport::Channel;

use crate::bench::{BenchArgs, closed_loop, histogram, load_holders};
use crate::client::{self, ClientCert, Target};
use crate::local::{LocalProvince, free_port};

/// Requests the generator lets be outstanding before it counts further
/// sends as dropped at the caller (keeps the generator itself bounded).
const MAX_OUTSTANDING: u64 = 50_000;
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

async fn open_loop(
    rate: f64,
    duration: Duration,
    conns: &[StatusLookupClient<Channel>],
    holders: Arc<Vec<String>>,
    issuer: &str,
) -> Step {
    let outstanding = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Result<(), tonic::Code>, Duration)>();
    let started = Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut sent = 0u64;
    let mut dropped = 0u64;
    let collector = tokio::spawn(async move {
        let mut step = (0u64, 0u64, 0u64, histogram(), histogram());
        while let Some((result, latency)) = rx.recv().await {
            let micros = latency.as_micros().max(1) as u64;
            match result {
                Ok(()) => {
                    step.0 += 1;
                    let _ = step.3.record(micros);
                }
                Err(tonic::Code::ResourceExhausted) => {
                    step.1 += 1;
                    let _ = step.4.record(micros);
                }
                Err(_) => step.2 += 1,
            }
        }
        step
    });
    while sent < total {
        // Send everything whose time has come; then sleep to the next.
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            let scheduled = started + Duration::from_secs_f64(sent as f64 / rate);
            if outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                dropped += 1;
                sent += 1;
                continue;
            }
            outstanding.fetch_add(1, Ordering::Relaxed);
            let mut client = conns[sent as usize % conns.len()].clone();
            let mut request = tonic::Request::new(LookupRequest {
                issuer: issuer.to_owned(),
                holder: holders[sent as usize % holders.len()].clone(),
            });
            request.set_timeout(DEADLINE);
            let tx = tx.clone();
            let outstanding = outstanding.clone();
            tokio::spawn(async move {
                let result = client
                    .lookup(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code());
                let _ = tx.send((result, scheduled.elapsed()));
                outstanding.fetch_sub(1, Ordering::Relaxed);
            });
            sent += 1;
        }
        let next = started + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(next.into()).await;
    }
    drop(tx);
    let (ok, shed, errors, admitted, refused) = collector
        .await
        .unwrap_or_else(|_| (0, 0, 0, histogram(), histogram()));
    Step {
        offered: rate,
        ok,
        shed,
        errors,
        dropped,
        admitted,
        refused,
        elapsed: started.elapsed(),
    }
}

pub async fn run(args: &BenchArgs, steps: &[f64]) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let p = Province::parse("440000")?;
    let listen = format!("127.0.0.1:{}", free_port()?).parse()?;
    let province = LocalProvince::init_at(scratch.path(), p, listen)?;
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
        conns.push(StatusLookupClient::new(
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
        "{:>5} {:>9} {:>9} {:>6} {:>9} {:>7} {:>7} {:>9} {:>9} {:>11} {:>9}",
        "load",
        "offered/s",
        "goodput/s",
        "/cap",
        "shed/s",
        "errors",
        "dropped",
        "p50 ms",
        "p99 ms",
        "refusal p99",
        "node MiB"
    );
    for &multiple in steps {
        let rate = capacity.rate() * multiple;
        let step = open_loop(
            rate,
            Duration::from_secs(args.seconds),
            &conns,
            holders.clone(),
            &issuer,
        )
        .await;
        let secs = step.elapsed.as_secs_f64();
        let (rss, _) = node.memory_mib();
        println!(
            "{:>4}x {:>9.0} {:>9.0} {:>6.2} {:>9.0} {:>7} {:>7} {:>9.2} {:>9.2} {:>9.2}ms {:>9.0}",
            multiple,
            step.offered,
            step.ok as f64 / secs,
            step.ok as f64 / secs / capacity.rate(),
            step.shed as f64 / secs,
            step.errors,
            step.dropped,
            step.admitted.value_at_quantile(0.5) as f64 / 1000.0,
            step.admitted.value_at_quantile(0.99) as f64 / 1000.0,
            step.refused.value_at_quantile(0.99) as f64 / 1000.0,
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
