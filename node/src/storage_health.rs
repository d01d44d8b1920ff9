//! Keeps the node's storage writable and says when it is not: after a
//! failed write (a full disk), the store reopens and probes itself until
//! writes succeed again, and meanwhile gRPC health reports `NOT_SERVING`
//! for the whole node (the empty service name) and for the admin API that
//! writes, while lookups keep answering from what is stored. The same while
//! statuses written keep failing to merge into their buckets (the store
//! refuses writes then, and retries the merge every second).

use std::sync::Arc;

use hufu_proto::v1::admin_service_server::AdminServiceServer;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::services::admin::AdminService;
use crate::store::Store;

/// Runs until `stop`.
pub async fn run(store: Arc<Store>, health: HealthReporter, stop: CancellationToken) {
    let mut writable = store.watch_writable();
    let mut merge_failing = store.watch_merge_failing();
    let report = async {
        loop {
            let status =
                if *writable.borrow_and_update() && merge_failing.borrow_and_update().is_none() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
            health.set_service_status("", status).await;
            health
                .set_service_status(
                    <AdminServiceServer<AdminService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            let changed = tokio::select! {
                changed = writable.changed() => changed,
                changed = merge_failing.changed() => changed,
            };
            if changed.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = report => {}
        _ = store.keep_writable(stop.clone()) => {}
    }
}
