//! `hufu bench federation`'s audit section: what auditing costs the hot
//! path, and the audit log's own append rate and proof sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hufu_certs::{Province, Role};
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use tonic::transport::Channel;

use super::{BenchArgs, verify_call};
use crate::loadgen::{Figures, clients, closed_loop, issue_tokens, load_holders};
use crate::output::outln;
use hufu_node::local::LocalFederation;
use hufu_node::sample;

/// A two-province federation for [`audit_cost`]: B holds a replica of A's
/// holders and is asked to verify A's codes.
struct AuditPair {
    _scratch: tempfile::TempDir,
    fed: LocalFederation,
    b: Province,
    tokens: Arc<Vec<String>>,
    conns: Vec<StatusLookupServiceClient<Channel>>,
}

impl AuditPair {
    async fn start(audit: bool) -> anyhow::Result<AuditPair> {
        let scratch = tempfile::tempdir()?;
        let (a, b) = (Province::parse("440000")?, Province::parse("610000")?);
        let mut fed = LocalFederation::init(scratch.path(), &[a, b], |c| {
            c.federation.heartbeat_ms = 200;
            c.federation.max_replica_age_secs = 5;
            c.audit.enabled = audit;
        })?;
        fed.start_all().await?;
        let holders = 2_000;
        let ids = load_holders(fed.get(a), holders).await?;
        let b_state = fed.get(b).node.as_ref().expect("running").state.clone();
        let started = Instant::now();
        while b_state.store.tail(a).await?.sequence < holders {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "replication did not finish in a minute"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let tokens = Arc::new(issue_tokens(fed.get(a), &ids, 20_000).await?);
        let conns = clients(fed.get(b), 4).await?;
        Ok(AuditPair {
            _scratch: scratch,
            fed,
            b,
            tokens,
            conns,
        })
    }

    /// The entries in B's audit log, once written.
    async fn b_log_size(&self) -> anyhow::Result<u64> {
        let state = self
            .fed
            .get(self.b)
            .node
            .as_ref()
            .expect("running")
            .state
            .clone();
        Ok(tokio::task::spawn_blocking(move || {
            let log = state.audit.log()?;
            log.flush()?;
            log.size()
        })
        .await??)
    }
}

/// What auditing costs the hot path, measured in one run: cross-province
/// verify at B (each call appends an audit entry) against a federation that
/// audits and an otherwise identical one that does not, in alternating
/// rounds (on, off, off, on) so that drift on a shared machine affects both
/// alike. Codes repeat, so verify is the cached, cheapest kind, where an
/// audit entry weighs most. Also the process's CPU time per verify, steadier
/// than throughput on a shared machine. Then the audit log alone: appends
/// per second and proof sizes.
pub(super) async fn audit_cost(args: &BenchArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let mut on = AuditPair::start(true).await?;
    let mut off = AuditPair::start(false).await?;
    // Warm up: every code verified (and cached) once in each federation.
    for pair in [&on, &off] {
        closed_loop(
            Duration::from_secs(1),
            args.concurrency,
            verify_call(pair.tokens.clone(), pair.conns.clone(), false),
        )
        .await;
    }
    let logged = on.b_log_size().await?;
    let mut rounds: [Vec<Figures>; 2] = Default::default();
    let mut cpu = [Duration::ZERO; 2];
    for audited in [true, false, false, true] {
        let pair = if audited { &on } else { &off };
        let started = process_cpu();
        let figures = closed_loop(
            duration,
            args.concurrency,
            verify_call(pair.tokens.clone(), pair.conns.clone(), false),
        )
        .await;
        cpu[usize::from(!audited)] += process_cpu().saturating_sub(started);
        rounds[usize::from(!audited)].push(figures);
    }
    let [with, without] = rounds.map(|r| {
        r.into_iter()
            .reduce(|mut sum, f| {
                sum.ok += f.ok;
                sum.errors += f.errors;
                sum.elapsed += f.elapsed;
                let _ = sum.latency.add(&f.latency);
                sum
            })
            .expect("two rounds")
    });
    with.print("Verify at B, A's codes, audit on", None);
    without.print("Verify at B, A's codes, audit off", None);
    let entries = on.b_log_size().await? - logged;
    outln!(
        "auditing costs {:.1}% of cross-province verify throughput (on / off: {:.2}); B's audit log gained {entries} entries for {} verifies",
        (1.0 - with.rate() / without.rate()) * 100.0,
        with.rate() / without.rate(),
        with.ok
    );
    let [cpu_with, cpu_without] = [(cpu[0], &with), (cpu[1], &without)]
        .map(|(cpu, f)| cpu.as_secs_f64() * 1e6 / f.ok.max(1) as f64);
    outln!(
        "process CPU per verify (node, TLS and load generator): audit on {cpu_with:.1}us, off {cpu_without:.1}us: an audit entry adds {:.1}us ({:.1}%)",
        cpu_with - cpu_without,
        (cpu_with / cpu_without - 1.0) * 100.0
    );
    on.fed.stop_all().await?;
    off.fed.stop_all().await?;
    tokio::task::spawn_blocking(audit_log_figures).await??;
    outln!();
    Ok(())
}

/// This process's CPU time, user and system, from `/proc/self/stat` (in
/// clock ticks of 10 ms); zero where there is no such file.
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let user: u64 = fields.get(11)?.parse().ok()?;
            let system: u64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The audit log alone, in a temporary sled database like a node's: appends
/// of verify entries from one thread, written and flushed, and the sizes of
/// proofs in the resulting log of a million entries.
fn audit_log_figures() -> anyhow::Result<()> {
    use hufu_federation::audit::{AnswerSource, AuditEntry, AuditLog, EntryKind};
    const ENTRIES: u64 = 1_000_000;
    let scratch = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(scratch.path().join("audit"))
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let log = AuditLog::open(db.open_tree(hufu_node::audit::LOG_TREE)?)?;
    let (a, b) = (Province::parse("440000")?, Province::parse("610000")?);
    let caller = hufu_certs::Identity::new(b, Role::Terminal, "bench")?;
    let secret = hufu_federation::holder::HolderSecret::new(&[7; 32])?;
    let holders: Vec<_> = (0..1024)
        .map(|i| secret.pseudonym(&sample::national_id(a, i)))
        .collect();
    let started = Instant::now();
    let mut appending = Duration::ZERO;
    for i in 0..ENTRIES {
        let entry = AuditEntry::new(
            1_700_000_000_000 + i,
            EntryKind::VerifyServed,
            caller.clone(),
            a,
        )
        .with_holder(holders[(i % 1024) as usize].clone())
        .with_answer("green")
        .with_source(AnswerSource::Replica);
        let t = Instant::now();
        log.append(entry)?;
        appending += t.elapsed();
    }
    log.flush()?;
    let took = started.elapsed();
    outln!(
        "audit log appends: {ENTRIES} in {:.2}s = {:.0}/s written and flushed, one thread appending ({:.0} ns a call)",
        took.as_secs_f64(),
        ENTRIES as f64 / took.as_secs_f64(),
        appending.as_nanos() as f64 / ENTRIES as f64
    );
    let n = log.size()?;
    let inclusion = [0, n / 3, n / 2, n - 1]
        .into_iter()
        .map(|i| log.inclusion_proof(i, n).map(|p| p.len()))
        .collect::<Result<Vec<_>, _>>()?;
    let consistency = [1, n / 3, n / 2 + 1, n - 1]
        .into_iter()
        .map(|m| log.consistency_proof(m, n).map(|p| p.len()))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = |hashes: &[usize]| {
        let (lo, hi) = (hashes.iter().min(), hashes.iter().max());
        format!(
            "{} to {} hashes = {} to {} bytes",
            lo.unwrap_or(&0),
            hi.unwrap_or(&0),
            lo.unwrap_or(&0) * 32,
            hi.unwrap_or(&0) * 32
        )
    };
    outln!(
        "proofs in a real log of {n} entries: inclusion {}; consistency from a smaller size {}",
        bytes(&inclusion),
        bytes(&consistency)
    );
    Ok(())
}
