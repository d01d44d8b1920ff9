//! Keeps the node's storage writable and says when it is not: after a
//! failed write (a full disk), the store reopens and probes itself until
//! writes succeed again, and meanwhile gRPC health reports `NOT_SERVING`
//! for the whole node (the empty service name) and for the admin API that
//! writes, while lookups keep answering from what is stored. A store that
//! cannot even be opened because its disk is full says so ([`full_disk`]).

use std::path::Path;
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
    let report = async {
        loop {
            let status = if *writable.borrow_and_update() {
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
            if writable.changed().await.is_err() {
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

/// `err`, from opening a store at `path`, said plainly if the disk holding
/// it is full: how much is free there and what to do, instead of sled's
/// bare "No space left on device".
pub fn full_disk(err: anyhow::Error, path: &Path) -> anyhow::Error {
    let full = err.chain().any(|cause| {
        let io =
            cause
                .downcast_ref::<std::io::Error>()
                .or(match cause.downcast_ref::<sled::Error>() {
                    Some(sled::Error::Io(io)) => Some(io),
                    _ => None,
                });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    if !full {
        return err;
    }
    // The store's directory may not exist yet: ask about its nearest
    // existing ancestor, on the same disk.
    let free = path
        .ancestors()
        .find(|dir| dir.exists())
        .and_then(|dir| fs2::available_space(dir).ok());
    let free = match free {
        Some(bytes) => format!("{} KiB free", bytes / 1024),
        None => "free space unknown".to_string(),
    };
    err.context(format!(
        "the disk holding {} is full ({free}): free space on it, or move the store to a larger disk, then start the node again",
        path.display()
    ))
}
