//! A group's listening UNIX socket: created by the root parent before the daemons are forked,
//! owned by Apache's worker user (or socket-user) with mode 0600 so only Apache's workers (and
//! root) can connect, and removed when the group stops.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::unistd::{self, Gid, Uid};

/// The longest socket path the kernel accepts (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Binds and listens on `path`. A stale file of a previous run is removed first.
/// The socket is non-blocking (each daemon thread polls it) and close-on-exec.
pub fn create(path: &Path, backlog: u32, owner: Option<(u32, u32)>) -> io::Result<OwnedFd> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    // Restrict before anyone can connect: listen() comes after the mode and owner are set.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = owner {
        unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    let backlog =
        Backlog::new(i32::try_from(backlog).unwrap_or(i32::MAX).max(1)).map_err(io::Error::from)?;
    socket::listen(&fd, backlog)?;
    Ok(fd)
}

/// Removes the socket file, ignoring a file that is already gone.
pub fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}

/// Borrows the group's listener inherited from the parent.
pub fn borrow_inherited(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: a daemon's listener is inherited open and is never closed before the process
    // exits, so the borrow cannot outlive the descriptor.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Takes ownership of a descriptor just returned by accept4.
pub fn own_accepted(fd: RawFd) -> OwnedFd {
    // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Closes an inherited listener in a process that must not accept on it.
pub fn close_inherited(fd: RawFd) {
    let _ = unistd::close(fd);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn creates_private_socket_and_replaces_stale_file() {
        let dir = std::env::temp_dir().join(format!("wsgirs-listener-{}", std::process::id()));
        let path = dir.join("g.sock");
        fs::create_dir_all(&dir).unwrap();
        fs::write(&path, b"stale").unwrap();
        let fd = create(&path, 10, None).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        drop(fd);
        remove(&path);
        assert!(!path.exists());
        let _ = fs::remove_dir(&dir);
    }
}
