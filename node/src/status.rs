//! Status records as the node handles them: parsing operator input, times,
//! and the rule that the newer `as_of` wins.

use std::time::{SystemTime, UNIX_EPOCH};

use hufu_proto::Timestamp;
use hufu_proto::v1::{Colour, Reason, StatusRecord};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn timestamp(secs: i64) -> Timestamp {
    Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// Seconds of an optional timestamp; `None` when unset.
pub fn seconds(ts: Option<&Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds)
}

/// Parses a colour as operators write it: `green`, `yellow`, `red`
/// (any case).
pub fn parse_colour(s: &str) -> Result<Colour, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "green" => Ok(Colour::Green),
        "yellow" => Ok(Colour::Yellow),
        "red" => Ok(Colour::Red),
        other => Err(format!(
            "unknown colour {other:?}: expected green, yellow or red"
        )),
    }
}

pub fn colour_name(c: Colour) -> &'static str {
    match c {
        Colour::Green => "green",
        Colour::Yellow => "yellow",
        Colour::Red => "red",
        Colour::Unspecified => "unspecified",
    }
}

/// Parses a reason: `none`, `close_contact`, `positive_test`,
/// `high_risk_travel`, `missing_test` (hyphens allowed); empty means none.
pub fn parse_reason(s: &str) -> Result<Reason, String> {
    match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
        "" | "none" => Ok(Reason::None),
        "close_contact" => Ok(Reason::CloseContact),
        "positive_test" => Ok(Reason::PositiveTest),
        "high_risk_travel" => Ok(Reason::HighRiskTravel),
        "missing_test" => Ok(Reason::MissingTest),
        other => Err(format!(
            "unknown reason {other:?}: expected none, close_contact, positive_test, high_risk_travel or missing_test"
        )),
    }
}

pub fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::None | Reason::Unspecified => "none",
        Reason::CloseContact => "close_contact",
        Reason::PositiveTest => "positive_test",
        Reason::HighRiskTravel => "high_risk_travel",
        Reason::MissingTest => "missing_test",
    }
}

/// Parses a time as RFC 3339 (`2022-01-10T08:00:00Z`) or Unix seconds; empty
/// means absent.
pub fn parse_time(s: &str) -> Result<Option<i64>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(Some(secs));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| Some(t.unix_timestamp()))
        .map_err(|e| format!("bad time {s:?}: {e}; use RFC 3339 like 2022-01-10T08:00:00Z"))
}

/// RFC 3339 rendering of Unix seconds, for people.
pub fn format_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Whether `candidate` should replace `stored`: a newer `as_of` wins, and an
/// equal one replaces only if something differs (so re-imports are no-ops).
pub fn supersedes(candidate: &StatusRecord, stored: &StatusRecord) -> bool {
    let new = seconds(candidate.as_of.as_ref()).unwrap_or(0);
    let old = seconds(stored.as_of.as_ref()).unwrap_or(0);
    new > old || (new == old && candidate != stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_input() {
        assert_eq!(parse_colour(" Red "), Ok(Colour::Red));
        assert!(parse_colour("blue").unwrap_err().contains("blue"));
        assert_eq!(parse_reason("close-contact"), Ok(Reason::CloseContact));
        assert_eq!(parse_reason(""), Ok(Reason::None));
        assert_eq!(parse_time("1641801600"), Ok(Some(1_641_801_600)));
        assert_eq!(parse_time("2022-01-10T08:00:00Z"), Ok(Some(1_641_801_600)));
        assert_eq!(parse_time(""), Ok(None));
        assert!(parse_time("yesterday").is_err());
        assert_eq!(format_time(1_641_801_600), "2022-01-10T08:00:00Z");
    }
}
