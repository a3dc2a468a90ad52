//! The Apache-worker side of a daemon-mode request: connect to the group's UNIX socket
//! (retrying while the daemon is restarting or its backlog is full), send the environ, answer
//! the daemon's body pulls from the client, and relay status, headers and the streamed body
//! back. No ffi here: the httpd layer implements [`Client`] over the real request_rec and
//! turns a [`ProxyError`] into a status, an aborted connection and a log line.
//!
//! Memory per request is bounded whatever the body sizes: one buffer for incoming frames and
//! one for outgoing Body frames (each at most `wire::MAX_CHUNK` or header-buffer-size bytes,
//! reused for every frame), plus a fixed read buffer on the socket, plus the connection's
//! shared region (`region`): when the daemon has mapped it, big body bytes travel in its
//! slots and only small frames cross the socket.
//!
//! **When the client is flushed.** Data frames are handed to [`Client::write_body`] as they
//! arrive (Apache's output filters send them once they fill their own buffers). We additionally
//! call [`Client::flush`] whenever we would otherwise wait with unflushed data:
//! - after a Data frame, if the daemon has nothing more readable right now (our read buffer is
//!   empty and a zero-timeout poll says the socket is not readable): the app is still
//!   producing, so what it has produced so far goes to the client now;
//! - before reading the request body for a ReadBody, since that read may block too;
//! - at End.
//!
//! So a streamed response reaches the client while it is produced, and a small response whose
//! frames arrive together (the usual Headers, Data, End in one write) costs one flush, at End.

#![forbid(unsafe_code)]

mod connect;
mod error;
mod pieces;
mod pool;
mod region;
mod traffic;

pub use error::{ProxyError, TruncatedWhy};
pub use pieces::{give_back as give_back_piece, PIECE};
pub use pool::Pool;
pub use region::{BodySlot, SlotLease};
pub use traffic::watch as watch_quiet;

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{LoadBoard, LoadSlot};
use crate::logging::Level;
use crate::wire::{self, Kind, WireError};
use crate::wsgi_log;

use connect::Sender;
use error::escape;
use pool::{Claim, Idle};
use region::WorkerRegion;

/// The most response body read from the daemon before it goes to the client (a bigger Data
/// frame is relayed in pieces).
const DATA_PIECE: usize = 64 * 1024;

/// Without a region, response pieces this big or bigger are handed to the client in a buffer
/// it keeps (no copy); smaller ones are cheaper to copy into the client's output buffer.
const HANDOVER_MIN: usize = 8 * 1024;

/// The most request body one Body frame carries: what the daemon asks for beyond it comes in
/// further answers.
const BODY_PIECE: usize = 64 * 1024;

/// The read buffer on the daemon socket: frame headers and small frames come out of it
/// without a syscall each; big payloads are read straight into the frame buffer. One page is
/// enough for a typical response's Headers, Data and End frames, and it is allocated for
/// every request: each of the child's malloc arenas keeps the pages its threads' concurrent
/// requests touched (16 KiB made them twice as large).
const READ_BUFFER: usize = 4 * 1024;

/// The real request, as the proxy needs it. Implemented by the httpd layer (and by a fake in
/// the tests).
pub trait Client {
    /// Reads up to buf.len() bytes of the (de-chunked) request body; Ok(0) at its end.
    fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, ClientError>;
    /// Status line as the app gave it ("200 OK") and headers in order (repeats kept).
    fn send_headers(&mut self, status: &[u8], headers: &[(&[u8], &[u8])])
        -> Result<(), ProxyError>;
    fn write_body(&mut self, data: &[u8]) -> Result<(), ClientError>;
    /// Sends the first `len` bytes of `piece` (a buffer from [`pieces::take`]). A client that
    /// can keep the piece until it is written gives it back to [`pieces::give_back`] then;
    /// by default it is copied by `write_body` and given back at once.
    fn write_piece(&mut self, piece: Box<[u8]>, len: usize) -> Result<(), ClientError> {
        let result = self.write_body(&piece[..len.min(piece.len())]);
        pieces::give_back(piece);
        result
    }
    /// Reads up to `max` bytes of the body (like `read_body`) into `slot` at `offset`; `max`
    /// fits the slot. By default through a private buffer.
    fn read_body_into(
        &mut self,
        slot: BodySlot<'_>,
        offset: usize,
        max: usize,
    ) -> Result<usize, ClientError> {
        let mut buf = vec![0; max.min(BodySlot::LEN.saturating_sub(offset))];
        let n = self.read_body(&mut buf)?;
        slot.write_at(offset, &[io::IoSlice::new(&buf[..n.min(buf.len())])])
            .map_err(region_write_failed)
    }
    /// Sends the first `len` bytes of a data slot. A client that can send straight from the
    /// slot keeps the lease until it is written; by default the bytes are copied and the slot
    /// is released at once.
    fn write_slot(&mut self, lease: SlotLease, len: usize) -> Result<(), ClientError> {
        let data = lease.copy(len);
        drop(lease);
        self.write_body(&data)
    }
    /// Push anything buffered to the client (called when the daemon has nothing more queued).
    fn flush(&mut self) -> Result<(), ClientError>;
}

/// A body slot could not be written (the kernel found no memory for the region's pages).
pub fn region_write_failed(err: io::Error) -> ClientError {
    ClientError::Read(format!(
        "the body could not be written to the memory shared with the daemon: {err}"
    ))
}

/// A failure talking to the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Reading the request body failed (bad chunking, a body over the limit …): 400.
    #[error("client read failed: {0}")]
    Read(String),
    /// The client was too slow (Apache's Timeout): 408 while reading the body.
    #[error("client timed out: {0}")]
    Timeout(String),
    /// The connection is gone (reset, aborted).
    #[error("client went away: {0}")]
    Gone(String),
}

/// Where and how to reach a daemon group, and what to name in messages.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub group: &'a str,
    pub socket_path: &'a Path,
    /// The script (SCRIPT_FILENAME), named in error messages as mod_wsgi does.
    pub script: &'a str,
    /// How long to keep retrying a refused or full socket (zero: one attempt).
    pub connect_timeout: Duration,
    /// The deadline of every single read or write on the daemon socket (zero: none).
    pub socket_timeout: Duration,
    /// The largest Headers frame accepted (the group's header-buffer-size; 0: the default,
    /// 32768).
    pub header_buffer_size: usize,
    /// This Apache child's idle connections to the group, if it keeps any.
    pub pool: Option<&'a Pool>,
    /// The group's load board (empty: every process counts as free).
    pub load: LoadBoard,
}

/// header-buffer-size when the group gives 0 (mod_wsgi's default).
pub const DEFAULT_HEADER_BUFFER_SIZE: usize = 32768;

impl Target<'_> {
    fn header_cap(&self) -> usize {
        match self.header_buffer_size {
            0 => DEFAULT_HEADER_BUFFER_SIZE,
            size => size,
        }
    }
}

/// How a forwarded request ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was relayed completely.
    Completed,
    /// The daemon asked for this status before sending headers (the app failed); the worker
    /// answers with Apache's own error page.
    DaemonStatus(u16),
}

/// How often a request is sent again after daemons closed the connection without reading it
/// (they were stopping); beyond that the group is restarting too fast to be used.
const MAX_RESENDS: u32 = 4;

/// Runs one request through the daemon group `target`. `environ` is a wire pairs payload,
/// already encoded. Blocks the calling Apache worker thread until the response is relayed.
///
/// The request goes over an idle connection from `target.pool` when one leads to a daemon
/// process with a free thread; when none has one, it waits in the shortest queue of a
/// process it has an idle connection to, withdrawable until picked up (see `crate::load`);
/// otherwise it goes over a new connection. A connection whose response ended cleanly goes
/// back to the pool. A daemon that closes an idle connection answers Goodbye
/// (or the connection is already gone when the request is written): nothing was read, so the
/// request is sent again, whatever its method.
pub fn forward(
    target: &Target<'_>,
    environ: &[u8],
    client: &mut impl Client,
) -> Result<Outcome, ProxyError> {
    if environ.len() > wire::MAX_ENVIRON {
        return Err(ProxyError::EnvironTooLarge {
            group: target.group.to_owned(),
            script: target.script.to_owned(),
            len: environ.len(),
        });
    }
    let _in_flight = traffic::InFlight::begin();
    let pool = target.pool.filter(|p| p.serves(target.socket_path));
    let mut resends = 0;
    // Only a request whose frame fits in the socket's buffer is queued: the worker must get
    // past the write to be able to withdraw it.
    let mut may_queue = environ.len() <= QUEUED_ENVIRON_MAX;
    // A withdrawn request holds a claim on a free thread of another process.
    let mut reserved: Option<(usize, &'static LoadSlot)> = None;
    loop {
        // A resend goes over a new connection: the kept ones may lead to the same stopping
        // process, which is saying goodbye on each of them in turn.
        let kept = pool.filter(|_| resends == 0);
        let taken = match reserved.take() {
            Some((index, slot)) => {
                let conn = kept.and_then(|p| p.take_to(index));
                if conn.is_none() {
                    // No kept connection to it: a new one reaches whichever process has a
                    // thread free, and the daemon takes no claim back from a new connection.
                    slot.release_claim();
                }
                conn.map(|idle| {
                    let claim = Claim {
                        slot: Some(slot),
                        queued: false,
                    };
                    (idle, claim)
                })
            }
            None => kept.and_then(|p| p.take(&target.load, may_queue)),
        };
        let (conn, claim) = match taken {
            Some((idle, claim)) => (idle, Some(claim)),
            None => (open(target)?, None),
        };
        let exchanged = exchange(target, conn, claim, environ, client)?;
        if let (Exchange::NotRead | Exchange::Withdrawn(_), Some(slot)) =
            (&exchanged, claim.and_then(|c| c.slot))
        {
            // The daemon never picked the request up: its place is free again.
            slot.release_claim();
        }
        match exchanged {
            Exchange::Done(outcome, keep) => {
                if let (Some(pool), Some(conn)) = (pool, keep) {
                    pool.put(conn);
                }
                return Ok(outcome);
            }
            Exchange::Withdrawn(elsewhere) => {
                // Sent again to the free thread it claimed, never queued again: a request is
                // withdrawn at most once.
                reserved = Some(elsewhere);
                may_queue = false;
            }
            Exchange::NotRead if resends < MAX_RESENDS => resends += 1,
            Exchange::NotRead => {
                return Err(ProxyError::TurnedAway {
                    group: target.group.to_owned(),
                    script: target.script.to_owned(),
                    attempts: resends + 1,
                })
            }
        }
    }
}

/// A new connection to the group, with its deadlines set and a region shared with the
/// daemon process that takes it (the Region frame goes ahead of the first request).
fn open(target: &Target<'_>) -> Result<Idle, ProxyError> {
    let stream = connect::connect(target)?;
    let timeout = (!target.socket_timeout.is_zero()).then_some(target.socket_timeout);
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|source| ProxyError::DaemonIo {
            group: target.group.to_owned(),
            script: target.script.to_owned(),
            during: "setting the socket timeouts",
            source,
        })?;
    let region = match WorkerRegion::create() {
        Ok(region) => {
            let mut frame = Vec::with_capacity(wire::HEADER_LEN + 4);
            let length = wire::encode_u32(wire::region::REGION_LEN as u32);
            wire::write_frame(&mut frame, Kind::Region, &length)
                .and_then(|()| connect::send_with_fd(&stream, &frame, region.descriptor()))
                .map_err(|source| ProxyError::SendRequest {
                    group: target.group.to_owned(),
                    path: target.socket_path.to_owned(),
                    script: target.script.to_owned(),
                    source,
                })?;
            Some(region)
        }
        Err(err) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                wsgi_log!(
                    Level::Warn,
                    "WSGIRS0322: Could not create the memory shared with daemon process '{}' \
                     ({err}); request and response bodies go over the socket instead (logged \
                     once per Apache child).",
                    target.group
                );
            }
            None
        }
    };
    Ok(Idle {
        stream,
        slot: None,
        region,
        parked_at: None,
    })
}

/// How one attempt over one connection ended.
enum Exchange {
    /// The response was relayed (or the daemon asked for an error page); the connection, when
    /// it can carry another request.
    Done(Outcome, Option<Idle>),
    /// The daemon closed the connection without reading the request.
    NotRead,
    /// The request waited in a process's queue, and the worker took it back to send it to a
    /// process with a thread free, claimed here (its index and slot); the connection is closed.
    Withdrawn((usize, &'static LoadSlot)),
}

/// The largest Request frame sent to a process with no thread free (see `forward`): well
/// within a Unix socket's send buffer.
const QUEUED_ENVIRON_MAX: usize = 64 * 1024;

/// How often a worker whose request waits in a process's queue looks for a thread free in
/// another process of the group.
const WITHDRAW_CHECK: Duration = Duration::from_millis(10);

fn exchange(
    target: &Target<'_>,
    conn: Idle,
    claim: Option<Claim>,
    environ: &[u8],
    client: &mut impl Client,
) -> Result<Exchange, ProxyError> {
    let reused = claim.is_some();
    // Only a connection with a region can carry a queued request: its pickup word is how the
    // request is withdrawn (the pool hands out no other for queueing).
    let queued = conn
        .region
        .as_ref()
        .filter(|_| claim.is_some_and(|c| c.queued));
    if let Some(region) = queued {
        region.mark_queued();
    }
    if let Err(source) = wire::write_frame(&mut Sender(&conn.stream), Kind::Request, environ) {
        // A kept connection the daemon closed after we checked it: it never saw the request.
        if reused && is_reset(&source) {
            return Ok(Exchange::NotRead);
        }
        return Err(ProxyError::SendRequest {
            group: target.group.to_owned(),
            path: target.socket_path.to_owned(),
            script: target.script.to_owned(),
            source,
        });
    }
    if let Some(region) = queued {
        let claimed = claim.and_then(|c| c.slot);
        match await_pickup(target, &conn.stream, region, conn.slot, claimed)? {
            Pickup::Taken => {}
            Pickup::Withdrawn(elsewhere) => return Ok(Exchange::Withdrawn(elsewhere)),
            Pickup::NotRead => return Ok(Exchange::NotRead),
        }
    }
    let mut relay = Relay {
        target,
        stream: &conn.stream,
        reader: BufReader::with_capacity(READ_BUFFER, &conn.stream),
        payload: Vec::new(),
        body: BodyBuffer(None),
        region: conn.region.as_ref(),
        headers_sent: false,
        body_done: false,
        unflushed: false,
        body_left: None,
        excess_logged: false,
        answered: false,
        slot: conn.slot,
    };
    // On an error the connection is dropped, which closes it: the daemon sees EOF.
    let outcome = match relay.run(client)? {
        Some(outcome) => outcome,
        None => return Ok(Exchange::NotRead),
    };
    let clean = relay.reader.buffer().is_empty();
    let slot = relay.slot;
    drop(relay);
    let keep = clean.then_some(Idle {
        stream: conn.stream,
        slot,
        region: conn.region,
        parked_at: None,
    });
    Ok(Exchange::Done(outcome, keep))
}

/// What became of a request that waited in a process's queue.
enum Pickup {
    /// A daemon thread picked it up: its answer follows as usual.
    Taken,
    /// The worker took it back, for another process that has a thread free (claimed: its
    /// index and slot).
    Withdrawn((usize, &'static LoadSlot)),
    /// The daemon closed the connection or said Goodbye before any thread picked it up (it
    /// died or is stopping): it never ran, so it may be sent again.
    NotRead,
}

/// Waits while the request sent over `stream` sits in its process's queue, looking every
/// WITHDRAW_CHECK for a thread free in another process of the group. A request no thread
/// picks up within socket-timeout is withdrawn too, and fails as a request with no answer
/// does (`claimed`, its place in the queue, is given back first).
fn await_pickup(
    target: &Target<'_>,
    stream: &UnixStream,
    region: &WorkerRegion,
    slot: Option<usize>,
    claimed: Option<&LoadSlot>,
) -> Result<Pickup, ProxyError> {
    let started = Instant::now();
    loop {
        // An error here shows up again at the first read, which reports it.
        let readable = connect::wait_readable(stream, WITHDRAW_CHECK).unwrap_or(true);
        if !region.still_queued() {
            return Ok(Pickup::Taken);
        }
        if readable {
            // Before a thread picks a request up, the daemon sends nothing but a Goodbye.
            return Ok(if region.withdraw() {
                Pickup::NotRead
            } else {
                Pickup::Taken
            });
        }
        // The free thread is claimed before the request is withdrawn, so that one free thread
        // draws one request out of a queue, not every request waiting there.
        if let Some(elsewhere) = target.load.claim_elsewhere(slot) {
            if region.withdraw() {
                return Ok(Pickup::Withdrawn(elsewhere));
            }
            elsewhere.1.release_claim();
            return Ok(Pickup::Taken);
        }
        let timeout = target.socket_timeout;
        if !timeout.is_zero() && started.elapsed() >= timeout && region.withdraw() {
            if let Some(claimed) = claimed {
                claimed.release_claim();
            }
            return Err(ProxyError::HeaderTimeout {
                group: target.group.to_owned(),
                script: target.script.to_owned(),
                timeout,
                what: "no daemon thread took the request",
            });
        }
    }
}

/// The buffer for request body pieces: one of the child's recycled pieces, taken at the first
/// pull and given back when the request is over.
struct BodyBuffer(Option<Box<[u8]>>);

const _: () = assert!(BODY_PIECE <= pieces::PIECE);

impl BodyBuffer {
    fn get(&mut self) -> &mut [u8] {
        self.0.get_or_insert_with(pieces::take)
    }
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        if let Some(piece) = self.0.take() {
            pieces::give_back(piece);
        }
    }
}

/// One request's relay state after the Request frame went out.
struct Relay<'t, 's> {
    target: &'t Target<'t>,
    stream: &'s UnixStream,
    reader: BufReader<&'s UnixStream>,
    /// Each incoming frame.
    payload: Vec<u8>,
    /// Each Body frame we send.
    body: BodyBuffer,
    /// The region shared with the daemon on this connection, if any.
    region: Option<&'s Arc<WorkerRegion>>,
    headers_sent: bool,
    /// The client's body reached its end (every later ReadBody gets BodyEnd).
    body_done: bool,
    /// Data went to the client since the last flush.
    unflushed: bool,
    /// What the app's Content-Length still allows; the relay never sends more (an excess
    /// would be read by the client as the start of the next response on a kept-alive
    /// connection) and treats less as a broken response.
    body_left: Option<u64>,
    /// The excess over Content-Length was already reported.
    excess_logged: bool,
    /// Some frame of the answer has arrived (a Goodbye is only one before anything else).
    answered: bool,
    /// The daemon process's slot on the load board, as its End frame gave it.
    slot: Option<usize>,
}

impl Relay<'_, '_> {
    /// Relays the answer; None when the daemon said Goodbye instead (it did not read the
    /// request).
    fn run(&mut self, client: &mut impl Client) -> Result<Option<Outcome>, ProxyError> {
        loop {
            if self.unflushed && !self.daemon_has_more() {
                self.flush(client)?;
            }
            let (kind, len) =
                match wire::read_frame_header(&mut self.reader, self.target.header_cap()) {
                    Ok(header) => header,
                    Err(e) => return Err(self.read_failed(e)),
                };
            let first = !std::mem::replace(&mut self.answered, true);
            if kind == Kind::Data && self.headers_sent {
                self.relay_data(client, len)?;
                continue;
            }
            if kind == Kind::DataSlot && self.headers_sent {
                self.relay_data_slot(client, len)?;
                continue;
            }
            if let Err(e) = wire::read_payload(&mut self.reader, len, &mut self.payload) {
                return Err(self.read_failed(e));
            }
            match kind {
                Kind::Goodbye if first => return Ok(None),
                Kind::ReadBody => self.pull_body(client)?,
                Kind::Headers if !self.headers_sent => self.relay_headers(client)?,
                Kind::End if self.headers_sent => {
                    if let Some(left @ 1..) = self.body_left {
                        return Err(self.broken(format!(
                            "the application's response ended {left} bytes short of its \
                             Content-Length"
                        )));
                    }
                    self.slot = wire::decode_end(&self.payload).or(self.slot);
                    self.flush(client)?;
                    return Ok(Some(Outcome::Completed));
                }
                Kind::Fail if !self.headers_sent => {
                    return match wire::decode_status(&self.payload) {
                        Ok(status) => Ok(Some(Outcome::DaemonStatus(status))),
                        Err(e) => Err(self.protocol(e.to_string())),
                    };
                }
                Kind::Fail => {
                    let status = wire::decode_status(&self.payload).unwrap_or(500);
                    return Err(self.broken(format!(
                        "the daemon reported a failure (status {status}) after the headers \
                         were sent: the application failed while producing the body (see the \
                         daemon's log lines for this request)"
                    )));
                }
                other => {
                    let when = if self.headers_sent {
                        "after the response headers"
                    } else {
                        "before the response headers"
                    };
                    return Err(self.protocol(format!("unexpected {other:?} frame {when}")));
                }
            }
        }
    }

    /// True when a read on the daemon socket would not block right now.
    fn daemon_has_more(&self) -> bool {
        !self.reader.buffer().is_empty() || connect::readable(self.stream)
    }

    fn flush(&mut self, client: &mut impl Client) -> Result<(), ProxyError> {
        client
            .flush()
            .map_err(|e| self.client_gone(&e, "sending the response"))?;
        self.unflushed = false;
        Ok(())
    }

    /// Answers one ReadBody with a Body frame (never more than asked, nor more than
    /// `wire::MAX_CHUNK`), or BodyEnd at the end of the body. The Body holds what one client
    /// read gave, or, when the daemon asked for all of it (`fill`), everything asked for up to
    /// the end of the body. Either way at most one BODY_PIECE buffer is used: a piece the
    /// Content-Length guarantees (`known`) is announced whole and streamed through it.
    fn pull_body(&mut self, client: &mut impl Client) -> Result<(), ProxyError> {
        let ask = match wire::decode_read_body(&self.payload) {
            Ok(ask) => ask,
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        if self.unflushed {
            // The client read may block: let the client see what it has been sent so far.
            self.flush(client)?;
        }
        let max = usize::try_from(ask.max)
            .unwrap_or(usize::MAX)
            .min(wire::MAX_CHUNK);
        if let Some(slot) = ask.slot {
            return self.fill_body_slot(client, usize::from(slot), max, ask.fill);
        }
        if ask.known && !self.body_done && max > 0 {
            return self.stream_body(client, max);
        }
        let want = max.min(BODY_PIECE);
        let got = if self.body_done || want == 0 {
            // Asked for nothing: answer with nothing, without touching the client.
            0
        } else {
            self.read_client(client, want, ask.fill)?
        };
        let kind = if got == 0 && self.body_done {
            Kind::BodyEnd
        } else {
            Kind::Body
        };
        wire::write_frame(&mut Sender(self.stream), kind, &self.body.get()[..got])
            .map_err(|e| self.write_failed(e, "sending the request body"))
    }

    /// Answers a ReadBody that names a body slot: the client's bytes go into the slot (what
    /// one read gives, or with `fill` up to `max` or the end of the body), and the daemon gets
    /// BodySlot(len), or BodyEnd at the end of the body.
    fn fill_body_slot(
        &mut self,
        client: &mut impl Client,
        slot: usize,
        max: usize,
        fill: bool,
    ) -> Result<(), ProxyError> {
        let Some(region) = self.region else {
            return Err(self.protocol(
                "a ReadBody named a body slot, but this connection shares no region".to_string(),
            ));
        };
        let want = max.min(BodySlot::LEN);
        let mut got = 0;
        while got < want && !self.body_done {
            match client.read_body_into(region.body_slot(slot), got, want - got) {
                Ok(0) => self.body_done = true,
                Ok(n) => got += n.min(want - got),
                Err(e) => return Err(self.client_read_failed(e)),
            }
            if !fill {
                break;
            }
        }
        let sent = if got == 0 {
            wire::write_frame(&mut Sender(self.stream), Kind::BodyEnd, b"")
        } else {
            wire::write_frame(
                &mut Sender(self.stream),
                Kind::BodySlot,
                &wire::encode_u32(got as u32),
            )
        };
        sent.map_err(|e| self.write_failed(e, "sending the request body"))
    }

    /// Reads up to `want` (at most BODY_PIECE) bytes of the client's body into `body`: what one
    /// read gives, or with `fill` as many as the body still has.
    fn read_client(
        &mut self,
        client: &mut impl Client,
        want: usize,
        fill: bool,
    ) -> Result<usize, ProxyError> {
        let want = want.min(BODY_PIECE);
        let mut got = 0;
        while got < want {
            match client.read_body(&mut self.body.get()[got..want]) {
                Ok(0) => {
                    self.body_done = true;
                    break;
                }
                Ok(n) => got += n.min(want - got),
                Err(e) => return Err(self.client_read_failed(e)),
            }
            if !fill {
                break;
            }
        }
        Ok(got)
    }

    /// Sends a Body frame of exactly `len` bytes, which the Content-Length guarantees: the
    /// header first, then the body in BODY_PIECE writes as the client delivers it. A body cut
    /// short (the client went away) fails the request, as it would anyway.
    fn stream_body(&mut self, client: &mut impl Client, len: usize) -> Result<(), ProxyError> {
        let header = match wire::frame_header(Kind::Body, len) {
            Ok(header) => header,
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        Sender(self.stream)
            .write_all(&header)
            .map_err(|e| self.write_failed(e, "sending the request body"))?;
        let mut sent = 0;
        while sent < len {
            let got = self.read_client(client, (len - sent).min(BODY_PIECE), true)?;
            if got == 0 {
                return Err(self.client_read_failed(ClientError::Read(format!(
                    "the request body ended {} bytes before its Content-Length",
                    len - sent
                ))));
            }
            Sender(self.stream)
                .write_all(&self.body.get()[..got])
                .map_err(|e| self.write_failed(e, "sending the request body"))?;
            sent += got;
        }
        Ok(())
    }

    /// Decodes and checks the Headers frame, then hands status and headers to the client.
    fn relay_headers(&mut self, client: &mut impl Client) -> Result<(), ProxyError> {
        let (status, headers) = match wire::decode_headers(&self.payload) {
            Ok(decoded) => decoded,
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        if let Err(detail) = check_status(status) {
            return Err(self.malformed(detail));
        }
        for &(name, value) in &headers {
            if let Err(detail) = check_header(name, value) {
                return Err(self.malformed(detail));
            }
        }
        for &(name, value) in &headers {
            if name.eq_ignore_ascii_case(b"Content-Length") {
                // Digits only (RFC 9110), and one value: two different lengths would let the
                // client and any proxy in front disagree on where this response ends.
                let digits = value.trim_ascii();
                let parsed = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                    .flatten();
                match parsed {
                    Some(length) if self.body_left.is_none_or(|seen| seen == length) => {
                        self.body_left = Some(length)
                    }
                    Some(_) => {
                        return Err(self.malformed("conflicting Content-Length headers".to_string()))
                    }
                    None => {
                        return Err(self.malformed(format!(
                            "Content-Length is not a number: {:?}",
                            String::from_utf8_lossy(value)
                        )))
                    }
                }
            }
        }
        client.send_headers(status, &headers)?;
        self.headers_sent = true;
        Ok(())
    }

    /// Relays a Data frame of `len` bytes to the client in DATA_PIECE pieces, as they arrive,
    /// so an Apache thread never holds more than one piece of the response. Without a region,
    /// where every big body comes this way, a piece of HANDOVER_MIN bytes or more is read
    /// into a buffer the client keeps (see `pieces`). Otherwise bytes are copied into the
    /// client's own output buffers, at most HANDOVER_MIN at a time: with a region, big bodies
    /// come in data slots, and inline Data is small, or the rare overflow while a slow client
    /// holds every slot, which is not worth 64 KiB buffers that the child's malloc arenas keep
    /// touched long after.
    fn relay_data(&mut self, client: &mut impl Client, len: usize) -> Result<(), ProxyError> {
        let handover = self.region.is_none();
        let mut left = len;
        while left > 0 {
            let piece = if handover {
                left.min(DATA_PIECE)
            } else {
                left.min(HANDOVER_MIN)
            };
            left -= piece;
            if handover && piece >= HANDOVER_MIN {
                let mut buffer = pieces::take();
                if let Err(e) = wire::read_payload_into(&mut self.reader, &mut buffer[..piece]) {
                    pieces::give_back(buffer);
                    return Err(self.read_failed(e));
                }
                let allowed = self.allowed_len(piece);
                if allowed == 0 {
                    pieces::give_back(buffer);
                    continue;
                }
                client
                    .write_piece(buffer, allowed)
                    .map_err(|e| self.client_gone(&e, "sending the response"))?;
            } else {
                if let Err(e) = wire::read_payload(&mut self.reader, piece, &mut self.payload) {
                    return Err(self.read_failed(e));
                }
                let allowed = self.allowed_len(piece);
                if allowed == 0 {
                    continue;
                }
                client
                    .write_body(&self.payload[..allowed])
                    .map_err(|e| self.client_gone(&e, "sending the response"))?;
            }
            self.unflushed = true;
        }
        Ok(())
    }

    /// Relays a DataSlot frame: the daemon put the bytes in a data slot, which Apache sends
    /// from and then releases.
    fn relay_data_slot(&mut self, client: &mut impl Client, len: usize) -> Result<(), ProxyError> {
        if let Err(e) = wire::read_payload(&mut self.reader, len, &mut self.payload) {
            return Err(self.read_failed(e));
        }
        let (slot, len) = match wire::decode_data_slot(&self.payload) {
            Ok(decoded) => decoded,
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        let Some(region) = self.region else {
            return Err(self.protocol(
                "a DataSlot frame came over a connection that shares no region".to_string(),
            ));
        };
        let Some(lease) = region.lease(slot) else {
            return Err(self.protocol(format!(
                "a DataSlot frame named data slot {slot}, which Apache is still sending from"
            )));
        };
        let allowed = self.allowed_len(len);
        if allowed == 0 {
            return Ok(());
        }
        client
            .write_slot(lease, allowed)
            .map_err(|e| self.client_gone(&e, "sending the response"))?;
        self.unflushed = true;
        Ok(())
    }

    /// How much of `len` more body bytes may go to the client under Content-Length.
    fn allowed_len(&mut self, len: usize) -> usize {
        let Some(left) = self.body_left.as_mut() else {
            return len;
        };
        let allowed = usize::try_from(*left).unwrap_or(usize::MAX).min(len);
        *left -= allowed as u64;
        if allowed < len && !self.excess_logged {
            self.excess_logged = true;
            wsgi_log!(
                Level::Warn,
                "WSGIRS0321: Daemon process '{}' sent more response body than its \
                 Content-Length for {}; the excess was discarded.",
                self.target.group,
                self.target.script
            );
        }
        allowed
    }

    fn group(&self) -> String {
        self.target.group.to_owned()
    }

    fn script(&self) -> String {
        self.target.script.to_owned()
    }

    fn broken(&self, cause: String) -> ProxyError {
        ProxyError::BrokenAfterHeaders {
            group: self.group(),
            script: self.script(),
            cause,
        }
    }

    fn protocol(&self, detail: String) -> ProxyError {
        if self.headers_sent {
            return self.broken(format!("protocol error: {detail}"));
        }
        ProxyError::Protocol {
            group: self.group(),
            script: self.script(),
            detail,
        }
    }

    fn malformed(&self, detail: String) -> ProxyError {
        ProxyError::MalformedHeader {
            group: self.group(),
            script: self.script(),
            detail,
        }
    }

    fn client_gone(&self, e: &ClientError, during: &'static str) -> ProxyError {
        ProxyError::ClientGone {
            group: self.group(),
            script: self.script(),
            during,
            detail: e.to_string(),
            headers_sent: self.headers_sent,
        }
    }

    fn client_read_failed(&self, e: ClientError) -> ProxyError {
        let (group, script, headers_sent) = (self.group(), self.script(), self.headers_sent);
        match e {
            ClientError::Read(detail) => ProxyError::ClientRead {
                group,
                script,
                detail,
                headers_sent,
            },
            ClientError::Timeout(detail) => ProxyError::ClientTimeout {
                group,
                script,
                detail,
                headers_sent,
            },
            gone @ ClientError::Gone(_) => self.client_gone(&gone, "reading the request body"),
        }
    }

    /// A failed read of the daemon's next frame.
    fn read_failed(&self, e: WireError) -> ProxyError {
        let timeout = e.is_timeout();
        if self.headers_sent {
            let cause = match e {
                _ if timeout => format!(
                    "Timeout when reading response content: nothing received within \
                     socket-timeout of {:.3} s",
                    self.target.socket_timeout.as_secs_f64()
                ),
                WireError::Closed => "the daemon closed the connection before the end of the \
                                      response (it may have crashed: see the daemon's exit \
                                      status in the log)"
                    .to_owned(),
                WireError::Io(ref io) if is_reset(io) => "the daemon reset the connection \
                                                          before the end of the response (it \
                                                          may have crashed: see the daemon's \
                                                          exit status in the log)"
                    .to_owned(),
                other => other.to_string(),
            };
            return self.broken(cause);
        }
        let truncated = |why| ProxyError::TruncatedHeaders {
            group: self.group(),
            script: self.script(),
            why,
        };
        match e {
            _ if timeout => self.header_timeout("nothing was received"),
            WireError::Closed => truncated(TruncatedWhy::Closed),
            WireError::Truncated => truncated(TruncatedWhy::CutMidFrame),
            WireError::Oversized {
                kind: Kind::Headers,
                len,
                cap,
            } => truncated(TruncatedWhy::Oversized { len, cap }),
            WireError::Io(ref io) if is_reset(io) => truncated(TruncatedWhy::Reset),
            WireError::Io(source) => ProxyError::DaemonIo {
                group: self.group(),
                script: self.script(),
                during: "reading the response",
                source,
            },
            other => self.protocol(other.to_string()),
        }
    }

    /// A failed write of a frame to the daemon.
    fn write_failed(&self, e: io::Error, during: &'static str) -> ProxyError {
        if self.headers_sent {
            return self.broken(format!("error while {during}: {e}"));
        }
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return self.header_timeout("the daemon did not take the request body");
        }
        if is_reset(&e) {
            return ProxyError::TruncatedHeaders {
                group: self.group(),
                script: self.script(),
                why: TruncatedWhy::Reset,
            };
        }
        ProxyError::DaemonIo {
            group: self.group(),
            script: self.script(),
            during,
            source: e,
        }
    }

    fn header_timeout(&self, what: &'static str) -> ProxyError {
        ProxyError::HeaderTimeout {
            group: self.group(),
            script: self.script(),
            timeout: self.target.socket_timeout,
            what,
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// The status line must start with a 3-digit status 100..=599, followed by the end or a space
/// and a reason phrase; nothing in it may split the line.
fn check_status(status: &[u8]) -> Result<(), String> {
    let code_ok = status.len() >= 3
        && (b'1'..=b'5').contains(&status[0])
        && status[1..3].iter().all(u8::is_ascii_digit)
        && (status.len() == 3 || status[3] == b' ');
    let clean = !status.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0));
    if code_ok && clean {
        Ok(())
    } else {
        Err(format!(
            "bad status line {} (it must be a 3-digit status from 100 to 599, then a space and \
             a reason phrase without CR, LF or NUL)",
            escape(status)
        ))
    }
}

/// Header names are HTTP tokens; values may not contain CR, LF or NUL (no header splitting).
fn check_header(name: &[u8], value: &[u8]) -> Result<(), String> {
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!(
            "bad header name {} (it must be a non-empty HTTP token: no spaces, colons or \
             control characters)",
            escape(name)
        ));
    }
    if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(format!(
            "header {} has a value containing CR, LF or NUL: {}",
            escape(name),
            escape(value)
        ));
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::httpd::shm::{self, Region};
    use crate::logging::Level;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread::{self, JoinHandle};
    use std::time::Instant;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "wsgirs-proxy-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("daemon.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake daemon: listens in a temp dir, accepts one connection, reads the Request frame
    /// and hands the stream and the environ to `script`.
    struct Daemon {
        dir: TempDir,
        thread: Option<JoinHandle<()>>,
    }

    impl Daemon {
        fn start(script: impl FnOnce(UnixStream, Vec<u8>) + Send + 'static) -> Daemon {
            // The region the worker offers is left unmapped: these daemons keep to inline
            // frames.
            Daemon::start_with_region(|stream, environ, _region| script(stream, environ))
        }

        /// Like `start`, with the region the worker shares, mapped.
        fn start_with_region(
            script: impl FnOnce(UnixStream, Vec<u8>, Region) + Send + 'static,
        ) -> Daemon {
            let dir = TempDir::new();
            let listener = UnixListener::bind(dir.socket()).unwrap();
            let thread = thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                // The Region frame, with the memfd attached to its bytes.
                let mut head = [0u8; wire::HEADER_LEN + 4];
                let mut fds = Vec::new();
                let mut got = 0;
                while got < head.len() {
                    let n = shm::recv_with_fds(&stream, &mut head[got..], &mut fds).unwrap();
                    assert!(n > 0, "the worker closed before its Region frame");
                    got += n;
                }
                assert_eq!(head[0], Kind::Region as u8);
                let region = Region::map(&fds.pop().expect("a memfd")).unwrap();
                let mut environ = Vec::new();
                let kind = wire::read_frame(&mut stream, &mut environ, 0).unwrap();
                assert_eq!(kind, Kind::Request);
                script(stream, environ, region);
            });
            Daemon {
                dir,
                thread: Some(thread),
            }
        }

        fn path(&self) -> PathBuf {
            self.dir.socket()
        }

        /// Waits for the daemon thread, re-raising its assertion failures.
        fn join(mut self) {
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    fn target(path: &Path) -> Target<'_> {
        Target {
            group: "site",
            socket_path: path,
            script: "/srv/app.wsgi",
            connect_timeout: Duration::from_secs(2),
            socket_timeout: Duration::from_secs(5),
            header_buffer_size: 32768,
            pool: None,
            load: crate::load::LoadBoard::default(),
        }
    }

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_frame(&mut out, kind, payload).unwrap();
        out
    }

    fn headers_frame(status: &[u8], headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut payload = Vec::new();
        wire::encode_headers(&mut payload, status, headers.iter().copied());
        frame(Kind::Headers, &payload)
    }

    fn environ() -> Vec<u8> {
        let mut out = Vec::new();
        wire::push_pair(&mut out, b"REQUEST_METHOD", b"GET");
        wire::push_pair(&mut out, b"PATH_INFO", b"/hello");
        out
    }

    #[derive(Default)]
    struct FakeClient {
        body: Vec<u8>,
        pos: usize,
        /// At most this many bytes per read_body (0: no limit).
        read_limit: usize,
        read_error: Option<ClientError>,
        /// write_body fails once this many bytes have been written.
        gone_after: Option<usize>,
        status: Option<Vec<u8>>,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        out: Vec<u8>,
        writes: usize,
        largest_write: usize,
        flushes: usize,
        /// Told the number of body bytes received at each flush.
        on_flush: Option<mpsc::Sender<usize>>,
        /// When set, write_slot keeps the leases here (as Apache does until a bucket is
        /// written), rather than releasing each slot at once.
        kept_leases: Option<Vec<SlotLease>>,
    }

    impl Client for FakeClient {
        fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, ClientError> {
            if let Some(e) = self.read_error.take() {
                return Err(e);
            }
            let mut n = buf.len().min(self.body.len() - self.pos);
            if self.read_limit > 0 {
                n = n.min(self.read_limit);
            }
            buf[..n].copy_from_slice(&self.body[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }

        fn send_headers(
            &mut self,
            status: &[u8],
            headers: &[(&[u8], &[u8])],
        ) -> Result<(), ProxyError> {
            assert!(self.status.is_none(), "headers sent twice");
            self.status = Some(status.to_vec());
            self.headers = headers
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            Ok(())
        }

        fn write_body(&mut self, data: &[u8]) -> Result<(), ClientError> {
            assert!(self.status.is_some(), "body before headers");
            if matches!(self.gone_after, Some(limit) if self.out.len() >= limit) {
                return Err(ClientError::Gone("connection reset by peer".into()));
            }
            self.out.extend_from_slice(data);
            self.writes += 1;
            self.largest_write = self.largest_write.max(data.len());
            Ok(())
        }

        fn write_slot(&mut self, lease: SlotLease, len: usize) -> Result<(), ClientError> {
            self.write_body(&lease.copy(len))?;
            if let Some(kept) = self.kept_leases.as_mut() {
                kept.push(lease);
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), ClientError> {
            self.flushes += 1;
            if let Some(tx) = &self.on_flush {
                let _ = tx.send(self.out.len());
            }
            Ok(())
        }
    }

    #[test]
    fn simple_get() {
        let daemon = Daemon::start(|mut s, environ| {
            assert_eq!(environ, self::environ());
            // Headers, Data and End in one write, as a small response usually arrives.
            let mut all = headers_frame(
                b"200 OK",
                &[
                    (b"Content-Type", b"text/plain"),
                    (b"Set-Cookie", b"a=1"),
                    (b"Set-Cookie", b"b=2"),
                ],
            );
            all.extend(frame(Kind::Data, b"hello "));
            all.extend(frame(Kind::Data, b"world"));
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        assert_eq!(client.status.as_deref(), Some(&b"200 OK"[..]));
        let headers: Vec<(&[u8], &[u8])> = client
            .headers
            .iter()
            .map(|(n, v)| (&n[..], &v[..]))
            .collect();
        assert_eq!(
            headers,
            vec![
                (&b"Content-Type"[..], &b"text/plain"[..]),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ]
        );
        assert_eq!(client.out, b"hello world");
        assert_eq!(
            client.flushes, 1,
            "a small response is flushed once, at End"
        );
    }

    /// A board of `n` processes of one thread each, all busy.
    fn saturated_board(n: usize) -> LoadBoard {
        let slots: Vec<LoadSlot> = (0..n).map(|_| LoadSlot::default()).collect();
        let board = LoadBoard::new(Box::leak(slots.into_boxed_slice()));
        for index in 0..n {
            let slot = board.slot(index).unwrap();
            slot.open(1);
            slot.enter();
        }
        board
    }

    /// A kept connection to the process in `slot`, with a region if `region`; the daemon's
    /// end, and the region as the daemon maps it.
    fn kept(slot: usize, region: bool) -> (Idle, UnixStream, Option<Region>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let region = region.then(|| WorkerRegion::create().unwrap());
        let mapped = region
            .as_ref()
            .map(|r| Region::map(r.descriptor()).unwrap());
        // As a daemon does with the connection's first request.
        assert!(mapped.as_ref().is_none_or(Region::pick_up));
        let idle = Idle {
            stream: ours,
            slot: Some(slot),
            region,
            parked_at: None,
        };
        (idle, theirs, mapped)
    }

    /// A target whose worker keeps `pool`, on the group's `load` board.
    fn pooled<'a>(path: &'a Path, pool: &'a Pool, load: LoadBoard) -> Target<'a> {
        Target {
            pool: Some(pool),
            load,
            ..target(path)
        }
    }

    /// Forwards a GET that must complete; the body the client got.
    fn forward_ok(target: &Target<'_>) -> Vec<u8> {
        let mut client = FakeClient::default();
        let got = forward(target, &environ(), &mut client).unwrap();
        assert_eq!(got, Outcome::Completed);
        client.out
    }

    /// A 200 response with `body`, its End frame naming `slot` (when given).
    fn ok_response(body: &[u8], slot: Option<u32>) -> Vec<u8> {
        let mut all = headers_frame(b"200 OK", &[]);
        all.extend(frame(Kind::Data, body));
        let end = slot.map(wire::encode_u32);
        all.extend(frame(Kind::End, end.as_ref().map_or(&b""[..], |e| &e[..])));
        all
    }

    /// Serves one request on `stream` with "ok", naming `slot` in its End frame.
    fn serve_ok(mut stream: UnixStream, slot: u32) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut environ = Vec::new();
            assert_eq!(
                wire::read_frame(&mut stream, &mut environ, 0).unwrap(),
                Kind::Request
            );
            stream.write_all(&ok_response(b"ok", Some(slot))).unwrap();
            environ
        })
    }

    #[test]
    fn a_queued_request_goes_to_the_process_that_frees_a_thread_first() {
        let path = PathBuf::from("/nonexistent/queued.sock");
        let pool = Pool::new(&path, 8);
        let load = saturated_board(2);
        // Process 1's connection cannot carry a queued request (no region): the request
        // waits in process 0's queue.
        let (b, b_daemon, _) = kept(1, false);
        let (a, mut a_daemon, a_region) = kept(0, true);
        pool.put(b);
        pool.put(a);
        let served = serve_ok(b_daemon, 1);
        let frees = thread::spawn(move || {
            thread::sleep(Duration::from_millis(60));
            load.slot(1).unwrap().leave();
        });
        let target = pooled(&path, &pool, load);
        let started = Instant::now();
        let mut client = FakeClient::default();
        let got = forward(&target, &environ(), &mut client).unwrap();
        let took = started.elapsed();
        frees.join().unwrap();
        assert_eq!(got, Outcome::Completed);
        assert_eq!(client.out, b"ok");
        assert_eq!(served.join().unwrap(), environ(), "process 1 served it");
        assert!(
            took >= Duration::from_millis(60) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Process 0 finds the request withdrawn when a thread gets to it, and the connection
        // closed behind it; the worker gave its place in the queue back.
        let mut stale = Vec::new();
        assert_eq!(
            wire::read_frame(&mut a_daemon, &mut stale, 0).unwrap(),
            Kind::Request
        );
        assert!(!a_region.unwrap().pick_up(), "the request was withdrawn");
        assert!(matches!(
            wire::read_frame(&mut a_daemon, &mut stale, 0),
            Err(WireError::Closed)
        ));
        assert_eq!(
            load.slot(0).unwrap().load(),
            Some(1),
            "only its busy thread"
        );
        assert_eq!(pool.len(), 1, "process 1's connection is kept again");
    }

    #[test]
    fn one_free_thread_draws_one_request_out_of_a_queue() {
        let path = PathBuf::from("/nonexistent/queued.sock");
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(&path, 8)));
        let slots: Vec<LoadSlot> = (0..2).map(|_| LoadSlot::default()).collect();
        let load = LoadBoard::new(Box::leak(slots.into_boxed_slice()));
        let (zero, one) = (load.slot(0).unwrap(), load.slot(1).unwrap());
        zero.open(2);
        zero.enter();
        zero.enter();
        one.open(1);
        one.enter();
        // Two requests wait in process 0's queue (process 1's connection has no region).
        let (b, b_daemon, _) = kept(1, false);
        pool.put(b);
        let mut zeros = Vec::new();
        for _ in 0..2 {
            let (a, a_daemon, a_region) = kept(0, true);
            pool.put(a);
            zeros.push((a_daemon, a_region.unwrap()));
        }
        let served = serve_ok(b_daemon, 1);
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                thread::spawn(move || forward_ok(&pooled(&path, pool, load)))
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(zeros.iter().filter(|(_, r)| r.still_queued()).count(), 2);
        one.leave();
        assert_eq!(served.join().unwrap(), environ(), "process 1 served one");
        thread::sleep(Duration::from_millis(50));
        let waiting: Vec<_> = zeros
            .into_iter()
            .filter(|(_, r)| r.still_queued())
            .collect();
        assert_eq!(
            waiting.len(),
            1,
            "the other request still waits in process 0's queue"
        );
        // Process 0 gets to it.
        let (mut stream, region) = waiting.into_iter().next().unwrap();
        let mut request = Vec::new();
        wire::read_frame(&mut stream, &mut request, 0).unwrap();
        assert!(region.pick_up());
        stream.write_all(&ok_response(b"from 0", Some(0))).unwrap();
        let mut outs: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        outs.sort();
        assert_eq!(outs, vec![b"from 0".to_vec(), b"ok".to_vec()]);
    }

    #[test]
    fn a_request_too_big_to_withdraw_is_not_queued() {
        let path = PathBuf::from("/nonexistent/queued.sock");
        let pool = Pool::new(&path, 8);
        let load = saturated_board(1);
        let (a, _a_daemon, _) = kept(0, true);
        pool.put(a);
        let target = Target {
            connect_timeout: Duration::ZERO,
            ..pooled(&path, &pool, load)
        };
        let mut big = environ();
        wire::push_pair(&mut big, b"HTTP_X_BIG", &vec![b'x'; QUEUED_ENVIRON_MAX]);
        let err = forward(&target, &big, &mut FakeClient::default()).unwrap_err();
        assert!(
            matches!(err, ProxyError::SocketUnavailable { .. }),
            "a new connection was tried instead: {err}"
        );
        assert_eq!(pool.len(), 1, "the kept connection was not used");
        assert_eq!(load.slot(0).unwrap().load(), Some(1));
    }

    #[test]
    fn a_queued_request_picked_up_stays_where_it_is() {
        let path = PathBuf::from("/nonexistent/queued.sock");
        let pool = Pool::new(&path, 8);
        let load = saturated_board(2);
        let (a, a_daemon, a_region) = kept(0, true);
        pool.put(a);
        let a_region = a_region.unwrap();
        // Process 0 picks the request up, then process 1 frees a thread: the request is
        // no longer the worker's to withdraw, and process 0's answer is relayed.
        let daemon = thread::spawn(move || {
            let mut stream = a_daemon;
            let mut environ = Vec::new();
            wire::read_frame(&mut stream, &mut environ, 0).unwrap();
            thread::sleep(Duration::from_millis(30));
            assert!(a_region.pick_up(), "not withdrawn yet");
            load.slot(1).unwrap().leave();
            thread::sleep(Duration::from_millis(40));
            stream.write_all(&ok_response(b"from 0", Some(0))).unwrap();
        });
        let target = pooled(&path, &pool, load);
        let out = forward_ok(&target);
        daemon.join().unwrap();
        assert_eq!(out, b"from 0");
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn a_queued_request_whose_daemon_dies_is_sent_again() {
        // The group's socket, where the request goes again, on a new connection.
        let daemon = Daemon::start(|mut s, environ| {
            assert_eq!(environ, self::environ());
            s.write_all(&ok_response(b"again", None)).unwrap();
        });
        let path = daemon.path();
        let pool = Pool::new(&path, 8);
        let load = saturated_board(1);
        let (a, a_daemon, _a_region) = kept(0, true);
        pool.put(a);
        let dies = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(a_daemon);
        });
        let target = pooled(&path, &pool, load);
        let out = forward_ok(&target);
        dies.join().unwrap();
        daemon.join();
        assert_eq!(out, b"again");
        assert_eq!(
            load.slot(0).unwrap().load(),
            Some(1),
            "its place given back"
        );
    }

    #[test]
    fn a_queued_request_no_thread_takes_times_out() {
        let path = PathBuf::from("/nonexistent/queued.sock");
        let pool = Pool::new(&path, 8);
        let load = saturated_board(1);
        let (a, _a_daemon, a_region) = kept(0, true);
        pool.put(a);
        let target = Target {
            socket_timeout: Duration::from_millis(100),
            ..pooled(&path, &pool, load)
        };
        let started = Instant::now();
        let err = forward(&target, &environ(), &mut FakeClient::default()).unwrap_err();
        assert!(
            matches!(err, ProxyError::HeaderTimeout { .. }),
            "{err:?}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!a_region.unwrap().pick_up(), "withdrawn, so never run");
        assert_eq!(
            load.slot(0).unwrap().load(),
            Some(1),
            "its place given back"
        );
        assert_eq!(err.status(), 504);
    }

    #[test]
    fn with_a_region_big_inline_data_is_copied_in_small_steps() {
        // A daemon sends big bodies inline when a slow client holds every data slot; the
        // worker then copies them on in HANDOVER_MIN steps instead of taking 64 KiB pieces.
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let expected = body.clone();
        let daemon = Daemon::start(move |mut s, _| {
            let mut all = headers_frame(b"200 OK", &[]);
            all.extend(frame(Kind::Data, &body));
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        assert!(client.out == expected, "the body arrived altered");
        assert_eq!(client.largest_write, HANDOVER_MIN);
        assert_eq!(client.writes, expected.len().div_ceil(HANDOVER_MIN));
    }

    #[test]
    fn body_pulled_in_rounds() {
        let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let expected = body.clone();
        let daemon = Daemon::start(move |mut s, _| {
            let mut got = Vec::new();
            let mut buf = Vec::new();
            let mut rounds = 0;
            loop {
                wire::write_frame(&mut s, Kind::ReadBody, &wire::encode_u32(65536)).unwrap();
                rounds += 1;
                match wire::read_frame(&mut s, &mut buf, 0).unwrap() {
                    Kind::Body => {
                        assert!(!buf.is_empty() && buf.len() <= 65536);
                        got.extend_from_slice(&buf);
                    }
                    Kind::BodyEnd => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(rounds > 16, "{rounds} rounds");
            assert_eq!(got, expected);
            // Asking again after the end gets BodyEnd again.
            wire::write_frame(&mut s, Kind::ReadBody, &wire::encode_u32(65536)).unwrap();
            assert_eq!(
                wire::read_frame(&mut s, &mut buf, 0).unwrap(),
                Kind::BodyEnd
            );
            s.write_all(&headers_frame(b"200 OK", &[])).unwrap();
            s.write_all(&frame(Kind::Data, format!("{}", got.len()).as_bytes()))
                .unwrap();
            s.write_all(&frame(Kind::End, b"")).unwrap();
        });
        let mut client = FakeClient {
            body,
            read_limit: 40_000,
            ..FakeClient::default()
        };
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        assert_eq!(client.out, b"1048576");
        assert_eq!(client.pos, 1 << 20);
    }

    #[test]
    fn streamed_response_reaches_the_client_while_produced() {
        let (tx, rx) = mpsc::channel();
        let daemon = Daemon::start(move |mut s, _| {
            s.write_all(&headers_frame(b"200 OK", &[])).unwrap();
            let mut sent = 0;
            // One chunk at a time: each must be flushed to the client before the next exists.
            for i in 0..50 {
                let chunk = format!("chunk {i}\n");
                s.write_all(&frame(Kind::Data, chunk.as_bytes())).unwrap();
                sent += chunk.len();
                let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
                assert_eq!(seen, sent, "chunk {i} was not flushed while streaming");
            }
            // Then a burst of 200 frames in one write: no flush per frame needed.
            let mut burst = Vec::new();
            for _ in 0..200 {
                burst.extend(frame(Kind::Data, &[b'x'; 100]));
            }
            burst.extend(frame(Kind::End, b""));
            s.write_all(&burst).unwrap();
        });
        let mut client = FakeClient {
            on_flush: Some(tx),
            ..FakeClient::default()
        };
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        let expected: String = (0..50).map(|i| format!("chunk {i}\n")).collect();
        assert!(client.out.starts_with(expected.as_bytes()));
        assert_eq!(client.out.len(), expected.len() + 200 * 100);
        assert_eq!(client.writes, 250);
        assert!(client.flushes >= 51);
        assert!(
            client.flushes < 100,
            "{} flushes for 250 frames",
            client.flushes
        );
    }

    #[test]
    fn fail_before_headers_is_the_daemons_status() {
        let daemon = Daemon::start(|mut s, _| {
            s.write_all(&frame(Kind::Fail, &500u16.to_le_bytes()))
                .unwrap();
        });
        let mut client = FakeClient::default();
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::DaemonStatus(500));
        assert!(client.status.is_none());
    }

    #[test]
    fn fail_after_headers_breaks_the_response() {
        let daemon = Daemon::start(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[]);
            all.extend(frame(Kind::Data, b"partial"));
            all.extend(frame(Kind::Fail, &500u16.to_le_bytes()));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(
            matches!(err, ProxyError::BrokenAfterHeaders { .. }),
            "{err}"
        );
        assert!(err.headers_sent());
        assert_eq!(client.out, b"partial");
    }

    fn run_error(script: impl FnOnce(UnixStream, Vec<u8>) + Send + 'static) -> ProxyError {
        let daemon = Daemon::start(script);
        let mut client = FakeClient::default();
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        err
    }

    /// A daemon whose first `goodbyes` connections answer Goodbye before anything else, and
    /// whose next one (if `serve`) answers "ok". Returns the environ of every connection.
    fn goodbye_daemon(goodbyes: usize, serve: bool) -> (TempDir, JoinHandle<Vec<Vec<u8>>>) {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.socket()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let thread = thread::spawn(move || {
            let mut seen = Vec::new();
            for n in 0..goodbyes + usize::from(serve) {
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            assert!(Instant::now() < deadline, "no connection #{}", n + 1);
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                };
                stream.set_nonblocking(false).unwrap();
                let mut environ = Vec::new();
                // The Region frame (its memfd is dropped: this daemon keeps to inline frames).
                assert_eq!(
                    wire::read_frame(&mut stream, &mut environ, 0).unwrap(),
                    Kind::Region
                );
                assert_eq!(
                    wire::read_frame(&mut stream, &mut environ, 0).unwrap(),
                    Kind::Request
                );
                seen.push(environ);
                if n < goodbyes {
                    stream.write_all(&frame(Kind::Goodbye, b"")).unwrap();
                } else {
                    stream.write_all(&ok_response(b"ok", None)).unwrap();
                }
            }
            seen
        });
        (dir, thread)
    }

    #[test]
    fn a_goodbye_before_any_answer_sends_the_request_again() {
        let (dir, daemon) = goodbye_daemon(2, true);
        let mut client = FakeClient::default();
        let got = forward(&target(&dir.socket()), &environ(), &mut client).unwrap();
        assert_eq!(got, Outcome::Completed);
        assert_eq!(client.out, b"ok");
        let seen = daemon.join().unwrap();
        assert_eq!(
            seen,
            vec![environ(); 3],
            "each connection carries the same request"
        );
    }

    #[test]
    fn a_daemon_that_keeps_saying_goodbye_gets_a_503_after_five_connections() {
        let (dir, daemon) = goodbye_daemon(5, false);
        let mut client = FakeClient::default();
        let err = forward(&target(&dir.socket()), &environ(), &mut client).unwrap_err();
        assert_eq!(daemon.join().unwrap(), vec![environ(); 5]);
        assert!(
            matches!(err, ProxyError::TurnedAway { attempts: 5, .. }),
            "{err:?}"
        );
        assert_eq!(err.status(), 503);
        assert!(!err.headers_sent());
        let msg = err.to_string();
        assert!(
            msg.starts_with("WSGIRS0313: Daemon process 'site' closed the connection 5 times"),
            "{msg}"
        );
        assert!(client.status.is_none() && client.out.is_empty());
    }

    #[test]
    fn daemon_closing_before_headers_is_a_500() {
        let err = run_error(|s, _| drop(s));
        assert!(
            matches!(
                err,
                ProxyError::TruncatedHeaders {
                    why: TruncatedWhy::Closed,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status(), 500);
        assert!(!err.headers_sent());
        assert_eq!(err.log_level(), Level::Error);
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0305: "), "{text}");
        assert!(
            text.contains(
                "Truncated or oversized response headers received from daemon process 'site': \
                 /srv/app.wsgi"
            ),
            "{text}"
        );
        assert!(
            text.contains("closed the connection before sending headers"),
            "{text}"
        );
    }

    #[test]
    fn daemon_cut_mid_frame_before_headers() {
        let err = run_error(|mut s, _| {
            let full = headers_frame(b"200 OK", &[(b"A", b"b")]);
            s.write_all(&full[..full.len() - 2]).unwrap();
        });
        assert!(
            matches!(
                err,
                ProxyError::TruncatedHeaders {
                    why: TruncatedWhy::CutMidFrame,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn daemon_closing_after_headers_breaks_the_response() {
        let daemon = Daemon::start(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[]);
            all.extend(frame(Kind::Data, b"some"));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(
            matches!(err, ProxyError::BrokenAfterHeaders { .. }),
            "{err:?}"
        );
        assert!(err.headers_sent());
        assert_eq!(err.log_level(), Level::Error);
        assert_eq!(client.status.as_deref(), Some(&b"200 OK"[..]));
        assert_eq!(client.out, b"some");
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0320: "), "{text}");
        assert!(
            text.contains("'site'") && text.contains("/srv/app.wsgi"),
            "{text}"
        );
    }

    #[test]
    fn body_beyond_content_length_is_discarded() {
        let daemon = Daemon::start(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[(b"Content-Length", b"5")]);
            all.extend(frame(Kind::Data, b"hel"));
            all.extend(frame(Kind::Data, b"lo and then some smuggled bytes"));
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        assert_eq!(client.out, b"hello");
    }

    #[test]
    fn body_short_of_content_length_breaks_the_response() {
        let daemon = Daemon::start(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[(b"Content-Length", b"10")]);
            all.extend(frame(Kind::Data, b"short"));
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(err.headers_sent(), "{err:?}");
        assert!(
            err.to_string()
                .contains("5 bytes short of its Content-Length"),
            "{err}"
        );
    }

    #[test]
    fn non_numeric_content_length_is_malformed() {
        let daemon = Daemon::start(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[(b"Content-Length", b"lots")]);
            all.extend(frame(Kind::End, b""));
            let _ = s.write_all(&all);
        });
        let mut client = FakeClient::default();
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(err.to_string().contains("Malformed header"), "{err}");
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn oversized_headers_frame() {
        let daemon = Daemon::start(|mut s, _| {
            let value = vec![b'v'; 10_000];
            // The worker hangs up after the frame header: ignore the broken pipe.
            let _ = s.write_all(&headers_frame(b"200 OK", &[(b"X-Big", &value)]));
        });
        let mut client = FakeClient::default();
        let path = daemon.path();
        let mut t = target(&path);
        t.header_buffer_size = 8192;
        let err = forward(&t, &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(
            matches!(
                err,
                ProxyError::TruncatedHeaders {
                    why: TruncatedWhy::Oversized { cap: 8192, .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status(), 500);
        let text = err.to_string();
        assert!(
            text.contains("Truncated or oversized response headers"),
            "{text}"
        );
        assert!(
            text.contains("exceeded header-buffer-size of 8192 bytes"),
            "{text}"
        );
    }

    fn malformed(status: &'static [u8], name: &'static [u8], value: &'static [u8]) -> String {
        let err = run_error(move |mut s, _| {
            let _ = s.write_all(&headers_frame(status, &[(name, value)]));
        });
        assert!(matches!(err, ProxyError::MalformedHeader { .. }), "{err:?}");
        assert_eq!(err.status(), 500);
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0306: "), "{text}");
        assert!(
            text.contains("Malformed header from daemon process 'site'"),
            "{text}"
        );
        text
    }

    #[test]
    fn malformed_headers_are_refused() {
        let text = malformed(b"200 OK", b"X-Split", b"a\r\nInjected: yes");
        assert!(text.contains(r#""a\r\nInjected: yes""#), "{text}");
        malformed(b"200 OK", b"X-Nul", b"a\0b");
        malformed(b"200 OK", b"Bad Name", b"v");
        malformed(b"200 OK", b"Bad:Name", b"v");
        malformed(b"200 OK", b"", b"v");
        let text = malformed(b"20 OK", b"A", b"b");
        assert!(text.contains(r#"bad status line "20 OK""#), "{text}");
        malformed(b"600 Nope", b"A", b"b");
        malformed(b"099 Low", b"A", b"b");
        malformed(b"200OK", b"A", b"b");
        malformed(b"abc", b"A", b"b");
        malformed(b"200 OK\r\nX: y", b"A", b"b");
    }

    #[test]
    fn status_and_header_checks() {
        assert!(check_status(b"200").is_ok());
        assert!(check_status(b"200 OK").is_ok());
        assert!(check_status(b"599 Whatever you like").is_ok());
        assert!(check_status(b"100 Continue").is_ok());
        assert!(check_status(b"").is_err());
        assert!(check_status(b"2000 OK").is_err());
        assert!(check_status(b"20").is_err());
        assert!(check_header(b"Set-Cookie", b"a=1; Path=/").is_ok());
        assert!(check_header(b"X-Latin", b"caf\xe9\tok").is_ok());
        assert!(check_header(b"X", b"a\nb").is_err());
        assert!(check_header(b"X\x7f", b"v").is_err());
        let path = PathBuf::from("/nowhere");
        let mut t = target(&path);
        t.header_buffer_size = 0;
        assert_eq!(t.header_cap(), DEFAULT_HEADER_BUFFER_SIZE);
        t.header_buffer_size = 8192;
        assert_eq!(t.header_cap(), 8192);
        assert_eq!(escape(b"a\\\"\x01\xff"), r#""a\\\"\x01\xff""#);
        assert!(escape(&[b'a'; 1000]).ends_with("… (1000 bytes in all)"));
    }

    #[test]
    fn header_timeout_is_a_504() {
        let (tx, rx) = mpsc::channel::<()>();
        let daemon = Daemon::start(move |s, _| {
            // Hold the connection, silent, until the test is done.
            let _ = rx.recv_timeout(Duration::from_secs(5));
            drop(s);
        });
        let mut client = FakeClient::default();
        let path = daemon.path();
        let mut t = target(&path);
        t.socket_timeout = Duration::from_millis(200);
        let start = Instant::now();
        let err = forward(&t, &environ(), &mut client).unwrap_err();
        let took = start.elapsed();
        tx.send(()).unwrap();
        daemon.join();
        assert!(matches!(err, ProxyError::HeaderTimeout { .. }), "{err:?}");
        assert_eq!(err.status(), 504);
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0304: "), "{text}");
        assert!(
            text.contains(
                "Timeout when reading response headers from daemon process 'site': /srv/app.wsgi"
            ),
            "{text}"
        );
    }

    #[test]
    fn missing_socket_is_a_503_at_once() {
        let dir = TempDir::new();
        let path = dir.socket();
        let mut client = FakeClient::default();
        let start = Instant::now();
        let err = forward(&target(&path), &environ(), &mut client).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(100));
        assert!(
            matches!(
                err,
                ProxyError::SocketUnavailable {
                    errno: nix::errno::Errno::ENOENT,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status(), 503);
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0302: "), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("uid {}", nix::unistd::geteuid())),
            "{text}"
        );
        assert!(
            text.contains("Unable to connect to WSGI daemon process 'site'"),
            "{text}"
        );
    }

    #[test]
    fn refused_connect_retries_until_connect_timeout() {
        let dir = TempDir::new();
        let path = dir.socket();
        drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
        let mut t = target(&path);
        t.connect_timeout = Duration::from_millis(300);
        let mut client = FakeClient::default();
        let start = Instant::now();
        let err = forward(&t, &environ(), &mut client).unwrap_err();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        let ProxyError::Connect {
            attempts, errno, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert!(*attempts >= 4, "{attempts} attempts");
        assert_eq!(*errno, nix::errno::Errno::ECONNREFUSED);
        assert_eq!(err.status(), 503);
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0301: "), "{text}");
        assert!(
            text.contains(&format!(
                "Unable to connect to WSGI daemon process 'site' on '{}' after multiple attempts",
                path.display()
            )),
            "{text}"
        );
        assert!(text.contains("Connection refused"), "{text}");
    }

    #[test]
    fn full_backlog_is_retried_until_a_slot_frees() {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let dir = TempDir::new();
        let path = dir.socket();
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
        let listener = UnixListener::from(fd);
        // Fill the backlog (0 on Linux admits one pending connection).
        let filler = UnixStream::connect(&path).unwrap();
        let thread = thread::spawn(move || {
            thread::sleep(Duration::from_millis(150));
            let (first, _) = listener.accept().unwrap();
            drop(first);
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            assert_eq!(wire::read_frame(&mut s, &mut buf, 0).unwrap(), Kind::Region);
            assert_eq!(
                wire::read_frame(&mut s, &mut buf, 0).unwrap(),
                Kind::Request
            );
            let mut all = headers_frame(b"204 No Content", &[]);
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient::default();
        let start = Instant::now();
        let got = forward(&target(&path), &environ(), &mut client).unwrap();
        thread.join().unwrap();
        drop(filler);
        assert_eq!(got, Outcome::Completed);
        assert!(start.elapsed() >= Duration::from_millis(140));
        assert_eq!(client.status.as_deref(), Some(&b"204 No Content"[..]));
    }

    fn client_read_error(error: ClientError) -> ProxyError {
        let daemon = Daemon::start(|mut s, _| {
            wire::write_frame(&mut s, Kind::ReadBody, &wire::encode_u32(65536)).unwrap();
            // The worker drops the connection rather than inventing an end of body.
            let mut buf = Vec::new();
            let got = wire::read_frame(&mut s, &mut buf, 0);
            assert!(matches!(got, Err(WireError::Closed)), "{got:?}");
        });
        let mut client = FakeClient {
            body: b"never read".to_vec(),
            read_error: Some(error),
            ..FakeClient::default()
        };
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        err
    }

    #[test]
    fn client_read_error_is_a_400() {
        let err = client_read_error(ClientError::Read("bad chunk header".into()));
        assert!(matches!(err, ProxyError::ClientRead { .. }), "{err:?}");
        assert_eq!(err.status(), 400);
        assert_eq!(err.log_level(), Level::Info);
        assert!(!err.headers_sent());
        let text = err.to_string();
        assert!(text.starts_with("WSGIRS0310: "), "{text}");
        assert!(text.contains("bad chunk header"), "{text}");
    }

    #[test]
    fn client_read_timeout_is_a_408() {
        let err = client_read_error(ClientError::Timeout("no data for 60 s".into()));
        assert!(matches!(err, ProxyError::ClientTimeout { .. }), "{err:?}");
        assert_eq!(err.status(), 408);
        assert_eq!(err.log_level(), Level::Info);
    }

    #[test]
    fn client_gone_during_data() {
        let daemon = Daemon::start(|mut s, _| {
            let _ = s.write_all(&headers_frame(b"200 OK", &[]));
            for _ in 0..10 {
                if s.write_all(&frame(Kind::Data, &[b'y'; 1000])).is_err() {
                    break;
                }
            }
            let _ = s.write_all(&frame(Kind::End, b""));
        });
        let mut client = FakeClient {
            gone_after: Some(2000),
            ..FakeClient::default()
        };
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(matches!(err, ProxyError::ClientGone { .. }), "{err:?}");
        assert!(err.headers_sent());
        assert!(err.is_client_fault());
        assert_eq!(err.log_level(), Level::Info);
        assert_eq!(client.out.len(), 2000);
        assert!(err.to_string().starts_with("WSGIRS0312: "));
    }

    #[test]
    fn wrong_frames_are_protocol_errors() {
        let err = run_error(|mut s, _| {
            let _ = s.write_all(&frame(Kind::Data, b"body before headers"));
        });
        assert!(matches!(err, ProxyError::Protocol { .. }), "{err:?}");
        assert_eq!(err.status(), 502);
        assert!(err.to_string().starts_with("WSGIRS0307: "));

        let err = run_error(|mut s, _| {
            let _ = s.write_all(&[42, 0, 0, 0, 0]);
        });
        assert!(matches!(err, ProxyError::Protocol { .. }), "{err:?}");
        assert!(err.to_string().contains("unknown frame kind 42"));

        let err = run_error(|mut s, _| {
            let _ = s.write_all(&frame(Kind::End, b""));
        });
        assert_eq!(err.status(), 502);

        let err = run_error(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[]);
            all.extend(headers_frame(b"200 OK", &[]));
            let _ = s.write_all(&all);
        });
        assert!(
            matches!(err, ProxyError::BrokenAfterHeaders { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn body_and_response_bytes_cross_in_shared_slots() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected_body = body.clone();
        let daemon = Daemon::start_with_region(move |mut s, _, region| {
            let ask = wire::BodyAsk {
                max: 300_000,
                fill: true,
                known: false,
                slot: Some(1),
            };
            wire::write_frame(&mut s, Kind::ReadBody, &wire::encode_read_body(ask)).unwrap();
            let mut answer = Vec::new();
            assert_eq!(
                wire::read_frame(&mut s, &mut answer, 0).unwrap(),
                Kind::BodySlot
            );
            let len = wire::decode_body_slot(&answer).unwrap();
            assert_eq!(&region.body_slot(1)[..len], &expected_body[..]);
            // The answer: the body back, in two slot frames around an inline one.
            let mut all = headers_frame(b"200 OK", &[]);
            for part in [&expected_body[..60_000], &expected_body[60_000..]] {
                let slot = region
                    .claim_data_slot(crate::wire::region::DATA_SLOTS)
                    .unwrap();
                region.fill_data_slot(slot, part);
                all.extend(frame(
                    Kind::DataSlot,
                    &wire::encode_data_slot(slot as u32, part.len() as u32),
                ));
                all.extend(frame(Kind::Data, b"|"));
            }
            all.extend(frame(Kind::End, b""));
            s.write_all(&all).unwrap();
        });
        let mut client = FakeClient {
            body,
            read_limit: 7000,
            ..FakeClient::default()
        };
        let got = forward(&target(&daemon.path()), &environ(), &mut client).unwrap();
        daemon.join();
        assert_eq!(got, Outcome::Completed);
        let mut expected = client.body[..60_000].to_vec();
        expected.push(b'|');
        expected.extend_from_slice(&client.body[60_000..]);
        expected.push(b'|');
        assert!(client.out == expected, "the response arrived altered");
    }

    #[test]
    fn slot_frames_that_break_the_protocol_are_refused() {
        // A data slot named again while Apache still sends from it.
        let daemon = Daemon::start_with_region(|mut s, _, region| {
            let slot = region
                .claim_data_slot(crate::wire::region::DATA_SLOTS)
                .unwrap();
            region.fill_data_slot(slot, &[b'x'; 9000]);
            let mut all = headers_frame(b"200 OK", &[]);
            let named = wire::encode_data_slot(slot as u32, 9000);
            all.extend(frame(Kind::DataSlot, &named));
            all.extend(frame(Kind::DataSlot, &named));
            let _ = s.write_all(&all);
        });
        let mut client = FakeClient {
            kept_leases: Some(Vec::new()),
            ..FakeClient::default()
        };
        let err = forward(&target(&daemon.path()), &environ(), &mut client).unwrap_err();
        daemon.join();
        assert!(err.to_string().contains("still sending from"), "{err}");
        assert_eq!(client.out.len(), 9000, "the first one was relayed");

        // A slot or length outside the layout.
        let err = run_error(|mut s, _| {
            let mut all = headers_frame(b"200 OK", &[]);
            let bad = wire::encode_data_slot(wire::region::DATA_SLOTS as u32, 10);
            all.extend(frame(Kind::DataSlot, &bad));
            let _ = s.write_all(&all);
        });
        assert!(err.to_string().contains("no such data slot"), "{err}");
    }

    #[test]
    fn oversized_environ_is_refused_before_connecting() {
        let dir = TempDir::new();
        let path = dir.socket();
        let mut client = FakeClient::default();
        let environ = vec![0u8; wire::MAX_ENVIRON + 1];
        let err = forward(&target(&path), &environ, &mut client).unwrap_err();
        assert!(matches!(err, ProxyError::EnvironTooLarge { .. }), "{err:?}");
        assert_eq!(err.status(), 500);
    }
}
