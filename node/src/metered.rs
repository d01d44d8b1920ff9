//! Metrics as a layer: every call to one of the node's `hufu.v1` services
//! is counted by method and outcome and timed, around the service, so no
//! handler measures itself. Methods are named by the admission layer's
//! method table; calls refused before they reach a service (admission,
//! authorization) are counted there, not here.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;

use crate::admission;
use crate::metrics::Metrics;

type Body = tonic::body::Body;

/// Wraps the node's routes in [`Metered`].
#[derive(Clone)]
pub struct MeteredLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MeteredLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<http::Request<Body>> for Metered<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        // Health and reflection are not the node's API.
        // A method the table does not know is answered UNIMPLEMENTED by the
        // router, with no service behind it.
        let name = path
            .starts_with("/hufu.v1.")
            .then(|| admission::method(path).name)
            .filter(|name| *name != "unknown method");
        let started = Instant::now();
        let answer = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = answer.await?;
            if let Some(name) = name {
                metrics.observe(name, started, code(&response));
            }
            Ok(response)
        })
    }
}

/// The status a response carries in its headers (a refusal is sent as
/// headers only); a response that starts without one is OK so far.
fn code(response: &http::Response<Body>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}
