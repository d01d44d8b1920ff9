//! Queries over a fetched audit directory, and their export as JSON Lines
//! or CSV.
//!
//! A query reads the entries as they are; run [`verify_dir`](super::verify_dir)
//! first to know they are the log's.
//!
//! Both exports have one record per entry with the same fields, in this
//! order: `index`, `time` (unix millis), `time_utc` (RFC 3339), `kind`,
//! `caller`, `province`, `holder`, `answer`, `source`, `detail`. Absent
//! fields are `null` in JSON Lines and empty in CSV.

use std::io::Write;
use std::path::Path;

use hufu_certs::Province;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::dir::{StoredLine, entry_lines};
use super::{AnswerSource, AuditEntry, AuditError, EntryKind};
use crate::holder::HolderId;

/// Which entries a query keeps: all conditions must hold; `None` matches
/// anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Entries at or after this time (unix millis).
    pub since: Option<u64>,
    /// Entries before this time (unix millis).
    pub until: Option<u64>,
    /// Entries whose caller identity URI contains this text.
    pub caller: Option<String>,
    /// Entries about this province.
    pub province: Option<Province>,
    /// Entries about this holder.
    pub holder: Option<HolderId>,
    pub kind: Option<EntryKind>,
}

impl Filter {
    pub fn matches(&self, entry: &AuditEntry) -> bool {
        self.since.is_none_or(|t| entry.time >= t)
            && self.until.is_none_or(|t| entry.time < t)
            && self
                .caller
                .as_ref()
                .is_none_or(|c| entry.caller.uri().contains(c.as_str()))
            && self.province.is_none_or(|p| entry.province == p)
            && self
                .holder
                .as_ref()
                .is_none_or(|h| entry.holder.as_ref() == Some(h))
            && self.kind.is_none_or(|k| entry.kind == k)
    }
}

/// An entry and its index in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub entry: AuditEntry,
}

/// The entries of the audit directory `dir` that `filter` keeps, in log
/// order.
pub fn query(dir: &Path, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let mut records = Vec::new();
    for item in entry_lines(dir)? {
        let StoredLine { index, bytes, .. } = item?;
        let entry = AuditEntry::decode(&bytes).map_err(|e| AuditError::BadStoredEntry {
            index,
            reason: e.to_string(),
        })?;
        if filter.matches(&entry) {
            records.push(Record { index, entry });
        }
    }
    Ok(records)
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line.
    JsonLines,
    /// A header line, then one row per entry.
    Csv,
}

/// The export's fields, in order.
const COLUMNS: [&str; 10] = [
    "index", "time", "time_utc", "kind", "caller", "province", "holder", "answer", "source",
    "detail",
];

/// One exported record, flat, in column order.
#[derive(Serialize)]
struct Row<'a> {
    index: u64,
    time: u64,
    time_utc: String,
    kind: &'static str,
    caller: String,
    province: Province,
    holder: Option<&'a str>,
    answer: Option<&'a str>,
    source: Option<AnswerSource>,
    detail: Option<&'a str>,
}

impl<'a> Row<'a> {
    fn of(record: &'a Record) -> Row<'a> {
        let e = &record.entry;
        Row {
            index: record.index,
            time: e.time,
            time_utc: time_utc(e.time),
            kind: e.kind.as_str(),
            caller: e.caller.uri(),
            province: e.province,
            holder: e.holder.as_ref().map(HolderId::as_str),
            answer: e.answer.as_deref(),
            source: e.source,
            detail: e.detail.as_deref(),
        }
    }
}

/// Writes `records` to `out` in `format`.
pub fn export(records: &[Record], format: ExportFormat, out: impl Write) -> Result<(), AuditError> {
    let failed = |e: String| AuditError::Io {
        action: "write",
        path: "the export".into(),
        source: std::io::Error::other(e),
    };
    match format {
        ExportFormat::JsonLines => {
            let mut out = std::io::BufWriter::new(out);
            for record in records {
                serde_json::to_writer(&mut out, &Row::of(record))
                    .map_err(|e| failed(e.to_string()))?;
                out.write_all(b"\n").map_err(|e| failed(e.to_string()))?;
            }
            out.flush().map_err(|e| failed(e.to_string()))
        }
        ExportFormat::Csv => {
            let mut out = csv::Writer::from_writer(out);
            // The header comes from the first row; with none, write it here.
            if records.is_empty() {
                out.write_record(COLUMNS)
                    .map_err(|e| failed(e.to_string()))?;
            }
            for record in records {
                out.serialize(Row::of(record))
                    .map_err(|e| failed(e.to_string()))?;
            }
            out.flush().map_err(|e| failed(e.to_string()))
        }
    }
}

/// `time` (unix millis) in RFC 3339, UTC.
fn time_utc(millis: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
