//! `hufu federation status`: the console's federation table in the
//! terminal, read from a running node's console over its metrics listener.

use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::views::FederationView;
use crate::config::NodeConfig;

/// Where the console of the node `config` describes is reached.
pub fn console_addr(config: &NodeConfig) -> anyhow::Result<SocketAddr> {
    let mut addr = config.metrics_listen.with_context(|| {
        "this node serves no console: set metrics_listen in its config (e.g. \"127.0.0.1:9090\") and restart it"
    })?;
    // A node listening on every address is reached on loopback from here.
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

/// Fetches the federation view from the console at `addr`.
pub async fn fetch(addr: SocketAddr) -> anyhow::Result<FederationView> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the node's console at {addr}: is the node running?")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get("/console/api/federation.json")
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let reply = sender.send_request(request).await?;
    let status = reply.status();
    let body = reply.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "the console at {addr} answered {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    serde_json::from_slice(&body)
        .with_context(|| format!("the console at {addr} sent an unreadable federation view"))
}

/// The trust list line and the members table, as printed.
pub fn render(view: &FederationView) -> String {
    let mut out = String::new();
    match &view.trust {
        Some(t) => out.push_str(&format!(
            "province {}: trust list v{} (threshold {}, witness quorum {}), signed by {}\n",
            view.province,
            t.version,
            t.threshold,
            t.witness_quorum,
            t.signers.join(", ")
        )),
        None => out.push_str(&format!(
            "province {}: no trust list, this node runs alone\n",
            view.province
        )),
    }
    out.push_str(&format!(
        "replicas are fresh up to {} s old\n\n",
        view.max_replica_age_secs
    ));
    out.push_str(&format!(
        "{:<8} {:<14} {:<22} {:>10} {:>9} {:<6} {:<9} {}\n",
        "PROVINCE", "NAME", "ENDPOINT", "FEED", "AGE", "STATE", "BREAKER", "LAST ERROR"
    ));
    for m in &view.members {
        let own = m.state == "self";
        out.push_str(&format!(
            "{:<8} {:<14} {:<22} {:>10} {:>9} {:<6} {:<9} {}\n",
            m.province,
            m.name,
            m.endpoints.join(","),
            m.sequence,
            m.age_secs
                .filter(|_| !own)
                .map_or("-".to_owned(), |a| format!("{a:.1}s")),
            m.state,
            if own { "-" } else { m.peer.breaker.as_str() },
            m.peer.last_error.as_deref().unwrap_or("-"),
        ));
    }
    out
}
