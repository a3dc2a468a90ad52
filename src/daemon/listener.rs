//! A group's listening UNIX socket: created by the root parent before the daemons are forked,
//! owned by Apache's worker user (or socket-user) with mode 0600 so only Apache's workers (and
//! root) can connect, and removed when the group stops.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::unistd::{self, Gid, Uid};

/// The longest socket path the kernel accepts (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Binds and listens on `path`, replacing whatever is there in one step: the socket is made
/// under a temporary name and renamed over `path`, so a worker connecting during a graceful
/// restart finds either the old socket or the new one, never nothing.
/// The socket is non-blocking (each daemon thread polls it) and close-on-exec.
pub fn create(path: &Path, backlog: u32, owner: Option<(u32, u32)>) -> io::Result<OwnedFd> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = std::path::PathBuf::from(temporary);
    let fd = bind_private(&temporary, backlog, owner)?;
    if let Err(err) = fs::rename(&temporary, path) {
        remove(&temporary);
        return Err(err);
    }
    Ok(fd)
}

fn bind_private(path: &Path, backlog: u32, owner: Option<(u32, u32)>) -> io::Result<OwnedFd> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
        if owner.is_some() {
            check_directory(dir)?;
        }
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
        // Never follow a symlink planted in place of the socket: root would hand its target
        // to the worker user.
        unistd::fchownat(
            AT_FDCWD,
            path,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    let backlog =
        Backlog::new(i32::try_from(backlog).unwrap_or(i32::MAX).max(1)).map_err(io::Error::from)?;
    socket::listen(&fd, backlog)?;
    Ok(fd)
}

/// As root, the socket directory must be root's and writable by nobody else: otherwise another
/// user could swap the socket for a symlink or their own listener.
fn check_directory(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the socket directory {} must be a directory owned by root and not writable by \
                 group or others (it is uid {}, mode {:o}); choose another WSGISocketPrefix",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Removes sockets under `prefix` left by Apache parents that no longer exist (their names
/// carry the parent's pid: `<prefix>.<pid>.<generation>.<index>.sock`), e.g. after a crash.
pub fn remove_stale(prefix: &Path) {
    let (Some(dir), Some(base)) = (prefix.parent(), prefix.file_name().and_then(|b| b.to_str()))
    else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        if !rest.ends_with(".sock") {
            continue;
        }
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone && pid != std::process::id() as i32 {
            remove(&entry.path());
        }
    }
}

/// Removes this parent's sockets under `prefix` that belong to no current group (a group
/// removed by a graceful restart).
pub fn remove_unlisted(prefix: &Path, current: &[std::path::PathBuf]) {
    let (Some(dir), Some(base)) = (prefix.parent(), prefix.file_name().and_then(|b| b.to_str()))
    else {
        return;
    };
    let ours = format!("{base}.{}.", std::process::id());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&ours) && name.ends_with(".sock") && !current.contains(&entry.path()) {
            remove(&entry.path());
        }
    }
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
