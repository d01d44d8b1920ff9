//! What runs beside a surge in `hufu bench surge`: an admin writing
//! statuses on a schedule, and the peer province replicating them from the
//! node's feed.

use std::sync::Arc;
use std::time::Duration;

use hufu_node::status::{now_unix, timestamp};
use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{PutStatusRequest, StatusInput, status_input};
use tonic::transport::Channel;

use super::{sample, scrape};

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
    /// Writes for `duration`; (acknowledged, failed).
    pub(super) async fn write(&self, duration: Duration, offset: u64) -> (u64, u64) {
        if self.per_sec == 0 {
            tokio::time::sleep(duration).await;
            return (0, 0);
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
            writes.spawn(async move { admin.put_status(request).await.is_ok() });
        }
        // Each write ends by its deadline.
        let done = writes.join_all().await;
        let ok = done.iter().filter(|ok| **ok).count() as u64;
        (ok, done.len() as u64 - ok)
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
