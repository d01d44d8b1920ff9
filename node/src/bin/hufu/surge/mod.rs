//! `hufu bench surge`: what a node does when thousands of callers, each on
//! its own connection, offer it 0.5x to 10x of its capacity and never back
//! off. The node runs as its own `hufu serve` process held to a CPU share
//! ([`confine`]), so that one machine can offer ten times what it serves;
//! the load is open loop with a deadline per call ([`load`]); and a bare
//! tonic server ([`echo`]) runs the same steps under identical conditions
//! as the baseline.

mod capacity;
pub(crate) mod confine;
mod cores;
mod echo;
mod load;
mod side;
mod table;
mod timeline;

use std::sync::Arc;
use std::time::Duration;

use crate::output::outln;
use anyhow::Context;
use hufu_certs::{Province, Role};
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{LookupRequest, VerifyRequest};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub use echo::echo_server;
pub use load::Behaviour;

use crate::loadgen::{issue_tokens, load_holders};
use capacity::Over;
use confine::{Confined, Confinement, GeneratorCores};
use hufu_node::client::{self, ClientCert, Target};
use hufu_node::local::LocalFederation;
use hufu_node::ports::free_port;
use load::{Call, Callers, open_loop};
use side::SideTraffic;
pub(crate) use table::scrape;
use table::{NAMED, print_header, print_row, sample, view};
use timeline::Timeline;

#[derive(Debug, Clone, clap::Args)]
pub struct SurgeArgs {
    /// Offered-load multiples of capacity, in order.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,5,10,0.5")]
    pub steps: Vec<f64>,
    /// The node's CPU share, in percent of one core (cgroup v1 quota; 100:
    /// unlimited).
    #[arg(long, default_value_t = 10)]
    pub node_cpu_percent: u32,
    /// Deadline of every call, in milliseconds, from its scheduled time.
    #[arg(long, default_value_t = 1000)]
    pub deadline_ms: u64,
    /// Callers' behaviour; both by default.
    #[arg(long, value_enum)]
    pub clients: Option<Behaviour>,
    /// What the callers ask: lookups, verification of codes (the node's
    /// verified-code cache off, so every call checks a signature), or both
    /// in turn.
    #[arg(long, value_enum, default_value = "lookup")]
    pub call: SurgeCall,
    /// Run the bare tonic echo baseline too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
    /// Where the load generator runs: on every core, the node's too, in
    /// what the node leaves of it (`all`), or on the cores other than the
    /// node's (`others`).
    #[arg(long, value_enum, default_value = "all")]
    pub generator_cores: GeneratorCores,
    /// Holders at the node.
    #[arg(long, default_value_t = 2_000)]
    pub holders: u64,
    /// A setting of the node's config for this run, as `section.key=value`
    /// (for example `limits.max_concurrent_streams=8`); repeatable, to
    /// measure one lever at a time.
    #[arg(long = "node-config", value_name = "SECTION.KEY=VALUE")]
    pub node_config: Vec<String>,
    /// Status changes an admin writes a second, beside the capacity
    /// measurement and every step, each on its own schedule (open loop,
    /// 1 s deadline), so that every phase carries the same writes.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub writes_per_sec: u64,
    /// Also append the node's places to this file every 250 ms,
    /// tab-separated (table, phase, seconds, places, connections served,
    /// paused, waiting, scheduling delay, and the calls that reached the
    /// node, those cancelled there and the stream-limit frames it sent, a
    /// second): how each step's row came about.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<std::path::PathBuf>,
}

/// `config` with `settings` (`section.key=value`, the value in TOML) applied.
fn patched(config: &hufu_node::config::NodeConfig, settings: &[String]) -> anyhow::Result<String> {
    let mut doc: toml::Table = toml::from_str(&toml::to_string(config)?)?;
    for setting in settings {
        let (path, value) = setting
            .split_once('=')
            .with_context(|| format!("--node-config {setting:?}: expected section.key=value"))?;
        let (section, key) = path
            .split_once('.')
            .with_context(|| format!("--node-config {setting:?}: expected section.key=value"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()));
        doc.entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("--node-config {setting:?}: {section} is not a section"))?
            .insert(key.to_owned(), value);
    }
    let text = toml::to_string(&doc)?;
    // The result must still be a valid config.
    toml::from_str::<hufu_node::config::NodeConfig>(&text)
        .with_context(|| format!("--node-config {settings:?}"))?;
    Ok(text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SurgeCall {
    Lookup,
    Verify,
    /// Lookups and verifications, one each in turn.
    Mixed,
}

/// How long each measurement lasts, and how the callers are spread, from
/// `hufu bench`'s common options.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub seconds: u64,
    /// Calls in flight when capacity is measured (`--concurrency`).
    pub concurrency: usize,
    /// Connections (default 1,000).
    pub connections: Option<usize>,
}

impl SurgeArgs {
    /// Worker threads the process's runtime should have for this run.
    pub fn runtime_threads(&self) -> Option<usize> {
        confine::generator_threads(self.generator_cores)
    }
}

pub async fn run(args: Shape, surge: &SurgeArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let (p, peer) = (Province::parse("440000")?, Province::parse("610000")?);
    // Two provinces: the node under test, and a peer that replicates its
    // feed all through the surge.
    let mut fed = LocalFederation::init(scratch.path(), &[p, peer], |c| {
        c.federation.heartbeat_ms = 500;
        if surge.call != SurgeCall::Lookup {
            // Every verification checks a signature.
            c.codes.cache_entries = 0;
        }
    })?;
    for lp in [p, peer] {
        let lp = fed.get_mut(lp);
        lp.config.metrics_listen = Some(format!("127.0.0.1:{}", free_port()?).parse()?);
        lp.config.client.endpoint = lp.config.listen.to_string();
        let settings: &[String] = if lp.province == p {
            &surge.node_config
        } else {
            &[]
        };
        std::fs::write(lp.dir.join("hufu.toml"), patched(&lp.config, settings)?)?;
    }
    let province = fed.get(p);
    let listen = province.config.listen;
    let metrics_addr = province.config.metrics_listen;

    let confinement = Confinement::new("hufu-surge", Some(surge.node_cpu_percent));
    let generator = confinement.place_self(surge.generator_cores);
    outln!("node: {}; {generator}", confinement.describe());
    if !surge.node_config.is_empty() {
        outln!("node settings: {}", surge.node_config.join(", "));
    }
    for note in &confinement.notes {
        outln!("note: {note}");
    }
    let connections = args.connections.unwrap_or(1000).max(1);
    let deadline = Duration::from_millis(surge.deadline_ms);
    let seconds = Duration::from_secs(args.seconds);
    outln!(
        "open loop over {connections} mutual-TLS connections, deadline {} ms per call from its scheduled time, {} s per step",
        surge.deadline_ms,
        args.seconds
    );
    outln!(
        "meanwhile an admin writes {} status changes a second (open loop) and province {peer} replicates them from the node's feed\n",
        surge.writes_per_sec
    );

    let exe = std::env::current_exe()?;
    let config_arg = province
        .dir
        .join("hufu.toml")
        .to_string_lossy()
        .into_owned();
    let target = Target::with_ca_pem(&listen.to_string(), p, &province.ca_pem()?)?;
    let terminal = province.client_cert(Role::Terminal, "surge")?;
    let behaviours = match surge.clients {
        Some(b) => vec![b],
        None => vec![Behaviour::Naive, Behaviour::Hufu],
    };

    {
        let mut node = confinement.spawn(
            &exe,
            &["serve", "--config", &config_arg],
            &scratch.path().join("node.log"),
        )?;
        // The peer shares the load generator's cores (it inherits them).
        let peer_config = fed.get(peer).dir.join("hufu.toml");
        let _peer = Confinement::unconfined().spawn(
            &exe,
            &["serve", "--config", &peer_config.to_string_lossy()],
            &scratch.path().join("peer.log"),
        )?;
        let admin = province.client_cert(Role::Admin, "surge-admin")?;
        wait_up(&target, &admin).await?;
        let holders = Arc::new(load_holders(province, surge.holders).await?);
        let call = match surge.call {
            SurgeCall::Lookup => lookup_call(holders.clone(), p),
            SurgeCall::Verify => {
                let tokens = issue_tokens(province, &holders, 2_000).await?;
                verify_call(Arc::new(tokens))
            }
            SurgeCall::Mixed => {
                let tokens = issue_tokens(province, &holders, 2_000).await?;
                let (lookup, verify) = (
                    lookup_call(holders.clone(), p),
                    verify_call(Arc::new(tokens)),
                );
                Arc::new(move |channel: Channel, k: u64, left: Duration| {
                    if k.is_multiple_of(2) {
                        lookup(channel, k / 2, left)
                    } else {
                        verify(channel, k / 2, left)
                    }
                })
            }
        };
        let side = SideTraffic {
            admin: AdminServiceClient::new(client::connect(&target, &admin).await?),
            per_sec: surge.writes_per_sec,
            holders,
            node_metrics: metrics_addr,
            peer_metrics: fed.get(peer).config.metrics_listen,
        };
        let conns = dial(&target, &terminal, connections).await?;
        for behaviour in &behaviours {
            let title =
                format!("hufu node, {behaviour:?} clients, {:?}", surge.call).to_lowercase();
            let run = Run {
                args,
                surge,
                seconds,
                deadline,
                behaviour: *behaviour,
                conns: &conns,
                call: &call,
                side: Some(&side),
            };
            run.steps(&title, &mut node).await?;
        }
    }

    if surge.baseline {
        let mut echo = confinement.spawn(
            &exe,
            &["bench", "echo-server", "--config", &config_arg],
            &scratch.path().join("echo.log"),
        )?;
        wait_up(&target, &terminal).await?;
        let conns = dial(&target, &terminal, connections).await?;
        let call: Call = Arc::new(|channel: Channel, _k, _left| {
            Box::pin(async move {
                HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|_| ())
            })
        });
        let run = Run {
            args,
            surge,
            seconds,
            deadline,
            behaviour: Behaviour::Naive,
            conns: &conns,
            call: &call,
            side: None,
        };
        run.steps(
            "baseline: bare tonic echo (health check; tonic's own mutual TLS and defaults), naive clients",
            &mut echo,
        )
        .await?;
    }
    outln!(
        "node/s: calls HTTP/2 handed to the node a second (every caller's: terminals', the admin's, the peer's); canc/s: of those, calls their callers cancelled before the node answered; goodput: OK answers within the deadline; /cap: goodput over the closed-loop capacity measured just before; p50/p99: latency of OK answers from their scheduled time; held: calls a Hufu client did not send (push-back, throttling); handshake: full/resumed TLS handshakes at the node; cpu%: of one core; gen%: the load generator's CPU; full s: seconds of the step in which the load generator's cores were at least 95% busy (sampled every 250 ms; a step with many measures the generator more than the node); admin: status writes acknowledged/failed during the step; adm ms: p99 latency of the acknowledged ones; lag: changes written but not yet at the peer when the step ended"
    );
    Ok(())
}

/// The least latency that counts as served as usual after a surge: below
/// it, a first step that ran very fast would make the scheduler's and the
/// network's ordinary jitter count as a surge's tail.
const MIN_PROMPT: Duration = Duration::from_millis(50);
/// Closed-loop windows the capacity is the mean of.
const CAPACITY_WINDOWS: u64 = 2;

fn lookup_call(holders: Arc<Vec<String>>, p: Province) -> Call {
    let issuer = p.to_string();
    Arc::new(move |channel: Channel, k: u64, left: Duration| {
        let mut request = tonic::Request::new(LookupRequest {
            issuer: issuer.clone(),
            holder: holders[(k as usize) % holders.len()].clone(),
        });
        request.set_timeout(left);
        Box::pin(async move {
            StatusLookupServiceClient::new(channel)
                .lookup(request)
                .await
                .map(|_| ())
        })
    })
}

fn verify_call(tokens: Arc<Vec<String>>) -> Call {
    Arc::new(move |channel: Channel, k: u64, left: Duration| {
        let mut request = tonic::Request::new(VerifyRequest {
            token: tokens[(k as usize) % tokens.len()].clone(),
            ..Default::default()
        });
        request.set_timeout(left);
        Box::pin(async move {
            StatusLookupServiceClient::new(channel)
                .verify(request)
                .await
                .map(|_| ())
        })
    })
}

async fn wait_up(target: &Target, cert: &ClientCert) -> anyhow::Result<()> {
    for _ in 0..400 {
        if client::connect(target, cert).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "the server under test did not come up at {}",
        target.endpoint
    )
}

/// `n` connections, each with its own TLS session, dialled a few at a time.
async fn dial(target: &Target, cert: &ClientCert, n: usize) -> anyhow::Result<Vec<Channel>> {
    use futures::StreamExt;
    let dialled: Vec<anyhow::Result<Channel>> = futures::stream::iter(0..n)
        .map(|_| client::connect(target, cert))
        .buffered(16)
        .collect()
        .await;
    dialled
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()
        .context("dialling the surge's connections")
}

/// One table of the surge: a server, its callers and what they ask.
struct Run<'a> {
    args: Shape,
    surge: &'a SurgeArgs,
    seconds: Duration,
    deadline: Duration,
    behaviour: Behaviour,
    conns: &'a [Channel],
    call: &'a Call,
    side: Option<&'a SideTraffic>,
}

impl Run<'_> {
    /// Capacity, then every step of the surge, printed as a table.
    async fn steps(&self, title: &str, server: &mut Confined) -> anyhow::Result<()> {
        // The node's places every 250 ms, if asked for (the bare echo has
        // no metrics), each row named by the phase it falls in.
        let metrics = self.side.and_then(|s| s.node_metrics);
        let timeline = match (&self.surge.timeline, metrics) {
            (Some(path), Some(addr)) => Some(
                Timeline::start(path, title, addr)
                    .with_context(|| format!("--timeline {}", path.display()))?,
            ),
            _ => None,
        };
        let phase = |name: &str| {
            if let Some(timeline) = &timeline {
                timeline.phase(name);
            }
        };
        phase("capacity");
        let in_flight = self.args.concurrency.max(1);
        let capacity = self.capacity(title, in_flight, &phase).await;
        print_header();
        let mut others = std::collections::BTreeMap::new();
        let mut messages = std::collections::BTreeMap::<String, String>::new();
        let mut writes_failed = std::collections::BTreeMap::<String, u64>::new();
        // What counts as served as usual: set by the first step (below
        // capacity, in the default steps), until then the deadline.
        let mut prompt = self.deadline;
        let (mut peak, mut recovery) = (0.0f64, None);
        // Steps whose calls the generator could not all send in time.
        let mut behind = Vec::new();
        for (i, &multiple) in self.surge.steps.iter().enumerate() {
            phase(&format!("step {} ({multiple}x)", i + 1));
            let before = view(server, metrics).await;
            let me_before = confine::usage(std::process::id());
            let watch = cores::Watch::start(cores::own());
            let started = std::time::Instant::now();
            let callers = Callers {
                deadline: self.deadline,
                prompt,
                behaviour: self.behaviour,
            };
            let load = open_loop(
                capacity * multiple,
                self.seconds,
                callers,
                self.conns,
                self.call.clone(),
            );
            let (step, writes) = match self.side {
                Some(side) => {
                    let (step, writes) =
                        tokio::join!(load, side.write(self.seconds, i as u64 * 100_000));
                    (step, Some(writes))
                }
                None => (load.await, None),
            };
            let after = view(server, metrics).await;
            let me_after = confine::usage(std::process::id());
            let wall = started.elapsed().as_secs_f64();
            let full = watch.full_secs();
            let side = match (&writes, self.side) {
                (Some(writes), Some(side)) => Some((writes, side.lag().await)),
                _ => None,
            };
            print_row(
                multiple,
                capacity,
                &step,
                (&before, &after),
                ((me_after.cpu_secs - me_before.cpu_secs) / wall, full),
                wall,
                side,
            );
            if i == 0 {
                let p99 = Duration::from_micros(step.latency.value_at_quantile(0.99));
                prompt = (p99 * 2).max(MIN_PROMPT).min(self.deadline);
            } else if i + 1 == self.surge.steps.len() && multiple < peak {
                recovery = Some((multiple, step.recovered_after()));
            }
            peak = peak.max(multiple);
            if step.generator_fell_behind() {
                let late = step.late_at_caller();
                behind.push(format!(
                    "{multiple}x ({late} of {} calls, {:.0}%)",
                    step.offered,
                    100.0 * late as f64 / step.offered as f64
                ));
            }
            for (code, n) in &step.codes {
                *others.entry(code.clone()).or_insert(0) += n;
            }
            for (code, n) in writes.iter().flat_map(|w| &w.failed) {
                *writes_failed.entry(code.clone()).or_insert(0) += n;
            }
            for (code, message) in &step.messages {
                messages
                    .entry(code.clone())
                    .or_insert_with(|| message.clone());
            }
        }
        if !behind.is_empty() {
            outln!(
                "the load generator fell behind its own schedule at {}: calls that came due a whole deadline late were never sent (`late at caller`); those rows measure this machine's generator as much as the server (a smaller --node-cpu-percent lowers what the steps ask of it)",
                behind.join(", ")
            );
        }
        // The same capacity once more: a shared machine's speed can drift
        // within minutes, and a ratio above is only as good as its
        // denominator.
        phase("capacity again");
        let again = match self.side {
            Some(side) => {
                tokio::join!(
                    self.closed(in_flight, Over::Few),
                    side.write(self.seconds, 900_000)
                )
                .0
            }
            None => self.closed(in_flight, Over::Few).await,
        };
        outln!(
            "capacity again after the steps ({in_flight} calls in flight, one window): {:.0}/s ({:.2} of the capacity above)",
            again.rate(),
            again.rate() / capacity
        );
        let usage = server.usage();
        others.retain(|code, _| !NAMED.contains(&code.as_str()));
        outln!(
            "other replies: {}",
            if others.is_empty() {
                "none".to_string()
            } else {
                others
                    .iter()
                    .map(|(code, n)| match messages.get(code) {
                        Some(m) => format!("{code} {n} (\"{m}\")"),
                        None => format!("{code} {n}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        if self.side.is_some() {
            outln!(
                "admin writes failed: {}",
                if writes_failed.is_empty() {
                    "none".to_string()
                } else {
                    writes_failed
                        .iter()
                        .map(|(code, n)| format!("{code} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        if let Some((multiple, after)) = recovery {
            let normal = format!(
                "every {} ms from then on, 99% of the calls scheduled in it answered OK within {} ms: twice the first step's p99, at least {} ms",
                load::SLICE.as_millis(),
                prompt.as_millis(),
                MIN_PROMPT.as_millis()
            );
            match after {
                Some(after) => outln!(
                    "back to {multiple}x: served as usual {:.2} s after the surge ({normal})",
                    after.as_secs_f64()
                ),
                None => outln!(
                    "back to {multiple}x: not served as usual within the step's {} s ({normal})",
                    self.seconds.as_secs()
                ),
            }
        }
        outln!(
            "server alive: {}, peak resident memory {:.0} MiB\n",
            server.alive(),
            usage.peak_rss_mib
        );
        Ok(())
    }
}
