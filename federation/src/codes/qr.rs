//! The form a code takes inside a QR symbol.
//!
//! A compact JWS mixes lower- and upper-case letters, so a QR symbol can only
//! hold it in byte mode, at 8 bits a character. Every character of a JWS lies
//! between `-` (45) and `z` (122), so, as SMART Health Cards do, each one is
//! written as two decimal digits (its code minus 45) and the digits go into
//! the symbol in numeric mode, at 10 bits for 3 digits: 6.7 bits a character,
//! a sixth less. The text begins with [`QR_PREFIX`] so that a scanner knows
//! what it read. A node's `Verify` takes either form; what it verifies, and
//! what standard JOSE tools verify, is always the JWS itself.

use std::borrow::Cow;

use super::{MAX_TOKEN_BYTES, Verdict};

/// The start of a code's QR text. Upper case, so that the QR symbol holds it
/// in alphanumeric mode.
pub const QR_PREFIX: &str = "HUFU:/";

/// Lowest character of a JWS (`-`), written as `00`.
const OFFSET: u8 = b'-';

/// The QR text of `token`: [`QR_PREFIX`] and two digits per character.
pub fn to_qr_text(token: &str) -> String {
    let mut text = String::with_capacity(QR_PREFIX.len() + 2 * token.len());
    text.push_str(QR_PREFIX);
    for b in token.bytes() {
        let n = b.saturating_sub(OFFSET);
        text.push(char::from(b'0' + n / 10));
        text.push(char::from(b'0' + n % 10));
    }
    text
}

/// The JWS in what a terminal scanned: the QR text decoded, or the input as
/// it is when it does not begin with [`QR_PREFIX`].
pub fn from_scanned(scanned: &str) -> Result<Cow<'_, str>, Verdict> {
    let Some(digits) = scanned
        .get(..QR_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(QR_PREFIX))
        .map(|_| &scanned[QR_PREFIX.len()..])
    else {
        return Ok(Cow::Borrowed(scanned));
    };
    if digits.len() > 2 * MAX_TOKEN_BYTES {
        return Err(Verdict::Malformed(format!(
            "QR text is {} digits, more than a code of {MAX_TOKEN_BYTES} bytes has",
            digits.len()
        )));
    }
    if digits.len() % 2 != 0 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Verdict::Malformed(format!(
            "text after {QR_PREFIX} must be pairs of digits: scan the code again"
        )));
    }
    let token = digits
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let n = (pair[0] - b'0') * 10 + (pair[1] - b'0');
            match OFFSET.checked_add(n) {
                Some(c @ b'-'..=b'z') => Ok(char::from(c)),
                _ => Err(Verdict::Malformed(format!(
                    "digits {n:02} after {QR_PREFIX} stand for no character of a code: scan the code again"
                ))),
            }
        })
        .collect::<Result<String, Verdict>>()?;
    Ok(Cow::Owned(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_plain_tokens_pass_through() {
        let token = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodWZ1OjQ0MDAwMCJ9.a-b_Zz09";
        let text = to_qr_text(token);
        assert!(text.starts_with(QR_PREFIX));
        assert_eq!(text.len(), QR_PREFIX.len() + 2 * token.len());
        assert_eq!(from_scanned(&text).unwrap(), token);
        assert_eq!(from_scanned(&text.to_lowercase()).unwrap(), token);
        assert!(matches!(from_scanned(token).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn bad_digits_are_malformed() {
        for bad in ["HUFU:/123", "HUFU:/12a4", "HUFU:/99"] {
            assert!(
                matches!(from_scanned(bad), Err(Verdict::Malformed(_))),
                "{bad}"
            );
        }
        let long = format!("{QR_PREFIX}{}", "20".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(from_scanned(&long), Err(Verdict::Malformed(_))));
    }
}
