//! The operator's console in a real browser (headless Chromium over
//! WebDriver) against three provinces on loopback: the members table and
//! map, a province going down, live load charts, audit and keys pages; no
//! holder data on any page, no error in any page. Screenshots of every page
//! go to `target/console-screenshots/`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::browser::{Browser, http_get};
use hufu_certs::Province;
use hufu_node::console::status;
use hufu_node::local::LocalFederation;
use hufu_proto::v1::LookupRequest;

const BJ: &str = "110000";
const TJ: &str = "120000";
const GD: &str = "440000";
/// The replica age limit the nodes run with.
const MAX_AGE: Duration = Duration::from_secs(2);

fn p(code: &str) -> Province {
    common::province(code)
}

async fn federation(root: &std::path::Path) -> LocalFederation {
    common::logs();
    let mut fed = LocalFederation::init(root, &[p(BJ), p(TJ), p(GD)], |c| {
        c.federation.heartbeat_ms = 200;
        c.federation.max_replica_age_secs = MAX_AGE.as_secs();
        c.federation.peer_deadline_ms = 500;
        c.federation.gossip_secs = 1;
        c.audit.checkpoint_secs = 1.0;
    })
    .unwrap();
    fed.start_all().await.unwrap();
    fed
}

/// Rows of the members table whose state is one of `states`, as a script.
fn members_in(states: &[&str], count: usize) -> String {
    format!(
        "const rows = [...document.querySelectorAll('#members tbody tr')];
         return rows.length === {count} && rows.every(r => {states:?}.includes(r.dataset.state));"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_the_federation_load_audit_and_keys() {
    let root = tempfile::tempdir().unwrap();
    let mut fed = federation(root.path()).await;
    // Holders that must never appear on a page: Beijing imports them, the
    // other provinces replicate them and look them up.
    let pseudonyms = common::import_samples(fed.get(p(BJ)), 5).await;
    let national_ids: Vec<String> = (0..5)
        .map(|n| hufu_node::sample::national_id(p(BJ), n).as_str().to_owned())
        .collect();
    let console = fed.get(p(BJ)).node.as_ref().unwrap().metrics_addr.unwrap();
    let base = format!("http://{console}/console");
    let browser = Browser::start().await;

    // Federation: every member listed, the other two fresh.
    browser
        .client
        .goto(&format!("{base}/federation"))
        .await
        .unwrap();
    browser
        .wait_until(
            Duration::from_secs(20),
            "three members, the others fresh",
            &members_in(&["self", "fresh"], 3),
        )
        .await;
    browser
        .wait_until(
            Duration::from_secs(5),
            "map tiles coloured",
            "return document.querySelector('#province-map [data-province=\"440000\"]').dataset.state === 'fresh'
                && document.querySelector('#province-map [data-province=\"110000\"]').dataset.state === 'self';",
        )
        .await;
    browser.screenshot("federation").await;
    let mut pages = vec![browser.client.source().await.unwrap()];
    assert_eq!(browser.errors().await, Vec::<String>::new());

    // Load: lookups at Beijing while the load page is open.
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let mut terminal = fed.get(p(BJ)).terminal("gate").await.unwrap();
        let (running, holders) = (running.clone(), pseudonyms.clone());
        tokio::spawn(async move {
            let mut calls = 0u64;
            while running.load(Ordering::Relaxed) && calls < 20_000 {
                let holder = holders[calls as usize % holders.len()].clone();
                let request = LookupRequest {
                    issuer: BJ.into(),
                    holder,
                };
                terminal.lookup(request).await.unwrap();
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            calls
        })
    };
    browser.client.goto(&format!("{base}/load")).await.unwrap();
    browser
        .wait_until(
            Duration::from_secs(20),
            "three samples of serving calls and latency",
            "const chart = id => document.getElementById(id)?.dataset || {};
             return Number(chart('chart-calls').points) >= 3
                 && (chart('chart-calls').series || '').split(' ').includes('calls/serving')
                 && Number(chart('chart-latency').points) >= 3;",
        )
        .await;
    running.store(false, Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    browser.screenshot("load").await;
    pages.push(browser.client.source().await.unwrap());
    assert_eq!(browser.errors().await, Vec::<String>::new());

    // Audit: Beijing's checkpoints, cosigned by the other two. (Status
    // changes are audited: the next checkpoint asks both witnesses again,
    // now that every node has long been up.)
    common::import_samples(fed.get(p(BJ)), 1).await;
    browser.client.goto(&format!("{base}/audit")).await.unwrap();
    browser
        .wait_until(
            Duration::from_secs(20),
            "a checkpoint cosigned by both other members",
            "const row = document.querySelector('#checkpoints tbody tr');
             return !!row && row.children[2].textContent.includes('120000')
                 && row.children[2].textContent.includes('440000');",
        )
        .await;
    browser.screenshot("audit").await;
    pages.push(browser.client.source().await.unwrap());
    assert_eq!(browser.errors().await, Vec::<String>::new());

    // Keys: Beijing's key and both members' keys.
    browser.client.goto(&format!("{base}/keys")).await.unwrap();
    browser
        .wait_until(
            Duration::from_secs(10),
            "own and members' keys",
            "return document.querySelectorAll('#own-keys tbody tr').length === 1
                 && document.querySelectorAll('#member-keys tbody tr').length === 2;",
        )
        .await;
    browser.screenshot("keys").await;
    pages.push(browser.client.source().await.unwrap());
    assert_eq!(browser.errors().await, Vec::<String>::new());

    // What the pages are drawn from, too.
    for doc in ["federation", "load", "audit", "keys"] {
        let (code, body) = http_get(console, &format!("/console/api/{doc}.json")).await;
        assert_eq!(code, 200, "{doc}: {body}");
        pages.push(body);
    }
    for (page, holder) in pages.iter().flat_map(|page| {
        pseudonyms
            .iter()
            .chain(&national_ids)
            .map(move |h| (page, h))
    }) {
        assert!(!page.contains(holder.as_str()), "holder {holder} shown");
    }

    // Guangdong goes down: its row turns stale within the age limit.
    browser
        .client
        .goto(&format!("{base}/federation"))
        .await
        .unwrap();
    let stopped = Instant::now();
    fed.get_mut(p(GD)).stop().await.unwrap();
    browser
        .wait_until(
            MAX_AGE * 4,
            "Guangdong's row stale",
            "return document.querySelector('#members tr[data-province=\"440000\"]')?.dataset.state === 'stale';",
        )
        .await;
    let seen = stopped.elapsed();
    // The limit, plus the page's refresh period (2 s) and slack for a
    // loaded machine.
    assert!(
        seen <= MAX_AGE + Duration::from_secs(4),
        "stale after {seen:?}"
    );
    browser
        .wait_until(
            Duration::from_secs(5),
            "the others still fresh",
            "return document.querySelector('#members tr[data-province=\"120000\"]').dataset.state === 'fresh';",
        )
        .await;
    // Calls to it fail fast, and the operator sees why: the last failed
    // call (its feed, a witness request, gossip) and the endpoint it failed at.
    let gd_endpoint = fed.get(p(GD)).config.listen;
    browser
        .wait_until(
            Duration::from_secs(5),
            "Guangdong's breaker not closed, with its last error",
            &format!(
                "const cells = document.querySelector('#members tr[data-province=\"440000\"]').children;
                 return ['open', 'half-open'].includes(cells[6].textContent)
                     && cells[7].textContent.includes(' {gd_endpoint}: ');"
            ),
        )
        .await;
    browser.screenshot("federation-province-down").await;
    assert_eq!(browser.errors().await, Vec::<String>::new());

    // The same table in the terminal.
    let table = status::render(&status::fetch(console).await.unwrap());
    let line = |code: &str| {
        table
            .lines()
            .find(|l| l.starts_with(code))
            .unwrap_or_else(|| panic!("no row for {code} in\n{table}"))
            .to_owned()
    };
    assert!(line(BJ).contains(" self "), "{table}");
    assert!(line(TJ).contains(" fresh "), "{table}");
    assert!(line(GD).contains(" stale "), "{table}");
    assert!(
        table.contains("trust list v1 (threshold 2, witness quorum"),
        "{table}"
    );

    browser.close().await;
    fed.stop_all().await.unwrap();
}

#[tokio::test]
async fn the_console_serves_pages_metrics_and_the_status_table() {
    let node = common::start(BJ).await;
    let console = node.province.node.as_ref().unwrap().metrics_addr.unwrap();
    let (code, _) = http_get(console, "/console/federation").await;
    assert_eq!(code, 200);
    let (code, body) = http_get(console, "/console/nowhere").await;
    assert_eq!(code, 404);
    assert!(body.contains("/console"), "{body}");
    let (code, body) = http_get(console, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("hufu_replica_max_age_seconds"), "{body}");
    // Alone, without a trust list, the view says so.
    let table = status::render(&status::fetch(console).await.unwrap());
    assert!(table.contains("no trust list"), "{table}");
    let own = table.lines().find(|l| l.starts_with(BJ)).expect(&table);
    assert!(own.contains(" self "), "{table}");
}
