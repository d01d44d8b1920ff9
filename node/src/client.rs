//! Dialling a node over mutual TLS: used by the `hufu` client commands, the
//! demo, the benchmarks and the tests. The server must prove it is a node of
//! the province the caller meant to reach.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hufu_certs::{Province, TrustAnchors};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a client waits for a connection (TCP and TLS) to a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client certificate and key, as PEM.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientCert {
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<ClientCert> {
        Ok(ClientCert {
            cert_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read certificate {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("cannot read key {}", key.display()))?,
        })
    }
}

/// Where and whom to dial.
#[derive(Clone)]
pub struct Target {
    /// `host:port` (an `https://` prefix is accepted and ignored).
    pub endpoint: String,
    /// The province whose node must answer.
    pub province: Province,
    /// CA certificates the server may chain to.
    pub anchors: Arc<TrustAnchors>,
}

impl Target {
    /// A target whose only trusted CA is the given PEM.
    pub fn with_ca_pem(endpoint: &str, province: Province, ca_pem: &str) -> anyhow::Result<Target> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
        Ok(Target {
            endpoint: endpoint.to_owned(),
            province,
            anchors: TrustAnchors::new([ca])?,
        })
    }
}

/// `host` and `port` of an endpoint written `host:port` (an `https://`
/// prefix allowed).
pub(crate) fn host_port(endpoint: &str) -> anyhow::Result<(String, u16)> {
    let rest = endpoint
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let uri: Uri = format!("http://{rest}")
        .parse()
        .with_context(|| format!("bad endpoint {endpoint:?}: expected host:port"))?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("bad endpoint {endpoint:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .ok_or_else(|| anyhow::anyhow!("bad endpoint {endpoint:?}: no port"))?;
    Ok((host, port))
}

/// An endpoint with the settings every Hufu client uses.
fn endpoint(host: &str, port: u16, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    // TLS is done by our connector, so tonic sees a plain `http` URI.
    Ok(Endpoint::from_shared(format!("http://{authority}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10)))
}

fn connector(
    target: &Target,
    cert: &ClientCert,
) -> anyhow::Result<(
    Endpoint,
    impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
)> {
    let (host, port) = host_port(&target.endpoint)?;
    let config = hufu_certs::client_config(
        target.anchors.clone(),
        target.province,
        &cert.cert_pem,
        &cert.key_pem,
    )?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| anyhow::anyhow!("bad server name {host:?}: {e}"))?
        .to_owned();
    let tls = TlsConnector::from(config);
    let ep = endpoint(&host, port, CONNECT_TIMEOUT)?;
    let svc = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let host = host.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok((ep, svc))
}

/// Connects now; fails if the node cannot be reached or fails the TLS checks.
pub async fn connect(target: &Target, cert: &ClientCert) -> anyhow::Result<Channel> {
    let (ep, svc) = connector(target, cert)?;
    ep.connect_with_connector(svc).await.with_context(|| {
        format!(
            "cannot connect to {} (province {})",
            target.endpoint, target.province
        )
    })
}

/// A channel that connects on first use and reconnects after failures.
pub fn connect_lazy(target: &Target, cert: &ClientCert) -> anyhow::Result<Channel> {
    let (ep, svc) = connector(target, cert)?;
    Ok(ep.connect_with_connector_lazy(svc))
}
