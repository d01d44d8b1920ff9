//! Holders: national identity numbers as they arrive at issuance, and the
//! pseudonyms that replace them everywhere else.
//!
//! A national id (GB 11643-1999, 18 characters with an ISO 7064 MOD 11-2 check
//! character) is validated and immediately turned into a [`HolderId`]: the
//! first 128 bits of HMAC-SHA256 under the province's secret, in base32. The
//! national id itself is never stored or sent to another province.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::hmac;
use data_encoding::BASE32_NOPAD;

/// Why a national id or holder id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HolderError {
    #[error("national id must be 18 characters, got {0}")]
    Length(usize),
    #[error("national id must be 17 digits followed by a digit or X")]
    Characters,
    #[error("national id check character is {found}, expected {expected} (GB 11643 checksum)")]
    Checksum { found: char, expected: char },
    #[error("holder id must be 26 base32 characters (A-Z, 2-7)")]
    BadHolderId,
    #[error("province secret must be at least 32 bytes, got {0}")]
    ShortSecret(usize),
}

/// A validated national identity number. Deliberately not `Debug`-printable in
/// full and not serialisable: it exists only between input and pseudonymisation.
#[derive(Clone, PartialEq, Eq)]
pub struct NationalId(String);

impl fmt::Debug for NationalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NationalId({}…)", &self.0[..6])
    }
}

impl NationalId {
    /// Validates the GB 11643 format and checksum. Lower-case `x` and
    /// surrounding whitespace are accepted and normalised.
    pub fn parse(raw: &str) -> Result<NationalId, HolderError> {
        let id = raw.trim().to_ascii_uppercase();
        if id.len() != 18 {
            return Err(HolderError::Length(id.chars().count()));
        }
        let bytes = id.as_bytes();
        if !bytes[..17].iter().all(u8::is_ascii_digit)
            || !(bytes[17].is_ascii_digit() || bytes[17] == b'X')
        {
            return Err(HolderError::Characters);
        }
        let expected = check_character(&bytes[..17]);
        let found = bytes[17] as char;
        if found != expected {
            return Err(HolderError::Checksum { found, expected });
        }
        Ok(NationalId(id))
    }

    /// Builds a valid id from its first 17 digits by appending the check
    /// character; used for sample data and tests.
    pub fn with_check_character(first17: &str) -> Result<NationalId, HolderError> {
        if first17.len() != 17 || !first17.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HolderError::Characters);
        }
        let check = check_character(first17.as_bytes());
        NationalId::parse(&format!("{first17}{check}"))
    }

    /// The normalised 18-character form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// ISO 7064 MOD 11-2 as GB 11643 specifies it.
fn check_character(first17: &[u8]) -> char {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
    let sum: u32 = first17
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize]
}

/// A holder's pseudonym: 128 bits, base32 without padding (26 characters).
/// This is the only holder identifier that is stored, replicated or audited.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolderId(String);

impl HolderId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HolderId {
    type Err = HolderError;

    fn from_str(s: &str) -> Result<HolderId, HolderError> {
        let s = s.trim();
        // Decoded into the stack: every audit entry about a holder parses
        // its id, an import's a hundred thousand a second.
        let mut bytes = [0u8; 16];
        let decoded = match BASE32_NOPAD.decode_len(s.len()) {
            Ok(16) => BASE32_NOPAD.decode_mut(s.as_bytes(), &mut bytes).ok(),
            _ => None,
        };
        match decoded {
            Some(16) if s.len() == 26 => Ok(HolderId(s.to_owned())),
            _ => Err(HolderError::BadHolderId),
        }
    }
}

/// The province secret that keys holder pseudonyms.
#[derive(Clone)]
pub struct HolderSecret(hmac::Key);

impl fmt::Debug for HolderSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HolderSecret(..)")
    }
}

impl HolderSecret {
    pub const LEN: usize = 32;

    pub fn new(secret: &[u8]) -> Result<HolderSecret, HolderError> {
        if secret.len() < Self::LEN {
            return Err(HolderError::ShortSecret(secret.len()));
        }
        Ok(HolderSecret(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// A fresh random secret, for `hufu init`.
    pub fn generate_bytes() -> [u8; Self::LEN] {
        let mut bytes = [0u8; Self::LEN];
        aws_lc_rs::rand::fill(&mut bytes).expect("system randomness is available");
        bytes
    }

    /// HMAC-SHA256(secret, normalised national id), truncated to 128 bits.
    pub fn pseudonym(&self, id: &NationalId) -> HolderId {
        let tag = hmac::sign(&self.0, id.as_str().as_bytes());
        HolderId(BASE32_NOPAD.encode(&tag.as_ref()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_the_standard_example() {
        // The worked example from GB 11643-1999, annex A.
        assert!(NationalId::parse("11010519491231002X").is_ok());
        assert!(NationalId::parse("11010519491231002x").is_ok());
        assert_eq!(
            NationalId::parse("110105194912310021"),
            Err(HolderError::Checksum {
                found: '1',
                expected: 'X'
            })
        );
        assert_eq!(
            NationalId::parse("1101051949"),
            Err(HolderError::Length(10))
        );
        assert_eq!(
            NationalId::parse("1101051949123100AX"),
            Err(HolderError::Characters)
        );
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_short() {
        let id = NationalId::parse("11010519491231002X").unwrap();
        let a = HolderSecret::new(&[1; 32]).unwrap();
        let b = HolderSecret::new(&[2; 32]).unwrap();
        let p = a.pseudonym(&id);
        assert_eq!(
            p,
            a.pseudonym(&NationalId::parse(" 11010519491231002x ").unwrap())
        );
        assert_ne!(p, b.pseudonym(&id));
        assert_eq!(p.as_str().len(), 26);
        assert_eq!(p.as_str().parse::<HolderId>().unwrap(), p);
        assert!(!p.as_str().contains("110105"));
        assert!(HolderSecret::new(&[0; 8]).is_err());
    }
}
