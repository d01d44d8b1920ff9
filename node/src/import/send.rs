//! Sending a status file to a node for `hufu status import`: the file is
//! read on a blocking thread while its rows stream to the node, through a
//! bounded channel, so memory stays flat whatever the file's size and the
//! node's pace sets the reading's. On a terminal, progress is shown on
//! standard error; elsewhere nothing is.

use std::fs::File;
use std::io::{BufReader, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hufu_proto::v1::admin_service_client::AdminServiceClient;
use hufu_proto::v1::{ImportRejection, ImportStatusesRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Line, Reader};

/// Rows read ahead of the node at most.
const READ_AHEAD: usize = 4096;

/// Rejected lines of the file kept for printing at most; all are counted.
const LISTED: usize = 1000;

/// How an import ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows the node stored (new or unchanged).
    pub accepted: u64,
    /// Lines of the file that are rows (all but a CSV header).
    pub lines: u64,
    /// Rejected lines, by line: those found here and those the node listed.
    pub rejected: Vec<ImportRejection>,
    /// Rejected lines in all, listed or not.
    pub rejected_count: u64,
}

/// What the reading thread and the progress display share.
#[derive(Default)]
struct Progress {
    rows: AtomicU64,
    bytes: AtomicU64,
}

/// Streams the rows of `reader` (a file of `size` bytes, called `name` in
/// messages) to the node behind `channel`, and returns the outcome once
/// the node's summary arrives.
pub async fn send(
    mut reader: Reader<BufReader<File>>,
    size: u64,
    channel: Channel,
    name: &str,
) -> anyhow::Result<Outcome> {
    let (rows, stream) = tokio::sync::mpsc::channel::<ImportStatusesRequest>(READ_AHEAD);
    let progress = Arc::new(Progress::default());
    let shared = progress.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let mut rejected = Vec::new();
        let mut count = 0u64;
        let result = loop {
            let line = match reader.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break Ok(()),
                Err(e) => break Err((reader.line, e)),
            };
            shared.bytes.store(reader.bytes_read(), Ordering::Relaxed);
            match line {
                Line::Row(row) => {
                    // The call ended (the node refused it): stop reading.
                    if rows.blocking_send(row).is_err() {
                        break Ok(());
                    }
                    shared.rows.fetch_add(1, Ordering::Relaxed);
                }
                Line::Rejected(r) => {
                    count += 1;
                    if rejected.len() < LISTED {
                        rejected.push(r);
                    }
                }
            }
        };
        (rejected, count, result)
    });

    let display = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(show(progress.clone(), size, name.to_owned())));
    let reply = AdminServiceClient::new(channel)
        .import_statuses(ReceiverStream::new(stream))
        .await;
    if let Some(display) = display {
        display.abort();
        eprint!("\r{:80}\r", "");
    }
    let (mut rejected, local_count, read) = reading
        .await
        .map_err(|e| anyhow::anyhow!("the file reader stopped: {e}"))?;
    let sent = progress.rows.load(Ordering::Relaxed);
    let summary = match reply {
        Ok(summary) => summary.into_inner(),
        Err(status) if status.message().contains("were stored durably") => {
            // The node said how far it got.
            anyhow::bail!(
                "import of {name} failed after {sent} rows were sent: {}",
                status.message()
            )
        }
        Err(status) => anyhow::bail!(
            "import of {name} broke off after {sent} rows were sent, before the node's summary arrived ({:?}: {}): the node commits rows in transactions of 1,000, so at most {sent} rows were committed; running the same import again is safe (rows already stored count as unchanged)",
            status.code(),
            status.message()
        ),
    };
    if let Err((line, e)) = read {
        anyhow::bail!(
            "cannot read {name} after line {line}: {e}; the {} rows before it were imported; running the import again once the file can be read is safe (rows already stored count as unchanged)",
            summary.accepted
        );
    }
    // A node that predates the count lists every rejection.
    let remote_count = summary.rejected_count.max(summary.rejected.len() as u64);
    rejected.extend(summary.rejected);
    rejected.sort_by_key(|r| r.line);
    Ok(Outcome {
        accepted: summary.accepted,
        lines: sent + local_count,
        rejected,
        rejected_count: local_count + remote_count,
    })
}

/// Rows sent, rows a second and the time left, twice a second.
async fn show(progress: Arc<Progress>, size: u64, name: String) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    loop {
        tick.tick().await;
        let rows = progress.rows.load(Ordering::Relaxed);
        let bytes = progress.bytes.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let rate = rows as f64 / secs.max(0.001);
        let left = if bytes > 0 && size > bytes {
            let eta = secs * (size - bytes) as f64 / bytes as f64;
            format!(", about {} left", human_duration(eta))
        } else {
            String::new()
        };
        let done = (100 * bytes).checked_div(size).unwrap_or(100);
        eprint!("\r{name}: {rows} rows sent ({done}%), {rate:.0} rows/s{left}   ");
        let _ = std::io::stderr().flush();
    }
}

fn human_duration(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}
