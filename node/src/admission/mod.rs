//! Node-wide admission control, as one tower layer in front of every
//! service. For each request, before a byte of its body is read:
//!
//! 1. **Authorization** from the caller's certificate and the method path
//!    (the table in [`methods`]), and the caller's standing (its province a
//!    member, its certificate not revoked): a caller who may not call a
//!    method is refused with `PERMISSION_DENIED` and its body is never read.
//! 2. **Long-lived streams** (feeds, health watches, reflection) are outside
//!    the in-flight limit, under a budget per caller identity, so that no
//!    caller can take the node's capacity by holding streams open. The
//!    caller's standing is decided again before each message of such a
//!    stream, which ends when the caller loses it.
//! 3. **Unary calls** are read up to the message size limit (and a node-wide
//!    budget for bytes being buffered, of which one caller identity holds
//!    at most an eighth), then admitted through the
//!    [`queue`]: an adaptive concurrency limit ([`limit`]), a short wait
//!    newest-first, and refusal the moment a call's `grpc-timeout` cannot be
//!    met. Refusals are `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`.
//!
//! Classes: who yields first when the node is full: bulk admin and audit
//! work, then terminals' verification and lookups; federation traffic last.

mod limit;
mod methods;
mod queue;
mod streams;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hufu_certs::Province;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use limit::LimitBounds;
pub use methods::{Method, Shape, method};
pub use queue::{QueueConfig, Refusal};

use crate::net::PeerInfo;

/// Who yields first when the node is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Feeds, trust lists, witnessing, and lookups by other provinces' nodes.
    Federation,
    /// Verification, lookups and everything else callers do.
    Serving,
    /// The admin API (imports, status writes, code issuing) and the audit API.
    Bulk,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Federation => "federation",
            Class::Serving => "serving",
            Class::Bulk => "bulk",
        }
    }

    /// Percent of the limit this class may fill.
    fn share(self) -> usize {
        match self {
            Class::Federation => 100,
            Class::Serving => 90,
            Class::Bulk => 50,
        }
    }
}

/// How admission is configured (from `[limits]`).
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    pub province: Province,
    pub queue: QueueConfig,
    pub pushback_ms: u64,
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Request bytes buffered at once across the node.
    pub max_buffered_bytes: usize,
    /// Long-lived streams one caller identity may hold open.
    pub streams_per_caller: usize,
    /// Long-lived streams across the node.
    pub max_streams: usize,
}

pub struct Admission {
    config: AdmissionConfig,
    /// Membership and revocation, checked on every call.
    standing: Arc<crate::standing::Standing>,
    queue: Arc<queue::Queue>,
    streams: streams::StreamBudget,
    buffered: streams::BufferBudget,
    /// Cancelled when the node stops.
    stop: CancellationToken,
    admitted: Family<Vec<(&'static str, &'static str)>, Counter>,
    shed: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Requests handed over by HTTP/2, and those their callers cancelled
    /// before the node answered.
    arrived: Counter,
    cancelled: Counter,
    in_flight_gauge: Gauge,
    limit_gauge: Gauge,
    queued_gauge: Gauge,
}

impl Admission {
    /// Admission for a node that stops when `stop` is cancelled (its
    /// long-lived streams end then).
    pub fn new(
        config: AdmissionConfig,
        standing: Arc<crate::standing::Standing>,
        metrics: &crate::metrics::Metrics,
        stop: CancellationToken,
    ) -> Arc<Admission> {
        let queue = queue::Queue::new(config.queue);
        let (_, limit, _) = queue.snapshot();
        metrics.admission_limit.set(limit as i64);
        Arc::new(Admission {
            streams: streams::StreamBudget::new(config.streams_per_caller, config.max_streams),
            buffered: streams::BufferBudget::new(
                config.max_buffered_bytes,
                buffered_per_caller(&config),
            ),
            queue,
            config,
            standing,
            stop,
            admitted: metrics.admitted.clone(),
            arrived: metrics.requests_arrived.clone(),
            cancelled: metrics.requests_cancelled.clone(),
            shed: metrics.shed.clone(),
            in_flight_gauge: metrics.in_flight.clone(),
            limit_gauge: metrics.admission_limit.clone(),
            queued_gauge: metrics.queued.clone(),
        })
    }

    /// (in flight, limit, waiting) now.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        self.queue.snapshot()
    }

    fn publish(&self) {
        let (in_flight, limit, queued) = self.queue.snapshot();
        self.in_flight_gauge.set(in_flight as i64);
        self.limit_gauge.set(limit as i64);
        self.queued_gauge.set(queued as i64);
    }

    fn count_shed(&self, class: Class, reason: &'static str) {
        self.shed
            .get_or_create(&vec![("class", class.label()), ("reason", reason)])
            .inc();
    }

    /// The refusal sent when the node is full: RESOURCE_EXHAUSTED with the
    /// push-back callers should wait before retrying.
    fn refusal(&self, class: Class, why: Refusal) -> http::Response<Body> {
        self.count_shed(class, why.label());
        let (in_flight, limit, queued) = self.queue.snapshot();
        let message = match why {
            Refusal::Deadline => {
                return tonic::Status::deadline_exceeded(
                    "the call's deadline is too short for this node to answer in time",
                )
                .into_http();
            }
            Refusal::Expired => {
                return tonic::Status::deadline_exceeded(
                    "the call's deadline passed while it waited for the node",
                )
                .into_http();
            }
            Refusal::QueueFull | Refusal::Waited => format!(
                "node at capacity ({in_flight} calls in flight of {limit}, {queued} waiting; {} class): retry after {} ms",
                class.label(),
                self.config.pushback_ms
            ),
        };
        pushback(message, self.config.pushback_ms)
    }
}

/// A `RESOURCE_EXHAUSTED` refusal carrying its push-back twice: as the
/// `grpc-retry-pushback-ms` header that gRPC's own retry logic reads, and as
/// a `google.rpc.RetryInfo` detail that applications read.
pub fn pushback(message: String, pushback_ms: u64) -> http::Response<Body> {
    use tonic_types::{ErrorDetails, StatusExt};
    let status = tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(Duration::from_millis(pushback_ms))),
    );
    let mut response = status.into_http::<Body>();
    response.headers_mut().insert(
        "grpc-retry-pushback-ms",
        http::HeaderValue::from(pushback_ms),
    );
    response
}

/// Request bytes one caller identity may have buffered across its calls:
/// an eighth of the node's budget, and at least one message of the largest
/// size, so that no caller (a stolen certificate among them) can take the
/// budget from everyone else by never finishing its requests.
fn buffered_per_caller(config: &AdmissionConfig) -> usize {
    (config.max_buffered_bytes / 8)
        .max(config.max_message_bytes.saturating_add(5))
        .min(config.max_buffered_bytes)
}

/// The default limit for this machine: enough requests in flight to keep
/// every core busy through I/O waits, few enough that queues stay short.
pub fn default_limit() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (64 * cores).max(64)
}

/// The deadline a gRPC request carries in its `grpc-timeout` header.
pub fn deadline<B>(request: &http::Request<B>) -> Option<Instant> {
    let value = request.headers().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

#[derive(Clone)]
pub struct AdmissionLayer(pub Arc<Admission>);

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Arc<Admission>,
}

type Body = tonic::body::Body;

impl<S> tower::Service<http::Request<Body>> for AdmissionService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let admission = self.admission.clone();
        Box::pin(admit(admission, inner, request))
    }
}

async fn admit<S>(
    admission: Arc<Admission>,
    inner: S,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    admission.arrived.inc();
    // Counts the call as cancelled unless it runs to its answer.
    let mut answered = Unanswered(Some(admission.cancelled.clone()));
    let response = admit_call(&admission, inner, request).await;
    answered.0 = None;
    response
}

/// Counts a call dropped before its answer: its caller cancelled it.
struct Unanswered(Option<Counter>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(counter) = &self.0 {
            counter.inc();
        }
    }
}

async fn admit_call<S>(
    admission: &Arc<Admission>,
    mut inner: S,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let method = method(request.uri().path());
    let Some(info) = request.extensions().get::<PeerInfo>().cloned() else {
        return Ok(crate::error::NodeError::Unauthenticated.into_http());
    };
    if let Err(err) = crate::auth::in_good_standing(&admission.standing, &info, method.name) {
        return Ok(err.into_http());
    }
    if let Some(access) = method.access
        && let Err(err) = crate::auth::authorize(
            admission.config.province,
            &info.identity,
            method.name,
            access,
        )
    {
        return Ok(err.into_http());
    }
    let class = method.class_for(&info.identity);
    match method.shape {
        Shape::LongLived => {
            let Some(held) = admission.streams.open(&info.identity) else {
                admission.count_shed(class, "streams");
                return Ok(streams::refusal(&admission.config, &info.identity));
            };
            // The caller's side ends at stop too, so that a handler
            // reading it (reflection) lets the stream go.
            let stop = admission.stop.clone();
            let request =
                request.map(|body| Body::new(streams::EndsAtStop::new(body, stop.clone())));
            let response = inner.call(request).await?;
            let standing = admission.standing.clone();
            Ok(response.map(|body| {
                Body::new(streams::HeldBody::new(
                    body,
                    held,
                    stop,
                    standing,
                    info,
                    method.name,
                ))
            }))
        }
        Shape::ClientStream => {
            let slot = match admission.queue.admit(class, deadline(&request)).await {
                Ok(slot) => slot.unmeasured(),
                Err(why) => return Ok(admission.refusal(class, why)),
            };
            admission.count_admitted(class);
            let response = inner.call(request).await;
            drop(slot);
            admission.publish();
            response
        }
        Shape::Unary => {
            let deadline = deadline(&request);
            let (parts, body) = request.into_parts();
            // The message is read before a slot is taken: a slot must not be
            // held while a slow caller is still sending.
            let (bytes, buffered) = match streams::collect(
                body,
                admission.config.max_message_bytes,
                &admission.buffered,
                &info.identity,
            )
            .await
            {
                Ok(read) => read,
                Err(refusal) => {
                    admission.count_shed(class, "body");
                    return Ok(refusal);
                }
            };
            // One turn of the scheduler before any work: a caller that gave
            // up has sent its RST_STREAM right behind the call, and hyper
            // drops a call whose stream was reset only while it waits.
            tokio::task::yield_now().await;
            let slot = match admission.queue.admit(class, deadline).await {
                Ok(slot) => slot,
                Err(why) => return Ok(admission.refusal(class, why)),
            };
            admission.count_admitted(class);
            let request =
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            let response = inner.call(request).await;
            // A unary answer is complete when its handler returns; how fast
            // the caller reads it is the caller's affair.
            drop(buffered);
            drop(slot);
            admission.publish();
            response
        }
    }
}

impl Admission {
    fn count_admitted(&self, class: Class) {
        self.admitted
            .get_or_create(&vec![("class", class.label())])
            .inc();
        self.publish();
    }
}
