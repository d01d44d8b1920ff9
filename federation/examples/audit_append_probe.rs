//! THROWAWAY probe: where audit appends spend time. Delete before commit.
use hufu_certs::{Identity, Province, Role};
use hufu_federation::audit::{AnswerSource, AuditEntry, AuditLog, EntryKind};
use hufu_federation::holder::{HolderSecret, NationalId};
use std::time::{Duration, Instant};

fn ticks() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = t.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let cpu: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        out.push((comm, cpu));
    }
    out
}
fn by_comm(v: &[(String, u64)]) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for (c, t) in v {
        let k = if c.starts_with("sled-io") {
            "sled-io".to_string()
        } else {
            c.clone()
        };
        *m.entry(k).or_insert(0) += t;
    }
    m
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or("burst".into());
    let n: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(200_000);
    let rate: u64 = std::env::args()
        .nth(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(15_000);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("a"))
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap();
    let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
    let secret = HolderSecret::new(&[7u8; 32]).unwrap();
    let holders: Vec<_> = (0..100)
        .map(|i| {
            secret.pseudonym(
                &NationalId::with_check_character(&format!("110105194912{i:05}")).unwrap(),
            )
        })
        .collect();
    let caller =
        Identity::new(Province::parse("610000").unwrap(), Role::Terminal, "bench").unwrap();
    let entries: Vec<AuditEntry> = (0..n)
        .map(|i| {
            AuditEntry::new(
                1_700_000_000_000 + i,
                EntryKind::VerifyServed,
                caller.clone(),
                Province::parse("440000").unwrap(),
            )
            .with_holder(holders[(i % 100) as usize].clone())
            .with_answer("green")
            .with_source(AnswerSource::Replica)
        })
        .collect();
    let t_enc = Instant::now();
    for e in entries.iter().take(20000) {
        std::hint::black_box(e.encode().unwrap());
    }
    println!(
        "encode: {:.0} ns/entry",
        t_enc.elapsed().as_nanos() as f64 / 20000.0
    );
    let before = by_comm(&ticks());
    let start = Instant::now();
    let mut in_append = Duration::ZERO;
    match mode.as_str() {
        "burst" => {
            for e in &entries {
                let t = Instant::now();
                log.append(e).unwrap();
                in_append += t.elapsed();
            }
        }
        _ => {
            // paced: `rate` per second in steps of 1 ms
            let per_ms = (rate / 1000).max(1);
            let mut i = 0usize;
            let mut next = Instant::now();
            while i < entries.len() {
                for _ in 0..per_ms {
                    if i < entries.len() {
                        let t = Instant::now();
                        log.append(&entries[i]).unwrap();
                        in_append += t.elapsed();
                        i += 1;
                    }
                }
                next += Duration::from_millis(1);
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        }
    }
    let queued = start.elapsed();
    log.flush().unwrap();
    let total = start.elapsed();
    let after = by_comm(&ticks());
    assert_eq!(log.size().unwrap(), n);
    println!(
        "{mode}: {n} entries; caller {:.0} ns/append; queued in {:.2}s; written+flushed in {:.2}s = {:.0}/s",
        in_append.as_nanos() as f64 / n as f64,
        queued.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            println!(
                "  cpu {k:<16} {:>6} ms = {:.0} ns/entry",
                d * 10,
                d as f64 * 1e7 / n as f64
            );
        }
    }
    let t = Instant::now();
    let got = log.entries(0, n).unwrap();
    println!(
        "entries(0,n): {} in {:.0} ms",
        got.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    for i in 0..1000u64 {
        std::hint::black_box(log.inclusion_proof(i * (n / 1000), n).unwrap());
    }
    println!("inclusion proof: {:.1} us", t.elapsed().as_secs_f64() * 1e3);
}
