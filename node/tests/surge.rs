//! A flood from many connections that never back off: the node keeps
//! serving another province's feed and its own admin, and its memory
//! returns to its level before the flood. With places for terminals'
//! connections on, the node pauses and closes terminals under the flood,
//! never its admin, and lets terminals back once it is over.

mod common;

use std::time::{Duration, Instant};

use hufu_certs::{Province, Role};
use hufu_node::local::LocalFederation;
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hufu_proto::v1::{Colour, LookupRequest, PutStatusRequest};

/// The floods run one at a time: each test's figures (memory, whether the
/// node fell behind) must be its own flood's.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GD: &str = "440000";
const SN: &str = "610000";

async fn colour_at(fed: &LocalFederation, at: Province, holder: &str) -> Option<i32> {
    let mut t = fed.get(at).terminal("check").await.ok()?;
    let reply = t
        .lookup(LookupRequest {
            issuer: GD.into(),
            holder: holder.into(),
        })
        .await
        .ok()?
        .into_inner();
    Some(reply.record?.colour)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_leaves_feeds_and_admin_served_and_memory_bounded() {
    let _alone = ONE_FLOOD.lock().await;
    let scratch = tempfile::tempdir().unwrap();
    let (gd, sn) = (common::province(GD), common::province(SN));
    let mut fed = LocalFederation::init(scratch.path(), &[gd, sn], |c| {
        c.federation.heartbeat_ms = 100;
        c.limits.max_in_flight = 8;
    })
    .unwrap();
    // The flooded node runs in its own process, so that its memory is its
    // own; the peer runs in the test.
    // get_mut lets go of the port the federation holds for the node.
    let config = fed.get_mut(gd).dir.join("hufu.toml");
    std::fs::write(&config, toml::to_string(&fed.get(gd).config).unwrap()).unwrap();
    let node = common::Serve::start(&config, &scratch.path().join("node.log"));
    fed.start(sn).await.unwrap();
    let up = Instant::now();
    while fed.get(gd).admin().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "node did not come up: {}",
            std::fs::read_to_string(scratch.path().join("node.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holders = common::import_samples(fed.get(gd), 20).await;
    // The peer has replicated the import before the flood.
    let replicated = Instant::now();
    while colour_at(&fed, sn, &holders[0]).await.is_none() {
        assert!(
            replicated.elapsed() < Duration::from_secs(10),
            "no replication"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rss_before = common::memory_kib(node.pid(), "VmRSS");
    // The first flood has an admin write go through, and reach the other
    // province through the feed, while it lasts.
    let (ok, refused, _) = flood(&fed, &holders, Duration::from_secs(3), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut admin = fed.get(gd).admin().await.unwrap();
        write_red(&mut admin, gd, 0)
            .await
            .expect("admin served during the flood");
        let written = Instant::now();
        while colour_at(&fed, sn, &holders[0]).await != Some(Colour::Red as i32) {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "the feed stalled during the flood"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    eprintln!("flood: {ok} answered, {refused} refused or late");
    assert!(ok > 0, "the node served nothing during the flood");
    assert!(refused > 0, "the flood did not overload the node");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_first = common::memory_kib(node.pid(), "VmRSS");
    // Memory is bounded: the first flood's connections and waiting calls
    // cost tens of MiB (which the C allocator keeps for reuse rather than
    // giving back), and a second flood reuses them: nothing is leaked.
    flood(&fed, &holders, Duration::from_secs(3), async {}).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_second = common::memory_kib(node.pid(), "VmRSS");
    eprintln!(
        "node rss {rss_before} KiB before, {rss_first} KiB after one flood, {rss_second} after two"
    );
    assert!(
        rss_first < rss_before + 64 * 1024,
        "node rss {rss_before} KiB before the flood, {rss_first} KiB after"
    );
    // A flood makes some 75,000 calls: leaking even 256 bytes of each would
    // grow the node by about 19 MiB; the allocator's own drift between two
    // identical floods stays well under 16 MiB.
    assert!(
        rss_second < rss_first + 16 * 1024,
        "node rss {rss_first} KiB after one flood, {rss_second} KiB after two"
    );
    fed.get_mut(sn).stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_shut_terminals_out_under_a_flood_but_never_the_admin() {
    let _alone = ONE_FLOOD.lock().await;
    let scratch = tempfile::tempdir().unwrap();
    let gd = common::province(GD);
    let mut fed = LocalFederation::init(scratch.path(), &[gd], |c| {
        c.limits.max_in_flight = 8;
        // A target any flood passes on a test machine: the least late of
        // ten probes, with every worker busy, is late by more than this.
        c.limits.scheduling_delay_target_ms = 1;
    })
    .unwrap();
    fed.start(gd).await.unwrap();
    let holders = common::import_samples(fed.get(gd), 20).await;
    // The admin's connection is open before the flood: a new connection
    // waits for a place with the terminals' until a handshake tells who it
    // is (at most one every 500 ms while places are full).
    let mut admin = fed.get(gd).admin().await.unwrap();
    let admin_during = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut cut, mut paused_seen) = (false, false);
        for n in 0..20 {
            write_red(&mut admin, gd, n)
                .await
                .expect("the admin is served while terminals are shut out");
            let metrics = common::metrics(fed.get(gd)).await;
            let paused = gauge(&metrics, "hufu_caller_places_paused") > 0.0;
            paused_seen |= paused;
            cut |= paused || gauge(&metrics, "hufu_connections_taken_back_total") > 0.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            cut,
            "the flood never made the node pause or close a terminal"
        );
        if paused_seen {
            // A pause is a SETTINGS frame on the paused connection.
            let metrics = common::metrics(fed.get(gd)).await;
            assert!(
                counter(&metrics, "hufu_stream_limits_sent_total") > 0.0,
                "connections paused without a stream limit sent"
            );
        }
    };
    // A terminal that connects while places are cut waits for a place, or
    // is let through to its handshake (to learn who it is) and paused:
    // either way it keeps its connection, and its call is answered once
    // places come back.
    let mut late_answer = None;
    let late_during = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut late = fed
            .get(gd)
            .terminal("late")
            .await
            .expect("a terminal connects while places are cut");
        let mut request = tonic::Request::new(LookupRequest {
            issuer: GD.into(),
            holder: holders[0].clone(),
        });
        request.set_timeout(Duration::from_secs(60));
        late_answer = Some(late.lookup(request).await);
    };
    let during = async {
        tokio::join!(admin_during, late_during);
    };
    let (ok, _, crowd) = flood(&fed, &holders, Duration::from_secs(4), during).await;
    assert!(ok > 0, "the node served nothing during the flood");
    late_answer
        .expect("the late terminal called")
        .expect("a terminal that connected while places were cut is answered on its connection");
    // A pause closed nothing: the crowd (tonic clients, which honour an
    // HTTP/2 stream limit of zero) kept its connections. Once the node
    // has given every place back, each terminal served during the flood
    // (so one that held a place) is served again on its connection, without
    // a new handshake. (A terminal that arrived while places were cut
    // waited for a place, or was let through to its handshake and paused.)
    let metrics = common::metrics(fed.get(gd)).await;
    assert_eq!(gauge(&metrics, "hufu_connections_taken_back_total"), 0.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while gauge(
        &common::metrics(fed.get(gd)).await,
        "hufu_caller_places_paused",
    ) > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "paused terminals were never resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handshakes = counter(
        &common::metrics(fed.get(gd)).await,
        "hufu_tls_handshakes_total",
    );
    let served: Vec<_> = crowd
        .into_iter()
        .filter(|(_, ok)| *ok > 0)
        .map(|(client, _)| client)
        .collect();
    assert!(!served.is_empty());
    let calls = served.into_iter().map(|mut client| {
        let mut request = tonic::Request::new(LookupRequest {
            issuer: GD.into(),
            holder: holders[0].clone(),
        });
        request.set_timeout(Duration::from_secs(20));
        async move { client.lookup(request).await }
    });
    for answer in futures::future::join_all(calls).await {
        answer.expect("a paused terminal is served again on its connection");
    }
    assert_eq!(
        counter(
            &common::metrics(fed.get(gd)).await,
            "hufu_tls_handshakes_total"
        ),
        handshakes,
        "no terminal that held a place had to connect again"
    );
    // The flood's connections are gone: a new terminal gets a place.
    let mut terminal = fed.get(gd).terminal("after").await.unwrap();
    let mut request = tonic::Request::new(LookupRequest {
        issuer: GD.into(),
        holder: holders[0].clone(),
    });
    request.set_timeout(Duration::from_secs(10));
    terminal
        .lookup(request)
        .await
        .expect("a terminal is served after the flood");
}

/// Sets sample holder `n` red, as of now.
async fn write_red(
    admin: &mut AdminServiceClient<tonic::transport::Channel>,
    gd: Province,
    n: u64,
) -> Result<(), tonic::Status> {
    let mut input = common::sample_input(gd, n, Colour::Red);
    input.as_of = Some(hufu_node::status::timestamp(hufu_node::status::now_unix()));
    admin
        .put_status(PutStatusRequest {
            status: Some(input),
        })
        .await
        .map(drop)
}

/// A counter's total over its labels.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.split(' ').next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 200 terminal connections, each sending 40 lookups at once with a short
/// deadline, again and again for `duration`, never backing off, while
/// `meanwhile` runs; (answered, refused or late, each connection with the
/// calls answered on it).
async fn flood(
    fed: &LocalFederation,
    holders: &[String],
    duration: Duration,
    meanwhile: impl std::future::Future<Output = ()>,
) -> (
    u64,
    u64,
    Vec<(StatusLookupServiceClient<tonic::transport::Channel>, u64)>,
) {
    let gd = common::province(GD);
    let cert = fed.get(gd).client_cert(Role::Terminal, "crowd").unwrap();
    let mut conns = Vec::new();
    for _ in 0..200 {
        conns.push(StatusLookupServiceClient::new(
            fed.get(gd).channel_as(&cert).await.unwrap(),
        ));
    }
    let until = Instant::now() + duration;
    let mut crowd = tokio::task::JoinSet::new();
    for (i, client) in conns.into_iter().enumerate() {
        let holder = holders[i % holders.len()].clone();
        crowd.spawn(async move {
            let mut outcomes = (0u64, 0u64);
            while Instant::now() < until {
                let calls = (0..40).map(|_| {
                    let mut client = client.clone();
                    let mut request = tonic::Request::new(LookupRequest {
                        issuer: GD.into(),
                        holder: holder.clone(),
                    });
                    request.set_timeout(Duration::from_millis(200));
                    async move { client.lookup(request).await.is_ok() }
                });
                for ok in futures::future::join_all(calls).await {
                    if ok {
                        outcomes.0 += 1;
                    } else {
                        outcomes.1 += 1;
                    }
                }
            }
            (client, outcomes)
        });
    }
    meanwhile.await;
    let (mut ok, mut refused, mut conns) = (0, 0, Vec::new());
    while let Some(r) = crowd.join_next().await {
        let (client, (o, f)) = r.unwrap();
        ok += o;
        refused += f;
        conns.push((client, o));
    }
    (ok, refused, conns)
}

/// Whether an admin's status write is acknowledged within 2 s while the
/// node's terminals' runtime is held busy for 3 s (its only thread
/// blocked), on a node with or without the control lane for admins' and
/// other nodes' connections; and whether a terminal got an answer
/// meanwhile, to show the runtime really was held.
async fn write_while_terminals_runtime_held(control_lane: bool) -> (bool, bool) {
    let scratch = tempfile::tempdir().unwrap();
    let gd = common::province(GD);
    let mut province = hufu_node::local::LocalProvince::init(scratch.path(), gd).unwrap();
    province.config.limits.control_lane = control_lane;
    province.config.audit.enabled = true;
    let (node_runtime, province) = common::start_on_own_runtime(province).await;
    let holders = common::import_samples(&province, 2).await;
    let mut admin = province.admin().await.unwrap();
    let mut terminal = province.terminal("gate").await.unwrap();
    let lookup = |holder: &String| {
        let mut request = tonic::Request::new(LookupRequest {
            issuer: GD.into(),
            holder: holder.clone(),
        });
        request.set_timeout(Duration::from_millis(1500));
        request
    };
    // Both connections are open and served before the runtime is held.
    terminal.lookup(lookup(&holders[0])).await.unwrap();
    write_red(&mut admin, gd, 0).await.unwrap();

    node_runtime.spawn(async { std::thread::sleep(Duration::from_secs(3)) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let write = async {
        let mut input = common::sample_input(gd, 1, Colour::Red);
        input.as_of = Some(hufu_node::status::timestamp(hufu_node::status::now_unix()));
        let mut request = tonic::Request::new(PutStatusRequest {
            status: Some(input),
        });
        request.set_timeout(Duration::from_secs(2));
        admin.put_status(request).await
    };
    let (written, looked_up) = tokio::join!(write, terminal.lookup(lookup(&holders[1])));

    common::stop_on_own_runtime(node_runtime, province).await;
    (written.is_ok(), looked_up.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_go_through_while_terminals_runtime_is_held() {
    let _alone = ONE_FLOOD.lock().await;
    let (written, looked_up) = write_while_terminals_runtime_held(true).await;
    assert!(!looked_up, "the terminals' runtime was not held");
    assert!(
        written,
        "an admin write was not served on the control lane while terminals' runtime was busy"
    );
    // Without the control lane the same write waits for the terminals'
    // runtime: the lane is what serves it.
    let (written, looked_up) = write_while_terminals_runtime_held(false).await;
    assert!(!looked_up, "the terminals' runtime was not held");
    assert!(!written, "without a control lane a write was served anyway");
}
