//! What admission holds for a call while it runs: the budget of long-lived
//! streams per caller identity, and the bytes of request messages being
//! buffered, both bounded in all and per caller identity, so that no caller
//! can make the node's memory grow nor take what others need.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hufu_certs::Identity;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::AdmissionConfig;
use crate::net::PeerInfo;
use crate::standing::Standing;

type Body = tonic::body::Body;

/// Amounts (streams, bytes) held per caller identity.
#[derive(Clone, Default)]
struct PerCaller(Arc<Mutex<HashMap<String, usize>>>);

impl PerCaller {
    /// Adds `n` to `caller`'s amount unless that would pass `limit`.
    fn add(&self, caller: &str, n: usize, limit: usize) -> bool {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.get(caller).copied().unwrap_or(0);
        if mine.saturating_add(n) > limit {
            return false;
        }
        held.insert(caller.to_owned(), mine + n);
        true
    }

    fn sub(&self, caller: &str, n: usize) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mine) = held.get_mut(caller) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                held.remove(caller);
            }
        }
    }
}

/// A caller's share of a [`PerCaller`] amount and of the node's total;
/// both given back when dropped.
struct Share {
    per_caller: PerCaller,
    caller: String,
    amount: usize,
    total: Option<OwnedSemaphorePermit>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.per_caller.sub(&self.caller, self.amount);
    }
}

/// Long-lived streams open per caller identity, and in all.
pub struct StreamBudget {
    per_caller: usize,
    held: PerCaller,
    total: Arc<Semaphore>,
}

/// One open long-lived stream; its place is freed when dropped.
pub struct HeldStream {
    _share: Share,
}

impl StreamBudget {
    pub fn new(per_caller: usize, total: usize) -> StreamBudget {
        StreamBudget {
            per_caller: per_caller.max(1),
            held: PerCaller::default(),
            total: Arc::new(Semaphore::new(total.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// A place for one more stream of `caller`, if its budget allows.
    pub fn open(&self, caller: &Identity) -> Option<HeldStream> {
        let caller = caller.uri();
        let total = self.total.clone().try_acquire_owned().ok()?;
        if !self.held.add(&caller, 1, self.per_caller) {
            return None;
        }
        Some(HeldStream {
            _share: Share {
                per_caller: self.held.clone(),
                caller,
                amount: 1,
                total: Some(total),
            },
        })
    }
}

/// Request bytes being buffered, in all and per caller identity: one
/// caller that never finishes its requests holds at most its share, and
/// the rest stays for everyone else.
pub struct BufferBudget {
    per_caller: usize,
    held: PerCaller,
    total: Arc<Semaphore>,
}

/// The request bytes one call holds.
pub struct Buffered(Share);

impl BufferBudget {
    pub fn new(total: usize, per_caller: usize) -> BufferBudget {
        BufferBudget {
            per_caller,
            held: PerCaller::default(),
            total: Arc::new(Semaphore::new(total.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// Nothing held yet, for a call of `caller`.
    fn hold(&self, caller: &Identity) -> Buffered {
        Buffered(Share {
            per_caller: self.held.clone(),
            caller: caller.uri(),
            amount: 0,
            total: None,
        })
    }
}

/// Whose limit more bytes would pass.
enum Overflow {
    Caller,
    Node,
}

impl Buffered {
    /// `n` more bytes, unless they would pass the caller's share or the
    /// node's budget.
    fn grow(&mut self, budget: &BufferBudget, n: usize) -> Result<(), Overflow> {
        let share = &mut self.0;
        if !budget.held.add(&share.caller, n, budget.per_caller) {
            return Err(Overflow::Caller);
        }
        share.amount += n;
        let permit = u32::try_from(n)
            .ok()
            .and_then(|n| budget.total.clone().try_acquire_many_owned(n).ok())
            .ok_or(Overflow::Node)?;
        match &mut share.total {
            Some(held) => held.merge(permit),
            None => share.total = Some(permit),
        }
        Ok(())
    }

    /// The refusal for `overflow`.
    fn refusal(&self, budget: &BufferBudget, overflow: Overflow) -> http::Response<Body> {
        let message = match overflow {
            Overflow::Caller => format!(
                "{} has too many request bytes in flight at this node (at most {} across its calls): let its calls finish first",
                self.0.caller, budget.per_caller
            ),
            Overflow::Node => "node is buffering too many request bytes: retry shortly".to_owned(),
        };
        tonic::Status::resource_exhausted(message).into_http()
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

/// Whether the node has begun to stop, for a body to end then.
struct Stopping(Pin<Box<WaitForCancellationFutureOwned>>);

impl Stopping {
    fn new(stop: CancellationToken) -> Stopping {
        Stopping(Box::pin(stop.cancelled_owned()))
    }

    /// True once the node stops; wakes the caller's task then otherwise.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        self.0.as_mut().poll(cx).is_ready()
    }
}

/// A long-lived response body that keeps its stream's place until it ends,
/// and ends it early with a status:
/// - when the node stops (`UNAVAILABLE`): a stream that lasts as long as its
///   caller wants (a health watch, reflection) must not hold the node's
///   shutdown;
/// - when its caller loses its standing (`PERMISSION_DENIED`): before each
///   message, the caller's standing is decided again, since its province
///   may have left the trust list, or its certificate been revoked, since
///   the stream opened.
pub struct HeldBody {
    inner: Body,
    _held: HeldStream,
    stopping: Stopping,
    standing: Arc<Standing>,
    caller: PeerInfo,
    method: &'static str,
    ended: bool,
}

impl HeldBody {
    pub fn new(
        inner: Body,
        held: HeldStream,
        stop: CancellationToken,
        standing: Arc<Standing>,
        caller: PeerInfo,
        method: &'static str,
    ) -> HeldBody {
        HeldBody {
            inner,
            _held: held,
            stopping: Stopping::new(stop),
            standing,
            caller,
            method,
            ended: false,
        }
    }

    /// The status ending the stream of a caller no longer in good standing,
    /// if it is not.
    fn refused(&self) -> Option<tonic::Status> {
        let err = crate::auth::in_good_standing(&self.standing, &self.caller, self.method).err()?;
        tracing::info!(caller = %self.caller.identity, method = self.method, "stream ended: caller no longer in good standing");
        Some(err.into())
    }

    /// Ends the stream with `status` in its trailers (or without, should
    /// the status not fit in headers).
    fn end(&mut self, status: tonic::Status) -> Poll<Frame> {
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_ok() {
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}

type Frame = Option<Result<http_body::Frame<Bytes>, tonic::Status>>;

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Frame> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.stopping.poll(cx) {
            return self.end(tonic::Status::unavailable(
                "node shutting down: call another node of the province, or this one after its restart",
            ));
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_data() => {
                if let Some(status) = self.refused() {
                    return self.end(status);
                }
            }
            // After the stream's own trailers, nothing more may be sent.
            Some(Ok(f)) if f.is_trailers() => self.ended = true,
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that ends when the node stops.
pub struct EndsAtStop(Body, Stopping);

impl EndsAtStop {
    pub fn new(inner: Body, stop: CancellationToken) -> EndsAtStop {
        EndsAtStop(inner, Stopping::new(stop))
    }
}

impl http_body::Body for EndsAtStop {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Frame> {
        if self.1.poll(cx) {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.0).poll_frame(cx)
    }
}

/// Reads a unary request's body from `caller`: at most one message of
/// `max_message` bytes (plus gRPC's 5-byte prefix), each chunk counted
/// against the caller's share and the node's budget of buffered bytes.
/// Reading stops at the first byte over any of them.
pub async fn collect(
    mut body: Body,
    max_message: usize,
    budget: &BufferBudget,
    caller: &Identity,
) -> Result<(Bytes, Buffered), http::Response<Body>> {
    let limit = max_message.saturating_add(5);
    let mut bytes = BytesMut::new();
    let mut held = budget.hold(caller);
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
        if let Err(overflow) = held.grow(budget, data.len()) {
            return Err(held.refusal(budget, overflow));
        }
        if bytes.is_empty() {
            bytes = BytesMut::from(data);
        } else {
            bytes.extend_from_slice(&data);
        }
    }
    Ok((bytes.freeze(), held))
}
