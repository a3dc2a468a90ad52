//! Connecting an Apache worker to a daemon group's UNIX socket, and writing to it without
//! SIGPIPE. The socket is created non-blocking so that a full listen backlog answers EAGAIN at
//! once (a blocking AF_UNIX connect would wait for a slot with no deadline); a refused or full
//! socket is retried with short, growing sleeps until connect-timeout. No ffi here: nix's safe
//! wrappers only.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

use super::error::ProxyError;
use super::Target;

/// The first pause after a refused attempt; doubled after each one up to `MAX_DELAY`.
const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_millis(200);

/// Connects to `target.socket_path`, retrying while the daemon refuses (not listening yet, or
/// restarting) or its backlog is full, until `target.connect_timeout` has passed. A missing
/// socket or a permission problem fails at once: waiting would not fix it.
pub(super) fn connect(target: &Target<'_>) -> Result<UnixStream, ProxyError> {
    let unavailable = |errno: Errno| ProxyError::SocketUnavailable {
        group: target.group.to_owned(),
        path: target.socket_path.to_owned(),
        uid: nix::unistd::geteuid().as_raw(),
        errno,
        hint: hint(errno),
    };
    let addr = UnixAddr::new(target.socket_path).map_err(unavailable)?;
    let start = Instant::now();
    let deadline = start + target.connect_timeout;
    let mut delay = FIRST_DELAY;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let errno = match attempt(&addr, deadline) {
            Ok(stream) => return Ok(stream),
            Err(errno) if retryable(errno) => errno,
            Err(errno) => return Err(unavailable(errno)),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(ProxyError::Connect {
                group: target.group.to_owned(),
                path: target.socket_path.to_owned(),
                attempts,
                waited: now - start,
                timeout: target.connect_timeout,
                errno,
            });
        }
        thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// Refused (nobody listening: the daemon is starting or restarting), backlog full, or a
/// non-blocking connect that did not finish in time.
fn retryable(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ECONNREFUSED | Errno::EAGAIN | Errno::EINPROGRESS | Errno::EINTR
    )
}

fn hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOENT => {
            "the socket does not exist: is the daemon process group running (see the log for \
             its start-up), and was it created under this WSGISocketPrefix?"
        }
        Errno::EACCES | Errno::EPERM => {
            "permission denied: the socket and its directories must be accessible to the user \
             Apache's workers run as (see socket-user)"
        }
        Errno::ENAMETOOLONG => "the socket path is too long for a UNIX socket (107 bytes at most)",
        Errno::ENOTSOCK | Errno::EPROTOTYPE => "the path is not a stream socket",
        _ => "the daemon cannot be reached",
    }
}

fn attempt(addr: &UnixAddr, deadline: Instant) -> Result<UnixStream, Errno> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match socket::connect(fd.as_raw_fd(), addr) {
        Ok(()) => {}
        // Linux completes AF_UNIX connects at once; other kernels may not.
        Err(Errno::EINPROGRESS) => finish_connect(&fd, deadline)?,
        Err(errno) => return Err(errno),
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(|e| to_errno(&e))?;
    Ok(stream)
}

/// Waits (until `deadline`) for a non-blocking connect in progress, then reads its result.
fn finish_connect(fd: &OwnedFd, deadline: Instant) -> Result<(), Errno> {
    let left = deadline.saturating_duration_since(Instant::now());
    let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    if nix::poll::poll(&mut fds, timeout)? == 0 {
        return Err(Errno::EINPROGRESS);
    }
    match socket::getsockopt(fd, sockopt::SocketError)? {
        0 => Ok(()),
        raw => Err(Errno::from_raw(raw)),
    }
}

fn to_errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// True when the daemon has more for us right now (a read would not block): used to decide
/// whether to flush the client before waiting.
pub(super) fn readable(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Waits up to `timeout` for the daemon to have something for us; true when it has.
pub(super) fn wait_readable(stream: &UnixStream, timeout: Duration) -> io::Result<bool> {
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, PollTimeout::from(millis)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Writes `bytes` (a whole frame) to the daemon with `fd` attached to them (SCM_RIGHTS).
pub(super) fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: &OwnedFd) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let sent = loop {
        match socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
            Ok(n) => break n,
        }
    };
    // The descriptor went with the first byte; the rest (if the kernel took only part) is
    // plain data.
    Sender(stream).write_all(&bytes[sent.min(bytes.len())..])
}

/// Writes to the daemon with MSG_NOSIGNAL, so a daemon that died gives EPIPE rather than a
/// SIGPIPE that would kill the Apache child if the signal were not ignored.
pub(super) struct Sender<'a>(pub(super) &'a UnixStream);

impl Write for Sender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match socket::sendmsg::<()>(self.0.as_raw_fd(), bufs, &[], MsgFlags::MSG_NOSIGNAL, None)
            {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
                Ok(n) => return Ok(n),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
