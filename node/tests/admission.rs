//! Admission control: calls over a class's share wait, newest first, and
//! are refused with RESOURCE_EXHAUSTED and a retry push-back when their wait
//! runs out, while other classes are served; long-lived streams have a
//! budget per caller and end when the node stops; authorization and the
//! size limit apply before a request's body is read; the node's tasks and
//! memory return to normal.

mod common;

use std::time::Duration;

use hufu_certs::Role;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{ImportStatusesRequest, LookupRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

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
    common::memory_kib(std::process::id(), "VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_work_over_its_share_waits_then_is_refused_while_others_are_served() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    gd.config.limits.max_in_flight = 10;
    gd.config.limits.retry_pushback_ms = 250;
    gd.config.limits.max_queue_wait_ms = 300;
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
    let mut node = StatusLookupServiceClient::new(gd.channel(Role::Node, "node-2").await.unwrap());
    node.lookup(lookup()).await.unwrap();
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
    // A sixth waits for its turn, then is refused with a push-back.
    let started = std::time::Instant::now();
    let (_tx, rx) = mpsc::channel::<ImportStatusesRequest>(1);
    let err = admin
        .clone()
        .import_statuses(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(err.metadata().get("grpc-retry-pushback-ms").unwrap(), "250");
    assert!(
        err.message().contains("retry after 250 ms"),
        "{}",
        err.message()
    );

    // Terminals and other provinces' nodes are still served, and a burst of
    // 2,000 terminal lookups over the four slots left waits its turn
    // instead of being refused.
    terminal.lookup(lookup()).await.expect("terminal served");
    node.lookup(lookup())
        .await
        .expect("federation traffic served");
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let mut t = terminal.clone();
        let req = lookup();
        burst.spawn(async move { t.lookup(req).await.map(|_| ()).map_err(|e| e.code()) });
    }
    let mut served = 0;
    while let Some(r) = burst.join_next().await {
        if r.unwrap().is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 2000);

    // The surge ends: everything drains, and the node serves normally.
    drop(holds);
    for c in calls {
        let _ = c.await;
    }
    wait_in_flight(&gd, 0).await;
    terminal.lookup(lookup()).await.expect("served after");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_streams_have_a_budget_per_caller_and_take_no_serving_slot() {
    let scratch = tempfile::tempdir().unwrap();
    let mut gd = LocalProvince::init(scratch.path(), common::province("440000")).unwrap();
    gd.config.limits.max_in_flight = 4;
    gd.config.limits.streams_per_caller = 4;
    gd.start().await.unwrap();
    let holder = common::import_samples(&gd, 1).await.remove(0);
    let mut terminal = gd.terminal("gate").await.unwrap();
    // An auditor opens health watches on one connection and reflection
    // streams on another until refused: the budget is its identity's,
    // whatever the connection or the kind of stream.
    let channel = gd.channel(Role::Auditor, "audit-1").await.unwrap();
    let second = gd.channel(Role::Auditor, "audit-1").await.unwrap();
    let mut watches = Vec::new();
    let mut reflections = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        let opened = if i % 2 == 0 {
            HealthClient::new(channel.clone())
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|stream| watches.push(stream.into_inner()))
        } else {
            let (tx, rx) = mpsc::channel::<ServerReflectionRequest>(1);
            ServerReflectionClient::new(second.clone())
                .server_reflection_info(ReceiverStream::new(rx))
                .await
                .map(|stream| reflections.push((tx, stream.into_inner())))
        };
        if let Err(status) = opened {
            refused = Some(status);
            break;
        }
    }
    assert_eq!((watches.len(), reflections.len()), (2, 2));
    let refused = refused.expect("the fifth stream is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("too many streams"),
        "{refused:?}"
    );

    // The node's own terminals and admin are served all along.
    for _ in 0..20 {
        terminal
            .lookup(LookupRequest {
                issuer: "440000".into(),
                holder: holder.clone(),
            })
            .await
            .expect("terminal served while the streams are open");
    }
    gd.admin()
        .await
        .unwrap()
        .get_status(hufu_proto::v1::GetStatusRequest {
            subject: Some(hufu_proto::v1::get_status_request::Subject::Holder(
                holder.clone(),
            )),
        })
        .await
        .expect("admin served while the streams are open");

    // Closing one makes room for another.
    watches.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a stream after one closed");

    // Streams that last as long as their caller wants do not hold the
    // node's shutdown: they end, UNAVAILABLE, when it stops.
    let started = std::time::Instant::now();
    gd.stop().await.expect("the node stops with streams open");
    assert!(started.elapsed() < Duration::from_secs(5));
    let ended = loop {
        match watches[0].message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = ended.expect_err("a health watch ended without a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(reflections);
}
