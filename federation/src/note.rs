//! C2SP signed notes (<https://c2sp.org/signed-note>) with Ed25519 keys, and
//! C2SP tlog cosignatures (<https://c2sp.org/tlog-cosignature>, cosignature/v1).
//!
//! A note is a UTF-8 text ending in a newline, a blank line, then one line
//! per signature: `— <key name> <base64(4-byte key id || signature)>`. The
//! trust list and the audit log's checkpoints travel in this form, so that
//! auditors' existing tools read both; witnesses' cosignatures are further
//! signature lines on a checkpoint.
//!
//! Written here on aws-lc-rs rather than taken from the `signed_note` crate,
//! which would bring ed25519-dalek in as a second crypto backend.

use std::fmt;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ED25519, ParsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Why a note, a signature line or a verifier key was refused. The trust
/// list and the audit log wrap it in their own error types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error(
        "invalid verifier key {key:?}: {reason}; expected <name>+<8 hex digits>+<base64 of the type byte (0x01 ed25519, 0x04 cosignature/v1) and a 32-byte ed25519 key>"
    )]
    InvalidVerifierKey { key: String, reason: String },

    #[error("signed note is {size} bytes, more than the {max} accepted: refused unread")]
    TooLarge { size: usize, max: usize },

    #[error("malformed signed note: {0}")]
    Malformed(String),
}

/// Longest note accepted, checked before any parsing. A trust list of all 34
/// provinces is a few tens of KiB; a checkpoint a few hundred bytes.
pub const MAX_NOTE_BYTES: usize = 1 << 20;

/// Most signature lines a note may carry. The spec asks verifiers to accept at
/// least 16; a trust list needs at most one per province (34), and so does a
/// checkpoint (its log and the witnesses of the other provinces).
pub const MAX_SIGNATURES: usize = 100;

/// The prefix of every signature line: em dash, space.
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// The first line of the message a cosignature/v1 signs.
const COSIGNATURE_HEADER: &str = "cosignature/v1\n";

/// Length of the timestamp that starts a cosignature (big-endian u64).
const TIMESTAMP_LEN: usize = 8;

/// The signature algorithm of a verifier key, by its signed-note type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// 0x01: plain Ed25519 over the note text (logs, governance keys).
    Ed25519,
    /// 0x04: C2SP tlog-cosignature/v1, Ed25519 over a timestamped message
    /// (witnesses).
    CosignatureV1,
}

impl KeyType {
    fn byte(self) -> u8 {
        match self {
            KeyType::Ed25519 => 0x01,
            KeyType::CosignatureV1 => 0x04,
        }
    }

    fn from_byte(byte: u8) -> Option<KeyType> {
        match byte {
            0x01 => Some(KeyType::Ed25519),
            0x04 => Some(KeyType::CosignatureV1),
            _ => None,
        }
    }
}

/// The message a cosignature/v1 signs: `cosignature/v1`, `time <secs>`, then
/// the whole checkpoint text.
pub fn cosignature_message(time: u64, text: &str) -> String {
    format!("{COSIGNATURE_HEADER}time {time}\n{text}")
}

/// One signature line of a note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteSignature {
    /// The key name, such as `hufu-governance-440000`.
    pub name: String,
    /// The first four bytes of the signature, naming the key with `name`.
    pub key_id: u32,
    /// The signature proper: 64 bytes for Ed25519, and for a cosignature the
    /// 8-byte big-endian timestamp followed by 64 bytes.
    pub signature: Vec<u8>,
}

impl NoteSignature {
    /// Parses `— <name> <base64>` (without the newline).
    pub fn parse_line(line: &str) -> Result<NoteSignature, NoteError> {
        let malformed =
            |reason: &str| NoteError::Malformed(format!("signature line {line:?}: {reason}"));
        let rest = line
            .strip_prefix(SIGNATURE_PREFIX)
            .ok_or_else(|| malformed("does not start with an em dash and a space"))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or_else(|| malformed("expected a key name, a space and a base64 signature"))?;
        if !is_key_name_valid(name) {
            return Err(malformed("the key name is empty or has spaces or '+'"));
        }
        // The standard engine refuses non-canonical padding and trailing bits,
        // so one signature has exactly one line.
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| malformed(&format!("the signature is not base64: {e}")))?;
        if bytes.len() < 5 {
            return Err(malformed(
                "the signature is shorter than a key id and one byte",
            ));
        }
        let (id, signature) = bytes.split_at(4);
        Ok(NoteSignature {
            name: name.to_owned(),
            key_id: u32::from_be_bytes([id[0], id[1], id[2], id[3]]),
            signature: signature.to_vec(),
        })
    }

    /// The line, with its newline.
    pub fn to_line(&self) -> String {
        let mut bytes = self.key_id.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.signature);
        format!(
            "{SIGNATURE_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(bytes)
        )
    }

    /// Whether this line claims to be made by `key` (same name and key id).
    pub fn is_by(&self, key: &VerifierKey) -> bool {
        self.name == key.name && self.key_id == key.key_id
    }

    /// The time a cosignature says it was made (unix seconds), if the
    /// signature is long enough to be one.
    pub fn cosignature_time(&self) -> Option<u64> {
        let stamp: [u8; TIMESTAMP_LEN] = self.signature.get(..TIMESTAMP_LEN)?.try_into().ok()?;
        Some(u64::from_be_bytes(stamp))
    }
}

/// A text and its signatures.
///
/// Signature lines keep their order, so that parsing and encoding a note gives
/// back the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    text: String,
    signatures: Vec<NoteSignature>,
}

impl Note {
    /// An unsigned note of `text`, which must end in a newline, contain no
    /// ASCII control character but newline, and not end in a blank line
    /// (that line would be read as the one before the signatures).
    pub fn new(text: String) -> Result<Note, NoteError> {
        check_size(text.len())?;
        check_characters(&text)?;
        if !text.ends_with('\n') {
            return Err(NoteError::Malformed(
                "the text does not end in a newline".into(),
            ));
        }
        if text.ends_with("\n\n") || text == "\n" {
            return Err(NoteError::Malformed(
                "the text ends in a blank line, which would be read as the start of the signatures"
                    .into(),
            ));
        }
        Ok(Note {
            text,
            signatures: Vec::new(),
        })
    }

    /// An unsigned note of a text its maker guarantees to be well-formed
    /// (ending in a newline, without control characters or a final blank
    /// line); its size is checked when it is parsed.
    pub(crate) fn from_trusted_text(text: String) -> Note {
        debug_assert!(text.ends_with('\n') && !text.ends_with("\n\n"));
        Note {
            text,
            signatures: Vec::new(),
        }
    }

    /// Parses a signed note. A note with no signature lines (text, blank line,
    /// nothing else) is accepted so that an unsigned proposal can circulate;
    /// whoever verifies it finds no valid signature.
    pub fn parse(note: &str) -> Result<Note, NoteError> {
        // First, before any other work: the size.
        check_size(note.len())?;
        check_characters(note)?;
        // The text is separated from the signatures by the last blank line.
        let (text, signatures) = note.rsplit_once("\n\n").ok_or_else(|| {
            NoteError::Malformed("no blank line separates the text from the signatures".into())
        })?;
        let mut parsed = Note::new(format!("{text}\n"))?;
        if signatures.is_empty() {
            return Ok(parsed);
        }
        let lines = signatures.strip_suffix('\n').ok_or_else(|| {
            NoteError::Malformed("the last signature line does not end in a newline".into())
        })?;
        for line in lines.split('\n') {
            if parsed.signatures.len() == MAX_SIGNATURES {
                return Err(NoteError::Malformed(format!(
                    "more than {MAX_SIGNATURES} signature lines"
                )));
            }
            parsed.signatures.push(NoteSignature::parse_line(line)?);
        }
        Ok(parsed)
    }

    /// The signed text, with its final newline.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The signature lines, in note order.
    pub fn signatures(&self) -> &[NoteSignature] {
        &self.signatures
    }

    /// Adds `signature`, replacing any line with the same key name and id
    /// (a key signs a text once; Ed25519 signatures are deterministic).
    pub fn add_signature(&mut self, signature: NoteSignature) -> Result<(), NoteError> {
        if !is_key_name_valid(&signature.name) {
            return Err(NoteError::Malformed(format!(
                "key name {:?} is empty or has spaces or '+'",
                signature.name
            )));
        }
        let full = self.signatures.len() == MAX_SIGNATURES;
        match self
            .signatures
            .iter_mut()
            .find(|s| s.name == signature.name && s.key_id == signature.key_id)
        {
            Some(existing) => *existing = signature,
            None if full => {
                return Err(NoteError::Malformed(format!(
                    "a note carries at most {MAX_SIGNATURES} signatures"
                )));
            }
            None => self.signatures.push(signature),
        }
        Ok(())
    }

    /// The note in signed-note form: text, blank line, signature lines.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + 1 + 100 * self.signatures.len());
        out.push_str(&self.text);
        out.push('\n');
        for signature in &self.signatures {
            out.push_str(&signature.to_line());
        }
        out
    }
}

/// An Ed25519 verifier key, written `<name>+<hex key id>+<base64(type || public key)>`,
/// the type byte 0x01 for plain signatures or 0x04 for cosignature/v1.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_type: KeyType,
    key_id: u32,
    public_key: [u8; 32],
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = vec![self.key_type.byte()];
        bytes.extend_from_slice(&self.public_key);
        write!(
            f,
            "{}+{:08x}+{}",
            self.name,
            self.key_id,
            STANDARD.encode(bytes)
        )
    }
}

impl VerifierKey {
    /// The plain Ed25519 verifier key of `public_key` under `name`.
    pub fn ed25519(name: &str, public_key: &[u8]) -> Result<VerifierKey, NoteError> {
        VerifierKey::new(name, KeyType::Ed25519, public_key)
    }

    /// The cosignature/v1 verifier key of Ed25519 `public_key` under `name`:
    /// what a witness's cosignatures are checked with.
    pub fn cosignature_v1(name: &str, public_key: &[u8]) -> Result<VerifierKey, NoteError> {
        VerifierKey::new(name, KeyType::CosignatureV1, public_key)
    }

    fn new(name: &str, key_type: KeyType, public_key: &[u8]) -> Result<VerifierKey, NoteError> {
        let invalid = |reason: &str| NoteError::InvalidVerifierKey {
            key: name.to_owned(),
            reason: reason.to_owned(),
        };
        if !is_key_name_valid(name) {
            return Err(invalid("the name is empty or has spaces or '+'"));
        }
        let public_key: [u8; 32] = public_key
            .try_into()
            .map_err(|_| invalid("an ed25519 public key is 32 bytes"))?;
        // Refuse a point that is not on the curve now, rather than as a
        // signature that never verifies later.
        ParsedPublicKey::new(&ED25519, public_key)
            .map_err(|e| invalid(&format!("not an ed25519 public key: {e}")))?;
        Ok(VerifierKey {
            name: name.to_owned(),
            key_type,
            key_id: key_id(name, key_type, &public_key),
            public_key,
        })
    }

    /// Parses `<name>+<8 hex digits>+<base64>`, checking that the key id is
    /// the one the spec derives from the name, type and key.
    pub fn parse(key: &str) -> Result<VerifierKey, NoteError> {
        let invalid = |reason: &str| NoteError::InvalidVerifierKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        // Base64 has '+' in its alphabet: only the first two separate parts.
        let mut parts = key.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("expected three parts separated by '+'"));
        };
        if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("the key id is not 8 hex digits"));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| invalid("bad key id"))?;
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| invalid(&format!("the key is not base64: {e}")))?;
        let Some((key_type, public_key)) = bytes
            .split_first()
            .and_then(|(&t, rest)| Some((KeyType::from_byte(t)?, rest)))
        else {
            return Err(invalid(
                "the key does not start with signature type 0x01 (ed25519) or 0x04 (cosignature/v1)",
            ));
        };
        let parsed = VerifierKey::new(name, key_type, public_key).map_err(|e| match e {
            NoteError::InvalidVerifierKey { reason, .. } => invalid(&reason),
            other => other,
        })?;
        if parsed.key_id != id {
            return Err(invalid(&format!(
                "the key id {id_hex} does not match the name and key (expected {:08x})",
                parsed.key_id
            )));
        }
        Ok(parsed)
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The signature algorithm.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The key id: `SHA-256(name || 0x0A || type || public key)[:4]`.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    /// Whether `signature` is this key's line and a valid signature of
    /// `text`: over the text itself for an Ed25519 key, over the
    /// cosignature/v1 message for a cosigner's key.
    pub fn verifies(&self, text: &str, signature: &NoteSignature) -> bool {
        if !signature.is_by(self) {
            return false;
        }
        let Ok(key) = ParsedPublicKey::new(&ED25519, self.public_key) else {
            return false;
        };
        match self.key_type {
            KeyType::Ed25519 => key
                .verify_sig(text.as_bytes(), &signature.signature)
                .is_ok(),
            KeyType::CosignatureV1 => {
                let Some(time) = signature.cosignature_time() else {
                    return false;
                };
                // The spec caps the timestamp at 2^63 - 1.
                time <= i64::MAX as u64
                    && key
                        .verify_sig(
                            cosignature_message(time, text).as_bytes(),
                            &signature.signature[TIMESTAMP_LEN..],
                        )
                        .is_ok()
            }
        }
    }
}

/// The key id the spec defines for an Ed25519 key of `key_type`.
fn key_id(name: &str, key_type: KeyType, public_key: &[u8; 32]) -> u32 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(&[b'\n', key_type.byte()]);
    ctx.update(public_key);
    let hash = ctx.finish();
    let h = hash.as_ref();
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Key names are non-empty, without Unicode spaces or '+'.
pub fn is_key_name_valid(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

fn check_size(len: usize) -> Result<(), NoteError> {
    if len > MAX_NOTE_BYTES {
        return Err(NoteError::TooLarge {
            size: len,
            max: MAX_NOTE_BYTES,
        });
    }
    Ok(())
}

fn check_characters(s: &str) -> Result<(), NoteError> {
    match s.bytes().position(|b| b < 0x20 && b != b'\n') {
        Some(at) => Err(NoteError::Malformed(format!(
            "control character 0x{:02x} at byte {at}: a note may hold no control character but newline",
            s.as_bytes()[at]
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the C2SP spec and of Go's x/mod/sumdb/note.
    const PETER_KEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
        then you don't know what your problem is.\n\
        \n\
        \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn verifies_the_reference_note() {
        let key = VerifierKey::parse(PETER_KEY).unwrap();
        assert_eq!(key.to_string(), PETER_KEY);
        let note = Note::parse(PETER_NOTE).unwrap();
        assert_eq!(note.encode(), PETER_NOTE);
        assert_eq!(note.signatures().len(), 1);
        assert!(key.verifies(note.text(), &note.signatures()[0]));

        let mut altered = Note::new(note.text().replace("problem", "trouble")).unwrap();
        altered.add_signature(note.signatures()[0].clone()).unwrap();
        assert!(!key.verifies(altered.text(), &altered.signatures()[0]));
    }

    #[test]
    fn refuses_malformed_keys() {
        for bad in [
            "",
            "PeterNeumann",
            "PeterNeumann+c74f20a3",
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+AhpjZHcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW+x",
        ] {
            assert!(VerifierKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_malformed_notes() {
        for bad in [
            "no blank line\n\u{2014} a AAAAAAA=\n",
            "text\n\n\u{2014} a AAAAAAA=",
            "text\n\n- a AAAAAAA=\n",
            "text\n\n\u{2014} a\n",
            "text\n\n\u{2014} a !!!!\n",
            "text\n\n\u{2014} a AAAA\n",
            "tab\there\n\n\u{2014} a AAAAAAA=\n",
        ] {
            assert!(Note::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Note::new("no newline".into()).is_err());
        assert!(Note::new("blank at end\n\n".into()).is_err());
    }

    /// A native cosignature/v1 verifier key from transparency-dev/formats'
    /// tests: its key id is computed with type byte 0x04.
    #[test]
    fn parses_cosignature_keys() {
        let remora = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2";
        let key = VerifierKey::parse(remora).unwrap();
        assert_eq!(key.key_type(), KeyType::CosignatureV1);
        assert_eq!(key.to_string(), remora);
        // The same key as a plain ed25519 key has another id.
        let plain = VerifierKey::ed25519(key.name(), key.public_key()).unwrap();
        assert_ne!(plain.key_id(), key.key_id());
    }

    #[test]
    fn cosignatures_sign_a_timestamped_message() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let key = VerifierKey::cosignature_v1("w", pair.public_key().as_ref()).unwrap();
        let text = "example.com/log\n3\nf+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0=\n";
        let time = 1_727_964_367u64;
        let mut signature = time.to_be_bytes().to_vec();
        signature.extend_from_slice(
            pair.sign(cosignature_message(time, text).as_bytes())
                .as_ref(),
        );
        let line = NoteSignature {
            name: "w".into(),
            key_id: key.key_id(),
            signature,
        };
        assert!(key.verifies(text, &line));
        assert_eq!(line.cosignature_time(), Some(time));
        assert!(!key.verifies(&text.replace('3', "4"), &line));

        // The same bytes checked as a plain signature over the text fail:
        // the two kinds of line cannot stand in for each other.
        let plain = VerifierKey::ed25519("w", pair.public_key().as_ref()).unwrap();
        let relabelled = NoteSignature {
            key_id: plain.key_id(),
            ..line.clone()
        };
        assert!(!plain.verifies(text, &relabelled));

        // Another timestamp with the same signature fails.
        let mut moved = line.clone();
        moved.signature[7] ^= 1;
        assert!(!key.verifies(text, &moved));
    }

    #[test]
    fn unsigned_notes_round_trip() {
        let note = Note::new("hello\n".into()).unwrap();
        assert_eq!(note.encode(), "hello\n\n");
        assert_eq!(Note::parse(&note.encode()).unwrap(), note);
    }
}
