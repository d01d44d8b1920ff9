//! A member's declaration of one legacy code format, its checks, and the
//! matcher that finds a scanned text's format among every member's.

use std::fmt;

use hufu_certs::Province;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

use super::CodeHash;
use crate::trust::TrustList;

/// Longest scanned text looked at, in bytes: more than any QR code holds in
/// the modes legacy codes use. A longer text is refused unread.
pub const MAX_SCAN_BYTES: usize = 4096;
/// Longest pattern a format may declare.
pub const MAX_PATTERN_BYTES: usize = 256;
/// Longest literal prefix a format may declare.
pub const MAX_PREFIX_BYTES: usize = 64;
/// Longest code id a format may capture.
pub const MAX_CODE_ID_BYTES: usize = 128;
/// Longest format name.
const MAX_NAME_BYTES: usize = 32;
/// Most formats one member may declare.
pub(crate) const MAX_FORMATS: usize = 8;
/// Bound on a compiled pattern's program (and its lazy DFA's cache): a
/// pattern such as `(a{100}){100}` exceeds it and is refused when the list
/// is made, never at a scan.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Deepest nesting of groups a pattern may have.
const NEST_LIMIT: u32 = 32;

/// Hufu's own codes as a terminal scans them: the QR text (anything after
/// `HUFU:/`, which the code verifier reads) or a compact JWS. No legacy
/// format may match any of these, so a scan is either Hufu's or a legacy
/// code, never both.
pub(crate) const HUFU_CODES: &str =
    r"(?s)\A(?:(?i:HUFU:/).*|[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)\z";

/// One legacy code format of a member, as the trust list declares it.
///
/// The scanned text matches when it starts with `prefix` and the rest
/// matches `pattern` in full; the pattern's one capture group is the code
/// id. Without a pattern the id is the rest of the text after the prefix
/// (printable ASCII, no spaces).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyFormat {
    /// Lowercase letters, digits and `-`, unique within the member, such as
    /// `yuekang`: named in answers and audit entries.
    pub name: String,
    /// A literal the text starts with (may be empty when `pattern` is given).
    pub prefix: String,
    /// A regular expression (Rust `regex` syntax) for the rest of the text,
    /// with exactly one capture group: the code id (may be empty when
    /// `prefix` is given).
    pub pattern: String,
    /// Longest scanned text of this format, in bytes.
    pub max_len: usize,
    /// A code of this format, as scanned: it must match.
    pub example: String,
}

impl LegacyFormat {
    /// The whole text's pattern: anchored at both ends, the prefix as a
    /// literal.
    pub(crate) fn full_pattern(&self) -> String {
        let rest = if self.pattern.is_empty() {
            "([!-~]+)"
        } else {
            &self.pattern
        };
        format!(r"(?s)\A{}(?:{rest})\z", regex::escape(&self.prefix))
    }

    /// Checks the declaration on its own (name, sizes, one capture group,
    /// the example matches) and compiles its matcher. Errors say what to
    /// change.
    pub fn compile(&self) -> Result<Regex, String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_BYTES
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(format!(
                "format name {:?} must be 1 to {MAX_NAME_BYTES} lowercase letters, digits or '-'",
                self.name
            ));
        }
        let named = |reason: String| format!("format {}: {reason}", self.name);
        if self.prefix.is_empty() && self.pattern.is_empty() {
            return Err(named("give a prefix, a pattern or both".into()));
        }
        if self.prefix.len() > MAX_PREFIX_BYTES || self.prefix.chars().any(char::is_control) {
            return Err(named(format!(
                "the prefix must be at most {MAX_PREFIX_BYTES} bytes without control characters"
            )));
        }
        if self.pattern.len() > MAX_PATTERN_BYTES {
            return Err(named(format!(
                "the pattern is {} bytes, more than the {MAX_PATTERN_BYTES} allowed: describe the code more simply",
                self.pattern.len()
            )));
        }
        if self.max_len == 0 || self.max_len > MAX_SCAN_BYTES {
            return Err(named(format!(
                "max_len must be from 1 to {MAX_SCAN_BYTES} bytes"
            )));
        }
        let regex = RegexBuilder::new(&self.full_pattern())
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .nest_limit(NEST_LIMIT)
            .build()
            .map_err(|e| named(format!("the pattern is refused: {}", one_line(&e))))?;
        if regex.captures_len() != 2 {
            return Err(named(format!(
                "the pattern has {} capture groups; it needs exactly one, the code id: make the others non-capturing, (?:...)",
                regex.captures_len() - 1
            )));
        }
        if self.example.len() > self.max_len {
            return Err(named(format!(
                "the example is {} bytes, longer than max_len {}",
                self.example.len(),
                self.max_len
            )));
        }
        if code_id(&regex, &self.example).is_none() {
            return Err(named(format!(
                "the example {:?} does not match (or captures an empty or over-long code id): fix the pattern or the example",
                self.example
            )));
        }
        Ok(regex)
    }
}

/// The code id `regex` captures from the whole of `text`, if any, non-empty
/// and not over-long.
fn code_id<'t>(regex: &Regex, text: &'t str) -> Option<&'t str> {
    let id = regex.captures(text)?.get(1)?.as_str();
    (!id.is_empty() && id.len() <= MAX_CODE_ID_BYTES).then_some(id)
}

/// regex's errors span several lines (the pattern, a caret, the message).
fn one_line(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "it compiles to more than {limit} bytes (a repetition of a repetition?): describe the code more simply"
        ),
        other => other
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// What a scanned text is.
#[derive(Debug)]
pub enum Scan<'a> {
    /// Hufu's own code (QR text or JWS): for the code verifier.
    Hufu,
    /// A member's legacy code.
    Legacy(CodeMatch<'a>),
    /// Neither: matches no member's format.
    Unmatched,
    /// Longer than any code: refused unread.
    TooLong { bytes: usize },
}

/// A scanned text matched to one member's format. The code id lives only
/// as long as the scan it was cut from.
pub struct CodeMatch<'a> {
    pub issuer: Province,
    pub format: &'a str,
    pub id: &'a str,
}

impl CodeMatch<'_> {
    /// The hash the issuer binds this code under.
    pub fn hash(&self) -> CodeHash {
        CodeHash::of(self.issuer, self.format, self.id)
    }
}

impl fmt::Debug for CodeMatch<'_> {
    // The id is the code itself: it never goes to a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeMatch")
            .field("issuer", &self.issuer)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

struct Compiled {
    province: Province,
    name: String,
    regex: Regex,
    max_len: usize,
}

/// Every member's legacy code formats, compiled, and Hufu's own code forms:
/// what a verifying node matches a scan against.
pub struct CodeFormats {
    hufu: Regex,
    set: RegexSet,
    formats: Vec<Compiled>,
}

impl fmt::Debug for CodeFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.formats.iter().map(|c| (c.province, &c.name)))
            .finish()
    }
}

impl Default for CodeFormats {
    fn default() -> CodeFormats {
        CodeFormats::from_formats(Vec::new())
    }
}

impl CodeFormats {
    /// The formats of every member of `list`. A list in force has been
    /// validated, so every format compiles; one that somehow does not is
    /// left out rather than taking the others down.
    pub fn new(list: &TrustList) -> CodeFormats {
        let mut formats = Vec::new();
        for m in &list.members {
            for f in &m.legacy_formats {
                match f.compile() {
                    Ok(regex) => formats.push(Compiled {
                        province: m.province,
                        name: f.name.clone(),
                        regex,
                        max_len: f.max_len,
                    }),
                    Err(e) => {
                        tracing::warn!(province = %m.province, error = %e, "legacy code format left out")
                    }
                }
            }
        }
        CodeFormats::from_formats(formats)
    }

    fn from_formats(formats: Vec<Compiled>) -> CodeFormats {
        let set = RegexSetBuilder::new(formats.iter().map(|c| c.regex.as_str()))
            .size_limit(REGEX_SIZE_LIMIT.saturating_mul(formats.len().max(1)))
            .dfa_size_limit(REGEX_SIZE_LIMIT.saturating_mul(formats.len().max(1)))
            .build()
            .unwrap_or_else(|_| RegexSet::empty());
        CodeFormats {
            hufu: Regex::new(HUFU_CODES).expect("a fixed pattern"),
            set,
            formats,
        }
    }

    /// How many formats are known.
    pub fn len(&self) -> usize {
        self.formats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.formats.is_empty()
    }

    /// What `text` is: Hufu's code, one member's legacy code (at most one
    /// can match: the trust list refuses overlapping formats), or nothing.
    /// Linear in the text, which is bounded by [`MAX_SCAN_BYTES`].
    pub fn scan<'a>(&'a self, text: &'a str) -> Scan<'a> {
        if text.len() > MAX_SCAN_BYTES {
            return Scan::TooLong { bytes: text.len() };
        }
        if self.hufu.is_match(text) {
            return Scan::Hufu;
        }
        let Some(i) = self.set.matches(text).iter().next() else {
            return Scan::Unmatched;
        };
        let c = &self.formats[i];
        if text.len() > c.max_len {
            return Scan::Unmatched;
        }
        match code_id(&c.regex, text) {
            Some(id) => Scan::Legacy(CodeMatch {
                issuer: c.province,
                format: &c.name,
                id,
            }),
            None => Scan::Unmatched,
        }
    }

    /// The code id in `text` if it is a code of `province`'s format named
    /// `format` (linking names the format), else None.
    pub fn match_format<'a>(
        &'a self,
        province: Province,
        format: &str,
        text: &'a str,
    ) -> Option<CodeMatch<'a>> {
        let c = self
            .formats
            .iter()
            .find(|c| c.province == province && c.name == format)?;
        if text.len() > c.max_len {
            return None;
        }
        code_id(&c.regex, text).map(|id| CodeMatch {
            issuer: province,
            format: &c.name,
            id,
        })
    }

    /// Names of `province`'s formats.
    pub fn names(&self, province: Province) -> Vec<&str> {
        self.formats
            .iter()
            .filter(|c| c.province == province)
            .map(|c| c.name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(prefix: &str, pattern: &str, example: &str) -> LegacyFormat {
        LegacyFormat {
            name: "yuekang".into(),
            prefix: prefix.into(),
            pattern: pattern.into(),
            max_len: 64,
            example: example.into(),
        }
    }

    #[test]
    fn declarations_are_checked() {
        let ok = format(
            "",
            r"(?:GD1|https://jkm\.gd\.example/c/)([A-Z2-7]{20})",
            "GD1ABCDEFGHIJKLMNOPQRST",
        );
        let regex = ok.compile().unwrap();
        assert_eq!(
            code_id(&regex, "https://jkm.gd.example/c/ABCDEFGHIJKLMNOPQRST"),
            Some("ABCDEFGHIJKLMNOPQRST")
        );
        // Anchored: a code inside a longer text is not a code.
        assert_eq!(code_id(&regex, "xGD1ABCDEFGHIJKLMNOPQRST"), None);
        assert_eq!(code_id(&regex, "GD1ABCDEFGHIJKLMNOPQRSTU"), None);
        // Prefix only: the id is the rest.
        let regex = format("SX:", "", "SX:12345").compile().unwrap();
        assert_eq!(code_id(&regex, "SX:12345"), Some("12345"));
        assert_eq!(code_id(&regex, "SX:"), None);

        for (bad, says) in [
            (format("", "", "x"), "give a prefix"),
            (format("", "[A-Z]+", "ABC"), "capture groups"),
            (format("", "([A-Z]+)([0-9]+)", "A1"), "capture groups"),
            (format("", "(A", "A"), "refused"),
            (format("X", "([0-9]+)", "Y1"), "does not match"),
            (format("X", &"(a)".repeat(100), "X"), "bytes, more than"),
        ] {
            let err = bad.compile().unwrap_err();
            assert!(err.contains(says), "{err}");
        }
        let mut bad_name = ok.clone();
        bad_name.name = "Yue Kang".into();
        assert!(bad_name.compile().unwrap_err().contains("format name"));
    }

    #[test]
    fn a_pathological_pattern_is_refused_cleanly() {
        // Nested counted repetitions: compiles to far more than the limit.
        let err = format("", r"((?:a{1,100}){1,100}){1,100}", "a")
            .compile()
            .unwrap_err();
        assert!(err.contains("describe the code more simply"), "{err}");
    }
}
