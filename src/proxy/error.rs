//! The proxy's error type: every way a daemon-mode request can fail on the Apache-worker side,
//! each with a stable `WSGIRS03NN` id, the HTTP status to answer with (when the headers have
//! not gone out yet), whose fault it was (the log level) and whether the client already has
//! the headers. No ffi here.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;

use crate::logging::Level;
use crate::wire;

/// Why the response headers never arrived complete (the `Truncated or oversized …` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncatedWhy {
    /// A clean EOF before the Headers frame.
    Closed,
    /// ECONNRESET/EPIPE: the daemon went away with data still unread on its side.
    Reset,
    /// EOF in the middle of a frame.
    CutMidFrame,
    /// The Headers frame was larger than the group's header-buffer-size.
    Oversized { len: usize, cap: usize },
}

impl fmt::Display for TruncatedWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TruncatedWhy::Closed => f.write_str(
                "the daemon closed the connection before sending headers (it may have crashed: \
                 see the daemon's exit status in the log)",
            ),
            TruncatedWhy::Reset => f.write_str(
                "the daemon reset the connection before sending headers (it may have crashed: \
                 see the daemon's exit status in the log)",
            ),
            TruncatedWhy::CutMidFrame => f.write_str(
                "the connection was cut in the middle of a frame before the headers were \
                 complete (the daemon may have crashed: see its exit status in the log)",
            ),
            TruncatedWhy::Oversized { len, cap } => write!(
                f,
                "the response headers ({len} bytes) exceeded header-buffer-size of {cap} bytes"
            ),
        }
    }
}

/// A failed daemon-mode request. `Display` starts with the stable id and carries mod_wsgi's
/// phrase for the same event where it has one.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "WSGIRS0301: Unable to connect to WSGI daemon process '{group}' on '{}' after multiple \
         attempts ({attempts} attempts over {:.3} s, connect-timeout {:.3} s): {errno}",
        path.display(),
        waited.as_secs_f64(),
        timeout.as_secs_f64()
    )]
    Connect {
        group: String,
        path: PathBuf,
        attempts: u32,
        waited: Duration,
        timeout: Duration,
        errno: Errno,
    },

    #[error(
        "WSGIRS0302: Unable to connect to WSGI daemon process '{group}' on '{}': {errno}; \
         {hint} (this Apache process runs as uid {uid})",
        path.display()
    )]
    SocketUnavailable {
        group: String,
        path: PathBuf,
        uid: u32,
        errno: Errno,
        hint: &'static str,
    },

    #[error(
        "WSGIRS0303: Unable to send request details to WSGI daemon process '{group}' on '{}': \
         {script}: {source}",
        path.display()
    )]
    SendRequest {
        group: String,
        path: PathBuf,
        script: String,
        source: io::Error,
    },

    #[error(
        "WSGIRS0304: Timeout when reading response headers from daemon process '{group}': \
         {script} ({what} within socket-timeout of {:.3} s)",
        timeout.as_secs_f64()
    )]
    HeaderTimeout {
        group: String,
        script: String,
        timeout: Duration,
        /// "nothing was received", "the daemon did not take the request body", or "no daemon
        /// thread took the request".
        what: &'static str,
    },

    #[error(
        "WSGIRS0305: Truncated or oversized response headers received from daemon process \
         '{group}': {script}: {why}"
    )]
    TruncatedHeaders {
        group: String,
        script: String,
        why: TruncatedWhy,
    },

    #[error("WSGIRS0306: Malformed header from daemon process '{group}': {script}: {detail}")]
    MalformedHeader {
        group: String,
        script: String,
        detail: String,
    },

    #[error(
        "WSGIRS0307: Protocol error in the response from daemon process '{group}': {script}: \
         {detail}"
    )]
    Protocol {
        group: String,
        script: String,
        detail: String,
    },

    #[error(
        "WSGIRS0308: Error communicating with daemon process '{group}' while {during}: \
         {script}: {source}"
    )]
    DaemonIo {
        group: String,
        script: String,
        during: &'static str,
        source: io::Error,
    },

    #[error(
        "WSGIRS0309: Request environment of {len} bytes for daemon process '{group}' exceeds \
         the limit of {} bytes: {script}",
        wire::MAX_ENVIRON
    )]
    EnvironTooLarge {
        group: String,
        script: String,
        len: usize,
    },

    #[error(
        "WSGIRS0310: Error reading request body from client for daemon process '{group}': \
         {script}: {detail}"
    )]
    ClientRead {
        group: String,
        script: String,
        detail: String,
        headers_sent: bool,
    },

    #[error(
        "WSGIRS0311: Timeout reading request body from client for daemon process '{group}': \
         {script}: {detail}"
    )]
    ClientTimeout {
        group: String,
        script: String,
        detail: String,
        headers_sent: bool,
    },

    #[error(
        "WSGIRS0312: Client closed the connection while {during} for daemon process '{group}': \
         {script}: {detail}"
    )]
    ClientGone {
        group: String,
        script: String,
        /// "reading the request body" or "sending the response".
        during: &'static str,
        detail: String,
        headers_sent: bool,
    },

    #[error(
        "WSGIRS0313: Daemon process '{group}' closed the connection {attempts} times without \
         reading the request for {script}: its processes keep restarting"
    )]
    TurnedAway {
        group: String,
        script: String,
        attempts: u32,
    },
    #[error(
        "WSGIRS0320: Failed to proxy response from daemon process '{group}' after the response \
         headers were sent: {script}: {cause}"
    )]
    BrokenAfterHeaders {
        group: String,
        script: String,
        cause: String,
    },
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl ProxyError {
    /// The HTTP status to answer with when the headers have not been sent yet (after that the
    /// httpd layer aborts the connection instead; the status only goes to the access log).
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::SocketUnavailable { .. }
            | ProxyError::TurnedAway { .. } => 503,
            ProxyError::SendRequest { source, .. } if is_timeout(source) => 504,
            ProxyError::SendRequest { .. } => 500,
            ProxyError::HeaderTimeout { .. } => 504,
            ProxyError::TruncatedHeaders { .. }
            | ProxyError::MalformedHeader { .. }
            | ProxyError::EnvironTooLarge { .. } => 500,
            ProxyError::Protocol { .. } => 502,
            ProxyError::DaemonIo { source, .. } if is_timeout(source) => 504,
            ProxyError::DaemonIo { .. } => 502,
            ProxyError::ClientRead { .. } | ProxyError::ClientGone { .. } => 400,
            ProxyError::ClientTimeout { .. } => 408,
            ProxyError::BrokenAfterHeaders { .. } => 500,
        }
    }

    /// True when the client already has the status and headers: the httpd layer must abort
    /// the connection (so the client sees a truncated response), not send an error page.
    pub fn headers_sent(&self) -> bool {
        match self {
            ProxyError::BrokenAfterHeaders { .. } => true,
            ProxyError::ClientRead { headers_sent, .. }
            | ProxyError::ClientTimeout { headers_sent, .. }
            | ProxyError::ClientGone { headers_sent, .. } => *headers_sent,
            _ => false,
        }
    }

    /// True when the client, not the daemon or the module, caused the failure.
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            ProxyError::ClientRead { .. }
                | ProxyError::ClientTimeout { .. }
                | ProxyError::ClientGone { .. }
        )
    }

    /// Client-side problems are routine (Info); daemon and module problems are errors.
    pub fn log_level(&self) -> Level {
        if self.is_client_fault() {
            Level::Info
        } else {
            Level::Error
        }
    }
}

/// Bytes from the daemon made safe for one log line: printable ASCII kept, everything else
/// (and the backslash and the double quote) escaped; long text cut to `MAX_SHOWN` bytes.
pub(super) fn escape(bytes: &[u8]) -> String {
    const MAX_SHOWN: usize = 256;
    let shown = &bytes[..bytes.len().min(MAX_SHOWN)];
    let mut out = String::with_capacity(shown.len() + 2);
    out.push('"');
    for &b in shown {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    if bytes.len() > MAX_SHOWN {
        out.push_str(&format!("… ({} bytes in all)", bytes.len()));
    }
    out
}
