//! Admission control with a small limit: a burst beyond it is refused with
//! RESOURCE_EXHAUSTED and a retry push-back while admitted calls succeed;
//! federation traffic is still admitted while bulk admin work is refused;
//! the node's tasks and memory return to normal afterwards.

mod common;

use std::time::Duration;

use hufu_certs::Role;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{ImportStatusesRequest, LookupRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn in_flight(p: &LocalProvince) -> i64 {
    p.node.as_ref().unwrap().state.metrics.in_flight.get()
}

async fn wait_in_flight(p: &LocalProvince, n: i64) {
    for _ in 0..500 {
        if in_flight(p) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("in flight is {}, expected {n}", in_flight(p));
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_by_class_and_the_node_recovers() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    gd.config.limits.max_in_flight = 10;
    gd.config.limits.retry_pushback_ms = 250;
    gd.start().await.unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);
    let lookup = || LookupRequest {
        issuer: "440000".into(),
        holder: holder.clone(),
    };
    // Every connection the test uses, made (and used once) up front, so the
    // task count below measures the node, not new connections.
    let admin = gd.admin().await.unwrap();
    let mut terminal = gd.terminal("gate").await.unwrap();
    terminal.lookup(lookup()).await.unwrap();
    let channel = gd.channel(Role::Terminal, "probe").await.unwrap();
    StatusLookupServiceClient::new(channel.clone())
        .lookup(lookup())
        .await
        .unwrap();
    let mut node = StatusLookupServiceClient::new(gd.channel(Role::Node, "node-2").await.unwrap());
    node.lookup(lookup()).await.unwrap();
    admin
        .clone()
        .get_status(hufu_proto::v1::GetStatusRequest {
            subject: Some(hufu_proto::v1::get_status_request::Subject::Holder(
                holder.clone(),
            )),
        })
        .await
        .unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss_kib();

    // Bulk admin work may fill half the limit: five open imports.
    let mut holds = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = mpsc::channel::<ImportStatusesRequest>(1);
        let mut admin = admin.clone();
        calls.push(tokio::spawn(async move {
            admin
                .import_statuses(ReceiverStream::new(rx))
                .await
                .map(|_| ())
        }));
        holds.push(tx);
    }
    wait_in_flight(&gd, 5).await;
    let (_tx, rx) = mpsc::channel::<ImportStatusesRequest>(1);
    let err = admin
        .clone()
        .import_statuses(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.metadata().get("grpc-retry-pushback-ms").unwrap(), "250");
    assert!(
        err.message().contains("retry after 250 ms"),
        "{}",
        err.message()
    );

    // Terminals are still served.
    terminal.lookup(lookup()).await.expect("admitted");

    // Serving calls may fill 90%: four open reflection streams fill it.
    let mut reflections = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = mpsc::channel(1);
        let mut client =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
                channel.clone(),
            );
        calls.push(tokio::spawn(async move {
            client
                .server_reflection_info(ReceiverStream::new(rx))
                .await
                .map(|_| ())
        }));
        reflections.push(tx);
    }
    wait_in_flight(&gd, 9).await;
    let err = terminal.lookup(lookup()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // A node's lookup is federation traffic: still admitted.
    node.lookup(lookup())
        .await
        .expect("federation traffic admitted");

    // A burst of 2,000 terminal lookups: every one refused, quickly.
    let started = std::time::Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let mut t = terminal.clone();
        let req = lookup();
        burst.spawn(async move { t.lookup(req).await.map(|_| ()).map_err(|e| e.code()) });
    }
    let mut refused = 0;
    while let Some(r) = burst.join_next().await {
        if r.unwrap() == Err(Code::ResourceExhausted) {
            refused += 1;
        }
    }
    assert_eq!(refused, 2000);
    eprintln!("2,000 refusals in {:?}", started.elapsed());
    let shed = gd
        .node
        .as_ref()
        .unwrap()
        .state
        .metrics
        .shed
        .get_or_create(&vec![("class", "serving")])
        .get();
    assert!(shed >= 2001, "{shed}");

    // The surge ends: everything drains, and the node serves normally.
    drop(holds);
    drop(reflections);
    for c in calls {
        let _ = c.await;
    }
    wait_in_flight(&gd, 0).await;
    terminal
        .lookup(lookup())
        .await
        .expect("served after the surge");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_after = metrics.num_alive_tasks();
    assert!(
        tasks_after <= tasks_before + 2,
        "tasks {tasks_before} -> {tasks_after}"
    );
    let rss_after = rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "rss {rss_before} KiB -> {rss_after} KiB"
    );
}
