//! One row of `hufu bench surge`'s table: what the callers saw in a step,
//! beside what the node's process and metrics say of it.

use crate::output::outln;

use super::confine::{self, Confined};
use super::load::StepLoad;
use super::side::Writes;

/// What the bench learns of the node between two instants.
#[derive(Clone, Default)]
pub(super) struct NodeView {
    usage: confine::Usage,
    metrics: String,
}

pub(super) fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Replies with a column of their own.
pub(super) const NAMED: [&str; 4] = [
    "OK",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
];

/// The table's column names.
pub(super) fn print_header() {
    outln!(
        "{:>5} {:>8} {:>8} {:>7} {:>7} {:>8} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>9} {:>5} {:>5} {:>4} {:>6} {:>7} {:>6} {:>5}",
        "load",
        "offered",
        "sent",
        "node/s",
        "canc/s",
        "goodput",
        "/cap",
        "p50 ms",
        "p99 ms",
        "exhaust",
        "deadln",
        "unavail",
        "other",
        "held",
        "handshake",
        "cpu%",
        "MiB",
        "gen%",
        "full s",
        "admin",
        "adm ms",
        "lag"
    );
}

pub(super) async fn view(server: &Confined, metrics: Option<std::net::SocketAddr>) -> NodeView {
    NodeView {
        usage: server.usage(),
        metrics: match metrics {
            Some(addr) => scrape(addr).await.unwrap_or_default(),
            None => String::new(),
        },
    }
}

pub(super) fn print_row(
    multiple: f64,
    capacity: f64,
    step: &StepLoad,
    (before, after): (&NodeView, &NodeView),
    (gen_cpu, gen_full): (f64, Option<f64>),
    wall: f64,
    side: Option<(&Writes, Option<f64>)>,
) {
    let secs = step.elapsed.as_secs_f64();
    let code = |name: &str| step.codes.get(name).copied().unwrap_or(0);
    let other: u64 = step
        .codes
        .iter()
        .filter(|(k, _)| !NAMED.contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum();
    // From the node's metrics: its handshakes, the calls that reached it,
    // and those its callers gave up on there. The rest of what was sent and
    // not answered in time waited in the callers, or was answered too late.
    let (handshakes, at_node, cancelled) = if after.metrics.is_empty() {
        ("-".to_string(), "-".to_string(), "-".to_string())
    } else {
        let delta = |prefix: &str| sample(&after.metrics, prefix) - sample(&before.metrics, prefix);
        (
            format!(
                "{:.0}/{:.0}",
                delta("hufu_tls_handshakes_total{kind=\"full\"}"),
                delta("hufu_tls_handshakes_total{kind=\"resumed\"}")
            ),
            format!("{:.0}", delta("hufu_requests_arrived_total") / secs),
            format!("{:.0}", delta("hufu_requests_cancelled_total") / secs),
        )
    };
    let (admin, admin_p99, lag) = match side {
        Some((writes, lag)) => (
            format!("{}/{}", writes.ok, writes.failed()),
            writes
                .took_ms(0.99)
                .map(|ms| format!("{ms:.0}"))
                .unwrap_or_else(|| "-".into()),
            lag.map(|l| format!("{l:.0}")).unwrap_or_else(|| "?".into()),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    outln!(
        "{:>4}x {:>8.0} {:>8.0} {:>7} {:>7} {:>8.0} {:>5.2} {:>7.1} {:>7.1} {:>7} {:>7} {:>7} {:>6} {:>6} {:>9} {:>5.1} {:>5.0} {:>4.0} {:>6} {:>7} {:>6} {:>5}",
        multiple,
        step.offered as f64 / secs,
        step.sent as f64 / secs,
        at_node,
        cancelled,
        step.good as f64 / secs,
        step.good as f64 / secs / capacity,
        step.latency.value_at_quantile(0.5) as f64 / 1000.0,
        step.latency.value_at_quantile(0.99) as f64 / 1000.0,
        code("RESOURCE_EXHAUSTED"),
        code("DEADLINE_EXCEEDED"),
        code("UNAVAILABLE"),
        other,
        step.held_back,
        handshakes,
        100.0 * (after.usage.cpu_secs - before.usage.cpu_secs) / wall,
        after.usage.rss_mib,
        100.0 * gen_cpu,
        gen_full
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "-".into()),
        admin,
        admin_p99,
        lag,
    );
}

/// The node's Prometheus text, over plain HTTP.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/metrics")
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
