//! A connection from an Apache worker, daemon side: reads each request's environ, pulls the
//! request body on demand (never past CONTENT_LENGTH, never more than asked), and writes the
//! response frames. It serves one request at a time and is kept for the next when the last
//! one ended cleanly (End or Fail sent). Plain blocking I/O; the Python layer calls it with
//! the GIL released.
//!
//! When the worker shares a region (`crate::httpd::shm`), body pulls name a body slot and big
//! response chunks go through free data slots, so those bytes cross no socket; a chunk for
//! which no slot frees up in time goes inline, as without a region. A response limited to one
//! data slot that is the only request its process serves does not wait for the slot at all
//! (see `Connection::overflows_inline`).

#![forbid(unsafe_code)]

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::httpd::shm::{self, Region};
use crate::load::LoadSlot;
use crate::wire::{self, region, Kind, WireError};

/// How much body one pull asks the worker for, at least.
const PULL_SIZE: usize = 64 * 1024;
/// How much body is asked for ahead of the app's next read (see `Connection::read_ahead`).
const READ_AHEAD: u64 = 256 * 1024;
/// The read buffer: a Request frame (the environ) usually fits; big Body frames bypass it.
const READ_BUFFER: usize = 16 * 1024;
/// Buffers bigger than this are given back when a connection goes idle, so the idle
/// connections of a daemon (up to one per Apache worker thread) stay small.
const IDLE_KEEP: usize = 64 * 1024;
/// Frames smaller than this wait in `out` until a flush, so a small response (headers, body
/// and End) leaves in one write.
const OUT_CAP: usize = 64 * 1024;
/// Response chunks this big or bigger go through a data slot when the region has one free;
/// smaller ones are cheaper to batch inline.
const SLOT_MIN: usize = 8 * 1024;
/// How long a response chunk waits for the worker to free a data slot before it goes inline.
/// After one such wait the response stops waiting (something on the worker's side may keep
/// the slots, say a filter that holds the whole body) and takes only slots already free,
/// until it finds one free: then the worker is handing slots back (the wait was a slow
/// client), and the next chunk waits again rather than go inline whenever the worker is a
/// step behind.
const SLOT_WAIT: Duration = Duration::from_millis(50);

/// The socket, read with recvmsg so that a descriptor the worker sends (the region's memfd)
/// is kept rather than dropped by the kernel.
struct Socket {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        shm::recv_with_fds(&self.stream, buf, &mut self.fds)
    }
}

/// Buffered body bytes that are still in a body slot of the region.
#[derive(Debug, Clone, Copy)]
struct SlotInput {
    slot: usize,
    pos: usize,
    end: usize,
}

pub struct Connection {
    /// Reads go through a buffer (a frame header and its payload usually arrive together);
    /// writes go to the stream itself, batched in `out`.
    reader: BufReader<Socket>,
    out: Vec<u8>,
    frame: Vec<u8>,
    input: Vec<u8>,
    input_pos: usize,
    /// When set, the buffered input is in a body slot, and `input` is empty.
    input_slot: Option<SlotInput>,
    /// The body slot the outstanding ReadBody named, if it named one.
    asked_slot: Option<usize>,
    /// The region the worker shares, once mapped (see `accept_region`).
    region: Option<Region>,
    /// A region the worker offered with this request, not mapped yet.
    offered_region: Option<OwnedFd>,
    /// This response waited for a data slot in vain and has found none free since: it takes
    /// only free ones.
    slot_wait_failed: bool,
    /// How many of the region's data slots a response may fill (`response-buffer-size=`).
    data_slots: usize,
    /// This process's slot on the load board: how many requests it serves right now.
    process_load: Option<&'static LoadSlot>,
    body_done: bool,
    /// CONTENT_LENGTH still unread; None when the request gave none (chunked).
    body_left: Option<u64>,
    headers_sent: bool,
    /// Set by start_response, sent with the first body bytes (or at the end).
    pending_headers: Option<Vec<u8>>,
    /// A write failed because the worker hung up (the client went away).
    peer_gone: bool,
    /// The response ended with End or Fail, fully written: the connection may carry another.
    finished: bool,
    /// A ReadBody was sent ahead of the app's next read and is not answered yet.
    ahead: bool,
    /// This process's slot on the load board, sent with every End.
    slot: u32,
}

impl Connection {
    /// Limits each response to the first `slots` data slots of the region (at least one).
    /// Only the daemon keeps this limit: Apache children of the previous generation reach new
    /// daemons through the same socket after a graceful restart that may have changed it, so
    /// Apache checks only the region's own bound (DATA_SLOTS).
    pub fn with_data_slots(mut self, slots: usize) -> Connection {
        self.data_slots = slots.clamp(1, region::DATA_SLOTS);
        self
    }

    /// Lets the connection see how many requests its process serves (its load-board slot).
    pub fn with_process_load(mut self, load: Option<&'static LoadSlot>) -> Connection {
        self.process_load = load;
        self
    }

    pub fn new(stream: UnixStream, slot: u32) -> Connection {
        Connection {
            reader: BufReader::with_capacity(
                READ_BUFFER,
                Socket {
                    stream,
                    fds: Vec::new(),
                },
            ),
            out: Vec::new(),
            frame: Vec::new(),
            input: Vec::new(),
            input_pos: 0,
            input_slot: None,
            asked_slot: None,
            region: None,
            offered_region: None,
            slot_wait_failed: false,
            data_slots: region::DATA_SLOTS,
            process_load: None,
            body_done: false,
            body_left: None,
            headers_sent: false,
            pending_headers: None,
            peer_gone: false,
            finished: false,
            ahead: false,
            slot,
        }
    }

    /// Reads the next Request frame; the returned payload holds the environ pairs. Resets
    /// everything the previous request on this connection left. A Region frame before it is
    /// kept for `accept_region`.
    pub fn read_request(&mut self) -> Result<Vec<u8>, WireError> {
        self.input.clear();
        self.input_pos = 0;
        self.input_slot = None;
        self.asked_slot = None;
        self.slot_wait_failed = false;
        self.body_done = false;
        self.body_left = None;
        self.headers_sent = false;
        self.pending_headers = None;
        self.finished = false;
        self.ahead = false;
        let mut payload = Vec::new();
        loop {
            match wire::read_frame(&mut self.reader, &mut payload, 0)? {
                Kind::Request => return Ok(payload),
                Kind::Region if self.region.is_none() => {
                    // The descriptor came with the frame's first bytes; anything sent before
                    // it is not ours to keep.
                    let fds = &mut self.reader.get_mut().fds;
                    self.offered_region = fds.pop();
                    fds.clear();
                    if self.offered_region.is_none() {
                        return Err(WireError::Malformed {
                            kind: Kind::Region,
                            what: "no descriptor came with it",
                        });
                    }
                }
                got => {
                    return Err(WireError::Unexpected {
                        expected: "a Request frame",
                        got,
                    })
                }
            }
        }
    }

    /// Maps the region the worker offered with this request (called once the request's
    /// origin is validated). On an error the connection goes on without it.
    pub fn accept_region(&mut self) -> io::Result<()> {
        let Some(fd) = self.offered_region.take() else {
            return Ok(());
        };
        self.region = Some(Region::map(&fd)?);
        Ok(())
    }

    /// A thread picks up the request just read: false if the worker withdrew it meanwhile
    /// (it waited in this process's queue and went to a process with a free thread instead).
    pub fn pick_up(&self) -> bool {
        self.region.as_ref().is_none_or(Region::pick_up)
    }

    /// True once a shared region is in use on this connection.
    pub fn has_region(&self) -> bool {
        self.region.is_some()
    }

    /// Queues a frame, writing it (with everything queued before it) when `flush` is set or
    /// the queue would grow past OUT_CAP: one writev for the queue, the header and the payload.
    fn send_frame(&mut self, kind: Kind, payload: &[u8], flush: bool) -> io::Result<()> {
        let header = wire::frame_header(kind, payload.len())?;
        if !flush && self.out.len() + header.len() + payload.len() <= OUT_CAP {
            self.out.extend_from_slice(&header);
            self.out.extend_from_slice(payload);
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.out);
        let result = write_all_slices(self.stream(), &[&out, &header, payload]);
        out.clear();
        self.out = out;
        self.note_write(result)
    }

    /// Sets the body length from CONTENT_LENGTH (None for a chunked body).
    pub fn set_content_length(&mut self, length: Option<u64>) {
        self.body_left = length;
        if length == Some(0) {
            self.body_done = true;
        }
    }

    pub fn headers_sent(&self) -> bool {
        self.headers_sent
    }

    /// True once a write failed because the Apache worker closed the connection.
    pub fn peer_gone(&self) -> bool {
        self.peer_gone
    }

    fn note_write(&mut self, result: io::Result<()>) -> io::Result<()> {
        if let Err(err) = &result {
            if matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                self.peer_gone = true;
            }
        }
        result
    }

    fn buffered(&self) -> &[u8] {
        match (self.input_slot, &self.region) {
            (Some(input), Some(region)) => &region.body_slot(input.slot)[input.pos..input.end],
            _ => &self.input[self.input_pos..],
        }
    }

    /// Hands the next `n` buffered bytes (fewer if fewer are buffered) to `take`, then drops
    /// them from the buffer. The caller copies them once, straight into what it returns.
    pub fn take_ready<T>(&mut self, n: usize, take: impl FnOnce(&[u8]) -> T) -> T {
        if let (Some(input), Some(region)) = (self.input_slot.as_mut(), &self.region) {
            let end = (input.pos + n).min(input.end);
            let taken = take(&region.body_slot(input.slot)[input.pos..end]);
            input.pos = end;
            if input.pos == input.end {
                self.input_slot = None;
            }
            return taken;
        }
        let end = (self.input_pos + n).min(self.input.len());
        let taken = take(&self.input[self.input_pos..end]);
        self.input_pos = end;
        if self.input_pos == self.input.len() {
            self.input.clear();
            self.input_pos = 0;
        }
        taken
    }

    /// Pulls more body into the buffer; false at the end of the body. With `exact`, the worker
    /// answers only once it has `want` bytes (or the body ended); otherwise with what the
    /// client had sent so far (a line reader must not wait for more than one line).
    fn fill(&mut self, want: usize, exact: bool) -> Result<bool, WireError> {
        if self.body_done {
            return Ok(false);
        }
        if !self.ahead {
            let mut ask = want.clamp(PULL_SIZE, self.pull_cap());
            if let Some(left) = self.body_left {
                ask = ask.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            // Asking for more than the app wants (the PULL_SIZE floor) is fine, waiting for it
            // is not.
            let fill = exact && ask <= want;
            let known = fill && self.body_left.is_some();
            self.ask_body(ask, fill, known)?;
        }
        self.ahead = false;
        let filled = self.receive_body()?;
        if filled {
            self.read_ahead()?;
        }
        Ok(filled)
    }

    /// While the app has not started its response and the client still owes bytes of its
    /// Content-Length, asks for the next piece at once: the worker reads it from the client
    /// while the app works on this one, instead of the two taking turns. (Never for a chunked
    /// body, whose client may wait for an answer before it sends more, nor once the response
    /// has begun, which must not wait behind a client read.) At most one piece is ahead.
    fn read_ahead(&mut self) -> io::Result<()> {
        let Some(left) = self.body_left else {
            return Ok(());
        };
        if left == 0
            || self.body_done
            || self.headers_sent
            || self.pending_headers.is_some()
            || !self.out.is_empty()
        {
            return Ok(());
        }
        let ask = left.min(READ_AHEAD).min(self.pull_cap() as u64) as usize;
        self.ask_body(ask, true, true)?;
        self.ahead = true;
        Ok(())
    }

    /// The most one body pull asks for: a body slot with a region, a frame without.
    fn pull_cap(&self) -> usize {
        if self.region.is_some() {
            region::BODY_SLOT_LEN
        } else {
            wire::MAX_CHUNK
        }
    }

    /// Sends a ReadBody. With a region it names the body slot the buffered input is not in
    /// (at most one slot holds buffered input, the one the last answer came in).
    fn ask_body(&mut self, max: usize, fill: bool, known: bool) -> io::Result<()> {
        let slot = self.region.as_ref().map(|_| match self.input_slot {
            Some(input) => 1 - input.slot,
            None => 0,
        });
        self.asked_slot = slot;
        let ask = wire::BodyAsk {
            max: max as u32,
            fill,
            known,
            slot: slot.map(|s| s as u8),
        };
        self.send_frame(Kind::ReadBody, &wire::encode_read_body(ask), true)
    }

    /// Reads the answer to a piece asked for ahead that the app never read, so the
    /// connection is clean for its next request.
    fn settle(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.ahead) {
            let mut discard = std::mem::take(&mut self.frame);
            let read = wire::read_frame(&mut self.reader, &mut discard, 0);
            self.frame = discard;
            match read {
                Ok(Kind::Body | Kind::BodyEnd | Kind::BodySlot) => {}
                Ok(_) => return Err(io::Error::other("expected a Body frame")),
                Err(WireError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Ok(())
    }

    /// Reads the worker's answer to a ReadBody into the input buffer; false at the end of the
    /// body.
    fn receive_body(&mut self) -> Result<bool, WireError> {
        let kind = wire::read_frame(&mut self.reader, &mut self.frame, 0)?;
        let asked_slot = self.asked_slot.take();
        match kind {
            Kind::Body if !self.frame.is_empty() => {
                let got = self.count_body(self.frame.len());
                if self.buffered().is_empty() {
                    // Nothing buffered: the frame becomes the buffer, without a copy.
                    self.input_slot = None;
                    self.frame.truncate(got);
                    std::mem::swap(&mut self.input, &mut self.frame);
                    self.input_pos = 0;
                    return Ok(true);
                }
                self.unslot_input();
                self.input.extend_from_slice(&self.frame[..got]);
                Ok(true)
            }
            Kind::BodySlot => {
                let (Some(slot), true) = (asked_slot, self.region.is_some()) else {
                    return Err(WireError::Unexpected {
                        expected: "a Body frame (no body slot was asked for)",
                        got: kind,
                    });
                };
                let got = self.count_body(wire::decode_body_slot(&self.frame)?);
                if self.buffered().is_empty() {
                    // Nothing buffered: the slot becomes the buffer, without a copy.
                    self.input.clear();
                    self.input_pos = 0;
                    self.input_slot = (got > 0).then_some(SlotInput {
                        slot,
                        pos: 0,
                        end: got,
                    });
                    return Ok(got > 0 || !self.body_done);
                }
                self.unslot_input();
                if let Some(region) = &self.region {
                    self.input.extend_from_slice(&region.body_slot(slot)[..got]);
                }
                Ok(true)
            }
            Kind::Body | Kind::BodyEnd => {
                self.body_done = true;
                Ok(false)
            }
            got => Err(WireError::Unexpected {
                expected: "a Body frame",
                got,
            }),
        }
    }

    /// Counts `len` body bytes just received against CONTENT_LENGTH: how many of them the app
    /// may see (never bytes beyond CONTENT_LENGTH).
    fn count_body(&mut self, len: usize) -> usize {
        let mut got = len;
        if let Some(left) = self.body_left.as_mut() {
            got = got.min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= got as u64;
            if *left == 0 {
                self.body_done = true;
            }
        }
        got
    }

    /// Moves buffered input out of its body slot (if it is in one) into `input`, compacted,
    /// so more can be appended and the slot can be named again.
    fn unslot_input(&mut self) {
        if let (Some(input), Some(region)) = (self.input_slot.take(), &self.region) {
            self.input.clear();
            self.input
                .extend_from_slice(&region.body_slot(input.slot)[input.pos..input.end]);
            self.input_pos = 0;
        } else if self.input_pos > 0 {
            self.input.drain(..self.input_pos);
            self.input_pos = 0;
        }
    }

    /// `wsgi.input.read(size)`: buffers up to `size` bytes (all that is left for None), fewer
    /// only at the end of the body, and says how many are ready for `take_ready`.
    pub fn prepare_read(&mut self, size: Option<usize>) -> Result<usize, WireError> {
        let limit = size.unwrap_or(usize::MAX);
        while self.buffered().len() < limit {
            let want = limit.saturating_sub(self.buffered().len());
            if !self.fill(want, true)? {
                break;
            }
        }
        Ok(self.buffered().len().min(limit))
    }

    /// `wsgi.input.readline(size)`: buffers through the next b"\n", or `size` bytes, or the
    /// end, and says how many bytes the line has (for `take_ready`).
    pub fn prepare_readline(&mut self, size: Option<usize>) -> Result<usize, WireError> {
        let limit = size.unwrap_or(usize::MAX);
        let mut searched = 0;
        loop {
            let buffered = self.buffered();
            if let Some(pos) = buffered[searched..].iter().position(|&b| b == b'\n') {
                return Ok((searched + pos + 1).min(limit));
            }
            searched = buffered.len();
            if searched >= limit {
                return Ok(limit);
            }
            if !self.fill(PULL_SIZE, false)? {
                return Ok(self.buffered().len().min(limit));
            }
        }
    }

    /// `prepare_read` and the bytes, as a Vec.
    #[cfg(test)]
    pub fn read(&mut self, size: Option<usize>) -> Result<Vec<u8>, WireError> {
        let n = self.prepare_read(size)?;
        Ok(self.take_ready(n, <[u8]>::to_vec))
    }

    /// `prepare_readline` and the line, as a Vec.
    #[cfg(test)]
    pub fn readline(&mut self, size: Option<usize>) -> Result<Vec<u8>, WireError> {
        let n = self.prepare_readline(size)?;
        Ok(self.take_ready(n, <[u8]>::to_vec))
    }

    /// Records the response status and headers (an encoded Headers payload).
    pub fn set_pending_headers(&mut self, payload: Vec<u8>) {
        self.pending_headers = Some(payload);
    }

    pub fn has_pending_headers(&self) -> bool {
        self.pending_headers.is_some()
    }

    /// Sends the recorded headers if not sent yet; false if start_response was never called.
    pub fn flush_headers(&mut self) -> io::Result<bool> {
        if self.headers_sent {
            return Ok(true);
        }
        let Some(payload) = self.pending_headers.take() else {
            return Ok(false);
        };
        self.headers_sent = true;
        self.send_frame(Kind::Headers, &payload, false)?;
        Ok(true)
    }

    /// Appends a frame to the queue if it fits, without any I/O.
    fn queue_if_fits(&mut self, kind: Kind, payload: &[u8]) -> bool {
        if self.out.len() + wire::HEADER_LEN + payload.len() > OUT_CAP {
            return false;
        }
        self.out.push(kind as u8);
        self.out
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.extend_from_slice(payload);
        true
    }

    /// Queues the recorded headers without any I/O; false if there are none or they would
    /// need a write.
    pub fn queue_headers(&mut self) -> bool {
        if self.headers_sent {
            return false;
        }
        let Some(payload) = self.pending_headers.take() else {
            return false;
        };
        if self.queue_if_fits(Kind::Headers, &payload) {
            self.headers_sent = true;
        } else {
            self.pending_headers = Some(payload);
        }
        self.headers_sent
    }

    /// Queues small body bytes without any I/O (false if they need a write: then call
    /// `send_data` with the GIL released).
    pub fn try_queue_data(&mut self, data: &[u8]) -> bool {
        self.headers_sent && self.queue_if_fits(Kind::Data, data)
    }

    /// Sends body bytes; with `flush` they (and anything queued) leave now, which a streamed
    /// response needs, otherwise they may wait for the End frame (a list of small chunks).
    /// With a region, big chunks go through data slots (each DataSlot frame leaves at once:
    /// the worker frees the slot only after it has seen it).
    pub fn send_data(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            if let Some((slot, copied)) = self.fill_data_slot(rest) {
                let payload = wire::encode_data_slot(slot as u32, copied as u32);
                self.send_frame(Kind::DataSlot, &payload, true)?;
                rest = &rest[copied..];
                continue;
            }
            // Without a slot, a region keeps inline frames slot-sized so that the next chunk
            // can try a slot again soon.
            let cap = if self.region.is_some() {
                region::DATA_SLOT_LEN
            } else {
                wire::MAX_CHUNK
            };
            let (chunk, after) = rest.split_at(rest.len().min(cap));
            self.send_frame(Kind::Data, chunk, flush)?;
            rest = after;
        }
        Ok(())
    }

    /// Copies the start of `data` into a free data slot, when there is a region, the data is
    /// big enough to be worth it and a slot frees up in time: the slot and the bytes copied.
    fn fill_data_slot(&mut self, data: &[u8]) -> Option<(usize, usize)> {
        let region = self.region.as_ref().filter(|_| data.len() >= SLOT_MIN)?;
        let slot = if self.overflows_inline() {
            region.claim_data_slot(self.data_slots)
        } else if self.slot_wait_failed {
            let slot = region.claim_data_slot(self.data_slots);
            self.slot_wait_failed = slot.is_none();
            slot
        } else {
            let slot = region.wait_for_data_slot(self.data_slots, SLOT_WAIT);
            self.slot_wait_failed = slot.is_none();
            slot
        }?;
        Some((slot, region.fill_data_slot(slot, data)))
    }

    /// True when a chunk that finds the data slot taken goes inline rather than wait for it:
    /// the response may fill only one slot (`response-buffer-size=65536`), and it is the only
    /// request its process serves. Waiting for the one slot makes the daemon and Apache take
    /// turns, neither copying while the other sends, and nothing else would use that time: a
    /// single 64 MiB download went 1.7x as fast with the inline overflow, which Apache sends
    /// while the slot is in flight. With other requests running, the CPUs have their work to
    /// do, and waiting saves the inline path's copies (and Apache's buffers): at 16 parallel
    /// downloads both ways are as fast. With two slots or more, the daemon fills one while
    /// Apache sends another, and waiting is faster even alone.
    fn overflows_inline(&self) -> bool {
        self.data_slots == 1 && self.process_load.and_then(LoadSlot::load) == Some(1)
    }

    /// Sends every chunk of a complete response body (a list the app returned) in as few
    /// writes as the kernel allows, with whatever was queued before them.
    pub fn send_data_all(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        if self.region.is_some() && chunks.iter().any(|chunk| chunk.len() >= SLOT_MIN) {
            for chunk in chunks {
                self.send_data(chunk, false)?;
            }
            return Ok(());
        }
        let pieces: Vec<&[u8]> = chunks
            .iter()
            .flat_map(|chunk| chunk.chunks(wire::MAX_CHUNK))
            .filter(|piece| !piece.is_empty())
            .collect();
        let headers = pieces
            .iter()
            .map(|piece| wire::frame_header(Kind::Data, piece.len()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut slices: Vec<&[u8]> = Vec::with_capacity(1 + 2 * pieces.len());
        let out = std::mem::take(&mut self.out);
        slices.push(&out);
        for (header, piece) in headers.iter().zip(&pieces) {
            slices.push(header);
            slices.push(piece);
        }
        let result = write_all_slices(self.stream(), &slices);
        drop(slices);
        let mut out = out;
        out.clear();
        self.out = out;
        self.note_write(result)
    }

    pub fn send_end(&mut self) -> io::Result<()> {
        self.send_frame(Kind::End, &wire::encode_u32(self.slot), true)?;
        self.settle()?;
        self.finished = true;
        Ok(())
    }

    /// Asks the worker to answer with `status` itself (only before headers were sent).
    pub fn send_fail(&mut self, status: u16) -> io::Result<()> {
        self.send_frame(Kind::Fail, &status.to_le_bytes(), true)?;
        self.settle()?;
        self.finished = !self.headers_sent;
        Ok(())
    }

    /// True when the last response ended cleanly: the connection can carry the next request.
    pub fn reusable(&self) -> bool {
        self.finished && !self.peer_gone
    }

    /// True when bytes of the next request are already in our buffer. The worker may send
    /// it as soon as it has read End, so it can arrive while `settle` still reads; epoll
    /// will not report bytes we already hold, so such a connection must be served at once
    /// rather than wait in the idle set.
    pub fn has_next_request(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// Gives back big buffers before the connection waits, idle, for its next request.
    pub fn trim(&mut self) {
        for buffer in [&mut self.frame, &mut self.input, &mut self.out] {
            if buffer.capacity() > IDLE_KEEP {
                *buffer = Vec::new();
            }
        }
    }

    /// The descriptor, for the idle set.
    pub fn stream(&self) -> &UnixStream {
        &self.reader.get_ref().stream
    }

    /// Closes an idle connection, telling the worker first that its request (if one is on
    /// the way) was not read, so it can send it again elsewhere.
    pub fn goodbye(mut self) {
        let _ = self.send_frame(Kind::Goodbye, b"", true);
    }
}

/// Writes every slice, in order, with as few writev calls as the kernel allows.
fn write_all_slices(mut stream: &UnixStream, slices: &[&[u8]]) -> io::Result<()> {
    /// Linux takes at most 1024 slices per writev.
    const MAX_SLICES: usize = 1024;
    let mut slices: Vec<&[u8]> = slices.iter().copied().filter(|s| !s.is_empty()).collect();
    let mut first = 0;
    while first < slices.len() {
        let end = slices.len().min(first + MAX_SLICES);
        let io: Vec<IoSlice<'_>> = slices[first..end].iter().map(|s| IoSlice::new(s)).collect();
        let mut written = match stream.write_vectored(&io) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < slices.len() {
            let len = slices[first].len();
            if written < len {
                slices[first] = &slices[first][written..];
                break;
            }
            written -= len;
            first += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    /// A worker that answers body pulls from `body`, in pieces of at most `piece` bytes.
    fn fake_worker(
        mut stream: UnixStream,
        body: Vec<u8>,
        piece: usize,
    ) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut frame = Vec::new();
            let mut sent = 0;
            let mut pulls = 0;
            while let Ok(kind) = wire::read_frame(&mut stream, &mut frame, 1 << 20) {
                assert_eq!(kind, Kind::ReadBody);
                pulls += 1;
                let ask = wire::decode_read_body(&frame).unwrap().max as usize;
                let n = ask.min(piece).min(body.len() - sent);
                if n == 0 {
                    wire::write_frame(&mut stream, Kind::BodyEnd, b"").unwrap();
                } else {
                    wire::write_frame(&mut stream, Kind::Body, &body[sent..sent + n]).unwrap();
                    sent += n;
                }
                stream.flush().unwrap();
            }
            pulls
        })
    }

    #[test]
    fn read_all_lines_and_sizes() {
        let (a, b) = UnixStream::pair().unwrap();
        let body = b"line one\nline two\nrest".to_vec();
        let worker = fake_worker(b, body.clone(), 5);
        let mut conn = Connection::new(a, 0);
        conn.set_content_length(Some(body.len() as u64));
        assert_eq!(conn.readline(None).unwrap(), b"line one\n");
        assert_eq!(conn.readline(Some(4)).unwrap(), b"line");
        assert_eq!(conn.readline(None).unwrap(), b" two\n");
        assert_eq!(conn.read(Some(2)).unwrap(), b"re");
        assert_eq!(conn.read(None).unwrap(), b"st");
        assert_eq!(conn.read(None).unwrap(), b"");
        assert_eq!(conn.readline(None).unwrap(), b"");
        drop(conn);
        worker.join().unwrap();
    }

    #[test]
    fn never_reads_past_content_length() {
        let (a, b) = UnixStream::pair().unwrap();
        let worker = fake_worker(b, b"0123456789extra".to_vec(), 64);
        let mut conn = Connection::new(a, 0);
        conn.set_content_length(Some(10));
        assert_eq!(conn.read(None).unwrap(), b"0123456789");
        assert_eq!(conn.read(Some(5)).unwrap(), b"");
        drop(conn);
        // One pull for the ten bytes; none after the length is exhausted.
        assert_eq!(worker.join().unwrap(), 1);
    }

    #[test]
    fn zero_length_body_pulls_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let worker = fake_worker(b, Vec::new(), 64);
        let mut conn = Connection::new(a, 0);
        conn.set_content_length(Some(0));
        assert_eq!(conn.read(None).unwrap(), b"");
        drop(conn);
        assert_eq!(worker.join().unwrap(), 0);
    }

    #[test]
    fn chunked_body_reads_until_body_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let worker = fake_worker(b, body.clone(), 70_000);
        let mut conn = Connection::new(a, 0);
        conn.set_content_length(None);
        let mut got = Vec::new();
        loop {
            let chunk = conn.read(Some(65536)).unwrap();
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, body);
        drop(conn);
        worker.join().unwrap();
    }

    #[test]
    fn next_request_sent_while_settling_a_read_ahead_is_kept() {
        // The app reads 1000 bytes of a large body and answers; the worker answers the pull
        // sent ahead and, having read End, sends its next request at once. Both can reach
        // the daemon's buffer in one read while it settles: the connection must still carry
        // that request (it used to be dropped, which the worker saw as a 500).
        let (a, mut worker) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a, 0);
        conn.set_content_length(Some(3 << 20));
        let mut frame = Vec::new();
        let answer = std::thread::spawn(move || {
            for _ in 0..2 {
                assert_eq!(
                    wire::read_frame(&mut worker, &mut frame, 1 << 20).unwrap(),
                    Kind::ReadBody
                );
                let ask = wire::decode_read_body(&frame).unwrap().max as usize;
                let mut out = Vec::new();
                wire::write_frame(&mut out, Kind::Body, &vec![b'x'; ask.min(4000)]).unwrap();
                if ask == READ_AHEAD as usize {
                    // The pull sent ahead: its answer and the next request in one write.
                    wire::write_frame(&mut out, Kind::Request, b"next environ").unwrap();
                }
                worker.write_all(&out).unwrap();
            }
            worker
        });
        assert_eq!(conn.read(Some(1000)).unwrap().len(), 1000);
        let mut worker = answer.join().unwrap();
        conn.set_pending_headers(Vec::new());
        assert!(conn.flush_headers().unwrap());
        conn.send_end().unwrap();
        assert!(conn.reusable());
        assert!(
            conn.has_next_request(),
            "epoll cannot report what is buffered"
        );
        assert_eq!(conn.read_request().unwrap(), b"next environ");
        assert!(!conn.has_next_request());
        let mut frame = Vec::new();
        for expected in [Kind::Headers, Kind::End] {
            assert_eq!(
                wire::read_frame(&mut worker, &mut frame, 1 << 20).unwrap(),
                expected
            );
        }
    }

    /// Opens a connection the way a worker does: a Region frame carrying the memfd, then a
    /// Request. Returns the daemon's connection (region accepted) and the worker's side.
    fn connection_with_region() -> (Connection, UnixStream, Region) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let (a, mut b) = UnixStream::pair().unwrap();
        let (region, fd) = Region::create().unwrap();
        let mut frame = Vec::new();
        let len = wire::encode_u32(region::REGION_LEN as u32);
        wire::write_frame(&mut frame, Kind::Region, &len).unwrap();
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<()>(
            b.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, frame.len());
        wire::write_frame(&mut b, Kind::Request, b"environ").unwrap();
        let mut conn = Connection::new(a, 0);
        assert_eq!(conn.read_request().unwrap(), b"environ");
        assert!(!conn.has_region(), "mapped only once the origin is checked");
        conn.accept_region().unwrap();
        assert!(conn.has_region());
        (conn, b, region)
    }

    #[test]
    fn a_withdrawn_request_is_not_picked_up() {
        let (conn, _worker, region) = connection_with_region();
        assert!(
            !region.mapped_by_daemon(),
            "mapped, but no request picked up yet"
        );
        assert!(conn.pick_up(), "an ordinary request");
        assert!(
            region.mapped_by_daemon(),
            "the worker may now queue requests here"
        );
        region.mark_queued();
        assert!(conn.pick_up(), "a queued request a thread reached first");
        assert!(!region.withdraw(), "too late to take it back");
        region.mark_queued();
        assert!(region.withdraw());
        assert!(!conn.pick_up(), "withdrawn: it went to another process");
        let (plain, _peer) = UnixStream::pair().unwrap();
        assert!(
            Connection::new(plain, 0).pick_up(),
            "without a region nothing can be withdrawn"
        );
    }

    #[test]
    fn body_comes_through_alternating_body_slots() {
        let (mut conn, mut worker, region) = connection_with_region();
        // Every byte differs from its neighbours' slot-sized offsets, so a slot overwritten
        // while the daemon still reads it shows up as wrong bytes.
        let body: Vec<u8> = (0..700_001u32).map(|i| (i % 253) as u8).collect();
        let expected = body.clone();
        let feeder = std::thread::spawn(move || {
            let mut frame = Vec::new();
            let mut sent = 0;
            let mut named = Vec::new();
            while let Ok(kind) = wire::read_frame(&mut worker, &mut frame, 0) {
                assert_eq!(kind, Kind::ReadBody);
                let ask = wire::decode_read_body(&frame).unwrap();
                let slot = usize::from(ask.slot.expect("with a region, asks name a slot"));
                named.push(slot);
                let n = (ask.max as usize)
                    .min(region::BODY_SLOT_LEN)
                    .min(body.len() - sent);
                if n == 0 {
                    wire::write_frame(&mut worker, Kind::BodyEnd, b"").unwrap();
                    continue;
                }
                region.copy_into_body_slot(slot, 0, &body[sent..sent + n]);
                sent += n;
                wire::write_frame(&mut worker, Kind::BodySlot, &wire::encode_u32(n as u32))
                    .unwrap();
            }
            named
        });
        conn.set_content_length(Some(expected.len() as u64));
        let mut got = conn.readline(Some(10)).unwrap();
        for size in [1, 65_536, 300_000, 7].iter().cycle() {
            let chunk = conn.read(Some(*size)).unwrap();
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the body arrived altered");
        drop(conn);
        let named = feeder.join().unwrap();
        assert!(named.contains(&0) && named.contains(&1), "{named:?}");
    }

    /// The worker's side of a response, holding every slot it is given: the body bytes in
    /// order, the data slots named (in order) and how many inline Data frames came.
    fn read_response_holding_slots(
        worker: &mut UnixStream,
        region: &Region,
    ) -> (Vec<u8>, Vec<usize>, usize) {
        let mut frame = Vec::new();
        let (mut got, mut slots, mut inline) = (Vec::new(), Vec::new(), 0);
        loop {
            match wire::read_frame(worker, &mut frame, 1 << 20).unwrap() {
                Kind::Headers => {}
                Kind::DataSlot => {
                    let (slot, len) = wire::decode_data_slot(&frame).unwrap();
                    got.extend(region.copy_from_data_slot(slot, len));
                    slots.push(slot);
                }
                Kind::Data => {
                    got.extend_from_slice(&frame);
                    inline += 1;
                }
                Kind::End => return (got, slots, inline),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Sends `chunks` (bytes `i % modulus`, one send_data each, then End) to a worker that
    /// holds every data slot it is given. Returns the bytes sent, the bytes that arrived,
    /// the data slots named and how many inline Data frames came.
    fn respond_to_a_holding_worker(
        mut conn: Connection,
        worker: &mut UnixStream,
        region: &Region,
        chunk_lens: &[usize],
        modulus: u32,
    ) -> (Vec<u8>, Vec<u8>, Vec<usize>, usize) {
        let chunks: Vec<Vec<u8>> = chunk_lens
            .iter()
            .map(|&len| (0..len as u32).map(|i| (i % modulus) as u8).collect())
            .collect();
        let sent = chunks.concat();
        conn.set_pending_headers(Vec::new());
        assert!(conn.flush_headers().unwrap());
        let sender = std::thread::spawn(move || {
            for chunk in &chunks {
                conn.send_data(chunk, true).unwrap();
            }
            conn.send_end().unwrap();
        });
        let (got, slots, inline) = read_response_holding_slots(worker, region);
        sender.join().unwrap();
        (sent, got, slots, inline)
    }

    /// A load-board slot of a process that serves `requests` requests right now.
    fn process_serving(requests: u32) -> &'static LoadSlot {
        let slot: &'static LoadSlot = Box::leak(Box::default());
        slot.open(16);
        for _ in 0..requests {
            slot.enter();
        }
        slot
    }

    /// response-buffer-size=65536: one slot per response; with the worker holding it, the
    /// rest goes inline, and every byte arrives in order. The chunk that finds the slot taken
    /// waits for it first (SLOT_WAIT), unless the response is the only request its process
    /// serves: then it goes inline at once.
    #[test]
    fn a_connection_limited_to_one_data_slot_uses_only_the_first() {
        for (requests, waits) in [(None, true), (Some(1), false), (Some(2), true)] {
            let (conn, mut worker, region) = connection_with_region();
            let conn = conn
                .with_data_slots(1)
                .with_process_load(requests.map(process_serving));
            let (data, got, slots, inline) = respond_to_a_holding_worker(
                conn,
                &mut worker,
                &region,
                &[3 * region::DATA_SLOT_LEN + 5_000],
                239,
            );
            let case = format!("a process serving {requests:?} requests");
            assert!(got == data, "{case}: the response arrived altered");
            assert_eq!(
                slots,
                [0],
                "{case}: only the first slot, once (the worker never released it)"
            );
            assert_eq!(inline, 3, "{case}: the rest in slot-sized Data frames");
            assert_eq!(region.daemon_waits_for_a_slot(), waits, "{case}");
        }
    }

    #[test]
    fn big_response_chunks_go_through_data_slots_and_inline_when_none_frees() {
        let (conn, mut worker, region) = connection_with_region();
        // The worker holds every slot it is given: once they are all taken, the daemon waits
        // SLOT_WAIT for one, then sends the rest inline.
        let (expected, got, slots, inline) = respond_to_a_holding_worker(
            conn,
            &mut worker,
            &region,
            &[region::DATA_SLOTS * region::DATA_SLOT_LEN + 70_000, 20_000],
            241,
        );
        assert!(got == expected, "the response arrived altered");
        assert_eq!(slots.len(), region::DATA_SLOTS);
        // The first chunk's last 70 000 bytes (in slot-sized frames: 65 536 and 4 464), then
        // the second chunk, which no longer waits.
        assert_eq!(inline, 3);
    }

    #[test]
    fn a_response_waits_for_slots_again_once_the_worker_hands_one_back() {
        let (mut conn, mut worker, region) = connection_with_region();
        let big = vec![7u8; region::DATA_SLOTS * region::DATA_SLOT_LEN + 10_000];
        let small = vec![9u8; 20_000];
        let (go_on, wait_go) = std::sync::mpsc::channel::<()>();
        conn.set_pending_headers(Vec::new());
        assert!(conn.flush_headers().unwrap());
        let sender = std::thread::spawn(move || {
            // Fills every slot, waits in vain, sends the rest inline.
            conn.send_data(&big, true).unwrap();
            wait_go.recv().unwrap();
            // A slot is free again: this chunk takes it, and the next one waits for one.
            conn.send_data(&small, true).unwrap();
            conn.send_data(&small, true).unwrap();
            conn.send_end().unwrap();
        });
        let mut frame = Vec::new();
        let mut kinds = Vec::new();
        let mut go_on = Some(go_on);
        loop {
            let kind = wire::read_frame(&mut worker, &mut frame, 1 << 20).unwrap();
            if kind == Kind::End {
                break;
            }
            kinds.push(kind);
            match kinds.iter().filter(|k| **k == Kind::DataSlot).count() {
                // After the inline rest of the big chunk (a slow client caught up): one slot
                // back, and the sender goes on.
                _ if kind == Kind::Data => {
                    if let Some(go_on) = go_on.take() {
                        region.release_data_slot(0);
                        go_on.send(()).unwrap();
                    }
                }
                // The first small chunk took it; the next finds none free, and gets one
                // 10 ms into its wait.
                5 => {
                    std::thread::sleep(Duration::from_millis(10));
                    region.release_data_slot(1);
                }
                _ => {}
            }
        }
        sender.join().unwrap();
        use Kind::{Data, DataSlot, Headers};
        assert_eq!(
            kinds,
            [Headers, DataSlot, DataSlot, DataSlot, DataSlot, Data, DataSlot, DataSlot]
        );
    }
}
