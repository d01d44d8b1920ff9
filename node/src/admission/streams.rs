//! What admission holds for a call while it runs: the budget of long-lived
//! streams per caller identity, and the bytes of request messages being
//! buffered, both bounded so that no caller can make the node's memory grow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hufu_certs::Identity;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AdmissionConfig;

type Body = tonic::body::Body;

/// Long-lived streams open per caller identity, and in all.
pub struct StreamBudget {
    per_caller: usize,
    total: usize,
    open: Arc<Mutex<(usize, HashMap<String, usize>)>>,
}

/// One open long-lived stream; its place is freed when dropped.
pub struct HeldStream {
    open: Arc<Mutex<(usize, HashMap<String, usize>)>>,
    caller: String,
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.caller);
            }
        }
    }
}

impl StreamBudget {
    pub fn new(per_caller: usize, total: usize) -> StreamBudget {
        StreamBudget {
            per_caller: per_caller.max(1),
            total: total.max(1),
            open: Arc::new(Mutex::new((0, HashMap::new()))),
        }
    }

    /// A place for one more stream of `caller`, if its budget allows.
    pub fn open(&self, caller: &Identity) -> Option<HeldStream> {
        let key = caller.uri();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.1.get(&key).copied().unwrap_or(0);
        if mine >= self.per_caller || open.0 >= self.total {
            return None;
        }
        open.0 += 1;
        *open.1.entry(key.clone()).or_insert(0) += 1;
        Some(HeldStream {
            open: self.open.clone(),
            caller: key,
        })
    }
}

pub fn refusal(config: &AdmissionConfig, caller: &Identity) -> http::Response<Body> {
    super::pushback(
        format!(
            "{} has too many streams open at this node (at most {} per caller): close one first",
            caller.uri(),
            config.streams_per_caller
        ),
        config.pushback_ms.max(1000),
    )
}

/// A response body that keeps its stream's place until it ends.
pub struct HeldBody {
    inner: Body,
    _held: HeldStream,
}

impl HeldBody {
    pub fn new(inner: Body, held: HeldStream) -> HeldBody {
        HeldBody { inner, _held: held }
    }
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
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

/// Reads a unary request's body: at most one message of `max_message`
/// bytes (plus gRPC's 5-byte prefix), each chunk counted against the node's
/// budget of buffered bytes. Reading stops at the first byte over either.
pub async fn collect(
    mut body: Body,
    max_message: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), http::Response<Body>> {
    let limit = max_message.saturating_add(5);
    let mut bytes = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => return Err(status.into_http()),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if bytes.len() + data.len() > limit {
            return Err(tonic::Status::out_of_range(format!(
                "request message too large: this node accepts at most {max_message} bytes"
            ))
            .into_http());
        }
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match budget.clone().try_acquire_many_owned(n) {
            Ok(permit) => match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            },
            Err(_) => {
                return Err(tonic::Status::resource_exhausted(
                    "node is buffering too many request bytes: retry shortly",
                )
                .into_http());
            }
        }
        if bytes.is_empty() {
            bytes = BytesMut::from(data);
        } else {
            bytes.extend_from_slice(&data);
        }
    }
    Ok((bytes.freeze(), held))
}
