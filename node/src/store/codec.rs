//! The bytes of the store: keys, the compact encoding of a status record,
//! and the change log's blocks (see the module doc of [`super`]).
//!
//! Everything here is exact: a change decodes back to the very bytes the
//! issuer hashed into its chain, or it is kept verbatim. A record that the
//! compact form cannot reproduce bit for bit (a timestamp with nanoseconds,
//! an enum value from a newer version, fields in another order) is stored
//! as its protobuf bytes, so signed feeds relay unchanged whatever they hold.

use bytes::Buf;
use data_encoding::BASE32_NOPAD;
use hufu_certs::Province;
use hufu_federation::feed;
use hufu_proto::v1::StatusRecord;
use prost::Message;
use prost::encoding::{decode_varint, encode_varint};
use prost_types::Timestamp;

use crate::error::{NodeError, NodeResult};

/// Key kinds (the first byte of every key).
pub const STATUS: u8 = b'S';
pub const CHANGES: u8 = b'C';
pub const HEAD_AT: u8 = b'H';
pub const LATEST_HEAD: u8 = b'L';
pub const CONFIRMED: u8 = b'A';
pub const REVOKED: u8 = b'R';
pub const BINDING: u8 = b'B';

/// Tags of a stored status value or change-log entry.
const COMPACT_STATUS: u8 = 1;
const VERBATIM_STATUS: u8 = 2;
/// A change-log entry holding a legacy code binding, verbatim.
const BINDING_CHANGE: u8 = 3;

/// Bytes of a holder pseudonym in keys and entries (128 bits).
pub const HOLDER_BYTES: usize = 16;

/// `kind ‖ province (4 bytes, big-endian) ‖ rest`.
pub fn key(kind: u8, p: Province, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.push(kind);
    k.extend_from_slice(&p.code().to_be_bytes());
    k.extend_from_slice(rest);
    k
}

/// The key of a change-log block starting at `first`.
pub fn block_key(p: Province, first: u64) -> Vec<u8> {
    key(CHANGES, p, &first.to_be_bytes())
}

/// The first sequence of the block stored under `k`.
pub fn block_first(k: &[u8]) -> NodeResult<u64> {
    k.get(5..13)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| NodeError::Internal("change log key is not a 64-bit sequence".into()))
}

/// A pseudonym's 16 bytes, if it is one (26 base32 characters).
pub fn holder_bytes(holder: &str) -> Option<[u8; HOLDER_BYTES]> {
    if holder.len() != 26 || BASE32_NOPAD.decode_len(holder.len()).ok()? != HOLDER_BYTES {
        return None;
    }
    // Into the array itself: this runs for every change staged and every
    // own write decided.
    let mut bytes = [0; HOLDER_BYTES];
    let n = BASE32_NOPAD
        .decode_mut(holder.as_bytes(), &mut bytes)
        .ok()?;
    (n == HOLDER_BYTES).then_some(bytes)
}

/// The key of `holder`'s status in province `p`; None for a string that is
/// not a pseudonym (no such holder can be stored).
pub fn status_key(p: Province, holder: &str) -> Option<Vec<u8>> {
    Some(key(STATUS, p, &holder_bytes(holder)?))
}

/// The compact fields of a record: what follows the holder.
/// `flags ‖ varint(as_of seconds) ‖ varint(last negative test seconds)`,
/// flags holding the colour (bits 0-1), the reason (bits 2-4) and which
/// times are present (bits 5, 6). Times are zigzag varints.
fn compact_fields(record: &StatusRecord, out: &mut Vec<u8>) -> bool {
    if !(0..4).contains(&record.colour) || !(0..8).contains(&record.reason) {
        return false;
    }
    let mut flags = record.colour as u8 | (record.reason as u8) << 2;
    for (bit, ts) in [(5, &record.as_of), (6, &record.last_negative_test)] {
        if let Some(ts) = ts {
            if ts.nanos != 0 {
                return false;
            }
            flags |= 1 << bit;
        }
    }
    out.push(flags);
    for ts in [&record.as_of, &record.last_negative_test]
        .into_iter()
        .flatten()
    {
        encode_varint(zigzag(ts.seconds), out);
    }
    true
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn corrupt(what: &str) -> NodeError {
    NodeError::Internal(format!("stored {what} is corrupt"))
}

fn read_fields(p: Province, holder: String, mut buf: &[u8]) -> NodeResult<StatusRecord> {
    let flags = *buf.first().ok_or_else(|| corrupt("status"))?;
    buf.advance(1);
    let mut time = |bit: u8| -> NodeResult<Option<Timestamp>> {
        if flags & (1 << bit) == 0 {
            return Ok(None);
        }
        let v = decode_varint(&mut buf).map_err(|_| corrupt("status"))?;
        Ok(Some(Timestamp {
            seconds: unzigzag(v),
            nanos: 0,
        }))
    };
    let as_of = time(5)?;
    let last_negative_test = time(6)?;
    Ok(StatusRecord {
        issuer: p.to_string(),
        holder,
        colour: i32::from(flags & 3),
        as_of,
        last_negative_test,
        reason: i32::from(flags >> 2 & 7),
    })
}

/// A status as stored under its holder's key: compact when the compact
/// form gives back exactly `bytes` (the record's protobuf encoding), else
/// verbatim.
pub fn status_value(p: Province, record: &StatusRecord, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.push(COMPACT_STATUS);
    if names(p, &record.issuer)
        && holder_bytes(&record.holder).is_some()
        && compact_fields(record, &mut out)
        && record.encode_to_vec() == bytes
    {
        return out;
    }
    out.clear();
    out.push(VERBATIM_STATUS);
    out.extend_from_slice(bytes);
    out
}

/// Reads a value written by [`status_value`].
pub fn read_status(p: Province, holder: &str, value: &[u8]) -> NodeResult<StatusRecord> {
    match value.split_first() {
        Some((&COMPACT_STATUS, rest)) => read_fields(p, holder.to_owned(), rest),
        Some((&VERBATIM_STATUS, rest)) => Ok(StatusRecord::decode(rest)?),
        _ => Err(corrupt("status")),
    }
}

/// Whether `issuer` is `p`'s code as records spell it (six digits),
/// without formatting `p` (this runs for every change stored).
pub fn names(p: Province, issuer: &str) -> bool {
    issuer.len() == 6
        && issuer.bytes().all(|b| b.is_ascii_digit())
        && issuer.parse::<u32>() == Ok(p.code())
}

/// One change-log entry: `tag ‖ body`; for a compact status the body is
/// `holder (16 bytes) ‖ fields`, for a verbatim one the protobuf bytes.
pub fn entry(p: Province, record: &StatusRecord, bytes: &[u8]) -> Vec<u8> {
    let value = status_value(p, record, bytes);
    match holder_bytes(&record.holder) {
        Some(holder) => entry_of_value(&holder, &value),
        None => value,
    }
}

/// The change-log entry of `holder`'s status stored as `value` (a
/// [`status_value`]): the same bytes, with the holder after the tag when
/// the status is compact.
pub fn entry_of_value(holder: &[u8; HOLDER_BYTES], value: &[u8]) -> Vec<u8> {
    if value.first() != Some(&COMPACT_STATUS) {
        return value.to_vec();
    }
    let mut entry = Vec::with_capacity(HOLDER_BYTES + value.len());
    entry.push(COMPACT_STATUS);
    entry.extend_from_slice(holder);
    entry.extend_from_slice(&value[1..]);
    entry
}

/// The exact bytes an entry stands for (those hashed into the chain).
pub fn entry_bytes(p: Province, entry: &[u8]) -> NodeResult<Vec<u8>> {
    match entry.split_first() {
        Some((&COMPACT_STATUS, rest)) if rest.len() > HOLDER_BYTES => {
            let holder = BASE32_NOPAD.encode(&rest[..HOLDER_BYTES]);
            Ok(read_fields(p, holder, &rest[HOLDER_BYTES..])?.encode_to_vec())
        }
        Some((&VERBATIM_STATUS | &BINDING_CHANGE, rest)) => Ok(rest.to_vec()),
        _ => Err(corrupt("change")),
    }
}

/// The change-log entry of a legacy code binding: its change bytes as they
/// are (about 70 bytes; bindings are few beside statuses).
pub fn binding_entry(bytes: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(1 + bytes.len());
    entry.push(BINDING_CHANGE);
    entry.extend_from_slice(bytes);
    entry
}

/// The key of legacy code `hash`'s binding in province `p`; its value is
/// the holder's 16 bytes.
pub fn binding_key(p: Province, hash: &[u8; 32]) -> Vec<u8> {
    key(BINDING, p, hash)
}

/// Bytes before a block's first entry: the chain hash before it and when
/// it was written.
const BLOCK_HEADER: usize = 40;

/// Set in the first byte of a block's written-at time (a time is never
/// negative, so earlier blocks never have it): the entries that follow
/// are zlib-compressed.
const COMPRESSED: u8 = 0x80;

/// The most bytes a compressed block's entries may inflate to: far above
/// [`BLOCK_CHANGES`](super::BLOCK_CHANGES) entries of the largest record,
/// so that only a damaged block reaches it.
const MAX_BLOCK_BYTES: u64 = 64 << 20;

/// Entries shorter than this are stored as they are: a new compressor
/// zeroes about 160 KB of tables (2.6% of a node's CPU in a profile of 100
/// single-status writes a second, and as much again in the audit log's),
/// and a few changes of about 29 bytes gain nothing from it.
const COMPRESS_FROM: usize = 512;

/// A change-log block being written:
/// `start hash (32) ‖ written at (unix ms, 8 bytes) ‖ (varint(len) ‖ entry)*`,
/// the entries zlib-compressed when that makes them smaller (the
/// written-at time's top bit then set). Its changes are numbered from the
/// block's key on, without gaps.
///
/// A block is written once and read back only to serve a feed, so it is
/// compressed: of a status entry's 29 bytes only the holder's 16 are
/// random, and what follows (flags, times near each other) repeats from
/// entry to entry.
pub struct BlockWriter {
    header: [u8; BLOCK_HEADER],
    entries: Vec<u8>,
    count: usize,
}

impl BlockWriter {
    pub fn new(start_hash: &[u8; 32], written_ms: i64) -> BlockWriter {
        let mut header = [0; BLOCK_HEADER];
        header[..32].copy_from_slice(start_hash);
        header[32..].copy_from_slice(&written_ms.max(0).to_be_bytes());
        BlockWriter {
            header,
            entries: Vec::with_capacity(16 * 1024),
            count: 0,
        }
    }

    /// Changes in the block so far.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn push(&mut self, entry: &[u8]) {
        encode_varint(entry.len() as u64, &mut self.entries);
        self.entries.extend_from_slice(entry);
        self.count += 1;
    }

    /// The block as stored: compressed unless it is short
    /// ([`COMPRESS_FROM`]) or that would not make it smaller.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCK_HEADER + self.entries.len());
        out.extend_from_slice(&self.header);
        if self.entries.len() >= COMPRESS_FROM {
            let mut deflate = flate2::write::ZlibEncoder::new(out, flate2::Compression::fast());
            let written = std::io::Write::write_all(&mut deflate, &self.entries);
            if let (Ok(()), Ok(mut compressed)) = (written, deflate.finish())
                && compressed.len() < BLOCK_HEADER + self.entries.len()
            {
                compressed[32] |= COMPRESSED;
                return compressed;
            }
            out = Vec::with_capacity(BLOCK_HEADER + self.entries.len());
            out.extend_from_slice(&self.header);
        }
        out.extend_from_slice(&self.entries);
        out
    }

    /// The block as earlier versions stored it, uncompressed (for tests of
    /// reading what they wrote).
    pub fn into_uncompressed_bytes(self) -> Vec<u8> {
        let mut out = self.header.to_vec();
        out.extend_from_slice(&self.entries);
        out
    }
}

/// One change read back from a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadChange {
    pub sequence: u64,
    /// Chain hash after this change.
    pub hash: [u8; 32],
    /// The bytes that were chained.
    pub bytes: Vec<u8>,
}

/// Walks a stored block from its first change, recomputing the chain.
pub struct BlockReader<'a> {
    p: Province,
    /// The entries, inflated if they were stored compressed.
    entries: std::borrow::Cow<'a, [u8]>,
    /// Where the next entry starts in `entries`.
    at: usize,
    next: u64,
    hash: [u8; 32],
    written_ms: i64,
}

impl<'a> BlockReader<'a> {
    pub fn new(p: Province, first: u64, block: &'a [u8]) -> NodeResult<BlockReader<'a>> {
        if block.len() < BLOCK_HEADER {
            return Err(corrupt("change block"));
        }
        let mut time: [u8; 8] = block[32..40].try_into().expect("8 bytes");
        let compressed = time[0] & COMPRESSED != 0;
        time[0] &= !COMPRESSED;
        let body = &block[BLOCK_HEADER..];
        let entries = if compressed {
            std::borrow::Cow::Owned(inflate(body)?)
        } else {
            std::borrow::Cow::Borrowed(body)
        };
        Ok(BlockReader {
            p,
            entries,
            at: 0,
            next: first,
            hash: block[..32].try_into().expect("32 bytes"),
            written_ms: i64::from_be_bytes(time),
        })
    }

    /// When the block was written (unix ms, this node's clock).
    pub fn written_ms(&self) -> i64 {
        self.written_ms
    }

    /// The chain hash before the next change.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The sequence the next change would have.
    pub fn next_sequence(&self) -> u64 {
        self.next
    }

    /// Skips to just after change `sequence` (or the end of the block),
    /// hashing the skipped changes.
    pub fn skip_through(&mut self, sequence: u64) -> NodeResult<()> {
        while self.next <= sequence {
            if self.next_change()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    pub fn next_change(&mut self) -> NodeResult<Option<ReadChange>> {
        let mut rest = &self.entries[self.at..];
        if rest.is_empty() {
            return Ok(None);
        }
        let len = decode_varint(&mut rest).map_err(|_| corrupt("change block"))? as usize;
        if len > rest.len() {
            return Err(corrupt("change block"));
        }
        let entry = &rest[..len];
        self.at = self.entries.len() - rest.len() + len;
        let bytes = entry_bytes(self.p, entry)?;
        let sequence = self.next;
        self.hash = feed::chain_next(&self.hash, sequence, &bytes);
        self.next += 1;
        Ok(Some(ReadChange {
            sequence,
            hash: self.hash,
            bytes,
        }))
    }
}

/// A compressed block's entries, inflated; a body that does not inflate,
/// or inflates past any real block, is a damaged block.
fn inflate(body: &[u8]) -> NodeResult<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len() * 2);
    flate2::read::ZlibDecoder::new(body)
        .take(MAX_BLOCK_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|_| corrupt("change block"))?;
    if out.len() as u64 > MAX_BLOCK_BYTES {
        return Err(corrupt("change block"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gd() -> Province {
        Province::parse("440000").unwrap()
    }

    fn record(holder: &str, nanos: i32) -> StatusRecord {
        StatusRecord {
            issuer: "440000".into(),
            holder: holder.into(),
            colour: 3,
            as_of: Some(Timestamp {
                seconds: 1_641_800_000,
                nanos,
            }),
            last_negative_test: None,
            reason: 2,
        }
    }

    const HOLDER: &str = "MFRGGZDFMZTWQ2LKNNWG23TPOA";

    #[test]
    fn a_record_is_stored_compactly_and_read_back_exactly() {
        let r = record(HOLDER, 0);
        let bytes = r.encode_to_vec();
        let value = status_value(gd(), &r, &bytes);
        assert!(value.len() <= 8, "{} bytes", value.len());
        assert_eq!(read_status(gd(), HOLDER, &value).unwrap(), r);
        let e = entry(gd(), &r, &bytes);
        assert_eq!(entry_bytes(gd(), &e).unwrap(), bytes);
    }

    #[test]
    fn what_the_compact_form_cannot_reproduce_is_kept_verbatim() {
        // Nanoseconds, a record of another issuer, fields out of order:
        // each must relay byte for byte.
        let with_nanos = record(HOLDER, 5);
        let mut other = record(HOLDER, 0);
        other.issuer = "610000".into();
        let canonical = record(HOLDER, 0).encode_to_vec();
        let mut reordered = canonical[8..].to_vec();
        reordered.extend_from_slice(&canonical[..8]);
        for bytes in [with_nanos.encode_to_vec(), other.encode_to_vec(), reordered] {
            let r = StatusRecord::decode(bytes.as_slice()).unwrap();
            let e = entry(gd(), &r, &bytes);
            assert_eq!(e[0], VERBATIM_STATUS);
            assert_eq!(entry_bytes(gd(), &e).unwrap(), bytes);
        }
    }

    #[test]
    fn a_block_recomputes_the_chain() {
        let start = [7u8; 32];
        let records: Vec<_> = (0..3).map(|_| record(HOLDER, 0).encode_to_vec()).collect();
        let mut w = BlockWriter::new(&start, 1);
        let mut hash = start;
        let mut hashes = vec![];
        for (i, bytes) in records.iter().enumerate() {
            w.push(&entry(gd(), &record(HOLDER, 0), bytes));
            hash = feed::chain_next(&hash, 10 + i as u64, bytes);
            hashes.push(hash);
        }
        let block = w.into_bytes();
        let mut r = BlockReader::new(gd(), 10, &block).unwrap();
        r.skip_through(10).unwrap();
        let c = r.next_change().unwrap().unwrap();
        assert_eq!((c.sequence, c.hash), (11, hashes[1]));
        assert_eq!(c.bytes, records[1]);
        r.skip_through(99).unwrap();
        assert_eq!((r.next_sequence(), r.hash()), (13, hashes[2]));
    }

    /// A block of `n` changes of holders spread like pseudonyms, written at
    /// `written_ms`, and the records' bytes.
    fn block_of(n: u32, written_ms: i64) -> (BlockWriter, Vec<Vec<u8>>) {
        let mut w = BlockWriter::new(&[7u8; 32], written_ms);
        let mut records = vec![];
        for i in 0..n {
            let mut h = [0u8; HOLDER_BYTES];
            h[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            h[8..12].copy_from_slice(&i.wrapping_mul(40_503).to_be_bytes());
            let mut r = record(&BASE32_NOPAD.encode(&h), 0);
            r.as_of = Some(Timestamp {
                seconds: 1_641_800_000 + i64::from(i % 977),
                nanos: 0,
            });
            let bytes = r.encode_to_vec();
            w.push(&entry(gd(), &r, &bytes));
            records.push(bytes);
        }
        (w, records)
    }

    fn read_all(block: &[u8]) -> NodeResult<Vec<Vec<u8>>> {
        let mut r = BlockReader::new(gd(), 1, block)?;
        let mut out = vec![];
        while let Some(c) = r.next_change()? {
            out.push(c.bytes);
        }
        Ok(out)
    }

    #[test]
    fn a_block_is_stored_compressed_and_reads_back_exactly() {
        let (w, records) = block_of(1_000, 1_700_000_000_000);
        let plain = block_of(1_000, 1_700_000_000_000)
            .0
            .into_uncompressed_bytes();
        let block = w.into_bytes();
        assert_ne!(block[32] & COMPRESSED, 0);
        assert!(
            block.len() * 10 < plain.len() * 9,
            "{} bytes compressed of {}",
            block.len(),
            plain.len()
        );
        assert_eq!(read_all(&block).unwrap(), records);
        let r = BlockReader::new(gd(), 1, &block).unwrap();
        assert_eq!(r.written_ms(), 1_700_000_000_000);
    }

    #[test]
    fn a_short_block_is_stored_as_it_is() {
        let (w, records) = block_of(3, 1_700_000_000_000);
        let block = w.into_bytes();
        assert_eq!(block[32] & COMPRESSED, 0);
        assert!(block.len() < BLOCK_HEADER + COMPRESS_FROM);
        assert_eq!(read_all(&block).unwrap(), records);
    }

    #[test]
    fn a_block_of_the_earlier_uncompressed_form_still_reads() {
        let (w, records) = block_of(50, 1_700_000_000_000);
        let plain = w.into_uncompressed_bytes();
        assert_eq!(plain[32] & COMPRESSED, 0);
        assert_eq!(read_all(&plain).unwrap(), records);
        assert_eq!(
            BlockReader::new(gd(), 1, &plain).unwrap().written_ms(),
            1_700_000_000_000
        );
    }

    #[test]
    fn a_damaged_compressed_block_is_an_error_not_fewer_changes() {
        let block = block_of(1_000, 1).0.into_bytes();
        assert_ne!(block[32] & COMPRESSED, 0);
        let truncated = &block[..block.len() - 10];
        let mut flipped = block.clone();
        let middle = BLOCK_HEADER + (block.len() - BLOCK_HEADER) / 2;
        flipped[middle] ^= 0x10;
        for damaged in [truncated, &flipped[..]] {
            let err = read_all(damaged).unwrap_err();
            assert!(err.to_string().contains("change block is corrupt"), "{err}");
        }
    }
}
