//! `hufu bench scale`: what a province of N holders costs (DESIGN.md,
//! "Scale"). Two nodes run as processes of their own, so that each one's
//! peak memory is its own: an issuer imports N holders from a CSV file with
//! `hufu status import`'s code, then a second province starts empty and
//! replicates them. Printed: the import and replication rates, bytes per
//! holder on disk at the issuer, in the replica and in the audit log, both
//! nodes' peak RSS, and Lookup and Verify rates at N, all beside the same
//! run with a small N.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hufu_certs::{Province, Role};
use hufu_node::local::{LocalFederation, LocalProvince};
use hufu_node::ports::free_port;
use hufu_node::sample;
use hufu_proto::v1::LookupRequest;

use super::footprint::Footprint;
use super::{BenchArgs, verify_call};
use crate::loadgen::{clients, closed_loop, issue_tokens};
use crate::output::outln;
use crate::surge::confine::{Confined, Confinement, usage};

/// Holders whose codes and lookups the rate figures draw from, at random
/// among all N.
const SAMPLED: u64 = 5_000;

/// What one run at N measured.
struct Figures {
    holders: u64,
    import_rate: f64,
    replication_rate: f64,
    /// Seconds from the end of the import (of the catch-up) until every
    /// status was merged into the store's buckets.
    issuer_merged_secs: f64,
    replica_merged_secs: f64,
    issuer_bytes: u64,
    audit_bytes: u64,
    replica_bytes: u64,
    issuer_peak_mib: f64,
    replica_peak_mib: f64,
    /// The issuer's peak once its import had ended, and once the replica
    /// had caught up (the peaks above include the Lookup and Verify
    /// measurements after them).
    issuer_import_peak_mib: f64,
    issuer_feed_peak_mib: f64,
    replica_catch_up_peak_mib: f64,
    lookup_rate: f64,
    verify_rate: f64,
    /// Where the bytes went, read once both nodes have stopped.
    issuer_data: Footprint,
    issuer_audit: Footprint,
    replica_data: Footprint,
}

pub async fn scale(args: &BenchArgs, holders: u64, small: u64) -> anyhow::Result<()> {
    outln!(
        "two nodes in processes of their own; sizes on disk once every status is merged into its bucket and the import settles; Lookup at the issuer and Verify of its codes at the replica over {SAMPLED} random holders, {} s each\n",
        args.seconds
    );
    let small_run = run_at(args, small).await?;
    let big = run_at(args, holders).await?;
    let row = |label: &str, f: &dyn Fn(&Figures) -> String| {
        outln!("{label:<40} {:>14} {:>14}", f(&small_run), f(&big));
    };
    row("holders", &|f| f.holders.to_string());
    row("import, rows/s", &|f| format!("{:.0}", f.import_rate));
    row("replication, changes/s", &|f| {
        format!("{:.0}", f.replication_rate)
    });
    row("merged after the import, s", &|f| {
        format!("{:.1}", f.issuer_merged_secs)
    });
    row("merged after the catch-up, s", &|f| {
        format!("{:.1}", f.replica_merged_secs)
    });
    let per = |bytes: u64, n: u64| format!("{:.0}", bytes as f64 / n as f64);
    row("issuer data, bytes/holder", &|f| {
        per(f.issuer_bytes, f.holders)
    });
    row("replica data, bytes/holder", &|f| {
        per(f.replica_bytes, f.holders)
    });
    row("issuer audit log, bytes/holder", &|f| {
        per(f.audit_bytes, f.holders)
    });
    row("issuer peak RSS, MiB", &|f| {
        format!("{:.0}", f.issuer_peak_mib)
    });
    row("  by the end of the import", &|f| {
        format!("{:.0}", f.issuer_import_peak_mib)
    });
    row("  by the end of the catch-up", &|f| {
        format!("{:.0}", f.issuer_feed_peak_mib)
    });
    row("replica peak RSS, MiB", &|f| {
        format!("{:.0}", f.replica_peak_mib)
    });
    row("  by the end of the catch-up", &|f| {
        format!("{:.0}", f.replica_catch_up_peak_mib)
    });
    row("Lookup at the issuer, calls/s", &|f| {
        format!("{:.0}", f.lookup_rate)
    });
    row("Verify at the replica, calls/s", &|f| {
        format!("{:.0}", f.verify_rate)
    });
    outln!(
        "\nwhere the bytes go at {} holders (keys and values as sled holds them):",
        big.holders
    );
    big.issuer_data.print("issuer data", big.holders);
    big.issuer_audit.print("issuer audit log", big.holders);
    big.replica_data.print("replica data", big.holders);
    let national = 1_400_000_000f64;
    outln!(
        "\nprojected to {national:.1e} holders per node (every node replicates every member): replica {:.0} GiB; a province of 127 million at its issuer {:.0} GiB data and {:.0} GiB audit log",
        national * big.replica_bytes as f64 / big.holders as f64 / (1u64 << 30) as f64,
        127e6 * big.issuer_bytes as f64 / big.holders as f64 / (1u64 << 30) as f64,
        127e6 * big.audit_bytes as f64 / big.holders as f64 / (1u64 << 30) as f64,
    );
    Ok(())
}

/// Bytes under `dir`, as allocated on disk.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries.flatten().map(|e| disk_bytes_of(&e.path())).sum()
}

/// Bytes of the file or directory at `path`, as allocated on disk.
pub fn disk_bytes_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => disk_bytes(path),
        Ok(meta) => meta.blocks() * 512,
        Err(_) => 0,
    }
}

/// Writes `n` rows of province `p` as an operator's CSV file.
fn write_csv(path: &Path, p: Province, n: u64) -> anyhow::Result<u64> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(out, "national_id,colour,as_of,last_negative_test,reason")?;
    let now = hufu_node::status::now_unix();
    let colours = ["green", "yellow", "red"];
    let reasons = ["", "close_contact", "positive_test"];
    for i in 0..n {
        let c = (i % 3) as usize;
        writeln!(
            out,
            "{},{},{},{},{}",
            sample::national_id(p, i).as_str(),
            colours[c],
            now - 3600 - (i % 86_400) as i64,
            now - 7200,
            reasons[c]
        )?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// Starts `province`'s node as a process of its own.
async fn spawn(province: &LocalProvince, log: &Path) -> anyhow::Result<Confined> {
    let config = province.dir.join("hufu.toml");
    let node = Confinement::unconfined().spawn(
        &std::env::current_exe()?,
        &["serve", "--config", &config.to_string_lossy()],
        log,
    )?;
    let target = province.target()?;
    let admin = province.client_cert(Role::Admin, "bench")?;
    for _ in 0..600 {
        if hufu_node::client::connect(&target, &admin).await.is_ok() {
            return Ok(node);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "the node of {} did not come up: see {}",
        province.province,
        log.display()
    )
}

/// The changes of other provinces a node has stored, from its metrics: a
/// counter moved at every batch applied, where `hufu_replica_sequence` is
/// refreshed every 2 s (timed by that gauge, a catch-up of 1,000,000 came
/// out anywhere from 90,000 to 230,000 changes/s from run to run).
async fn changes_applied(metrics: std::net::SocketAddr) -> u64 {
    let Ok(text) = crate::surge::scrape(metrics).await else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("hufu_feed_changes_applied_total "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .next()
        .unwrap_or(0)
}

/// Waits until the node scraped at `metrics` holds no status unmerged
/// (its gauge is refreshed every 2 s); returns the seconds it took.
async fn merged(metrics: std::net::SocketAddr) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let text = crate::surge::scrape(metrics).await.unwrap_or_default();
        let unmerged = text
            .lines()
            .find(|l| l.starts_with("hufu_store_unmerged "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if unmerged == Some(0.0) {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "statuses were not merged in an hour"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_at(args: &BenchArgs, n: u64) -> anyhow::Result<Figures> {
    let scratch = tempfile::tempdir()?;
    let (a, b) = (Province::parse("440000")?, Province::parse("610000")?);
    let mut fed = LocalFederation::init(scratch.path(), &[a, b], |c| {
        c.federation.heartbeat_ms = 500;
    })?;
    for p in [a, b] {
        let lp = fed.get_mut(p);
        lp.config.metrics_listen = Some(format!("127.0.0.1:{}", free_port()?).parse()?);
        lp.config.client.endpoint = lp.config.listen.to_string();
        std::fs::write(lp.dir.join("hufu.toml"), toml::to_string(&lp.config)?)?;
    }
    let csv = scratch.path().join("statuses.csv");
    let size = write_csv(&csv, a, n)?;

    // The import, into the issuer alone.
    let issuer = spawn(fed.get(a), &scratch.path().join("issuer.log")).await?;
    let channel = fed.get(a).channel(Role::Admin, "bench-import").await?;
    let reader = hufu_node::import::Reader::open(&csv, None)?;
    let started = Instant::now();
    let outcome = hufu_node::import::send(reader, size, channel, "statuses.csv").await?;
    let import_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        outcome.accepted == n,
        "the import stored {} rows of {n}",
        outcome.accepted
    );
    let config = &fed.get(a).config;
    let issuer_import_peak_mib = usage(issuer.pid()).peak_rss_mib;
    let issuer_merged_secs = merged(config.metrics_listen.context("metrics address")?).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let issuer_bytes = disk_bytes(&config.path(&config.data_dir));
    let audit_bytes = disk_bytes(&config.audit_dir());

    // The replica, from empty.
    let metrics = fed
        .get(b)
        .config
        .metrics_listen
        .context("metrics address")?;
    let started = Instant::now();
    let replica = spawn(fed.get(b), &scratch.path().join("replica.log")).await?;
    let mut first: Option<(Instant, u64)> = None;
    loop {
        // The replica starts empty and replicates the issuer alone.
        let seq = changes_applied(metrics).await;
        if first.is_none() && seq > 0 {
            first = Some((Instant::now(), seq));
        }
        if seq >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "replication did not finish in an hour"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Timed from the first batch held to the last, apart from the
    // replica's start-up; from its start when one look saw them all.
    let replication_rate = match first {
        Some((t0, s0)) if s0 < n => (n - s0) as f64 / t0.elapsed().as_secs_f64(),
        _ => n as f64 / started.elapsed().as_secs_f64(),
    };
    let issuer_feed_peak_mib = usage(issuer.pid()).peak_rss_mib;
    let replica_catch_up_peak_mib = usage(replica.pid()).peak_rss_mib;
    let replica_merged_secs = merged(metrics).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replica_config = &fed.get(b).config;
    let replica_bytes = disk_bytes(&replica_config.path(&replica_config.data_dir));

    // Rates at N: holders drawn at random from all N.
    let secret_bytes = std::fs::read(config.path(&config.holder_secret))?;
    let secret = hufu_federation::holder::HolderSecret::new(&secret_bytes)?;
    let ids: Vec<String> = (0..SAMPLED.min(n))
        .map(|k| {
            let i = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % n;
            secret.pseudonym(&sample::national_id(a, i)).to_string()
        })
        .collect();
    let ids = Arc::new(ids);
    let duration = Duration::from_secs(args.seconds);
    let conns = clients(fed.get(a), args.connections.unwrap_or(4)).await?;
    let issuer_name = a.to_string();
    let (c, list) = (conns.clone(), ids.clone());
    let lookup = closed_loop(duration, args.concurrency, move |k, w| {
        let mut client = c[w % c.len()].clone();
        let holder = list[(k % list.len() as u64) as usize].clone();
        let issuer = issuer_name.clone();
        async move {
            client
                .lookup(LookupRequest { issuer, holder })
                .await
                .is_ok()
        }
    })
    .await;
    let tokens = Arc::new(issue_tokens(fed.get(a), &ids, 20_000).await?);
    let at_replica = clients(fed.get(b), args.connections.unwrap_or(4)).await?;
    let verify = closed_loop(
        duration,
        args.concurrency,
        verify_call(tokens, at_replica, false),
    )
    .await;
    let (issuer_peak_mib, replica_peak_mib) = (
        usage(issuer.pid()).peak_rss_mib,
        usage(replica.pid()).peak_rss_mib,
    );
    // Stopped, so that their databases can be opened here.
    drop((issuer, replica));
    let figures = Figures {
        holders: n,
        import_rate: n as f64 / import_secs,
        replication_rate,
        issuer_merged_secs,
        replica_merged_secs,
        issuer_bytes,
        audit_bytes,
        replica_bytes,
        issuer_peak_mib,
        replica_peak_mib,
        issuer_import_peak_mib,
        issuer_feed_peak_mib,
        replica_catch_up_peak_mib,
        lookup_rate: lookup.rate(),
        verify_rate: verify.rate(),
        issuer_data: Footprint::of(&config.path(&config.data_dir))?,
        issuer_audit: Footprint::of(&config.audit_dir())?,
        replica_data: Footprint::of(&replica_config.path(&replica_config.data_dir))?,
    };
    Ok(figures)
}
