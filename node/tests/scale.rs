//! Scale (DESIGN.md, "Scale"; issue 17): a node's memory does not grow with
//! the volume it moves. The nodes run as `hufu serve` processes of their
//! own, so that each one's peak resident memory (`VmHWM`) is its own.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Serve, memory_kib};
use hufu_certs::Province;
use hufu_node::local::{LocalFederation, free_port};
use hufu_node::store::Store;
use hufu_proto::v1::StatusRecord;

/// Changes in the feed: enough that memory growing with them shows. Before
/// the store drained sled's replaced pages after each write, a replica grew
/// by about 3 KB a change (600 MiB and more here, in a debug build too).
const CHANGES: u64 = 200_000;

/// Changes in one batch of the feed, as the issuer serves it: the default.
const BATCH: usize = 5_000;

/// Peak resident memory either node may reach, in MiB: the process at
/// rest (about 40), the store's and the audit log's caches (64 and 16 MiB
/// by default, which sled undercounts by about half) and a few batches in
/// flight.
const BOUND_MIB: u64 = 300;

/// The replica sequence of `p` a node reports on its metrics listener.
fn replica_sequence(metrics: SocketAddr, p: Province) -> u64 {
    let Ok(mut tcp) = std::net::TcpStream::connect(metrics) else {
        return 0;
    };
    let _ = write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text);
    let wanted = format!("hufu_replica_sequence{{province=\"{p}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `n` distinct holders' red statuses of province `p`, from holder `from`.
fn records(p: Province, from: u64, n: u64) -> Vec<StatusRecord> {
    (from..from + n)
        .map(|i| {
            // Spread over the key space as pseudonyms are.
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            id[8..].copy_from_slice(&i.to_be_bytes());
            StatusRecord {
                issuer: p.to_string(),
                holder: data_encoding::BASE32_NOPAD.encode(&id),
                colour: 3,
                as_of: Some(hufu_node::status::timestamp(1_600_000_000 + i as i64)),
                last_negative_test: None,
                reason: 3,
            }
        })
        .collect()
}

/// Peak resident memory of `serve` so far, in MiB.
fn peak_mib(serve: &Serve) -> u64 {
    memory_kib(serve.pid(), "VmHWM") / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_catching_up_on_a_large_feed_stays_within_its_memory_bound() {
    let scratch = tempfile::tempdir().unwrap();
    let (gd, sn) = (common::province("440000"), common::province("610000"));
    let mut fed = LocalFederation::init(scratch.path(), &[gd, sn], |c| {
        c.federation.heartbeat_ms = 200;
        c.federation.batch_changes = BATCH;
    })
    .unwrap();
    for p in [gd, sn] {
        let lp = fed.get_mut(p);
        lp.config.metrics_listen = Some(
            format!("127.0.0.1:{}", free_port().unwrap())
                .parse()
                .unwrap(),
        );
        std::fs::write(
            lp.dir.join("hufu.toml"),
            toml::to_string(&lp.config).unwrap(),
        )
        .unwrap();
    }
    // The issuer's feed, written straight into its store before it starts.
    let sample = {
        let config = &fed.get(gd).config;
        let store = Store::open(&config.path(&config.data_dir), gd).unwrap();
        for from in (0..CHANGES).step_by(10_000) {
            store.put_many(&records(gd, from, 10_000)).await.unwrap();
        }
        assert_eq!(store.last_sequence().await, CHANGES);
        store.flush().await.unwrap();
        records(gd, CHANGES - 1, 1).pop().unwrap()
    };
    let issuer = Serve::start(
        &fed.get(gd).dir.join("hufu.toml"),
        &scratch.path().join("issuer.log"),
    );
    let replica = Serve::start(
        &fed.get(sn).dir.join("hufu.toml"),
        &scratch.path().join("replica.log"),
    );
    let metrics = fed.get(sn).config.metrics_listen.unwrap();
    // A bound for a slow debug build on a busy machine, not a timing.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let held = tokio::task::spawn_blocking(move || replica_sequence(metrics, gd))
            .await
            .unwrap();
        if held >= CHANGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica holds {held} of {CHANGES} changes after 15 minutes; see {}",
            scratch.path().join("replica.log").display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (served, caught_up) = (peak_mib(&issuer), peak_mib(&replica));
    eprintln!(
        "peak RSS: issuer serving the feed {served} MiB, replica catching up {caught_up} MiB"
    );
    drop((issuer, replica));

    // The replica holds what the issuer wrote last.
    let config = &fed.get(sn).config;
    let store = Store::open(&config.path(&config.data_dir), sn).unwrap();
    assert_eq!(store.get(gd, &sample.holder).unwrap(), Some(sample));
    assert_eq!(store.tail(gd).await.unwrap().sequence, CHANGES);
    drop(store);

    assert!(
        caught_up <= BOUND_MIB,
        "the replica reached {caught_up} MiB catching up on {CHANGES} changes (bound {BOUND_MIB})"
    );
    assert!(
        served <= BOUND_MIB,
        "the issuer reached {served} MiB serving {CHANGES} changes (bound {BOUND_MIB})"
    );
}
