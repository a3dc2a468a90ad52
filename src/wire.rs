//! The frames exchanged between an Apache worker and a daemon process over the group's UNIX
//! socket. Pure Rust: no ffi, no Python. Every length is checked against a cap before anything
//! is allocated, so a malformed or hostile peer gets an error, never a crash or a huge buffer.
//!
//! A frame is `[kind: u8][length: u32 little-endian][payload]`. A connection carries one
//! request at a time, and is kept for the next one when the last ended cleanly:
//!
//! ```text
//! worker → daemon   Request(environ pairs)
//! daemon → worker   ReadBody(max, fill) … when the app reads wsgi.input
//! worker → daemon   Body(bytes) | BodyEnd      (one answer per ReadBody)
//! daemon → worker   Headers(status, pairs), Data(bytes)…, End(slot)
//!                   or Fail(status) before Headers (the worker answers with Apache's error page)
//!                   or Goodbye instead of any answer: the daemon is closing this idle
//!                   connection and did not read the request (the worker may resend it)
//! ```
//!
//! **Shared region.** A worker may open a new connection with a Region frame that carries, as
//! SCM_RIGHTS, a sealed memfd of [`REGION_LEN`] bytes laid out as in [`region`]. Once the
//! daemon has mapped it, big body bytes no longer cross the socket: a ReadBody may name one of
//! the two body slots (the worker answers with BodySlot(len) once it has read the client's
//! bytes into that slot), and the daemon may answer with DataSlot(slot, len) instead of Data
//! after copying response bytes into a free data slot. The socket still carries every frame,
//! in order, so slot and inline frames mix freely, and either side may keep to inline frames.
//! The body is pulled by the daemon, so neither side ever buffers a whole body, and an app that
//! streams its answer while reading its input cannot deadlock the two sides. End names the
//! daemon process's slot on the load board (see `crate::load`), so the worker can tell
//! whether that process has a free thread before reusing the connection.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice, Read, Write};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 5;
/// The largest Data/Body frame either side sends; bigger app chunks are split.
pub const MAX_CHUNK: usize = 1 << 20;
/// The largest environ a worker may send (Apache's own header limits keep real ones far below).
pub const MAX_ENVIRON: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Body = 2,
    BodyEnd = 3,
    ReadBody = 4,
    Headers = 5,
    Data = 6,
    End = 7,
    Fail = 8,
    Goodbye = 9,
    Region = 10,
    BodySlot = 11,
    DataSlot = 12,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Request,
            2 => Kind::Body,
            3 => Kind::BodyEnd,
            4 => Kind::ReadBody,
            5 => Kind::Headers,
            6 => Kind::Data,
            7 => Kind::End,
            8 => Kind::Fail,
            9 => Kind::Goodbye,
            10 => Kind::Region,
            11 => Kind::BodySlot,
            12 => Kind::DataSlot,
            _ => return None,
        })
    }

    /// The cap for this kind's payload, given the cap for response headers.
    fn cap(self, header_cap: usize) -> usize {
        match self {
            Kind::Request => MAX_ENVIRON,
            Kind::Body | Kind::Data => MAX_CHUNK,
            Kind::BodyEnd | Kind::Goodbye => 0,
            Kind::ReadBody | Kind::End | Kind::Region | Kind::BodySlot => 4,
            Kind::DataSlot => 8,
            Kind::Fail => 2,
            Kind::Headers => header_cap,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {cap} bytes")]
    Oversized { kind: Kind, len: usize, cap: usize },
    #[error("malformed {kind:?} frame: {what}")]
    Malformed { kind: Kind, what: &'static str },
    #[error("expected {expected} but received a {got:?} frame")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl WireError {
    /// True when the error was a timeout on a socket with a deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// The 5-byte header of a frame carrying `len` payload bytes.
pub fn frame_header(kind: Kind, len: usize) -> io::Result<[u8; HEADER_LEN]> {
    let len = u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame payload over 4 GiB"))?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    Ok(header)
}

/// Writes one frame with a single vectored write where the kernel allows it.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let header = frame_header(kind, payload.len())?;
    write_all_vectored(w, &header, payload)
}

fn write_all_vectored(w: &mut impl Write, first: &[u8], second: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (first, second);
    while !a.is_empty() || !b.is_empty() {
        let written = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = written.min(a.len());
        a = &a[from_a..];
        b = &b[written - from_a..];
    }
    Ok(())
}

/// Reads one whole frame into `payload` (reusing its allocation). `header_cap` bounds a
/// Headers frame (the group's header-buffer-size).
pub fn read_frame(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    header_cap: usize,
) -> Result<Kind, WireError> {
    let (kind, len) = read_frame_header(r, header_cap)?;
    read_payload(r, len, payload)?;
    Ok(kind)
}

/// Reads a frame header, checked against its kind's cap: the kind and the payload length,
/// which the caller then reads (all at once with `read_payload`, or piece by piece).
pub fn read_frame_header(r: &mut impl Read, header_cap: usize) -> Result<(Kind, usize), WireError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact_or_closed(r, &mut header)?;
    let kind = Kind::from_byte(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[1..]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    let cap = kind.cap(header_cap);
    if len > cap {
        return Err(WireError::Oversized { kind, len, cap });
    }
    Ok((kind, len))
}

/// Reads `len` payload bytes into `payload` (reusing its allocation); a stream that ends
/// first is a cut frame.
pub fn read_payload(r: &mut impl Read, len: usize, payload: &mut Vec<u8>) -> Result<(), WireError> {
    payload.clear();
    // reserve_exact first: a reused buffer must not grow past the cap by doubling. Reading
    // through take() fills the spare capacity directly, without zeroing it first.
    payload.reserve_exact(len);
    let got = r.take(len as u64).read_to_end(payload)?;
    if got < len {
        return Err(WireError::Truncated);
    }
    Ok(())
}

/// Reads exactly `buf.len()` payload bytes into `buf`; a stream that ends first is a cut frame.
pub fn read_payload_into(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(WireError::Io(e)),
    }
}

/// Like read_exact, but an EOF before the first byte is a clean close.
fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// How many bytes `push_pair` adds for this pair.
pub fn pair_len(key: &[u8], value: &[u8]) -> usize {
    8 + key.len() + value.len()
}

/// Appends `key`/`value` to a pairs payload (environ or response headers).
pub fn push_pair(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // Both sides cap frames far below 4 GiB, so the casts cannot truncate real data.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Iterates the pairs of a pairs payload, failing on the first malformed length.
pub fn pairs(kind: Kind, payload: &[u8]) -> PairIter<'_> {
    PairIter {
        kind,
        rest: payload,
    }
}

pub struct PairIter<'a> {
    kind: Kind,
    rest: &'a [u8],
}

impl<'a> PairIter<'a> {
    fn take(&mut self) -> Result<&'a [u8], WireError> {
        let malformed = |what| WireError::Malformed {
            kind: self.kind,
            what,
        };
        if self.rest.len() < 4 {
            return Err(malformed("truncated length"));
        }
        let (len_bytes, rest) = self.rest.split_at(4);
        let mut raw = [0u8; 4];
        raw.copy_from_slice(len_bytes);
        let len = u32::from_le_bytes(raw) as usize;
        if len > rest.len() {
            return Err(malformed("length runs past the end of the frame"));
        }
        let (item, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(item)
    }
}

impl<'a> Iterator for PairIter<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let pair = self.take().and_then(|k| Ok((k, self.take()?)));
        if pair.is_err() {
            self.rest = &[];
        }
        Some(pair)
    }
}

/// A Headers payload: the status line, then header pairs.
pub fn encode_headers<'h>(
    out: &mut Vec<u8>,
    status: &[u8],
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) {
    out.clear();
    push_pair(out, b"", status);
    for (name, value) in headers {
        push_pair(out, name, value);
    }
}

/// Header name/value pairs borrowed from a frame payload.
pub type HeaderPairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Splits a Headers payload into its status line and header pairs.
pub fn decode_headers(payload: &[u8]) -> Result<(&[u8], HeaderPairs<'_>), WireError> {
    let mut iter = pairs(Kind::Headers, payload);
    let status = match iter.next() {
        Some(Ok((b"", status))) => status,
        Some(Err(e)) => return Err(e),
        _ => {
            return Err(WireError::Malformed {
                kind: Kind::Headers,
                what: "missing status line",
            })
        }
    };
    let headers = iter.collect::<Result<Vec<_>, _>>()?;
    Ok((status, headers))
}

/// In a ReadBody payload, the bit that asks the worker to keep reading the client until it has
/// all the bytes asked for (or the body ends), rather than answer with what one read gave:
/// `wsgi.input.read(n)` needs n bytes anyway, and one answer instead of many round trips is
/// what makes uploads fast. Asks never come near it (MAX_CHUNK is far below).
const FILL: u32 = 1 << 31;
/// In a ReadBody payload with FILL: the body is known (Content-Length) to hold at least the
/// bytes asked for, so the worker may announce the whole Body frame at once and stream it from
/// the client piece by piece, with a small buffer (a body cut short is an error then).
const KNOWN: u32 = 1 << 30;
/// In a ReadBody payload: answer with BodySlot, the bytes in the shared body slot named by
/// the `SLOT_INDEX` bit (at most `region::BODY_SLOT_LEN` of them).
const IN_SLOT: u32 = 1 << 29;
const SLOT_INDEX: u32 = 1 << 28;
const ASK_FLAGS: u32 = FILL | KNOWN | IN_SLOT | SLOT_INDEX;

/// What the daemon asks for in a ReadBody frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyAsk {
    /// At most this many bytes.
    pub max: u32,
    /// All of them (or up to the end of the body), not just what one client read gives.
    pub fill: bool,
    /// The body certainly has `max` more bytes (implies `fill`).
    pub known: bool,
    /// Answer in this body slot of the shared region (0 or 1), not inline.
    pub slot: Option<u8>,
}

pub fn encode_read_body(ask: BodyAsk) -> [u8; 4] {
    let mut raw = ask.max & !ASK_FLAGS;
    if ask.fill || ask.known {
        raw |= FILL;
    }
    if ask.known {
        raw |= KNOWN;
    }
    match ask.slot {
        Some(0) => raw |= IN_SLOT,
        Some(_) => raw |= IN_SLOT | SLOT_INDEX,
        None => {}
    }
    raw.to_le_bytes()
}

pub fn decode_read_body(payload: &[u8]) -> Result<BodyAsk, WireError> {
    let raw = decode_u32(Kind::ReadBody, payload)?;
    Ok(BodyAsk {
        max: raw & !ASK_FLAGS,
        fill: raw & FILL != 0,
        known: raw & FILL != 0 && raw & KNOWN != 0,
        slot: (raw & IN_SLOT != 0).then_some(u8::from(raw & SLOT_INDEX != 0)),
    })
}

/// A 4-byte little-endian number (an End frame's slot).
pub fn encode_u32(value: u32) -> [u8; 4] {
    value.to_le_bytes()
}

pub fn decode_u32(kind: Kind, payload: &[u8]) -> Result<u32, WireError> {
    let raw: [u8; 4] = payload.try_into().map_err(|_| WireError::Malformed {
        kind,
        what: "expected a 4-byte number",
    })?;
    Ok(u32::from_le_bytes(raw))
}

/// An End payload: the slot of the daemon process that answered, when it gave one.
pub fn decode_end(payload: &[u8]) -> Option<usize> {
    let raw: [u8; 4] = payload.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(raw)).ok()
}

/// A DataSlot payload: which data slot holds the bytes, and how many there are.
pub fn encode_data_slot(slot: u32, len: u32) -> [u8; 8] {
    let mut raw = [0u8; 8];
    raw[..4].copy_from_slice(&slot.to_le_bytes());
    raw[4..].copy_from_slice(&len.to_le_bytes());
    raw
}

/// Decodes a DataSlot payload, checked against the region's layout: the slot exists and the
/// length fits in it.
pub fn decode_data_slot(payload: &[u8]) -> Result<(usize, usize), WireError> {
    let malformed = |what| WireError::Malformed {
        kind: Kind::DataSlot,
        what,
    };
    let raw: [u8; 8] = payload
        .try_into()
        .map_err(|_| malformed("expected a slot and a length"))?;
    let [s0, s1, s2, s3, l0, l1, l2, l3] = raw;
    let slot = u32::from_le_bytes([s0, s1, s2, s3]) as usize;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    if slot >= region::DATA_SLOTS {
        return Err(malformed("no such data slot"));
    }
    if len == 0 || len > region::DATA_SLOT_LEN {
        return Err(malformed("length does not fit the data slot"));
    }
    Ok((slot, len))
}

/// Decodes a BodySlot payload: how many bytes the body slot holds.
pub fn decode_body_slot(payload: &[u8]) -> Result<usize, WireError> {
    let len = decode_u32(Kind::BodySlot, payload)? as usize;
    if len == 0 || len > region::BODY_SLOT_LEN {
        return Err(WireError::Malformed {
            kind: Kind::BodySlot,
            what: "length does not fit the body slot",
        });
    }
    Ok(len)
}

/// The layout of the region a worker shares with a daemon over one connection (see the
/// module docs). Only offsets and sizes: mapping it is `crate::httpd::shm`'s job.
pub mod region {
    /// The first page holds one 4-byte state word per data slot (0: the daemon may fill it;
    /// anything else: the worker may still be sending it) and, on its own cache line, the
    /// word a daemon waiting for a free data slot sleeps on.
    pub const CONTROL_LEN: usize = 4096;
    /// Offset of the waiting word: 0 while no daemon waits; otherwise `waiting_word`.
    pub const WAITING_OFFSET: usize = 64;
    /// Offset of the pickup word, on its own cache line. It is PICKUP_UNMAPPED until the
    /// daemon has mapped the region (it sets PICKUP_IDLE when a thread picks up a request).
    /// A worker that sends a request to a process with no thread free (the request waits in
    /// that process's queue, see `crate::load`) sets PICKUP_QUEUED first, and may withdraw the
    /// request (PICKUP_WITHDRAWN) until a daemon thread picks it up. Only a daemon that has
    /// mapped the region gets queued requests: one without it could not see a withdrawal.
    pub const PICKUP_OFFSET: usize = 128;
    pub const PICKUP_UNMAPPED: u32 = 0;
    pub const PICKUP_IDLE: u32 = 1;
    pub const PICKUP_QUEUED: u32 = 2;
    pub const PICKUP_WITHDRAWN: u32 = 3;
    pub const BODY_SLOTS: usize = 2;
    pub const BODY_SLOT_LEN: usize = 256 * 1024;
    pub const DATA_SLOTS: usize = 4;
    pub const DATA_SLOT_LEN: usize = 64 * 1024;
    pub const REGION_LEN: usize =
        CONTROL_LEN + BODY_SLOTS * BODY_SLOT_LEN + DATA_SLOTS * DATA_SLOT_LEN;

    /// Offset of data slot `slot`'s state word.
    pub const fn state_offset(slot: usize) -> usize {
        slot * 4
    }

    pub const fn body_slot_offset(slot: usize) -> usize {
        CONTROL_LEN + slot * BODY_SLOT_LEN
    }

    pub const fn data_slot_offset(slot: usize) -> usize {
        CONTROL_LEN + BODY_SLOTS * BODY_SLOT_LEN + slot * DATA_SLOT_LEN
    }

    /// The waiting word of a daemon that waits for a data slot among its first `slots`, to be
    /// woken once `wanted` of them are free: the slot count in the high half, the wanted
    /// count in the low half (each at least 1). A worker that releases a slot wakes the
    /// daemon only once that many are free, so a daemon can sleep while Apache sends several
    /// slots and refill them in one go.
    pub fn waiting_word(slots: usize, wanted: usize) -> u32 {
        let slots = slots.clamp(1, DATA_SLOTS);
        ((slots as u32) << 16) | wanted.clamp(1, slots) as u32
    }

    /// `(slots, wanted)` from a waiting word, clamped to the layout (the daemon writes it). A
    /// word without a slot count wakes on any free slot.
    pub fn waiting_parts(word: u32) -> (usize, usize) {
        let slots = (word >> 16) as usize;
        if slots == 0 {
            return (DATA_SLOTS, 1);
        }
        let slots = slots.min(DATA_SLOTS);
        (slots, ((word & 0xffff) as usize).clamp(1, slots))
    }

    /// How many data slots a daemon may fill for one response (`response-buffer-size=`):
    /// as many whole slots as fit in the size (it is a maximum), from 1 to DATA_SLOTS. Bytes
    /// in data slots are held by the Apache child until its client takes them, so this bounds
    /// what one response holds of the memory the child shares with the daemon; more slots let
    /// the daemon run further ahead of a download.
    pub const fn data_slots_for(response_buffer_size: usize) -> usize {
        let slots = response_buffer_size / DATA_SLOT_LEN;
        if slots < 1 {
            1
        } else if slots > DATA_SLOTS {
            DATA_SLOTS
        } else {
            slots
        }
    }

    const _: () = assert!(state_offset(DATA_SLOTS) <= WAITING_OFFSET);
    const _: () = assert!(WAITING_OFFSET + 4 <= PICKUP_OFFSET);
    const _: () = assert!(PICKUP_OFFSET + 4 <= CONTROL_LEN);
    const _: () = assert!(data_slot_offset(DATA_SLOTS) == REGION_LEN);
    const _: () = assert!(REGION_LEN < u32::MAX as usize);
}

/// A Fail payload: the HTTP status the worker should answer with.
pub fn decode_status(payload: &[u8]) -> Result<u16, WireError> {
    let raw: [u8; 2] = payload.try_into().map_err(|_| WireError::Malformed {
        kind: Kind::Fail,
        what: "expected a 2-byte status",
    })?;
    match u16::from_le_bytes(raw) {
        status @ 100..=599 => Ok(status),
        _ => Err(WireError::Malformed {
            kind: Kind::Fail,
            what: "status out of range",
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Cursor;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, payload).unwrap();
        out
    }

    #[test]
    fn round_trips_every_kind() {
        for kind in [
            Kind::Request,
            Kind::Body,
            Kind::BodyEnd,
            Kind::ReadBody,
            Kind::Headers,
            Kind::Data,
            Kind::End,
            Kind::Fail,
            Kind::Goodbye,
            Kind::Region,
            Kind::BodySlot,
            Kind::DataSlot,
        ] {
            let payload: &[u8] = match kind {
                Kind::BodyEnd | Kind::Goodbye => b"",
                Kind::ReadBody | Kind::End | Kind::Region | Kind::BodySlot => &[1, 0, 0, 0],
                Kind::DataSlot => &[1, 0, 0, 0, 2, 0, 0, 0],
                Kind::Fail => &[244, 1],
                _ => b"abc",
            };
            let bytes = frame(kind, payload);
            let mut buf = Vec::new();
            let got = read_frame(&mut Cursor::new(bytes), &mut buf, 1024).unwrap();
            assert_eq!(got, kind);
            assert_eq!(buf, payload);
        }
    }

    #[test]
    fn clean_close_and_truncation_differ() {
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut Cursor::new(Vec::new()), &mut buf, 1024),
            Err(WireError::Closed)
        ));
        let mut bytes = frame(Kind::Data, b"hello");
        bytes.truncate(7);
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes), &mut buf, 1024),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![6u8, 1]), &mut buf, 1024),
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut header = vec![Kind::Data as u8];
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = Vec::new();
        let err = read_frame(&mut Cursor::new(header), &mut buf, 1024).unwrap_err();
        assert!(matches!(
            err,
            WireError::Oversized {
                kind: Kind::Data,
                ..
            }
        ));
        assert!(buf.capacity() < 1 << 20);

        let bytes = frame(Kind::Headers, &[0u8; 2048]);
        let err = read_frame(&mut Cursor::new(bytes), &mut buf, 1024).unwrap_err();
        assert!(matches!(
            err,
            WireError::Oversized {
                kind: Kind::Headers,
                len: 2048,
                cap: 1024
            }
        ));

        let bytes = frame(Kind::End, b"slot!");
        assert!(read_frame(&mut Cursor::new(bytes), &mut buf, 1024).is_err());
        let bytes = frame(Kind::Goodbye, b"x");
        assert!(read_frame(&mut Cursor::new(bytes), &mut buf, 1024).is_err());
    }

    #[test]
    fn garbage_kind_is_an_error() {
        let mut buf = Vec::new();
        for byte in [0u8, 13, 200, 255] {
            let err =
                read_frame(&mut Cursor::new(vec![byte, 0, 0, 0, 0]), &mut buf, 1024).unwrap_err();
            assert!(matches!(err, WireError::UnknownKind(b) if b == byte));
        }
    }

    #[test]
    fn pairs_round_trip_and_reject_bad_lengths() {
        let mut payload = Vec::new();
        push_pair(&mut payload, b"REQUEST_METHOD", b"GET");
        push_pair(&mut payload, b"EMPTY", b"");
        assert_eq!(
            payload.len(),
            pair_len(b"REQUEST_METHOD", b"GET") + pair_len(b"EMPTY", b""),
            "pair_len sizes the payload exactly"
        );
        let got: Vec<_> = pairs(Kind::Request, &payload)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            vec![
                (&b"REQUEST_METHOD"[..], &b"GET"[..]),
                (&b"EMPTY"[..], &b""[..])
            ]
        );

        // Value length pointing past the end.
        let mut bad = Vec::new();
        push_pair(&mut bad, b"K", b"V");
        let last = bad.len() - 5;
        bad[last] = 200;
        let results: Vec<_> = pairs(Kind::Request, &bad).collect();
        assert_eq!(results.len(), 1);
        assert!(results[0].is_err());

        // A dangling key with no value.
        let mut dangling = Vec::new();
        dangling.extend_from_slice(&1u32.to_le_bytes());
        dangling.push(b'K');
        assert!(pairs(Kind::Request, &dangling).any(|p| p.is_err()));

        // Three stray bytes.
        assert!(pairs(Kind::Request, &[1, 2, 3]).any(|p| p.is_err()));
    }

    #[test]
    fn headers_round_trip() {
        let mut out = Vec::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Content-Type", b"text/plain"),
        ];
        encode_headers(&mut out, b"200 OK", headers.clone());
        let (status, got) = decode_headers(&out).unwrap();
        assert_eq!(status, b"200 OK");
        assert_eq!(got, headers);
        assert!(decode_headers(b"").is_err());
        let mut no_status = Vec::new();
        push_pair(&mut no_status, b"X", b"y");
        assert!(decode_headers(&no_status).is_err());
    }

    #[test]
    fn numbers_and_statuses() {
        assert_eq!(
            decode_u32(Kind::ReadBody, &encode_u32(65536)).unwrap(),
            65536
        );
        assert!(decode_u32(Kind::ReadBody, &[1, 2]).is_err());
        for ask in [
            BodyAsk {
                max: 65536,
                fill: true,
                known: false,
                slot: None,
            },
            BodyAsk {
                max: 7,
                fill: false,
                known: false,
                slot: Some(0),
            },
            BodyAsk {
                max: 1 << 20,
                fill: true,
                known: true,
                slot: Some(1),
            },
            BodyAsk {
                max: region::BODY_SLOT_LEN as u32,
                fill: true,
                known: false,
                slot: Some(1),
            },
        ] {
            assert_eq!(decode_read_body(&encode_read_body(ask)).unwrap(), ask);
        }
        assert_eq!(decode_status(&500u16.to_le_bytes()).unwrap(), 500);
        assert!(decode_status(&42u16.to_le_bytes()).is_err());
        assert!(decode_status(&[1]).is_err());
        assert_eq!(decode_end(&encode_u32(3)), Some(3));
        assert_eq!(decode_end(b""), None);
    }

    #[test]
    fn slot_frames_are_checked_against_the_layout() {
        let last = region::DATA_SLOTS as u32 - 1;
        let full = region::DATA_SLOT_LEN as u32;
        assert_eq!(
            decode_data_slot(&encode_data_slot(last, full)).unwrap(),
            (last as usize, full as usize)
        );
        assert!(decode_data_slot(&encode_data_slot(last + 1, 1)).is_err());
        assert!(decode_data_slot(&encode_data_slot(0, full + 1)).is_err());
        assert!(decode_data_slot(&encode_data_slot(0, 0)).is_err());
        assert!(decode_data_slot(&[0; 4]).is_err());
        let body = region::BODY_SLOT_LEN as u32;
        assert_eq!(decode_body_slot(&encode_u32(body)).unwrap(), body as usize);
        assert!(decode_body_slot(&encode_u32(body + 1)).is_err());
        assert!(decode_body_slot(&encode_u32(0)).is_err());
        // The slots do not overlap each other or the control page.
        assert!(region::body_slot_offset(0) >= region::CONTROL_LEN);
        assert_eq!(
            region::body_slot_offset(1) - region::body_slot_offset(0),
            region::BODY_SLOT_LEN
        );
        assert_eq!(
            region::data_slot_offset(0),
            region::body_slot_offset(region::BODY_SLOTS)
        );
    }

    #[test]
    fn response_buffer_size_counts_whole_data_slots() {
        use region::{data_slots_for, DATA_SLOTS, DATA_SLOT_LEN};
        // mod_wsgi's own default and minimum: one slot. A maximum: never more than it says.
        assert_eq!(data_slots_for(65_536), 1);
        assert_eq!(data_slots_for(131_071), 1);
        assert_eq!(data_slots_for(131_072), 2);
        assert_eq!(data_slots_for(200_000), 3);
        assert_eq!(data_slots_for(DATA_SLOTS * DATA_SLOT_LEN), DATA_SLOTS);
        // Beyond what a region has, and below one slot: clamped.
        assert_eq!(data_slots_for(64 * 1024 * 1024), DATA_SLOTS);
        assert_eq!(data_slots_for(1), 1);
        assert_eq!(data_slots_for(0), 1);
    }

    #[test]
    fn waiting_words_say_how_many_free_slots_wake_the_daemon() {
        use region::{waiting_parts, waiting_word, DATA_SLOTS};
        assert_eq!(
            waiting_parts(waiting_word(DATA_SLOTS, DATA_SLOTS - 1)),
            (DATA_SLOTS, DATA_SLOTS - 1)
        );
        assert_eq!(waiting_parts(waiting_word(2, 1)), (2, 1));
        // At least one of at least one slot, never more than the region has.
        assert_eq!(waiting_parts(waiting_word(1, 0)), (1, 1));
        assert_eq!(waiting_parts(waiting_word(0, 0)), (1, 1));
        assert_eq!(
            waiting_parts(waiting_word(99, 99)),
            (DATA_SLOTS, DATA_SLOTS)
        );
        assert_ne!(
            waiting_word(0, 0),
            0,
            "a waiting daemon never writes 0 (nobody waits)"
        );
        // Whatever a daemon writes is clamped; a word without a slot count wakes on any slot.
        assert_eq!(waiting_parts(1), (DATA_SLOTS, 1));
        assert_eq!(waiting_parts(u32::MAX), (DATA_SLOTS, DATA_SLOTS));
        assert_eq!(waiting_parts(2 << 16), (2, 1));
    }

    /// A writer that accepts at most 3 bytes per call, to exercise partial vectored writes.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_complete() {
        let mut w = Trickle(Vec::new());
        write_frame(&mut w, Kind::Data, b"hello world").unwrap();
        assert_eq!(w.0, frame(Kind::Data, b"hello world"));
    }
}
