//! A pause reaches its caller while the node runs late: the places' judge
//! writes the stream limit itself instead of waiting for the connection's
//! task, which waits as long as every other task on the terminals' runtime
//! (while its caller goes on sending calls the node must read later).
//!
//! The terminals' runtime here is held outright (its one thread blocked),
//! the extreme of running late: whatever reaches a caller meanwhile was
//! written from elsewhere. Each terminal's connection is watched from the
//! caller's side, below TLS, for the node's `SETTINGS` frames.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hufu_certs::Role;
use hufu_node::local::LocalProvince;
use hufu_proto::v1::LookupRequest;
use hufu_proto::v1::status_lookup_service_client::StatusLookupServiceClient;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

const GD: &str = "440000";

/// What a caller saw of the node's stream limit.
#[derive(Default)]
struct Seen {
    /// The limit the node set last (`u32::MAX`: none yet).
    limit: AtomicU32,
    /// When the node first set a limit of zero.
    paused_at: Mutex<Option<Instant>>,
}

/// A caller's TLS stream that reads the node's frames as they pass.
struct Watched {
    tls: TlsStream<TcpStream>,
    seen: Arc<Seen>,
    /// The server's frame being read: its header so far, then what is left
    /// of its payload, and a `SETTINGS` payload so far.
    header: Vec<u8>,
    payload_left: usize,
    settings: Option<Vec<u8>>,
}

impl Watched {
    fn note(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left == 0 && self.header.len() < 9 {
                let n = (9 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.header.len() == 9 {
                    let h = &self.header;
                    let length =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let settings = h[3] == 0x4 && h[4] & 0x1 == 0;
                    self.settings = settings.then(Vec::new);
                    self.payload_left = length;
                    self.header.clear();
                    if length == 0 {
                        self.settings = None;
                    }
                }
                continue;
            }
            let n = self.payload_left.min(bytes.len());
            if let Some(settings) = &mut self.settings {
                settings.extend_from_slice(&bytes[..n]);
            }
            self.payload_left -= n;
            bytes = &bytes[n..];
            if self.payload_left == 0
                && let Some(settings) = self.settings.take()
            {
                for entry in settings.chunks_exact(6) {
                    if entry[..2] == [0, 3] {
                        let limit = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        self.seen.limit.store(limit, Ordering::SeqCst);
                        if limit == 0 {
                            let mut at = self.seen.paused_at.lock().unwrap();
                            at.get_or_insert_with(Instant::now);
                        }
                    }
                }
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.tls).poll_read(cx, buf))?;
        let read = buf.filled()[before..].to_vec();
        this.note(&read);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// A terminal's channel to `province` whose node's stream limits `seen`
/// records.
async fn watched_terminal(province: &LocalProvince, name: &str) -> (Channel, Arc<Seen>) {
    let cert = province.client_cert(Role::Terminal, name).unwrap();
    let addr = province.node.as_ref().unwrap().addr;
    let target = province.target().unwrap();
    let config = hufu_certs::client_config(
        target.anchors,
        target.province,
        &cert.cert_pem,
        &cert.key_pem,
    )
    .unwrap();
    let tls = TlsConnector::from(config);
    let seen = Arc::new(Seen {
        limit: AtomicU32::new(u32::MAX),
        ..Seen::default()
    });
    let connect = {
        let seen = seen.clone();
        tower::service_fn(move |_: Uri| {
            let (tls, seen) = (tls.clone(), seen.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(addr.ip().to_string()).unwrap();
                let tls = tls.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(Watched {
                    tls,
                    seen,
                    header: Vec::new(),
                    payload_left: 0,
                    settings: None,
                }))
            }
        })
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connect)
        .await
        .unwrap();
    (channel, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_reaches_its_caller_while_the_terminals_runtime_is_held() {
    let scratch = tempfile::tempdir().unwrap();
    let gd = common::province(GD);
    let province = LocalProvince::init(scratch.path(), gd).unwrap();
    assert!(province.config.limits.control_lane);
    // The node's terminals' runtime has one thread of its own; the callers
    // run on the test's runtime.
    let (node_runtime, province) = common::start_on_own_runtime(province).await;
    let holders = common::import_samples(&province, 2).await;

    // More busy terminals than the fewest places the node keeps (16), each
    // calling every 20 ms.
    let mut callers = Vec::new();
    let mut seen = Vec::new();
    for n in 0..40 {
        let (channel, watched) = watched_terminal(&province, &format!("gate-{n}")).await;
        seen.push(watched);
        let holder = holders[0].clone();
        // A call every 20 ms, whether or not earlier ones were answered.
        callers.push(tokio::spawn(async move {
            let client = StatusLookupServiceClient::new(channel);
            let mut calls = tokio::task::JoinSet::new();
            let until = Instant::now() + Duration::from_secs(8);
            while Instant::now() < until {
                let mut request = tonic::Request::new(LookupRequest {
                    issuer: GD.into(),
                    holder: holder.clone(),
                });
                request.set_timeout(Duration::from_secs(1));
                let mut client = client.clone();
                calls.spawn(async move { client.lookup(request).await.is_ok() });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut answered = 0u32;
            while let Some(ok) = calls.join_next().await {
                answered += u32::from(ok.unwrap());
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        seen.iter().all(|s| s.paused_at.lock().unwrap().is_none()),
        "a terminal was paused before the node ran late"
    );

    // The terminals' runtime held for 3 s.
    let held_from = Instant::now();
    node_runtime.spawn(async { std::thread::sleep(Duration::from_secs(3)) });
    let held_until = held_from + Duration::from_secs(3);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let paused: Vec<Instant> = seen
        .iter()
        .filter_map(|s| *s.paused_at.lock().unwrap())
        .collect();
    assert!(
        !paused.is_empty(),
        "no terminal learned of a pause while the terminals' runtime was held"
    );
    assert!(
        paused.iter().all(|at| *at < held_until),
        "a pause reached its caller only after the runtime was free again"
    );

    // Once the runtime is free the pauses end: every terminal may open
    // streams again, and calls on its connection are answered.
    let mut answered = 0;
    for caller in callers {
        answered += caller.await.unwrap();
    }
    assert!(answered > 0);
    common::eventually(Duration::from_secs(30), || async {
        seen.iter()
            .all(|s| s.limit.load(Ordering::SeqCst) > 0)
            .then_some(())
    })
    .await;

    common::stop_on_own_runtime(node_runtime, province).await;
}
