//! Node-wide admission control: a limit on requests in flight across all
//! connections and services, with room reserved for the more important
//! classes. A request over its class's share is refused at once with
//! `RESOURCE_EXHAUSTED` and a `grpc-retry-pushback-ms` hint, before any
//! decoding or work, so a surge costs the node almost nothing and the excess
//! waits at the callers, not in the node's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either, Ready, ready};
use hufu_certs::Role;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::net::PeerInfo;

/// Who yields first when the node is full: bulk admin work, then terminals'
/// verification and lookups; federation traffic last.
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
    fn label(self) -> &'static str {
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

pub struct Admission {
    limit: usize,
    in_flight: AtomicUsize,
    pushback_ms: u64,
    pub admitted: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub shed: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub in_flight_gauge: Gauge,
}

impl Admission {
    pub fn new(
        limit: usize,
        pushback_ms: u64,
        metrics: &crate::metrics::Metrics,
    ) -> Arc<Admission> {
        metrics.admission_limit.set(limit.max(1) as i64);
        Arc::new(Admission {
            limit: limit.max(1),
            in_flight: AtomicUsize::new(0),
            pushback_ms,
            admitted: metrics.admitted.clone(),
            shed: metrics.shed.clone(),
            in_flight_gauge: metrics.in_flight.clone(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A slot for a request of `class`, or None if its share is full.
    fn try_admit(self: &Arc<Self>, class: Class) -> Option<Permit> {
        let cap = (self.limit * class.share() / 100).max(1);
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= cap {
                self.shed
                    .get_or_create(&vec![("class", class.label())])
                    .inc();
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.admitted
            .get_or_create(&vec![("class", class.label())])
            .inc();
        self.in_flight_gauge.set((current + 1) as i64);
        Some(Permit(self.clone()))
    }
}

/// Holds a slot until the request's handler has answered.
pub struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.in_flight_gauge.set(before.saturating_sub(1) as i64);
    }
}

/// The class of a request, from its path and the caller's certificate.
pub fn classify<B>(request: &http::Request<B>) -> Class {
    let path = request.uri().path();
    if path.starts_with("/hufu.v1.FederationService/")
        || path.starts_with("/hufu.v1.WitnessService/")
    {
        return Class::Federation;
    }
    // Admin work and auditors' bulk reads yield to everything else.
    if path.starts_with("/hufu.v1.AdminService/") || path.starts_with("/hufu.v1.AuditService/") {
        return Class::Bulk;
    }
    match request.extensions().get::<PeerInfo>() {
        Some(info) if info.identity.role == Role::Node => Class::Federation,
        _ => Class::Serving,
    }
}

/// Long-lived streams are not requests in flight: a feed subscription lasts
/// as long as the peer is connected, and members are few.
fn exempt<B>(request: &http::Request<B>) -> bool {
    request.uri().path() == "/hufu.v1.FederationService/SubscribeChanges"
}

/// Methods whose response is a stream (the feed is exempt altogether).
fn streams_response<B>(request: &http::Request<B>) -> bool {
    matches!(
        request.uri().path(),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            | "/grpc.health.v1.Health/Watch"
    )
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
    type Future = Either<
        BoxFuture<'static, Result<Self::Response, Self::Error>>,
        Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if exempt(&request) {
            let mut inner = inner;
            return Either::Left(Box::pin(inner.call(request)));
        }
        let class = classify(&request);
        if streams_request(&request) {
            return match self.admission.try_admit(class) {
                Some(permit) => Either::Left(Box::pin(admitted(inner, request, permit))),
                None => Either::Right(ready(Ok(refusal(&self.admission, class)))),
            };
        }
        // A unary request is admitted once its message has fully arrived:
        // a slot must not be held while a slow caller is still sending.
        let admission = self.admission.clone();
        Either::Left(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match http_body_util::BodyExt::collect(body).await {
                Ok(collected) => collected.to_bytes(),
                Err(status) => return Ok(status.into_http()),
            };
            let request =
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            match admission.try_admit(class) {
                Some(permit) => admitted(inner, request, permit).await,
                None => Ok(refusal(&admission, class)),
            }
        }))
    }
}

/// Runs an admitted request, holding its slot until the handler answers
/// (or, for a streaming answer, until the stream ends).
async fn admitted<S>(
    mut inner: S,
    request: http::Request<Body>,
    permit: Permit,
) -> Result<http::Response<Body>, S::Error>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let streams = streams_response(&request);
    let response = inner.call(request).await?;
    if streams {
        Ok(response.map(|body| {
            Body::new(HeldBody {
                inner: body,
                _permit: permit,
            })
        }))
    } else {
        // A unary answer is complete when its handler returns; how fast the
        // caller reads it is the caller's affair.
        drop(permit);
        Ok(response)
    }
}

/// Methods whose request is a stream of messages.
fn streams_request<B>(request: &http::Request<B>) -> bool {
    matches!(
        request.uri().path(),
        "/hufu.v1.AdminService/ImportStatuses"
            | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
}

/// A response body that keeps its request's admission slot until it ends.
struct HeldBody {
    inner: Body,
    _permit: Permit,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The refusal: `RESOURCE_EXHAUSTED` with the push-back delay twice, as the
/// `grpc-retry-pushback-ms` header that gRPC's own retry logic reads, and as
/// a `google.rpc.RetryInfo` detail that applications read.
fn refusal(admission: &Admission, class: Class) -> http::Response<Body> {
    use tonic_types::{ErrorDetails, StatusExt};
    let status = tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "node at capacity ({} requests in flight, {} class limit reached): retry after {} ms",
            admission.in_flight(),
            class.label(),
            admission.pushback_ms
        ),
        ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(
            admission.pushback_ms,
        ))),
    );
    let mut response = status.into_http::<Body>();
    if let Ok(value) = http::HeaderValue::from_str(&admission.pushback_ms.to_string()) {
        response
            .headers_mut()
            .insert("grpc-retry-pushback-ms", value);
    }
    response
}

/// The default limit for this machine: enough requests in flight to keep
/// every core busy through I/O waits, few enough that queues stay short.
pub fn default_limit() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (64 * cores).max(64)
}
