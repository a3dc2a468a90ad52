//! fork() for daemon processes. The child never returns into Apache: it runs the daemon and
//! leaves with _exit, so no Apache pool cleanup or atexit handler of the parent runs twice.

use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Closes every descriptor of this process except `keep` (in a freshly forked daemon).
pub fn close_inherited_except(keep: &[RawFd]) {
    let open: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    // read_dir's own descriptor is closed by now; closing it again would only fail.
    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
        // SAFETY: this single-threaded child owns all its descriptors, and nothing that
        // will run in it refers to the ones being closed.
        unsafe { libc::close(fd) };
    }
}

/// What the parent learns from a fork.
pub enum Forked {
    Parent { pid: i32 },
}

/// Forks; in the child runs `child` and exits with its return value (70 if it panicked).
pub fn fork_daemon(child: impl FnOnce() -> i32) -> std::io::Result<Forked> {
    // SAFETY: called from Apache's single-threaded parent at post_config or from its main
    // loop's child-maintenance callback, so no other thread holds a lock the child could need.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let code = catch_unwind(AssertUnwindSafe(child)).unwrap_or(70);
            // SAFETY: _exit ends the process at once, without running the parent's atexit
            // handlers or flushing stdio buffers it inherited.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(Forked::Parent { pid }),
    }
}
