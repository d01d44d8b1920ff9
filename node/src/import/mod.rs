//! Reading status files for `hufu status import`: CSV with a header row, or
//! JSON Lines, streamed a line at a time. Every line is accounted for: it
//! becomes a row for the node or a rejection naming its line number and
//! reason (a byte that is not UTF-8 included).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use hufu_proto::v1::{ImportRejection, ImportStatusesRequest, StatusInput, status_input};
use serde::Deserialize;

use crate::status::{parse_colour, parse_reason, parse_time, timestamp};

mod send;
pub use send::{Outcome, send};

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
    /// A legacy code of the province, as its holder carries it, to bind to
    /// the row's holder.
    #[serde(default)]
    legacy_code: Option<String>,
}

impl InputRow {
    /// The row's status, and its legacy code (empty: none).
    fn into_input(self) -> Result<(StatusInput, String), String> {
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
        let status = StatusInput {
            subject: Some(subject),
            colour: colour as i32,
            as_of: parse_time(self.as_of.as_deref().unwrap_or(""))?.map(timestamp),
            last_negative_test: parse_time(self.last_negative_test.as_deref().unwrap_or(""))?
                .map(timestamp),
            reason: reason as i32,
        };
        let code = self.legacy_code.unwrap_or_default().trim().to_owned();
        Ok((status, code))
    }
}

/// Parsed file: rows to send and lines refused before sending.
#[derive(Debug, Default)]
pub struct Parsed {
    pub rows: Vec<ImportStatusesRequest>,
    pub rejected: Vec<ImportRejection>,
}

/// One line of a status file, read: a row for the node or a refusal.
#[derive(Debug)]
pub enum Line {
    Row(ImportStatusesRequest),
    Rejected(ImportRejection),
}

fn line(n: u64, row: Result<(StatusInput, String), String>) -> Line {
    match row {
        Ok((status, legacy_code)) => Line::Row(ImportStatusesRequest {
            line: n,
            status: Some(status),
            legacy_code,
        }),
        Err(reason) => Line::Rejected(ImportRejection { line: n, reason }),
    }
}

const KNOWN: [&str; 7] = [
    "national_id",
    "holder",
    "colour",
    "as_of",
    "last_negative_test",
    "reason",
    "legacy_code",
];

/// Reads a status file one line at a time, so that a file of any size
/// costs one line of memory: CSV (its header checked on open) or JSON Lines.
pub struct Reader<R> {
    input: R,
    format: Format,
    /// The CSV header's column names, lowercase.
    header: Vec<String>,
    /// Number of the last line read, from 1.
    line: u64,
    /// Bytes read so far (for progress).
    bytes: u64,
    buf: Vec<u8>,
}

impl Reader<BufReader<File>> {
    /// Opens `path`; an empty file, or a CSV file with a header only, is an
    /// error (nothing to import is a mistake worth hearing about).
    pub fn open(path: &Path, format: Option<Format>) -> anyhow::Result<Self> {
        let format = match format {
            Some(f) => f,
            None => Format::from_path(path)?,
        };
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        Reader::new(BufReader::with_capacity(256 * 1024, file), format)
            .with_context(|| format!("{}", path.display()))
    }
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R, format: Format) -> anyhow::Result<Self> {
        let mut reader = Reader {
            input,
            format,
            header: Vec::new(),
            line: 0,
            bytes: 0,
            buf: Vec::new(),
        };
        if format == Format::Csv {
            let header = match reader.next_text()? {
                None => anyhow::bail!("the file is empty: nothing to import"),
                Some(Err(reason)) => anyhow::bail!("bad CSV header: {reason}"),
                Some(Ok(header)) => header,
            };
            reader.header = csv_fields(&header)
                .map_err(|e| anyhow::anyhow!("bad CSV header: {e}"))?
                .into_iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect();
            if let Some(unknown) = reader.header.iter().find(|h| !KNOWN.contains(&h.as_str())) {
                anyhow::bail!(
                    "unknown CSV column {unknown:?}: expected some of {}",
                    KNOWN.join(", ")
                );
            }
            if !reader.header.iter().any(|h| h == "colour")
                || !reader
                    .header
                    .iter()
                    .any(|h| h == "national_id" || h == "holder")
            {
                anyhow::bail!(
                    "the CSV header must name a colour column and a national_id or holder column"
                );
            }
        }
        if reader.input.fill_buf()?.is_empty() {
            anyhow::bail!(match format {
                Format::Csv => "the file has a header but no rows: nothing to import",
                Format::Jsonl => "the file is empty: nothing to import",
            });
        }
        Ok(reader)
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The next line as text, without its line ending; `Err` (a reason)
    /// when it is not UTF-8.
    fn next_text(&mut self) -> std::io::Result<Option<Result<String, String>>> {
        self.buf.clear();
        let n = self.input.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        self.bytes += n as u64;
        let mut text = self.buf.as_slice();
        text = text.strip_suffix(b"\n").unwrap_or(text);
        text = text.strip_suffix(b"\r").unwrap_or(text);
        Ok(Some(match std::str::from_utf8(text) {
            Ok(t) => Ok(t.to_owned()),
            Err(e) => Err(format!(
                "byte 0x{:02x} at column {} is not UTF-8: save the file as UTF-8",
                text[e.valid_up_to()],
                e.valid_up_to() + 1
            )),
        }))
    }

    /// The next line, read and checked; None at the end of the file.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let Some(text) = self.next_text()? else {
            return Ok(None);
        };
        let n = self.line;
        let text = match text {
            Ok(text) => text,
            Err(reason) => return Ok(Some(line(n, Err(reason)))),
        };
        if text.trim().is_empty() {
            return Ok(Some(line(n, Err("empty line".into()))));
        }
        let row = match self.format {
            Format::Jsonl => serde_json::from_str::<InputRow>(&text)
                .map_err(|e| format!("bad JSON: {e}"))
                .and_then(InputRow::into_input),
            Format::Csv => csv_fields(&text)
                .map_err(|e| format!("bad CSV: {e}"))
                .and_then(|fields| {
                    if fields.len() != self.header.len() {
                        return Err(format!(
                            "{} fields, the header has {}",
                            fields.len(),
                            self.header.len()
                        ));
                    }
                    let mut row = InputRow::default();
                    for (name, value) in self.header.iter().zip(fields) {
                        match name.as_str() {
                            "national_id" => row.national_id = Some(value),
                            "holder" => row.holder = Some(value),
                            "colour" => row.colour = value,
                            "as_of" => row.as_of = Some(value),
                            "last_negative_test" => row.last_negative_test = Some(value),
                            "legacy_code" => row.legacy_code = Some(value),
                            _ => row.reason = Some(value),
                        }
                    }
                    row.into_input()
                }),
        };
        Ok(Some(line(n, row)))
    }
}

/// Parses a whole text (tests, small inputs).
pub fn parse(text: &str, format: Format) -> anyhow::Result<Parsed> {
    let mut reader = Reader::new(text.as_bytes(), format)?;
    let mut parsed = Parsed::default();
    while let Some(line) = reader.next_line()? {
        match line {
            Line::Row(row) => parsed.rows.push(row),
            Line::Rejected(r) => parsed.rejected.push(r),
        }
    }
    Ok(parsed)
}

/// Splits one CSV line (quoted fields allowed) with the csv crate.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    // A line without quotes or carriage returns is its fields between
    // commas, as the CSV reader reads it; building that reader for each
    // line took most of an import's client (issue 17).
    if !line.contains(['"', '\r']) {
        return Ok(line.split(',').map(str::to_owned).collect());
    }
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
    fn a_line_without_quotes_reads_as_the_csv_reader_reads_it() {
        for line in [
            "a,b,c",
            "a,,c,",
            ",",
            " a , b ",
            "x",
            "a,\"b,c\",d",
            "a,b\r",
        ] {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(line.as_bytes());
            let want: Vec<String> = match reader.records().next() {
                Some(record) => record.unwrap().iter().map(str::to_owned).collect(),
                None => vec![],
            };
            assert_eq!(csv_fields(line).unwrap(), want, "{line:?}");
        }
    }

    #[test]
    fn a_byte_that_is_not_utf8_is_named_by_line_and_column() {
        let mut text =
            b"national_id,colour\n11010519491231002X,green\n11010519491231002X,gr".to_vec();
        text.extend_from_slice(&[0xff, b'n', b'\n']);
        let mut reader = Reader::new(text.as_slice(), Format::Csv).unwrap();
        assert!(matches!(reader.next_line().unwrap(), Some(Line::Row(_))));
        let Some(Line::Rejected(r)) = reader.next_line().unwrap() else {
            panic!("line 3 is refused");
        };
        assert_eq!(r.line, 3);
        assert_eq!(
            r.reason,
            "byte 0xff at column 22 is not UTF-8: save the file as UTF-8"
        );
        assert!(reader.next_line().unwrap().is_none());
    }

    #[test]
    fn an_empty_file_is_an_error() {
        for (text, format) in [
            ("", Format::Csv),
            ("", Format::Jsonl),
            ("national_id,colour\n", Format::Csv),
        ] {
            let err = Reader::new(text.as_bytes(), format).err().unwrap();
            assert!(err.to_string().contains("nothing to import"), "{err}");
        }
    }

    #[test]
    fn a_legacy_code_column_travels_with_its_row() {
        let text = "national_id,colour,legacy_code\n\
                    11010519491231002X,green,GD1ABCDEFGHIJKLMNOPQRST\n\
                    110105194912310021,red,\n";
        let parsed = parse(text, Format::Csv).unwrap();
        let codes: Vec<_> = parsed.rows.iter().map(|r| r.legacy_code.as_str()).collect();
        assert_eq!(codes, ["GD1ABCDEFGHIJKLMNOPQRST", ""]);
        let text = "{\"holder\":\"MFRGGZDFMZTWQ2LKNNWG23TPOA\",\"colour\":\"red\",\"legacy_code\":\"GD1X\"}\n";
        assert_eq!(
            parse(text, Format::Jsonl).unwrap().rows[0].legacy_code,
            "GD1X"
        );
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
