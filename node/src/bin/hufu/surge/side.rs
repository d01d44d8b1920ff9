//! What runs beside a surge in `hufu bench surge`: an admin writing
//! statuses on a schedule, and the peer province replicating them from the
//! node's feed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{PutStatusRequest, StatusInput, status_input};
use tonic::transport::Channel;

use super::{sample, scrape};
use crate::loadgen::histogram;

/// What runs beside the surge: an admin writing statuses, and the peer
/// province replicating them.
pub(super) struct SideTraffic {
    pub(super) admin: AdminServiceClient<Channel>,
    /// Writes a second, each sent at its scheduled time whatever the
    /// others' latency. Written one after another instead, as many got
    /// through as the node's latency let (9 to 31 a second in steps where
    /// the capacity measurement had 12 to 23), and each phase paid for a
    /// different number of them.
    pub(super) per_sec: u64,
    pub(super) holders: Arc<Vec<String>>,
    pub(super) node_metrics: Option<std::net::SocketAddr>,
    pub(super) peer_metrics: Option<std::net::SocketAddr>,
}

impl SideTraffic {
    /// Writes for `duration`.
    pub(super) async fn write(&self, duration: Duration, offset: u64) -> Writes {
        if self.per_sec == 0 {
            tokio::time::sleep(duration).await;
            return Writes::default();
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.per_sec as u32);
        let end = tokio::time::Instant::now() + duration;
        let mut writes = tokio::task::JoinSet::new();
        let mut n = offset;
        while tokio::time::Instant::now() < end {
            tick.tick().await;
            n += 1;
            let holder = self.holders[(n as usize) % self.holders.len()].clone();
            let mut request = tonic::Request::new(PutStatusRequest {
                status: Some(StatusInput {
                    subject: Some(status_input::Subject::Holder(holder)),
                    colour: 1 + (n % 3) as i32,
                    as_of: Some(timestamp(now_unix())),
                    last_negative_test: None,
                    reason: 0,
                }),
            });
            request.set_timeout(Duration::from_secs(1));
            let mut admin = self.admin.clone();
            let sent = Instant::now();
            writes.spawn(async move {
                let reply = admin.put_status(request).await;
                (reply.map(|_| ()).map_err(|s| s.code()), sent.elapsed())
            });
        }
        // Each write ends by its deadline.
        let mut done = Writes::default();
        for (reply, took) in writes.join_all().await {
            match reply {
                Ok(()) => {
                    done.ok += 1;
                    let _ = done.took.record(took.as_micros().max(1) as u64);
                }
                Err(code) => *done.failed.entry(format!("{code:?}")).or_default() += 1,
            }
        }
        done
    }

    /// Changes in the node's log not yet applied at the peer.
    pub(super) async fn lag(&self) -> Option<f64> {
        let node = scrape(self.node_metrics?).await.ok()?;
        let peer = scrape(self.peer_metrics?).await.ok()?;
        let head = sample(&node, "hufu_change_log_sequence ");
        let applied = sample(&peer, "hufu_feed_changes_applied_total");
        Some(head - applied)
    }
}

/// The admin's writes during one phase.
pub(super) struct Writes {
    /// Acknowledged.
    pub(super) ok: u64,
    /// Failed, by status code.
    pub(super) failed: BTreeMap<String, u64>,
    /// How long each acknowledged write took, in µs.
    took: Histogram<u64>,
}

impl Default for Writes {
    fn default() -> Writes {
        Writes {
            ok: 0,
            failed: BTreeMap::new(),
            took: histogram(),
        }
    }
}

impl Writes {
    pub(super) fn failed(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The latency of acknowledged writes at `q` (0 to 1), in ms.
    pub(super) fn took_ms(&self, q: f64) -> Option<f64> {
        (!self.took.is_empty()).then(|| self.took.value_at_quantile(q) as f64 / 1000.0)
    }
}
