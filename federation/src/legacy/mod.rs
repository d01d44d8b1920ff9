//! Provinces' existing ("legacy") health codes: the formats members declare
//! in the trust list, how a scanned text is matched to its issuer, and the
//! hash under which a code travels between provinces.
//!
//! A member declares each of its code formats as a [`LegacyFormat`]: a
//! name, a literal prefix and/or a regular expression with exactly one
//! capture group (the code id), a bound on the scanned text's length, and an
//! example. Patterns are compiled by the `regex` crate, whose matching takes
//! time linear in the text, under size limits, so a pathological pattern is
//! refused when the list is made and no scan can be made to take long.
//!
//! A list whose formats could match the same text (two members', two of one
//! member's, or one format and Hufu's own codes) is refused, naming both and
//! a text that both match: [`check_formats`] decides it exactly, by
//! exploring the product of the two patterns' DFAs ([`overlap`]).
//!
//! At a verifying node, [`CodeFormats`] matches a scan against every
//! member's formats at once and yields the issuer, the format and the code
//! id. The id itself never leaves that call: bindings are stored, sent in
//! feeds and audited as a [`CodeHash`], SHA-256 of the id domain-separated
//! by province and format, so a replica can resolve a code it is shown but
//! cannot produce one.

mod format;
mod overlap;

use std::fmt;

use aws_lc_rs::digest::{SHA256, digest};
use hufu_certs::Province;

pub(crate) use format::MAX_FORMATS;
pub use format::{
    CodeFormats, CodeMatch, LegacyFormat, MAX_CODE_ID_BYTES, MAX_PATTERN_BYTES, MAX_PREFIX_BYTES,
    MAX_SCAN_BYTES, Scan,
};
pub(crate) use overlap::check_formats;

/// First line of every hashed code id: domain separation from any other
/// SHA-256 in the federation.
const HASH_LABEL: &str = "hufu.legacy-code/v1\n";

/// SHA-256 of a legacy code id, under its issuing province and format: what
/// bindings are stored, replicated and audited under instead of the id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodeHash(pub [u8; 32]);

impl CodeHash {
    /// The hash of code id `id` of format `format` issued by `province`.
    pub fn of(province: Province, format: &str, id: &str) -> CodeHash {
        let mut input = String::with_capacity(HASH_LABEL.len() + 8 + format.len() + id.len());
        input.push_str(HASH_LABEL);
        input.push_str(&province.to_string());
        input.push('\n');
        // A format name holds no newline (LegacyFormat::compile), so the
        // fields cannot run into each other.
        input.push_str(format);
        input.push('\n');
        input.push_str(id);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, input.as_bytes()).as_ref());
        CodeHash(out)
    }

    /// A hash received as bytes (a feed, a `ResolveCode` request).
    pub fn from_slice(bytes: &[u8]) -> Option<CodeHash> {
        bytes.try_into().ok().map(CodeHash)
    }
}

impl fmt::Display for CodeHash {
    /// Unpadded base64url, 43 characters: how audit entries name a code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE64URL_NOPAD.encode(&self.0))
    }
}

impl fmt::Debug for CodeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_separated_by_province_and_format() {
        let gd = Province::parse("440000").unwrap();
        let sx = Province::parse("610000").unwrap();
        let h = CodeHash::of(gd, "yuekang", "ABC");
        assert_eq!(h, CodeHash::of(gd, "yuekang", "ABC"));
        assert_ne!(h, CodeHash::of(sx, "yuekang", "ABC"));
        assert_ne!(h, CodeHash::of(gd, "other", "ABC"));
        assert_ne!(h, CodeHash::of(gd, "yuekang", "ABD"));
        assert_eq!(h.to_string().len(), 43);
        assert_eq!(CodeHash::from_slice(&h.0), Some(h));
        assert_eq!(CodeHash::from_slice(&[0; 31]), None);
    }
}
