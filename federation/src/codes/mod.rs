//! Health codes: short-lived signed JWTs that any node verifies offline.
//!
//! A province signs codes with the keys in its [`Keyring`] and publishes the
//! public halves as a standard [`Jwks`]; every other node feeds those JWKS into
//! a [`CodeVerifier`] and checks codes without calling anyone. The token is a
//! plain compact JWS (ES256 by default, EdDSA allowed) so that standard JOSE
//! tools verify it from the published JWKS too.
//!
//! Beside the pseudonym a code may carry the holder's masked name and masked
//! national id ([`display`]), for a checkpoint to compare with the person
//! showing it. In a QR symbol a code is written in numeric form ([`qr`]).

mod bench;
pub mod display;
mod jwk;
mod keyring;
pub mod qr;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hufu_certs::Province;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

pub use bench::raw_es256_verify_rate;
pub use jwk::{Jwk, Jwks};
pub use keyring::{KeyRecord, Keyring, RETIRED_KEY_GRACE, generate_key, key_id};
pub use verify::{CodeVerifier, MAX_TOKEN_BYTES, Verdict, VerifiedCode};

/// Prefix of the `iss` claim: `hufu:<six-digit province code>`.
pub const ISSUER_PREFIX: &str = "hufu:";

/// The signature algorithm of a code-signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CodeAlg {
    /// ECDSA P-256 with SHA-256: the default, because every JOSE library has it.
    #[default]
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl CodeAlg {
    /// The JOSE name (`ES256`, `EdDSA`) used in headers and JWKs.
    pub fn jose_name(self) -> &'static str {
        match self {
            CodeAlg::Es256 => "ES256",
            CodeAlg::EdDsa => "EdDSA",
        }
    }

    pub(crate) fn algorithm(self) -> Algorithm {
        match self {
            CodeAlg::Es256 => Algorithm::ES256,
            CodeAlg::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for CodeAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.jose_name())
    }
}

impl FromStr for CodeAlg {
    type Err = CodeError;

    /// Accepts `es256` and `eddsa` in any case, so the JOSE names parse too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "es256" => Ok(CodeAlg::Es256),
            "eddsa" => Ok(CodeAlg::EdDsa),
            _ => Err(CodeError::UnknownAlg(s.to_owned())),
        }
    }
}

/// A holder's health-code colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Green,
    Yellow,
    Red,
}

impl Colour {
    /// The lowercase name used in claims and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Green => "green",
            Colour::Yellow => "yellow",
            Colour::Red => "red",
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Colour {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "green" => Ok(Colour::Green),
            "yellow" => Ok(Colour::Yellow),
            "red" => Ok(Colour::Red),
            _ => Err(CodeError::UnknownColour(s.to_owned())),
        }
    }
}

/// The health part of a code: what the issuer knew about the holder, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthClaim {
    pub colour: Colour,
    /// When the colour was decided (unix seconds).
    pub as_of: i64,
    /// Last negative test (unix seconds). Omitted when absent, to keep the QR
    /// code small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neg_test: Option<i64>,
}

/// The claims of a code. Field names are short registered JWT names so the
/// token stays small enough for a comfortable QR code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeClaims {
    /// `hufu:<province>`, e.g. `hufu:440000`.
    pub iss: String,
    /// Holder pseudonym, never a national id.
    pub sub: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub hc: HealthClaim,
    /// The holder's masked name ([`display::mask_name`]), when the issuer
    /// was given it. Omitted otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hn: Option<String>,
    /// The holder's masked national id ([`display::mask_national_id`]),
    /// when the code was issued by national id. Omitted otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hi: Option<String>,
}

impl CodeClaims {
    /// Claims for a code issued by `issuer` at `now`, valid for `lifetime`.
    pub fn new(
        issuer: Province,
        sub: impl Into<String>,
        hc: HealthClaim,
        now: i64,
        lifetime: Duration,
    ) -> CodeClaims {
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        CodeClaims {
            iss: issuer_claim(issuer),
            sub: sub.into(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime),
            hc,
            hn: None,
            hi: None,
        }
    }
}

/// The `iss` value for codes of `province`.
pub fn issuer_claim(province: Province) -> String {
    format!("{ISSUER_PREFIX}{province}")
}

/// Seconds since the Unix epoch, as JWT claims count time.
pub fn unix_now() -> i64 {
    // A clock before 1970 is a broken clock; treating it as 0 makes every code
    // look not-yet-valid rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What can go wrong managing keys or parsing code settings. Verification
/// outcomes are [`Verdict`]s, not errors.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "key metadata {} is unusable: {reason}; restore it from a backup or move the directory aside to start a new keyring",
        path.display()
    )]
    Metadata { path: PathBuf, reason: String },

    #[error(
        "private key {} is unusable: {reason}; restore it from a backup, or revoke its kid and rotate",
        path.display()
    )]
    PrivateKey { path: PathBuf, reason: String },

    #[error("cannot generate a {alg} key: aws-lc reported an internal error")]
    KeyGeneration { alg: CodeAlg },

    #[error("unknown key {kid}: it is not in this keyring")]
    UnknownKid { kid: String },

    #[error(
        "refusing to revoke {kid}: it is the active signing key; rotate first so a new key signs codes, then revoke {kid}"
    )]
    RevokeActive { kid: String },

    #[error("cannot sign code: {0}")]
    Sign(String),

    #[error("invalid jwk {kid:?}: {reason}")]
    InvalidJwk { kid: String, reason: String },

    #[error("unknown code algorithm {0:?}: expected es256 or eddsa")]
    UnknownAlg(String),

    #[error("unknown colour {0:?}: expected green, yellow or red")]
    UnknownColour(String),

    /// A holder's name that cannot be shown masked; the message says why.
    #[error("{0}")]
    Name(String),
}
