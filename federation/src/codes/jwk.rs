//! Public code-signing keys as standard JWKs (RFC 7517), and their RFC 7638
//! thumbprints, which serve as key ids.
//!
//! The types are Hufu's own rather than `jsonwebtoken::jwk` so that the
//! published JSON is exactly `{kty, crv, x, y, kid, alg, use}` and nothing else.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde::{Deserialize, Serialize};

use super::{CodeAlg, CodeError};

/// One public key, as published in a province's JWKS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `EC` for P-256, `OKP` for Ed25519.
    pub kty: String,
    /// `P-256` or `Ed25519`.
    pub crv: String,
    /// base64url x coordinate (EC) or the public key (OKP).
    pub x: String,
    /// base64url y coordinate; EC only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RFC 7638 thumbprint of this key.
    pub kid: String,
    /// `ES256` or `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub key_use: String,
}

/// A JWK Set: `{"keys": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The key with this `kid`, if published.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

impl Jwk {
    /// The JWK of a public key in aws-lc-rs form: the 65-byte uncompressed
    /// point for ES256, the 32-byte key for EdDSA. `kid` is computed.
    pub(crate) fn from_public_key(alg: CodeAlg, public: &[u8]) -> Result<Jwk, CodeError> {
        let invalid = |reason: &str| CodeError::InvalidJwk {
            kid: String::new(),
            reason: reason.to_owned(),
        };
        let mut jwk = match alg {
            CodeAlg::Es256 => {
                let point = public
                    .strip_prefix(&[0x04])
                    .filter(|p| p.len() == 64)
                    .ok_or_else(|| {
                        invalid("p-256 public key is not a 65-byte uncompressed point")
                    })?;
                let (x, y) = point.split_at(32);
                Jwk {
                    kty: "EC".into(),
                    crv: "P-256".into(),
                    x: URL_SAFE_NO_PAD.encode(x),
                    y: Some(URL_SAFE_NO_PAD.encode(y)),
                    kid: String::new(),
                    alg: alg.jose_name().into(),
                    key_use: "sig".into(),
                }
            }
            CodeAlg::EdDsa => {
                if public.len() != 32 {
                    return Err(invalid("ed25519 public key is not 32 bytes"));
                }
                Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    x: URL_SAFE_NO_PAD.encode(public),
                    y: None,
                    kid: String::new(),
                    alg: alg.jose_name().into(),
                    key_use: "sig".into(),
                }
            }
        };
        jwk.kid = jwk.thumbprint()?;
        Ok(jwk)
    }

    /// RFC 7638 thumbprint: SHA-256 over the required members in
    /// lexicographic order with no whitespace, base64url without padding,
    /// as `jsonwebtoken` computes it.
    pub fn thumbprint(&self) -> Result<String, CodeError> {
        use jsonwebtoken::jwk::{
            AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
            EllipticCurveKeyType, OctetKeyPairParameters, OctetKeyPairType, ThumbprintHash,
        };
        // `jsonwebtoken` writes the members into the hashed JSON unescaped:
        // anything but base64url is refused rather than hashed in a
        // non-canonical form.
        let canonical = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if ![&self.x]
            .into_iter()
            .chain(self.y.as_ref())
            .all(|f| canonical(f))
        {
            return Err(self.invalid("members must be base64url"));
        }
        let algorithm = match (self.kty.as_str(), self.crv.as_str(), &self.y) {
            ("EC", "P-256", Some(y)) => {
                AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: EllipticCurve::P256,
                    x: self.x.clone(),
                    y: y.clone(),
                })
            }
            ("OKP", "Ed25519", None) => AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: self.x.clone(),
            }),
            ("EC", _, None) => return Err(self.invalid("an EC key needs y")),
            ("OKP", _, Some(_)) => return Err(self.invalid("an OKP key has no y")),
            ("EC" | "OKP", crv, _) => {
                return Err(
                    self.invalid(&format!("crv {crv:?} is not P-256 (EC) or Ed25519 (OKP)"))
                );
            }
            (kty, _, _) => return Err(self.invalid(&format!("kty {kty:?} is not EC or OKP"))),
        };
        jsonwebtoken::jwk::Jwk {
            common: CommonParameters::default(),
            algorithm,
        }
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| self.invalid(&format!("thumbprint: {e}")))
    }

    /// Checks this is a well-formed Hufu signing key whose kid is its
    /// thumbprint, and returns its algorithm and a verification key.
    pub(crate) fn decoding_key(&self) -> Result<(CodeAlg, DecodingKey), CodeError> {
        if self.key_use != "sig" {
            return Err(self.invalid("use must be \"sig\""));
        }
        let expected = self.thumbprint()?;
        if self.kid != expected {
            return Err(self.invalid(&format!(
                "kid is not the rfc 7638 thumbprint of the key (expected {expected})"
            )));
        }
        let b64 = |field: &str, v: &str| {
            URL_SAFE_NO_PAD
                .decode(v)
                .map_err(|e| self.invalid(&format!("{field} is not base64url: {e}")))
        };
        match (
            self.kty.as_str(),
            self.crv.as_str(),
            self.alg.as_str(),
            &self.y,
        ) {
            ("EC", "P-256", "ES256", Some(y_b64)) => {
                let (x, y) = (b64("x", &self.x)?, b64("y", y_b64)?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(self.invalid("p-256 coordinates must be 32 bytes each"));
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                // Refuse points off the curve now, not as a puzzling bad
                // signature on every scan later.
                ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                    .map_err(|e| self.invalid(&format!("not a p-256 public key: {e}")))?;
                Ok((
                    CodeAlg::Es256,
                    DecodingKey::from_ec_components(&self.x, y_b64)
                        .map_err(|e| self.invalid(&e.to_string()))?,
                ))
            }
            ("OKP", "Ed25519", "EdDSA", None) => {
                let x = b64("x", &self.x)?;
                ParsedPublicKey::new(&ED25519, &x)
                    .map_err(|e| self.invalid(&format!("not an ed25519 public key: {e}")))?;
                Ok((
                    CodeAlg::EdDsa,
                    DecodingKey::from_ed_components(&self.x)
                        .map_err(|e| self.invalid(&e.to_string()))?,
                ))
            }
            (kty, crv, alg, _) => Err(self.invalid(&format!(
                "unsupported key kty={kty} crv={crv} alg={alg}: expected EC/P-256/ES256 or OKP/Ed25519/EdDSA"
            ))),
        }
    }

    fn invalid(&self, reason: &str) -> CodeError {
        CodeError::InvalidJwk {
            kid: self.kid.clone(),
            reason: reason.to_owned(),
        }
    }
}
