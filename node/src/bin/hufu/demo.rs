//! `hufu demo`: a federation of provinces on loopback, with real
//! certificates, storage and mutual TLS, telling the story of codes crossing
//! provinces (Hufu's own and a province's existing legacy code), a status
//! change propagating, and a province going down and coming back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hufu_certs::Province;
use hufu_proto::v1::{
    Colour, ImportStatusesRequest, IssueCodeRequest, LinkCodeRequest, PutStatusRequest, Source,
    StatusInput, Verdict, VerifyRequest, VerifyResponse, issue_code_request, link_code_request,
    status_input,
};

use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tonic::transport::Channel;

use crate::output::{out, outln};
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_node::sample;
use hufu_node::status::{colour_name, now_unix, timestamp};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of provinces (3 to 34): Shaanxi, Guangdong and Tianjin first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=34))]
    pub provinces: u8,
    /// Sample holders per province (default 1000; 100 with more than five
    /// provinces, where every node replicates every other's holders).
    #[arg(long)]
    pub holders: Option<u64>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Instead: one province as this many node replicas (2 to 5) sharing a
    /// write log on a 3-server NATS JetStream cluster on loopback (needs
    /// nats-server on PATH), beside a peer province.
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=5))]
    pub replicas: Option<u8>,
}

fn colour(c: i32) -> &'static str {
    colour_name(Colour::try_from(c).unwrap_or(Colour::Unspecified))
}

fn source(s: i32) -> String {
    Source::try_from(s)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("SOURCE_")
        .to_lowercase()
}

/// "red replica 0.1s" for one verification.
fn cell(r: &VerifyResponse) -> String {
    if r.verdict != Verdict::Valid as i32 {
        return Verdict::try_from(r.verdict)
            .unwrap_or_default()
            .as_str_name()
            .to_lowercase();
    }
    let status = r.status.as_ref().map(|s| s.colour).unwrap_or(0);
    let (src, age) = match &r.provenance {
        Some(p) => (
            source(p.source),
            p.age
                .as_ref()
                .map(|a| a.seconds as f64 + a.nanos as f64 / 1e9)
                .unwrap_or(0.0),
        ),
        None => ("?".into(), 0.0),
    };
    format!("{} {} {:.1}s", colour(status), src, age)
}

fn chosen(n: u8) -> Vec<Province> {
    let first: Vec<Province> = ["610000", "440000", "120000"]
        .iter()
        .map(|c| Province::parse(c).expect("known province"))
        .collect();
    let mut out: Vec<Province> = first.clone();
    out.extend(Province::all().filter(|p| !first.contains(p)));
    out.truncate(n as usize);
    out
}

async fn import(province: &LocalProvince, holders: u64) -> anyhow::Result<u64> {
    let p = province.province;
    let now = now_unix();
    let rows: Vec<ImportStatusesRequest> = (0..holders)
        .map(|n| ImportStatusesRequest {
            line: n + 1,
            status: Some(StatusInput {
                subject: Some(status_input::Subject::NationalId(
                    sample::national_id(p, n).as_str().to_owned(),
                )),
                colour: match n {
                    n if n % 50 == 7 => Colour::Red,
                    n if n % 5 == 3 => Colour::Yellow,
                    _ => Colour::Green,
                } as i32,
                as_of: Some(timestamp(now - 3600)),
                last_negative_test: Some(timestamp(now - 20 * 3600 - (n as i64 % 60) * 3600)),
                reason: 0,
            }),
            legacy_code: String::new(),
        })
        .collect();
    let summary = province
        .admin()
        .await?
        .import_statuses(tokio_stream::iter(rows))
        .await?
        .into_inner();
    Ok(summary.accepted)
}

async fn issue(province: &LocalProvince, n: u64) -> anyhow::Result<String> {
    Ok(province
        .admin()
        .await?
        .issue_code(IssueCodeRequest {
            subject: Some(issue_code_request::Subject::NationalId(
                sample::national_id(province.province, n)
                    .as_str()
                    .to_owned(),
            )),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
}

/// One checkpoint terminal per province, connected once: a scan is then one
/// call on an open connection, as at a real checkpoint, not a certificate
/// issued and a TLS handshake made per scan.
#[derive(Default)]
struct Terminals(Mutex<HashMap<Province, StatusLookupServiceClient<Channel>>>);

impl Terminals {
    async fn verify(&self, at: &LocalProvince, token: &str) -> anyhow::Result<VerifyResponse> {
        let known = self
            .0
            .lock()
            .expect("terminals lock")
            .get(&at.province)
            .cloned();
        let mut client = match known {
            Some(client) => client,
            None => {
                let client = at.terminal("checkpoint-1").await?;
                self.0
                    .lock()
                    .expect("terminals lock")
                    .insert(at.province, client.clone());
                client
            }
        };
        Ok(client
            .verify(VerifyRequest {
                token: token.to_owned(),
                policy: None,
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    /// Drops the connection to a province whose node restarted.
    fn forget(&self, p: Province) {
        self.0.lock().expect("terminals lock").remove(&p);
    }
}

/// Waits until every running node holds every other province's feed up to
/// that province's newest change; returns how long that took.
async fn replicated(fed: &LocalFederation, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let running: Vec<_> = fed
        .provinces
        .iter()
        .filter_map(|lp| lp.node.as_ref().map(|n| (lp.province, n.state.clone())))
        .collect();
    loop {
        let mut behind = None;
        'all: for (p, state) in &running {
            let newest = state.store.last_sequence().await;
            for (q, other) in &running {
                if q != p && other.store.tail(*p).await?.sequence < newest {
                    behind = Some((*q, *p));
                    break 'all;
                }
            }
        }
        let Some((q, p)) = behind else {
            return Ok(started.elapsed());
        };
        anyhow::ensure!(
            started.elapsed() < within,
            "{q} did not replicate {p}'s feed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header(provinces: &[Province]) {
    out!("{:<22}", "code issued by");
    for p in provinces {
        out!(" {:<26}", format!("verified at {p}"));
    }
    outln!();
}

async fn matrix(
    fed: &LocalFederation,
    terminals: &Terminals,
    tokens: &[(Province, String, String)],
    only: Option<Province>,
) -> anyhow::Result<()> {
    let running: Vec<Province> = fed
        .provinces
        .iter()
        .filter(|p| p.is_running())
        .map(|p| p.province)
        .collect();
    // Wide federations get one summary line per code instead of a column
    // per province.
    let wide = running.len() > 5;
    if !wide {
        header(&running);
    }
    for (issuer, label, token) in tokens {
        if only.is_some_and(|o| o != *issuer) {
            continue;
        }
        out!("{:<22}", format!("{issuer} {label}"));
        let mut tally: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        let answers = futures::future::try_join_all(
            running
                .iter()
                .map(|at| terminals.verify(fed.get(*at), token)),
        )
        .await?;
        for r in &answers {
            if wide {
                let key = format!(
                    "{} {}",
                    colour(r.status.as_ref().map(|s| s.colour).unwrap_or(0)),
                    r.provenance
                        .as_ref()
                        .map(|p| source(p.source))
                        .unwrap_or_default()
                );
                let age = r
                    .provenance
                    .as_ref()
                    .and_then(|p| p.age.as_ref())
                    .map(|a| a.seconds as f64 + a.nanos as f64 / 1e9)
                    .unwrap_or(0.0);
                let entry = tally.entry(key).or_default();
                entry.0 += 1;
                entry.1 = entry.1.max(age);
            } else {
                out!(" {:<26}", cell(r));
            }
        }
        if wide {
            let parts: Vec<String> = tally
                .iter()
                .map(|(k, (n, age))| format!("{n} × {k} (age ≤ {age:.1}s)"))
                .collect();
            out!(
                " verified at {} provinces: {}",
                running.len(),
                parts.join(", ")
            );
        }
        outln!();
    }
    Ok(())
}

/// The demo's throwaway data. In memory where the system offers it: the
/// demo's nodes share one disk, which real provinces never do, and would
/// spend the demo queueing behind each other's flushes.
pub(crate) fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let memory = Path::new("/dev/shm");
    if memory.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("hufu-demo-")
            .tempdir_in(memory)
    {
        return Ok(dir);
    }
    tempfile::Builder::new().prefix("hufu-demo-").tempdir()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(replicas) = args.replicas {
        return crate::demo_replicas::run(replicas, args.duration).await;
    }
    let began = Instant::now();
    let scratch = scratch_dir()?;
    let codes = chosen(args.provinces);
    let big = codes.len() > 5;
    outln!(
        "Hufu demo: a federation of {} provinces on loopback (data in {})\n",
        codes.len(),
        scratch.path().display()
    );
    // Guangdong joins with the codes its residents already carry.
    let gd = codes[1];
    let mut fed = LocalFederation::init_declaring(
        scratch.path(),
        &codes,
        &[(gd, vec![sample::legacy_format()])],
        |c| {
            // All nodes share this machine's cores, which real provinces never
            // do: a wide federation restates heads and gossips less often, and
            // gives a peer the default deadline to answer.
            c.federation.heartbeat_ms = if big { 1000 } else { 200 };
            c.federation.max_replica_age_secs = if big { 5 } else { 2 };
            c.federation.peer_deadline_ms = if big { 1000 } else { 500 };
            c.federation.gossip_secs = if big { 15 } else { 2 };
        },
    )?;
    let holders = args.holders.unwrap_or(if big { 100 } else { 1000 });
    fed.start_all().await?;
    let started = began.elapsed();
    outln!(
        "{:<8} {:<16} {:<18} holders",
        "province",
        "name",
        "endpoint"
    );
    let imported =
        futures::future::try_join_all(fed.provinces.iter().map(|lp| import(lp, holders))).await?;
    for (lp, n) in fed.provinces.iter().zip(imported) {
        outln!(
            "{:<8} {:<16} {:<18} {n}",
            lp.province,
            lp.province.name(),
            lp.addr()?
        );
    }
    let filled = replicated(&fed, Duration::from_secs(120)).await?;
    outln!(
        "\ngenesis trust list v1 signed by all {n} founders; {n} nodes started in {:.1}s; every node replicates every other's status feed, all replicas full {:.1}s after the imports",
        started.as_secs_f64(),
        filled.as_secs_f64(),
        n = codes.len(),
    );

    let terminals = Terminals::default();
    let shown: Vec<Province> = codes.iter().copied().take(3).collect();
    let mut tokens = Vec::new();
    for p in &shown {
        tokens.push((*p, p.name().to_owned(), issue(fed.get(*p), 3).await?));
    }
    // Guangdong links one of its existing codes to the same holder.
    let legacy = format!("https://jkm.gd.example/c/{}", sample::legacy_code_id(0));
    fed.get(gd)
        .admin()
        .await?
        .link_code(LinkCodeRequest {
            code: legacy.clone(),
            subject: Some(link_code_request::Subject::NationalId(
                sample::national_id(gd, 3).as_str().to_owned(),
            )),
        })
        .await?;
    tokens.push((gd, "legacy code".into(), legacy.clone()));
    replicated(&fed, Duration::from_secs(30)).await?;
    outln!(
        "\n{gd} declares its existing code format in the trust list (yuekang: GD1 or a jkm.gd.example URL, then 20 base32 characters) and links {legacy} to the holder of its Hufu code; the binding travels in its feed as a hash of the code id, never the id."
    );
    outln!(
        "\n1. A code from each province, scanned at every province's own node (colour, source, replica age):"
    );
    matrix(&fed, &terminals, &tokens, None).await?;

    // 2. A downgrade propagates.
    let holder_n = 3;
    let started = Instant::now();
    fed.get(gd)
        .admin()
        .await?
        .put_status(PutStatusRequest {
            status: Some(StatusInput {
                subject: Some(status_input::Subject::NationalId(
                    sample::national_id(gd, holder_n).as_str().to_owned(),
                )),
                colour: Colour::Red as i32,
                as_of: None,
                last_negative_test: None,
                reason: hufu_proto::v1::Reason::CloseContact as i32,
            }),
        })
        .await?;
    let gd_token = tokens[1].2.clone();
    outln!(
        "\n2. {gd} marks the holder of its code red (close contact). Time until each province sees it:"
    );
    for p in codes.iter().filter(|p| **p != gd) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = terminals.verify(fed.get(*p), &gd_token).await?;
            if r.status.as_ref().map(|s| s.colour) == Some(Colour::Red as i32) {
                if !big || shown.contains(p) {
                    outln!(
                        "   {p} {:<14} {:>7.1} ms   ({})",
                        p.name(),
                        started.elapsed().as_secs_f64() * 1000.0,
                        cell(&r)
                    );
                }
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{p} did not see the change within 10s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if big {
        outln!(
            "   … and all {} others ({:.0} ms for the last)",
            codes.len() - 1,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }

    // 3. A province goes down.
    outln!(
        "\n3. {gd}'s node stops. Its codes, Hufu's and its legacy code, still verify everywhere, from replicas; the age column grows:"
    );
    fed.get_mut(gd).stop().await?;
    let max_age = fed.get(shown[0]).config.federation.max_replica_age_secs;
    tokio::time::sleep(Duration::from_secs(max_age + 1)).await;
    matrix(&fed, &terminals, &tokens, Some(gd)).await?;

    // 4. It comes back and catches up.
    fed.get_mut(gd).start().await?;
    terminals.forget(gd);
    let restarted = Instant::now();
    // Wait until every province answers for GD from a fresh replica again.
    for p in codes.iter().filter(|p| **p != gd) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = terminals.verify(fed.get(*p), &gd_token).await?;
            if r.provenance.as_ref().map(|p| p.source) == Some(Source::Replica as i32) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{p} did not catch up with {gd} within 15s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    outln!(
        "\n4. {gd} restarts; feeds resume where they stopped, and within {:.1}s every replica is fresh again:",
        restarted.elapsed().as_secs_f64()
    );
    matrix(&fed, &terminals, &tokens, Some(gd)).await?;

    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    outln!(
        "\nthe federation keeps running; Ctrl-C to stop{}",
        args.duration
            .map(|s| format!(" (or after {s}s)"))
            .unwrap_or_default()
    );
    for lp in &fed.provinces {
        let http = lp
            .node
            .as_ref()
            .and_then(|n| n.metrics_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        outln!(
            "  {} node {}  console http://{http}/console  metrics http://{http}/metrics",
            lp.province,
            lp.addr()?,
        );
    }
    match deadline {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep_until(d.into()) => {}
                _ = crate::cli::signal::shutdown_signal() => {}
            }
        }
        None => crate::cli::signal::shutdown_signal().await,
    }
    fed.stop_all().await?;
    outln!("stopped");
    Ok(())
}
