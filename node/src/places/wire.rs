//! A terminal's HTTP/2 stream limit, changed while its connection stays
//! open.
//!
//! hyper announces a connection's `SETTINGS_MAX_CONCURRENT_STREAMS` once, as
//! it starts. Places need to change it later: a limit of zero tells the
//! caller to open no new stream (RFC 9113, 5.1.2), so that its calls wait in
//! its own process at no cost to the node, and the limit given back lets it
//! go on. Neither closes the connection (whose reopening costs the node a
//! full handshake) nor leaves calls unread in its socket (which would cost
//! the node their reading later, long after their callers gave up).
//!
//! So [`StreamLimit`] follows the frames in both directions of a terminal's
//! connection: it adds the node's own `SETTINGS` frames to what hyper
//! writes, between two of hyper's frames, and takes the caller's
//! acknowledgements of them out of what hyper reads (hyper would take an
//! acknowledgement of a `SETTINGS` it never sent for a protocol error).
//! Frames are counted by their 9-byte headers; payloads are passed over, not
//! parsed. A caller that keeps opening streams after it acknowledged a limit
//! of zero ignores limits, and its connection is closed.

use std::collections::VecDeque;

/// The client's connection preface, before its first frame.
const PREFACE: usize = 24;
const HEADER: usize = 9;
const KIND_HEADERS: u8 = 0x1;
const KIND_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A `SETTINGS` frame of one setting.
const SETTINGS_LEN: usize = HEADER + 6;
/// New streams a caller may open after it acknowledged a limit of zero
/// before it counts as ignoring limits: a client may have queued a few
/// before it wrote its acknowledgement.
const GRACE: u32 = 4;

/// The caller opened streams the limit it acknowledged does not allow.
#[derive(Debug, PartialEq, Eq)]
pub struct IgnoresLimit;

/// (payload length, kind, flags, stream) of a frame header.
fn header(h: &[u8]) -> (usize, u8, u8, u32) {
    let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (length, h[3], h[4], stream)
}

fn settings_frame(limit: u32) -> [u8; SETTINGS_LEN] {
    let mut frame = [0u8; SETTINGS_LEN];
    frame[2] = 6;
    frame[3] = KIND_SETTINGS;
    frame[9..11].copy_from_slice(&MAX_CONCURRENT_STREAMS.to_be_bytes());
    frame[11..15].copy_from_slice(&limit.to_be_bytes());
    frame
}

/// Both directions of one connection, as frames.
pub struct StreamLimit {
    /// Payload bytes of hyper's current frame still to be written.
    out_payload: usize,
    /// The part of hyper's next frame header written so far.
    out_header: [u8; HEADER],
    out_header_len: usize,
    /// hyper's first `SETTINGS` is out: the node's own may follow it.
    started: bool,
    /// `SETTINGS` frames written and not yet acknowledged, oldest first: the
    /// limit of each of the node's own, `None` for hyper's.
    unacked: VecDeque<Option<u32>>,
    /// The node's `SETTINGS` being written, and how much of it is out.
    adding: Option<(u32, [u8; SETTINGS_LEN], usize)>,
    /// The limit last written (at first hyper's).
    sent: u32,
    /// Preface bytes still to come from the caller.
    preface: usize,
    /// Payload bytes of the caller's current frame still to come.
    in_payload: usize,
    /// The limit the caller acknowledged last.
    acked: u32,
    /// The highest stream the caller opened.
    last_stream: u32,
    /// Streams opened since the caller acknowledged a limit of zero.
    over: u32,
    /// The start of a frame header the caller sent only in part, held back
    /// from hyper until the rest arrives.
    held: [u8; HEADER],
    held_len: usize,
}

impl StreamLimit {
    /// A connection on which hyper announces `streams`.
    pub fn new(streams: u32) -> StreamLimit {
        StreamLimit {
            out_payload: 0,
            out_header: [0; HEADER],
            out_header_len: 0,
            started: false,
            unacked: VecDeque::new(),
            adding: None,
            sent: streams,
            preface: PREFACE,
            in_payload: 0,
            acked: streams,
            last_stream: 0,
            over: 0,
            held: [0; HEADER],
            held_len: 0,
        }
    }

    /// Notes `bytes` that hyper wrote.
    pub fn wrote(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.out_payload > 0 {
                let n = self.out_payload.min(bytes.len());
                self.out_payload -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER - self.out_header_len).min(bytes.len());
            self.out_header[self.out_header_len..self.out_header_len + n]
                .copy_from_slice(&bytes[..n]);
            self.out_header_len += n;
            bytes = &bytes[n..];
            if self.out_header_len == HEADER {
                let (length, kind, flags, _) = header(&self.out_header);
                if kind == KIND_SETTINGS && flags & FLAG_ACK == 0 {
                    self.unacked.push_back(None);
                    self.started = true;
                }
                self.out_payload = length;
                self.out_header_len = 0;
            }
        }
    }

    /// What of the node's `SETTINGS` frame for `wanted` is still to be
    /// written before hyper's next byte; empty when nothing is (the limit
    /// already sent, or hyper in the middle of a frame).
    pub fn to_add(&mut self, wanted: u32) -> &[u8] {
        let between_frames = self.started && self.out_payload == 0 && self.out_header_len == 0;
        if self.adding.is_none() && wanted != self.sent && between_frames {
            self.adding = Some((wanted, settings_frame(wanted), 0));
        }
        match &self.adding {
            Some((_, frame, at)) => &frame[*at..],
            None => &[],
        }
    }

    /// Notes `n` bytes of the frame from [`Self::to_add`] written; true
    /// once the whole frame is.
    pub fn added(&mut self, n: usize) -> bool {
        let Some((limit, _, at)) = &mut self.adding else {
            return false;
        };
        *at += n;
        if *at < SETTINGS_LEN {
            return false;
        }
        let limit = *limit;
        self.adding = None;
        self.sent = limit;
        self.unacked.push_back(Some(limit));
        true
    }

    /// Bytes held back from the last read, to be put before the next.
    pub fn held(&self) -> &[u8] {
        &self.held[..self.held_len]
    }

    /// Gives back held bytes as they are (the caller closed its side:
    /// hyper is to see what it sent, however cut short).
    pub fn release_held(&mut self) {
        self.held_len = 0;
    }

    /// Filters `bytes`, read from the caller (after the bytes [`Self::held`]
    /// returned before the read, which the reader put first): takes out the
    /// caller's acknowledgements of the node's `SETTINGS` and holds back a
    /// frame header at the end that is not complete yet. The bytes for hyper
    /// are moved to the front; returns how many there are.
    pub fn read(&mut self, bytes: &mut [u8]) -> Result<usize, IgnoresLimit> {
        self.held_len = 0;
        let (mut from, mut to) = (0, 0);
        // Moves `n` bytes for hyper down over what was taken out.
        fn keep(bytes: &mut [u8], from: &mut usize, to: &mut usize, n: usize) {
            bytes.copy_within(*from..*from + n, *to);
            *from += n;
            *to += n;
        }
        if self.preface > 0 {
            let n = self.preface.min(bytes.len());
            keep(bytes, &mut from, &mut to, n);
            self.preface -= n;
        }
        while from < bytes.len() {
            if self.in_payload > 0 {
                let n = self.in_payload.min(bytes.len() - from);
                keep(bytes, &mut from, &mut to, n);
                self.in_payload -= n;
                continue;
            }
            let left = bytes.len() - from;
            if left < HEADER {
                self.held[..left].copy_from_slice(&bytes[from..]);
                self.held_len = left;
                break;
            }
            let (length, kind, flags, stream) = header(&bytes[from..from + HEADER]);
            if kind == KIND_SETTINGS && flags & FLAG_ACK != 0 && length == 0 {
                // Acknowledgements come in the order of the SETTINGS.
                if let Some(Some(limit)) = self.unacked.pop_front() {
                    self.acked = limit;
                    self.over = 0;
                    from += HEADER;
                    continue;
                }
            } else if kind == KIND_HEADERS && stream > self.last_stream {
                self.last_stream = stream;
                if self.acked == 0 {
                    self.over += 1;
                    if self.over > GRACE {
                        return Err(IgnoresLimit);
                    }
                }
            }
            keep(bytes, &mut from, &mut to, HEADER);
            self.in_payload = length;
        }
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn settings_ack() -> Vec<u8> {
        frame(KIND_SETTINGS, FLAG_ACK, 0, &[])
    }

    const DATA: u8 = 0x0;

    /// hyper's opening: its SETTINGS, then a window update.
    fn started(limit: &mut StreamLimit) {
        limit.wrote(&frame(KIND_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 8]));
        limit.wrote(&frame(0x8, 0, 0, &[0, 0, 1, 0]));
    }

    /// Reads `bytes` as one read after what was held, as `PeerConn` does.
    fn read(limit: &mut StreamLimit, bytes: &[u8]) -> Result<Vec<u8>, IgnoresLimit> {
        let mut buf = limit.held().to_vec();
        buf.extend_from_slice(bytes);
        let n = limit.read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn add_all(limit: &mut StreamLimit, wanted: u32) -> Vec<u8> {
        let frame = limit.to_add(wanted).to_vec();
        assert_eq!(limit.added(frame.len()), !frame.is_empty());
        frame
    }

    #[test]
    fn the_nodes_settings_go_out_only_after_hypers_and_between_its_frames() {
        let mut limit = StreamLimit::new(8);
        assert!(limit.to_add(0).is_empty(), "hyper's SETTINGS come first");
        // hyper's SETTINGS, written in two parts.
        let opening = frame(KIND_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 8]);
        limit.wrote(&opening[..4]);
        assert!(limit.to_add(0).is_empty());
        limit.wrote(&opening[4..]);
        // Half of a DATA frame written: not between frames.
        let data = frame(DATA, 0, 1, &[7; 20]);
        limit.wrote(&data[..12]);
        assert!(limit.to_add(0).is_empty());
        limit.wrote(&data[12..]);
        assert_eq!(limit.to_add(0), settings_frame(0));
        // Written in two parts; the limit wanted back meanwhile does not
        // change the frame under way.
        assert!(!limit.added(5), "a frame is sent once all of it is");
        assert_eq!(limit.to_add(8), &settings_frame(0)[5..]);
        assert!(limit.added(SETTINGS_LEN - 5));
        // Now the limit sent is 0: going back to 8 is a new frame.
        assert_eq!(limit.to_add(8), settings_frame(8));
        assert!(limit.added(SETTINGS_LEN));
        assert!(limit.to_add(8).is_empty(), "nothing more to say");
    }

    #[test]
    fn the_callers_acknowledgements_of_the_nodes_settings_are_taken_out_in_order() {
        let mut limit = StreamLimit::new(8);
        started(&mut limit);
        add_all(&mut limit, 0);
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let client_settings = frame(KIND_SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
        let headers = frame(KIND_HEADERS, 0x4, 1, &[1, 2, 3]);
        let data = frame(DATA, 0x1, 1, &[9; 10]);
        // The caller's first ACK is of hyper's SETTINGS: hyper sees it;
        // the second is of the node's: hyper does not.
        let sent = [
            preface.clone(),
            client_settings.clone(),
            settings_ack(),
            headers.clone(),
            data.clone(),
            settings_ack(),
        ]
        .concat();
        let expected = [preface, client_settings, settings_ack(), headers, data].concat();
        // Whatever the reads' sizes, hyper sees the same bytes.
        for size in [1, 2, 5, 9, 10, 17, sent.len()] {
            let mut limit = StreamLimit::new(8);
            started(&mut limit);
            add_all(&mut limit, 0);
            let mut seen = Vec::new();
            for chunk in sent.chunks(size) {
                seen.extend(read(&mut limit, chunk).unwrap());
            }
            assert_eq!(seen, expected, "reads of {size} bytes");
            assert!(limit.held().is_empty());
            assert_eq!(limit.acked, 0, "reads of {size} bytes");
        }
    }

    #[test]
    fn a_caller_that_opens_streams_after_acknowledging_a_limit_of_zero_ignores_limits() {
        let mut limit = StreamLimit::new(8);
        started(&mut limit);
        read(&mut limit, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        read(&mut limit, &settings_ack()).unwrap();
        // Streams opened before the acknowledgement are the caller's right.
        add_all(&mut limit, 0);
        for stream in (1..40).step_by(2) {
            read(&mut limit, &frame(KIND_HEADERS, 0x4, stream, &[1])).unwrap();
        }
        read(&mut limit, &settings_ack()).unwrap();
        // Trailers or data on streams already open are fine.
        read(&mut limit, &frame(KIND_HEADERS, 0x5, 39, &[1])).unwrap();
        let mut stream = 41;
        for _ in 0..GRACE {
            read(&mut limit, &frame(KIND_HEADERS, 0x4, stream, &[1])).unwrap();
            stream += 2;
        }
        assert_eq!(
            read(&mut limit, &frame(KIND_HEADERS, 0x4, stream, &[1])),
            Err(IgnoresLimit)
        );
        // The limit given back, new streams are the caller's right again.
        let mut limit = StreamLimit::new(8);
        started(&mut limit);
        read(&mut limit, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        read(&mut limit, &settings_ack()).unwrap();
        add_all(&mut limit, 0);
        read(&mut limit, &settings_ack()).unwrap();
        add_all(&mut limit, 8);
        read(&mut limit, &settings_ack()).unwrap();
        for stream in (1..100).step_by(2) {
            read(&mut limit, &frame(KIND_HEADERS, 0x4, stream, &[1])).unwrap();
        }
    }

    #[test]
    fn an_acknowledgement_nobody_asked_for_is_left_for_hyper_to_refuse() {
        let mut limit = StreamLimit::new(8);
        started(&mut limit);
        read(&mut limit, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        assert_eq!(read(&mut limit, &settings_ack()).unwrap(), settings_ack());
        assert_eq!(read(&mut limit, &settings_ack()).unwrap(), settings_ack());
    }
}
