//! Reading status files for `hufu status import`: CSV with a header row, or
//! JSON Lines. Every line is accounted for: it becomes a row for the node or a
//! rejection naming its line number and reason.

use std::path::Path;

use anyhow::Context;
use hufu_proto::v1::{ImportRejection, ImportStatusesRequest, StatusInput, status_input};
use serde::Deserialize;

use crate::status::{parse_colour, parse_reason, parse_time, timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    pub fn from_path(path: &Path) -> anyhow::Result<Format> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Ok(Format::Csv),
            Some("jsonl" | "ndjson" | "json") => Ok(Format::Jsonl),
            _ => anyhow::bail!(
                "cannot tell the format of {}: name it .csv or .jsonl, or pass --format",
                path.display()
            ),
        }
    }
}

/// One input row as written by operators. Times are RFC 3339 or Unix seconds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRow {
    #[serde(default)]
    national_id: Option<String>,
    #[serde(default)]
    holder: Option<String>,
    colour: String,
    #[serde(default)]
    as_of: Option<String>,
    #[serde(default)]
    last_negative_test: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

impl InputRow {
    fn into_input(self) -> Result<StatusInput, String> {
        let subject = match (
            self.national_id.filter(|s| !s.trim().is_empty()),
            self.holder.filter(|s| !s.trim().is_empty()),
        ) {
            (Some(id), _) => status_input::Subject::NationalId(id.trim().to_owned()),
            (None, Some(h)) => status_input::Subject::Holder(h.trim().to_owned()),
            (None, None) => return Err("no national_id or holder".into()),
        };
        let colour = parse_colour(&self.colour)?;
        let reason = parse_reason(self.reason.as_deref().unwrap_or(""))?;
        Ok(StatusInput {
            subject: Some(subject),
            colour: colour as i32,
            as_of: parse_time(self.as_of.as_deref().unwrap_or(""))?.map(timestamp),
            last_negative_test: parse_time(self.last_negative_test.as_deref().unwrap_or(""))?
                .map(timestamp),
            reason: reason as i32,
        })
    }
}

/// Parsed file: rows to send and lines refused before sending.
#[derive(Debug, Default)]
pub struct Parsed {
    pub rows: Vec<ImportStatusesRequest>,
    pub rejected: Vec<ImportRejection>,
}

impl Parsed {
    fn push(&mut self, line: u64, row: Result<StatusInput, String>) {
        match row {
            Ok(status) => self.rows.push(ImportStatusesRequest {
                line,
                status: Some(status),
            }),
            Err(reason) => self.rejected.push(ImportRejection { line, reason }),
        }
    }
}

pub fn read_file(path: &Path, format: Option<Format>) -> anyhow::Result<Parsed> {
    let format = match format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text, format)
}

pub fn parse(text: &str, format: Format) -> anyhow::Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i as u64 + 1, l));
    match format {
        Format::Jsonl => {
            for (n, line) in lines {
                if line.trim().is_empty() {
                    parsed.push(n, Err("empty line".into()));
                    continue;
                }
                let row = serde_json::from_str::<InputRow>(line)
                    .map_err(|e| format!("bad JSON: {e}"))
                    .and_then(InputRow::into_input);
                parsed.push(n, row);
            }
        }
        Format::Csv => {
            let Some((_, header)) = lines.next() else {
                return Ok(parsed);
            };
            let header: Vec<String> = csv_fields(header)
                .map_err(|e| anyhow::anyhow!("bad CSV header: {e}"))?
                .into_iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect();
            const KNOWN: [&str; 6] = [
                "national_id",
                "holder",
                "colour",
                "as_of",
                "last_negative_test",
                "reason",
            ];
            if let Some(unknown) = header.iter().find(|h| !KNOWN.contains(&h.as_str())) {
                anyhow::bail!(
                    "unknown CSV column {unknown:?}: expected some of {}",
                    KNOWN.join(", ")
                );
            }
            if !header.iter().any(|h| h == "colour")
                || !header.iter().any(|h| h == "national_id" || h == "holder")
            {
                anyhow::bail!(
                    "the CSV header must name a colour column and a national_id or holder column"
                );
            }
            for (n, line) in lines {
                if line.trim().is_empty() {
                    parsed.push(n, Err("empty line".into()));
                    continue;
                }
                let row = csv_fields(line)
                    .map_err(|e| format!("bad CSV: {e}"))
                    .and_then(|fields| {
                        if fields.len() != header.len() {
                            return Err(format!(
                                "{} fields, the header has {}",
                                fields.len(),
                                header.len()
                            ));
                        }
                        let mut row = InputRow::default();
                        for (name, value) in header.iter().zip(fields) {
                            match name.as_str() {
                                "national_id" => row.national_id = Some(value),
                                "holder" => row.holder = Some(value),
                                "colour" => row.colour = value,
                                "as_of" => row.as_of = Some(value),
                                "last_negative_test" => row.last_negative_test = Some(value),
                                _ => row.reason = Some(value),
                            }
                        }
                        row.into_input()
                    });
                parsed.push(n, row);
            }
        }
    }
    Ok(parsed)
}

/// Splits one CSV line (quoted fields allowed) with the csv crate.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(line.as_bytes());
    match reader.records().next() {
        Some(Ok(record)) => Ok(record.iter().map(str::to_owned).collect()),
        Some(Err(e)) => Err(e.to_string()),
        None => Ok(vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_accounted_for() {
        let text = "national_id,colour,as_of,reason\n\
                    11010519491231002X,green,2022-01-10T08:00:00Z,\n\
                    \n\
                    110105194912310021,red,,positive_test\n\
                    11010519491231002X,blue,,\n\
                    \"11010519491231002X\",yellow,,missing-test\n";
        let parsed = parse(text, Format::Csv).unwrap();
        assert_eq!(
            parsed.rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            vec![2, 4, 6]
        );
        let rejected: Vec<_> = parsed
            .rejected
            .iter()
            .map(|r| (r.line, r.reason.as_str()))
            .collect();
        assert_eq!(rejected[0], (3, "empty line"));
        assert_eq!(rejected[1].0, 5);
        assert!(rejected[1].1.contains("unknown colour \"blue\""));
    }

    #[test]
    fn json_lines() {
        let text = "{\"national_id\":\"11010519491231002X\",\"colour\":\"red\",\"reason\":\"close_contact\"}\n{\"colour\":\"red\"}\nnot json\n";
        let parsed = parse(text, Format::Jsonl).unwrap();
        assert_eq!(parsed.rows.len(), 1);
        assert_eq!(parsed.rejected.len(), 2);
        assert!(parsed.rejected[0].reason.contains("no national_id"));
        assert!(parsed.rejected[1].reason.starts_with("bad JSON"));
    }
}
