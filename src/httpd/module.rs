//! The exported module record `wsgi_module` (name "mod_wsgi.c", so `<IfModule mod_wsgi.c>`
//! matches), per-server/per-directory config create and merge, and the hooks. Every function
//! Apache calls catches panics.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ffi;
use super::pool::{cstr_lossy, on_cleanup, pool_box};
use super::{children, directives, log, request};
use crate::config::daemon_process::{AccountLookup, SystemAccounts};
use crate::config::{self, DirConfig, ServerConfig};
use crate::daemon::origin::{Secret, SECRET_LEN};
use crate::daemon::{self, listener, privileges::Identity, supervisor, GroupRuntime, Registry};
use crate::load::{LoadBoard, LoadSlot};
use crate::logging::Level;

/// The module record Apache reads; `static mut` because Apache writes its index and links.
#[cfg(not(test))]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut wsgi_module: ffi::module = ffi::module {
    version: ffi::WSGIRS_MODULE_MAGIC_NUMBER_MAJOR,
    minor_version: ffi::WSGIRS_MODULE_MAGIC_NUMBER_MINOR,
    module_index: -1,
    name: c"mod_wsgi.c".as_ptr(),
    dynamic_load_handle: ptr::null_mut(),
    next: ptr::null_mut(),
    magic: ffi::WSGIRS_MODULE_MAGIC_COOKIE,
    rewrite_args: None,
    create_dir_config: Some(create_dir_config),
    merge_dir_config: Some(merge_dir_config),
    create_server_config: Some(create_server_config),
    merge_server_config: Some(merge_server_config),
    cmds: directives::COMMANDS.0.as_ptr(),
    register_hooks: Some(register_hooks),
    flags: 0,
};

pub fn module_ptr() -> *mut ffi::module {
    &raw mut wsgi_module
}

pub fn module_index() -> c_int {
    // SAFETY: reading an int Apache wrote once while loading the module.
    unsafe { (*module_ptr()).module_index }
}

/// The configuration pool of the current generation, for registering daemon watches.
static PCONF: AtomicPtr<ffi::apr_pool_t> = AtomicPtr::new(ptr::null_mut());

pub fn pconf() -> *mut ffi::apr_pool_t {
    PCONF.load(Ordering::Acquire)
}

/// Runs `f`, turning a panic into `fallback` (a panic must never unwind into httpd).
pub fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        log::server_log(
            ptr::null(),
            Level::Crit,
            "WSGIRS0001: Internal error in mod_wsgi_rs (a Rust panic was caught); see above.",
        );
        fallback
    })
}

/// A new default config of type `T` owned by `pool`.
fn create_config<T: Default>(pool: *mut ffi::apr_pool_t) -> *mut c_void {
    // SAFETY: Apache passes a live pool to every create function.
    guarded(ptr::null_mut(), || unsafe {
        pool_box(pool, T::default()).cast()
    })
}

/// `merge(base, add)` into a new config owned by `pool`.
///
/// # Safety
/// `base` and `add` were created by `create_config::<T>` / `merge_config::<T>`.
unsafe fn merge_config<T>(
    pool: *mut ffi::apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
    merge: fn(&T, &T) -> T,
) -> *mut c_void {
    guarded(ptr::null_mut(), || {
        // SAFETY: per the caller, both point to live T values in Apache's pools.
        unsafe { pool_box(pool, merge(&*base.cast::<T>(), &*add.cast::<T>())).cast() }
    })
}

unsafe extern "C" fn create_dir_config(
    pool: *mut ffi::apr_pool_t,
    _dir: *mut c_char,
) -> *mut c_void {
    create_config::<DirConfig>(pool)
}

unsafe extern "C" fn merge_dir_config(
    pool: *mut ffi::apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    // SAFETY: Apache merges per-directory configs our create/merge functions made.
    unsafe { merge_config(pool, base, add, DirConfig::merge) }
}

unsafe extern "C" fn create_server_config(
    pool: *mut ffi::apr_pool_t,
    _s: *mut ffi::server_rec,
) -> *mut c_void {
    create_config::<ServerConfig>(pool)
}

unsafe extern "C" fn merge_server_config(
    pool: *mut ffi::apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    // SAFETY: Apache merges per-server configs our create/merge functions made.
    unsafe { merge_config(pool, base, add, ServerConfig::merge) }
}

/// This module's config in a config vector (server or request).
///
/// # Safety
/// `vector` is a live `ap_conf_vector_t` of a server or request.
pub unsafe fn module_config<T>(vector: *mut ffi::ap_conf_vector_t) -> *mut T {
    // SAFETY: per the caller; our slot holds a T created by our create/merge functions.
    unsafe { ffi::ap_get_module_config(vector, module_ptr()).cast::<T>() }
}

unsafe extern "C" fn register_hooks(_pool: *mut ffi::apr_pool_t) {
    let middle = ffi::APR_HOOK_MIDDLE as c_int;
    // SAFETY: registering hook functions with the signatures httpd expects.
    unsafe {
        ffi::ap_hook_pre_config(Some(pre_config), ptr::null(), ptr::null(), middle);
        ffi::ap_hook_post_config(Some(post_config), ptr::null(), ptr::null(), middle);
        ffi::ap_hook_child_init(Some(child_init), ptr::null(), ptr::null(), middle);
        ffi::ap_hook_translate_name(
            Some(request::translate_name),
            ptr::null(),
            ptr::null(),
            middle,
        );
        ffi::ap_hook_handler(Some(request::handler), ptr::null(), ptr::null(), middle);
    }
}

unsafe extern "C" fn pre_config(
    _pconf: *mut ffi::apr_pool_t,
    _plog: *mut ffi::apr_pool_t,
    _ptemp: *mut ffi::apr_pool_t,
) -> c_int {
    guarded(ffi::OK as c_int, || {
        config::reset_groups();
        ffi::OK as c_int
    })
}

unsafe extern "C" fn post_config(
    pconf: *mut ffi::apr_pool_t,
    _plog: *mut ffi::apr_pool_t,
    ptemp: *mut ffi::apr_pool_t,
    s: *mut ffi::server_rec,
) -> c_int {
    guarded(ffi::HTTP_INTERNAL_SERVER_ERROR as c_int, || {
        // SAFETY: ap_state_query only reads httpd's state.
        let state = unsafe { ffi::ap_state_query(ffi::AP_SQ_MAIN_STATE as c_int) };
        // The first pass only validates the configuration; daemons start on the real pass.
        if state == ffi::AP_SQ_MS_CREATE_PRE_CONFIG as c_int {
            return ffi::OK as c_int;
        }
        log::install(s);
        MAIN_SERVER_FOR_CHILD.store(s, Ordering::Release);
        PCONF.store(pconf, Ordering::Release);
        // SAFETY: live pools and server chain for the duration of post_config.
        match unsafe { start_daemons(pconf, ptemp, s) } {
            Ok(()) => ffi::OK as c_int,
            Err(message) => {
                log::server_log(s, Level::Emerg, &message);
                ffi::HTTP_INTERNAL_SERVER_ERROR as c_int
            }
        }
    })
}

/// The scope key the directive layer recorded for a server block.
pub(crate) fn server_key(s: *const ffi::server_rec) -> config::ServerKey {
    // SAFETY: callers pass live server_recs.
    let is_virtual = unsafe { (*s).is_virtual != 0 };
    config::ServerKey {
        id: s as usize,
        is_virtual,
    }
}

/// Resolves every defined group against the running Apache and starts them.
///
/// # Safety
/// Live pools and server chain (post_config).
unsafe fn start_daemons(
    pconf: *mut ffi::apr_pool_t,
    ptemp: *mut ffi::apr_pool_t,
    main: *mut ffi::server_rec,
) -> Result<(), String> {
    let defined = config::defined_groups();
    // SAFETY: main server config was created by create_server_config.
    let main_config = unsafe { &*module_config::<ServerConfig>((*main).module_config) };

    // Where each group was defined: the ServerName of its vhost, or global.
    let mut scopes = std::collections::HashMap::new();
    let mut server = main;
    while !server.is_null() {
        // SAFETY: walking httpd's server list.
        unsafe {
            let key = server_key(server);
            scopes.insert(key.id, cstr_lossy((*server).server_hostname));
            server = (*server).next;
        }
    }

    // SAFETY: ap_unixd_config is filled in by mod_unixd before post_config.
    let (apache_uid, apache_gid, apache_user) = unsafe {
        (
            ffi::ap_unixd_config.user_id,
            ffi::ap_unixd_config.group_id,
            cstr_lossy(ffi::ap_unixd_config.user_name),
        )
    };
    let is_root = nix::unistd::geteuid().is_root();
    // When Apache does not start as root there is nobody to switch to: run as ourselves.
    let (run_uid, run_gid) = if is_root {
        (apache_uid, apache_gid)
    } else {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    };

    // SAFETY: ptemp is live during post_config.
    let prefix = unsafe { socket_prefix(ptemp, main_config) }?;
    // SAFETY: reading the main server's Timeout.
    let apache_timeout =
        Duration::from_micros(u64::try_from(unsafe { (*main).timeout }).unwrap_or(60_000_000));
    let accounts = SystemAccounts;
    let mut groups = Vec::with_capacity(defined.len());
    for (index, def) in defined.into_iter().enumerate() {
        let spec = def.spec;
        // Stable across graceful restarts (the parent's pid and the group's name), so a
        // worker of the old generation still reaches the group through the new socket.
        let socket_path = PathBuf::from(format!(
            "{prefix}.{}.{:016x}.sock",
            std::process::id(),
            daemon::name_hash(&spec.name)
        ));
        let length = socket_path.as_os_str().len();
        if length > listener::MAX_SOCKET_PATH {
            return Err(daemon::DaemonError::SocketPathTooLong {
                group: spec.name.clone(),
                path: socket_path.display().to_string(),
                len: length,
            }
            .to_string());
        }
        let (uid, user_name, home_default) = match (&spec.user, is_root) {
            (Some(account), true) => (account.uid, account.name.clone(), account.home.clone()),
            _ => {
                let name = if is_root {
                    apache_user.clone()
                } else {
                    String::new()
                };
                (run_uid, name, PathBuf::from("/"))
            }
        };
        let user_name = if user_name.is_empty() {
            accounts
                .user_by_uid(uid)
                .map(|a| a.name)
                .unwrap_or_default()
        } else {
            user_name
        };
        // As mod_wsgi: without group=, the daemon keeps Apache's Group even when user= is set.
        let gid = match (&spec.group, is_root) {
            (Some(group), true) => group.gid,
            _ => run_gid,
        };
        let supplementary = spec
            .supplementary_groups
            .as_ref()
            .map(|list| list.iter().map(|g| g.gid).collect());
        let home = spec.home.clone().unwrap_or(if uid != apache_uid {
            home_default
        } else {
            PathBuf::from("/")
        });
        let scope = def
            .server
            .is_virtual
            .then(|| scopes.get(&def.server.id).cloned().unwrap_or_default());
        let mut spec = spec;
        if spec.python_path.is_empty() {
            spec.python_path = main_config.python_path.clone();
        }
        if spec.python_home.is_none() {
            spec.python_home = main_config.python_home.clone();
        }
        // SAFETY: pconf is live during post_config.
        let load = unsafe { map_load_board(pconf, &spec.name, spec.processes.max(1) as usize) };
        groups.push(GroupRuntime {
            load,
            import_scripts: config::imports_for(&spec.name),
            index,
            worker_uid: run_uid,
            socket_timeout: spec.socket_timeout.unwrap_or(apache_timeout),
            spec,
            scope,
            socket_path,
            identity: Identity {
                user_name,
                uid,
                gid,
                supplementary,
            },
            home,
        });
    }
    for warning in config::unconfigured_selections() {
        log::server_log(main, Level::Warn, &warning);
    }
    let secrets = groups
        .iter()
        // SAFETY: live main server.
        .map(|g| unsafe { group_secret(main, &g.spec.name) })
        .collect::<Result<Vec<_>, _>>()?;
    daemon::origin::install_secrets(secrets);
    let registry = Arc::new(Registry { groups });
    daemon::publish_arc(Arc::clone(&registry));
    let owner = is_root.then_some((apache_uid, apache_gid));
    listener::remove_stale(std::path::Path::new(&prefix));
    let current: Vec<PathBuf> = registry
        .groups
        .iter()
        .map(|g| g.socket_path.clone())
        .collect();
    listener::remove_unlisted(std::path::Path::new(&prefix), &current);
    // Registered first, so daemons forked before a failure part-way are still stopped.
    // SAFETY: pconf is live; the cleanup runs when Apache restarts or stops.
    unsafe { on_cleanup(pconf, Box::new(supervisor::stop_all)) };
    supervisor::start(
        registry,
        supervisor::ParentHooks {
            watch: children::watch,
            in_child: prepare_daemon_child,
            adopt: adopt_draining_daemon,
        },
        owner,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// The load boards of the current generation (address and length of each group's mapping, in
/// group order), so a daemon can unmap the other groups' boards.
static LOAD_BOARDS: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// Maps a group's load board: `processes` slots of shared, anonymous, zeroed memory (a valid
/// empty board) that every child forked afterwards inherits. The parent unmaps it when pconf
/// is cleared (a restart or stop); children keep their own mapping until they exit. The parent
/// itself never reads or writes a board, it only hands it to children. Without the mapping
/// the group runs with an empty board: every idle connection counts as usable.
///
/// # Safety
/// `pconf` is live.
unsafe fn map_load_board(pconf: *mut ffi::apr_pool_t, group: &str, processes: usize) -> LoadBoard {
    let len = processes * std::mem::size_of::<LoadSlot>();
    // A named memfd rather than MAP_ANONYMOUS: /proc/<pid>/maps then says what the mapping is
    // ("/memfd:wsgi-load:<group>"), where an anonymous one would pass for Apache's scoreboard.
    let name = super::pool::cstring(&format!(
        "wsgi-load:{}",
        group.chars().take(200).collect::<String>()
    ));
    // SAFETY: a NUL-terminated name; the descriptor is ours and closed below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return LoadBoard::default();
    }
    let size = libc::off_t::try_from(len).unwrap_or(0);
    // SAFETY: our fresh memfd; the new mapping touches no existing memory; the mapping keeps
    // the memory alive after the descriptor is closed.
    let address = unsafe {
        let address = if libc::ftruncate(fd, size) == 0 {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        } else {
            libc::MAP_FAILED
        };
        libc::close(fd);
        address
    };
    if address == libc::MAP_FAILED || len == 0 {
        return LoadBoard::default();
    }
    let raw = address as usize;
    if let Ok(mut boards) = LOAD_BOARDS.lock() {
        boards.push((raw, len));
    }
    // SAFETY: page-aligned (LoadSlot needs 64), zeroed and `processes` slots long; it stays
    // mapped in every child, which are the only processes that use it.
    let slots = unsafe { std::slice::from_raw_parts(address.cast::<LoadSlot>(), processes) };
    // SAFETY: pconf is live; the cleanup runs once, when it is cleared.
    unsafe {
        on_cleanup(
            pconf,
            Box::new(move || {
                if let Ok(mut boards) = LOAD_BOARDS.lock() {
                    boards.retain(|&(a, _)| a != raw);
                }
                // SAFETY: our own mapping; the parent holds no reference it will use again.
                libc::munmap(raw as *mut c_void, len);
            }),
        )
    };
    LoadBoard::new(slots)
}

/// Each group's origin secret, kept in the process pool so it survives graceful restarts
/// (Apache reloads this module, resetting its statics): a worker of the old generation still
/// proves itself to the new daemons. A group seen for the first time gets a fresh secret.
///
/// # Safety
/// `main` is the live main server.
unsafe fn group_secret(main: *mut ffi::server_rec, group: &str) -> Result<Secret, String> {
    let key = super::pool::cstring(&format!("mod_wsgi_rs.secret.{group}"));
    // SAFETY: the process pool lives as long as Apache; the stored value is SECRET_LEN bytes
    // allocated from that pool; apr_pool_userdata_set copies the key.
    unsafe {
        let pool = (*(*main).process).pool;
        let mut stored: *mut c_void = ptr::null_mut();
        ffi::apr_pool_userdata_get(&mut stored, key.as_ptr(), pool);
        if !stored.is_null() {
            let mut secret = [0u8; SECRET_LEN];
            ptr::copy_nonoverlapping(stored.cast::<u8>(), secret.as_mut_ptr(), SECRET_LEN);
            return Ok(secret);
        }
        let secret = daemon::origin::new_secret().map_err(|e| {
            format!("WSGIRS0406: Cannot read random bytes for the daemon origin secrets: {e}")
        })?;
        let copy = ffi::apr_palloc(pool, SECRET_LEN).cast::<u8>();
        if copy.is_null() {
            return Err("WSGIRS0406: Cannot allocate the daemon origin secret.".into());
        }
        ptr::copy_nonoverlapping(secret.as_ptr(), copy, SECRET_LEN);
        ffi::apr_pool_userdata_set(copy.cast::<c_void>(), key.as_ptr(), None, pool);
        Ok(secret)
    }
}

/// WSGISocketPrefix relative to ServerRoot, or `wsgi` in Apache's runtime directory.
///
/// # Safety
/// Live pool.
unsafe fn socket_prefix(
    ptemp: *mut ffi::apr_pool_t,
    main_config: &ServerConfig,
) -> Result<String, String> {
    let raw = match &main_config.socket_prefix {
        Some(prefix) => {
            let c = super::pool::cstring(prefix);
            // SAFETY: live pool, NUL-terminated input.
            unsafe { ffi::ap_server_root_relative(ptemp, c.as_ptr()) }
        }
        // SAFETY: live pool, NUL-terminated input.
        None => unsafe { ffi::ap_runtime_dir_relative(ptemp, c"wsgi".as_ptr()) },
    };
    if raw.is_null() {
        return Err(
            "WSGIRS0405: Invalid WSGISocketPrefix: Apache could not resolve it to a path.".into(),
        );
    }
    // SAFETY: Apache returned a pool string.
    Ok(unsafe { cstr_lossy(raw) })
}

/// A daemon of the previous generation drains after a graceful restart: the MPM reaps it (and
/// kills it if Apache stops meanwhile), as it does its own old workers.
fn adopt_draining_daemon(pid: i32) {
    let mut generation: c_int = 0;
    // SAFETY: plain queries and registration with the MPM, in the parent.
    unsafe {
        ffi::ap_mpm_query(ffi::AP_MPMQ_GENERATION as c_int, &mut generation);
        ffi::ap_register_extra_mpm_process(pid, generation);
    }
}

/// In a freshly forked daemon, before it drops root: give up what belongs to Apache (its
/// HTTP listeners, the scoreboard shared with the workers) and say which inherited
/// descriptors to keep (the error logs). Everything else is closed by the caller, so a
/// user's app cannot write the MPM's pipe of death, the access logs or the scoreboard.
fn prepare_daemon_child(title: Option<&str>, group: usize) -> Vec<RawFd> {
    if let Some(title) = title {
        set_process_title(title);
    }
    // Another group's load board is none of this daemon's business.
    let boards = LOAD_BOARDS
        .lock()
        .map(|boards| boards.clone())
        .unwrap_or_default();
    for (index, &(address, len)) in boards.iter().enumerate() {
        if index != group {
            // SAFETY: a mapping made by map_load_board in the parent, inherited by this
            // single-threaded child; nothing in a daemon refers to another group's board.
            unsafe { libc::munmap(address as *mut c_void, len) };
        }
    }
    // SAFETY: closes the listener sockets this forked process inherited.
    unsafe { ffi::ap_close_listeners() };
    // SAFETY: the scoreboard image was set up by the parent before forking us; its `global`
    // block is the start of the shared mapping, ap_calc_scoreboard_size() bytes long. We
    // unmap the whole pages it covers; nothing in a daemon touches the scoreboard.
    unsafe {
        let image = ffi::ap_scoreboard_image;
        if !image.is_null() && !(*image).global.is_null() {
            let base = (*image).global as usize;
            let size = usize::try_from(ffi::ap_calc_scoreboard_size()).unwrap_or(0);
            let page = 4096;
            let start = base & !(page - 1);
            libc::munmap(start as *mut c_void, base + size - start);
        }
    }
    let mut keep = Vec::new();
    let mut server = MAIN_SERVER_FOR_CHILD.load(Ordering::Acquire);
    while !server.is_null() {
        // SAFETY: walking the inherited server list; error_log is an apr_file_t or NULL.
        unsafe {
            let log = (*server).error_log;
            let mut fd: ffi::apr_os_file_t = -1;
            if !log.is_null() && ffi::apr_os_file_get(&mut fd, log) == 0 && fd >= 0 {
                keep.push(fd);
            }
            server = (*server).next;
        }
    }
    keep
}

/// display-name=: what `ps` shows for this daemon. The command line shown by `ps -f` lives in
/// the memory of the original argv strings, so the title is written over them (as mod_wsgi
/// does), cut to fit; the short name (`ps -e`, `top`) is set with prctl.
fn set_process_title(title: &str) {
    let _ = nix::sys::prctl::set_name(&super::pool::cstring(
        &title.chars().take(15).collect::<String>(),
    ));
    let main = MAIN_SERVER_FOR_CHILD.load(Ordering::Acquire);
    if main.is_null() {
        return;
    }
    // SAFETY: process->argv is main()'s argv: argc NUL-terminated strings that the kernel laid
    // out back to back. We only write inside [argv[0], end of the last string) and only after
    // checking that the strings are contiguous; nothing in a daemon reads argv afterwards.
    unsafe {
        let process = (*main).process;
        let (argv, argc) = ((*process).argv, (*process).argc);
        if argv.is_null() || argc < 1 || (*argv).is_null() {
            return;
        }
        let start = *argv as *mut u8;
        let mut end = start;
        for i in 0..argc as usize {
            let arg = *argv.add(i) as *mut u8;
            if arg.is_null() || (i > 0 && arg != end.add(1)) {
                break;
            }
            end = arg.add(std::ffi::CStr::from_ptr(arg.cast()).to_bytes().len());
        }
        let room = end.offset_from(start) as usize;
        let bytes = title.as_bytes();
        let n = bytes.len().min(room);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), start, n);
        std::ptr::write_bytes(start.add(n), 0, room + 1 - n);
    }
}

/// The main server, for walking the server list in a forked daemon.
static MAIN_SERVER_FOR_CHILD: AtomicPtr<ffi::server_rec> = AtomicPtr::new(ptr::null_mut());

unsafe extern "C" fn child_init(_pchild: *mut ffi::apr_pool_t, _s: *mut ffi::server_rec) {
    guarded((), supervisor::close_listeners_in_worker);
}
