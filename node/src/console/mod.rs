//! The operator's console: a read-only web console and `/metrics`, served
//! over plain HTTP on the node's metrics listener (`metrics_listen`,
//! loopback by default; put an operator's own reverse proxy and login in
//! front of it to reach it from elsewhere).
//!
//! Four pages, one shell (`assets/page.html`) whose script draws the page
//! its path names from a JSON document under `/console/api/`:
//!
//! - `/console/federation`: the trust list in force and every member with
//!   its endpoint, feed position, replica age, breaker and last error, as a
//!   table and as a tile map of the provinces;
//! - `/console/load`: calls, refusals, latency, connections and handshakes
//!   over the last hour, live ([`load`]);
//! - `/console/audit`: the log's size, latest checkpoints and cosigners,
//!   witnessing failures, conflicts;
//! - `/console/keys`: the province's JWKS, rotations and revocations, and
//!   the members' keys.
//!
//! No page carries holder-level data ([`views`]). The assets are compiled
//! into the binary: the console works without internet access.

pub mod load;
pub mod status;
pub mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::state::NodeState;
use crate::status::{now_millis, now_unix};
use load::LoadHistory;
use views::{AuditView, FederationView, KeysView};

const PAGE: &str = include_str!("assets/page.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");
const ICON: &str = include_str!("assets/favicon.svg");

/// The console's pages, by path under `/console/`.
pub const PAGES: [&str; 4] = ["federation", "load", "audit", "keys"];

/// What the listener serves from: the node's state and the load history.
struct Console {
    state: Arc<NodeState>,
    load: LoadHistory,
}

/// Serves the console and `/metrics` until `stop` is cancelled, and keeps
/// the load history and the gauges the console refreshes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<NodeState>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let console = Arc::new(Console {
        state,
        load: LoadHistory::default(),
    });
    tasks.spawn(sample(console.clone(), stop.clone()));
    let connections = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(_) => continue,
                },
            };
            // Each connection holds the node's state (and so its storage):
            // tracked and closed at shutdown, or a scraper's idle
            // keep-alive connection would keep the storage locked.
            connections.spawn(serve_connection(tcp, console.clone(), stop.clone()));
        }
    });
    Ok(addr)
}

/// How long a console request in flight may take to finish at shutdown.
const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one HTTP/1.1 connection until its client closes it or the node
/// stops.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    console: Arc<Console>,
    stop: CancellationToken,
) {
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let console = console.clone();
        async move { Ok::<_, Infallible>(console.respond(&req).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSING_GRACE, connection).await;
        }
    }
}

/// Every [`load::SAMPLE_EVERY`]: refresh the gauges that are read rather
/// than counted, then take a load sample from the exposition.
async fn sample(console: Arc<Console>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(load::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        refresh_gauges(&console.state).await;
        let text = console.state.metrics.render();
        console.load.record(&text, now_millis());
    }
}

/// Replica positions and ages, statuses not yet merged into storage, the
/// audit log's size and witnessing time, the active code key's age: read
/// from state, published as gauges so Prometheus can alert on them.
async fn refresh_gauges(state: &NodeState) {
    let m = &state.metrics;
    let federation = FederationView::of(state).await;
    m.replica_max_age
        .set(federation.max_replica_age_secs as i64);
    m.store_unmerged.set(state.store.unmerged() as i64);
    m.store_writable.set(state.store.writable() as i64);
    for row in &federation.members {
        let province = vec![("province", row.province.clone())];
        m.replica_sequence
            .get_or_create(&province)
            .set(row.sequence as i64);
        if let Some(age) = row.age_secs {
            m.replica_age.get_or_create(&province).set(age as i64);
        }
    }
    // While the audit log is being reopened (after a failed write), these
    // gauges keep their last values.
    if let Ok(log) = state.audit.log() {
        if let Ok(size) = log.size() {
            m.audit_log_size.set(size as i64);
        }
        if let Ok(Some(cp)) = log.latest_published() {
            let newest = cp.cosignatures().iter().map(|c| c.time()).max();
            m.audit_published_time.set(newest.unwrap_or(0) as i64);
        }
    }
    let created = {
        let keyring = state.codes.keyring.read().expect("keyring lock");
        keyring
            .keys()
            .iter()
            .filter(|k| k.is_active())
            .map(|k| k.created_at)
            .max()
    };
    m.code_key_created.set(created.unwrap_or_else(now_unix));
}

/// Publishes when the node's certificate and its province CA expire.
pub fn note_certificates(metrics: &Metrics, node_cert_pem: &str, ca_pem: &str) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    for (name, pem) in [("node", node_cert_pem), ("ca", ca_pem)] {
        let not_after = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|der| hufu_certs::not_after(&der).map_err(|e| e.to_string()));
        match not_after {
            Ok(t) => {
                metrics
                    .certificate_expiry
                    .get_or_create(&vec![("certificate", name.to_owned())])
                    .set(t);
            }
            Err(err) => tracing::warn!(certificate = name, error = %err, "expiry unknown"),
        }
    }
}

impl Console {
    async fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "the console is read-only: use GET\n".into(),
            );
        }
        let path = req.uri().path();
        match path {
            "/metrics" => body(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.state.metrics.render(),
            ),
            "/" | "/console" | "/console/" => Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/console/federation")
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid"),
            "/console/assets/console.js" => body(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                SCRIPT.into(),
            ),
            "/console/assets/favicon.svg" | "/favicon.ico" => {
                body(StatusCode::OK, "image/svg+xml", ICON.into())
            }
            "/console/assets/console.css" => {
                body(StatusCode::OK, "text/css; charset=utf-8", STYLE.into())
            }
            "/console/api/federation.json" => json(&FederationView::of(&self.state).await),
            "/console/api/load.json" => {
                let since = query_param(req.uri().query(), "since")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(i64::MIN);
                json(&serde_json::json!({
                    "province": self.state.province.to_string(),
                    "interval_ms": load::SAMPLE_EVERY.as_millis() as u64,
                    "samples": self.load.since(since),
                }))
            }
            "/console/api/audit.json" => {
                let state = self.state.clone();
                match tokio::task::spawn_blocking(move || AuditView::of(&state)).await {
                    Ok(Ok(view)) => json(&view),
                    Ok(Err(err)) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot read the audit log: {err}; check the node's log\n"),
                    ),
                    Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
                }
            }
            "/console/api/keys.json" => json(&KeysView::of(&self.state)),
            _ => match path.strip_prefix("/console/") {
                Some(page) if PAGES.contains(&page) => {
                    body(StatusCode::OK, "text/html; charset=utf-8", PAGE.into())
                }
                _ => text(
                    StatusCode::NOT_FOUND,
                    "not found: the console is at /console, metrics at /metrics\n".into(),
                ),
            },
        }
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string(value) {
        Ok(s) => body(StatusCode::OK, "application/json", s),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", message)
}

fn body(status: StatusCode, content_type: &str, content: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        // Everything the console needs is served from here: no inline
        // script, no other origin.
        .header(
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .body(Full::new(Bytes::from(content)))
        .expect("static response parts are valid")
}
