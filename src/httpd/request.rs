//! The request path in an Apache worker: `translate_name` maps WSGIScriptAlias URLs to their
//! script, `handler` checks the script, picks the daemon group, builds the environ and hands
//! the request to `proxy::forward`, with `ApacheClient` as its view of the client.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::io::{self, IoSlice};
use std::sync::{Mutex, OnceLock};

use super::ffi;
use super::log::request_log;
use super::module::{guarded, module_config};
use super::pool::{cstr_bytes, cstr_lossy, cstring, pstrdup};
use crate::config::{match_prefix, AliasMatch, DirConfig, ServerConfig};
use crate::daemon::GroupRuntime;
use crate::logging::Level;
use crate::proxy::{self, Client, ClientError, Outcome, Pool, ProxyError, Target};
use crate::{daemon, route, wire};

const ALIAS_NOTE: &std::ffi::CStr = c"mod_wsgi.script_alias";

/// The translate_name hook: maps WSGIScriptAlias URLs to their script.
///
/// # Safety
/// Called by httpd with a live request.
pub unsafe extern "C" fn translate_name(r: *mut ffi::request_rec) -> c_int {
    // SAFETY: httpd passes a live request.
    guarded(ffi::DECLINED, || unsafe { translate(r) })
}

/// # Safety
/// Live request.
unsafe fn translate(r: *mut ffi::request_rec) -> c_int {
    // SAFETY: live request; our server config slot holds a ServerConfig.
    unsafe {
        let uri_ptr = (*r).uri;
        if uri_ptr.is_null() || *uri_ptr != b'/' as c_char {
            return ffi::DECLINED;
        }
        let uri = cstr_bytes(uri_ptr);
        let config = &*module_config::<ServerConfig>((*(*r).server).module_config);
        for (index, alias) in config.script_aliases.iter().enumerate() {
            let filename = match &alias.matcher {
                AliasMatch::Prefix(location) => match match_prefix(location, uri) {
                    Some(len) => [alias.script.as_bytes(), &uri[len..]].concat(),
                    None => continue,
                },
                AliasMatch::Regex { compiled, .. } => {
                    let mut matches = [ffi::ap_regmatch_t {
                        rm_so: -1,
                        rm_eo: -1,
                    }; 10];
                    let regex = *compiled as *const ffi::ap_regex_t;
                    if ffi::ap_regexec(regex, uri_ptr, matches.len(), matches.as_mut_ptr(), 0) != 0
                    {
                        continue;
                    }
                    let script = cstring(&alias.script);
                    let found = ffi::ap_pregsub(
                        (*r).pool,
                        script.as_ptr(),
                        uri_ptr,
                        matches.len(),
                        matches.as_mut_ptr(),
                    );
                    if found.is_null() {
                        continue;
                    }
                    let end = usize::try_from(matches[0].rm_eo)
                        .unwrap_or(0)
                        .min(uri.len());
                    [cstr_bytes(found), &uri[end..]].concat()
                }
            };
            (*r).filename = pstrdup((*r).pool, &filename);
            (*r).handler = c"wsgi-script".as_ptr();
            let note = cstring(&index.to_string());
            ffi::apr_table_set((*r).notes, ALIAS_NOTE.as_ptr(), note.as_ptr());
            return ffi::OK as c_int;
        }
        ffi::DECLINED
    }
}

/// The content handler for `wsgi-script`.
///
/// # Safety
/// Called by httpd with a live request.
pub unsafe extern "C" fn handler(r: *mut ffi::request_rec) -> c_int {
    // SAFETY: httpd passes a live request.
    guarded(ffi::HTTP_INTERNAL_SERVER_ERROR as c_int, || unsafe {
        handle(r)
    })
}

fn fail(r: *mut ffi::request_rec, status: u32, message: &str) -> c_int {
    // SAFETY: live request for the duration of the handler.
    unsafe { request_log(r, Level::Error, message) };
    status as c_int
}

/// # Safety
/// Live request.
unsafe fn handle(r: *mut ffi::request_rec) -> c_int {
    // SAFETY: the request, its tables and configs are live for the whole handler call.
    unsafe {
        let handler = cstr_bytes((*r).handler);
        if handler != b"wsgi-script" && handler != b"application/x-httpd-wsgi" {
            return ffi::DECLINED;
        }
        let script = cstr_lossy((*r).filename);
        let server_config = &*module_config::<ServerConfig>((*(*r).server).module_config);
        let alias = {
            let note = ffi::apr_table_get((*r).notes, ALIAS_NOTE.as_ptr());
            std::str::from_utf8(cstr_bytes(note))
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|i| server_config.script_aliases.get(i))
        };
        if alias.is_none() && (ffi::ap_allow_options(r) & ffi::OPT_EXECCGI as c_int) == 0 {
            return fail(
                r,
                ffi::HTTP_FORBIDDEN,
                &format!("WSGIRS0601: Options ExecCGI is off in this directory: {script}"),
            );
        }
        match (*r).finfo.filetype {
            ffi::apr_filetype_e_APR_NOFILE => {
                return fail(
                    r,
                    ffi::HTTP_NOT_FOUND,
                    &format!(
                        "WSGIRS0602: Target WSGI script not found or unable to stat: {script}"
                    ),
                );
            }
            ffi::apr_filetype_e_APR_DIR => {
                return fail(
                    r,
                    ffi::HTTP_FORBIDDEN,
                    &format!(
                        "WSGIRS0603: Attempt to invoke directory as WSGI application: {script}"
                    ),
                );
            }
            _ => {}
        }

        let dir = &*module_config::<DirConfig>((*r).per_dir_config);
        let options = alias.map(|a| &a.options);
        let group_value = options
            .and_then(|o| o.process_group.clone())
            .or_else(|| dir.process_group.clone())
            .unwrap_or_default();
        let Some(registry) = daemon::registry() else {
            return fail(
                r,
                ffi::HTTP_SERVICE_UNAVAILABLE,
                "WSGIRS0604: No daemon process groups are running in this Apache generation.",
            );
        };
        let server_name = cstr_lossy((*(*r).server).server_hostname);
        let vars = ApacheVars { r };
        let request = route::RouteRequest {
            configured: &group_value,
            restrict: dir.restrict.as_ref(),
            server_name: &server_name,
            script: &script,
        };
        let group = match route::select(&registry, &request, &vars) {
            Ok((group, _)) => group,
            Err(err) => return fail(r, u32::from(err.status()), &err.to_string()),
        };

        // script-user / script-group: only scripts owned by the named account may run here.
        let (owner_uid, owner_gid) = ((*r).finfo.user, (*r).finfo.group);
        if let Some(account) = &group.spec.script_user {
            if owner_uid != account.uid {
                return fail(r, ffi::HTTP_FORBIDDEN, &format!(
                    "WSGIRS0605: Script '{script}' is owned by uid {owner_uid}, but daemon process group '{}' \
                     only runs scripts of script-user '{}' (uid {}).",
                    group.spec.name, account.name, account.uid
                ));
            }
        }
        if let Some(required) = &group.spec.script_group {
            if owner_gid != required.gid {
                return fail(r, ffi::HTTP_FORBIDDEN, &format!(
                    "WSGIRS0606: Script '{script}' belongs to gid {owner_gid}, but daemon process group '{}' \
                     only runs scripts of script-group '{}' (gid {}).",
                    group.spec.name, required.name, required.gid
                ));
            }
        }

        let chunked_ok = dir.chunked_request.unwrap_or(false);
        let policy = if chunked_ok {
            ffi::REQUEST_CHUNKED_DECHUNK
        } else {
            ffi::REQUEST_CHUNKED_ERROR
        };
        let status = ffi::ap_setup_client_block(r, policy as c_int);
        if status != ffi::OK as c_int {
            return status;
        }

        let callable = options
            .and_then(|o| o.callable_object.clone())
            .unwrap_or_else(|| dir.callable_object().to_string());
        let application_group_value = options
            .and_then(|o| o.application_group.clone())
            .or_else(|| dir.application_group.clone())
            .unwrap_or_else(|| "%{RESOURCE}".to_string());
        let application_group = route::expand(&application_group_value, &vars).name;
        let pass_authorization = options
            .and_then(|o| o.pass_authorization)
            .or(dir.pass_authorization)
            .unwrap_or(false);
        let Some(secret) = daemon::origin::secret_for(group.index) else {
            return fail(
                r,
                ffi::HTTP_INTERNAL_SERVER_ERROR,
                "WSGIRS0607: No origin secret for this daemon group.",
            );
        };
        // When the request reached us: the daemon measures queue-timeout from here.
        let queue_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros().to_string())
            .unwrap_or_default();
        let environ = build_environ(
            r,
            &secret,
            &[
                ("mod_wsgi.queue_start", queue_start.as_str()),
                ("mod_wsgi.process_group", group.spec.name.as_str()),
                ("mod_wsgi.application_group", application_group.as_str()),
                ("mod_wsgi.callable_object", callable.as_str()),
                (
                    "mod_wsgi.script_reloading",
                    if dir.script_reloading() { "1" } else { "0" },
                ),
            ],
            pass_authorization,
        );

        let target = Target {
            group: &group.spec.name,
            socket_path: &group.socket_path,
            script: &script,
            connect_timeout: group.spec.connect_timeout,
            socket_timeout: group.socket_timeout,
            header_buffer_size: group.spec.header_buffer_size,
            pool: pool_for(group),
            load: group.load,
        };
        let mut client = ApacheClient {
            r,
            redirect: None,
            brigade: std::ptr::null_mut(),
            input: std::ptr::null_mut(),
        };
        match proxy::forward(&target, &environ, &mut client) {
            Ok(Outcome::Completed) => match client.redirect {
                Some(location) => internal_redirect(r, &location),
                None => ffi::OK as c_int,
            },
            Ok(Outcome::DaemonStatus(status)) => c_int::from(status),
            Err(err) => report(r, &err),
        }
    }
}

/// This Apache child's idle connections, one pool per group of the registry it was forked
/// with (a child never sees another generation).
static POOLS: OnceLock<Vec<Pool>> = OnceLock::new();

fn pool_for(group: &GroupRuntime) -> Option<&'static Pool> {
    let pools = POOLS.get_or_init(|| {
        let capacity = threads_per_child();
        // The child's first daemon request: from now on it may have memory to give back.
        proxy::watch_quiet(kept_pools);
        daemon::registry()
            .map(|registry| {
                registry
                    .groups
                    .iter()
                    .map(|g| Pool::new(&g.socket_path, capacity))
                    .collect()
            })
            .unwrap_or_default()
    });
    pools.get(group.index)
}

/// This child's pools, once its first request made them (none before).
pub(crate) fn kept_pools() -> &'static [Pool] {
    POOLS.get().map(Vec::as_slice).unwrap_or(&[])
}

/// The MPM's ThreadsPerChild: no child ever needs more idle connections per group.
fn threads_per_child() -> usize {
    let mut threads: c_int = 0;
    // SAFETY: ap_mpm_query writes one int for AP_MPMQ_MAX_THREADS.
    let status = unsafe { ffi::ap_mpm_query(ffi::AP_MPMQ_MAX_THREADS as c_int, &mut threads) };
    if status == ffi::APR_SUCCESS as c_int && threads > 0 {
        usize::try_from(threads).unwrap_or(64)
    } else {
        64
    }
}

fn report(r: *mut ffi::request_rec, err: &ProxyError) -> c_int {
    // SAFETY: live request for the handler's duration.
    unsafe { request_log(r, err.log_level(), &err.to_string()) };
    if err.headers_sent() {
        // The status line is gone: cut the connection so the client sees an incomplete
        // response instead of a clean, short one.
        // SAFETY: live request and connection. What was produced goes out first (the status
        // line and the partial body), then the connection is cut so the client cannot take
        // the short response for a complete one.
        unsafe {
            ffi::ap_rflush(r);
            let c = (*r).connection;
            (*c).keepalive = ffi::ap_conn_keepalive_e_AP_CONN_CLOSE;
            (*c).aborted = 1;
        }
        ffi::OK as c_int
    } else {
        c_int::from(err.status())
    }
}

/// The directories whose .htaccess files Apache applied to this request (for audit lines).
///
/// # Safety
/// Live request.
unsafe fn htaccess_dirs(r: *mut ffi::request_rec) -> Vec<String> {
    let mut dirs = Vec::new();
    // SAFETY: r->htaccess is Apache's list of parsed .htaccess results for this request,
    // allocated in a pool that outlives it.
    unsafe {
        let mut entry = (*r).htaccess;
        while !entry.is_null() {
            if !(*entry).htaccess.is_null() {
                dirs.push(cstr_lossy((*entry).dir));
            }
            entry = (*entry).next;
        }
    }
    dirs.reverse();
    dirs
}

/// The request as `%{…}` templates see it.
struct ApacheVars {
    r: *mut ffi::request_rec,
}

impl ApacheVars {
    fn table_get(&self, table: *mut ffi::apr_table_t, name: &str) -> Option<String> {
        let key = cstring(name);
        // SAFETY: a live request table; the value (if any) is a pool string.
        let value = unsafe { ffi::apr_table_get(table, key.as_ptr()) };
        // SAFETY: NULL or a NUL-terminated pool string.
        (!value.is_null()).then(|| unsafe { cstr_lossy(value) })
    }

    /// `name` plus `:port` unless the port is 80 or 443.
    fn with_port(&self, name: String) -> String {
        // SAFETY: live request.
        let port = unsafe { ffi::ap_get_server_port(self.r) };
        if port == 80 || port == 443 || port == 0 {
            name
        } else {
            format!("{name}:{port}")
        }
    }
}

impl route::RequestVars for ApacheVars {
    fn note(&self, name: &str) -> Option<String> {
        // SAFETY: live request.
        self.table_get(unsafe { (*self.r).notes }, name)
    }

    fn request_env(&self, name: &str) -> Option<String> {
        // SAFETY: live request.
        self.table_get(unsafe { (*self.r).subprocess_env }, name)
    }

    fn server(&self) -> String {
        // SAFETY: live request and server.
        self.with_port(unsafe { cstr_lossy((*(*self.r).server).server_hostname) })
    }

    fn host(&self) -> String {
        // SAFETY: live request; hostname is the Host header's name (or the server's).
        self.with_port(unsafe { cstr_lossy((*self.r).hostname) })
    }

    fn script_name(&self) -> String {
        // SAFETY: live request.
        let (uri, path_info) =
            unsafe { (cstr_lossy((*self.r).uri), cstr_lossy((*self.r).path_info)) };
        uri.strip_suffix(path_info.as_str())
            .unwrap_or(&uri)
            .to_string()
    }

    fn htaccess_dirs(&self) -> Vec<String> {
        // SAFETY: live request.
        unsafe { htaccess_dirs(self.r) }
    }
}

/// The CGI environment Apache computes, plus our extra keys, as a wire pairs payload.
///
/// The payload is allocated once at its exact size: it lives as long as the request, and a
/// generous guess per request is memory every malloc arena of the child keeps touched.
///
/// # Safety
/// Live request.
unsafe fn build_environ(
    r: *mut ffi::request_rec,
    secret: &daemon::origin::Secret,
    extra: &[(&str, &str)],
    pass_authorization: bool,
) -> Vec<u8> {
    // SAFETY: live request; the table's entries are NUL-terminated pool strings, which live
    // as long as the request, so beyond this call.
    let (table, authorization) = unsafe {
        ffi::ap_add_common_vars(r);
        ffi::ap_add_cgi_vars(r);
        let elts = ffi::apr_table_elts((*r).subprocess_env);
        let count = usize::try_from((*elts).nelts).unwrap_or(0);
        let entries: &[ffi::apr_table_entry_t] = if count == 0 || (*elts).elts.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts((*elts).elts.cast::<ffi::apr_table_entry_t>(), count)
        };
        let authorization = if pass_authorization {
            let value = ffi::apr_table_get((*r).headers_in, c"Authorization".as_ptr());
            (!value.is_null()).then(|| cstr_bytes(value))
        } else {
            None
        };
        (entries, authorization)
    };
    let pairs = || {
        // The origin secret goes first, under the empty key (see daemon::origin).
        std::iter::once((daemon::origin::SECRET_KEY, &secret[..]))
            .chain(
                table
                    .iter()
                    .filter(|entry| !entry.key.is_null())
                    // SAFETY: non-null entries of a live table are NUL-terminated strings.
                    .map(|entry| unsafe { (cstr_bytes(entry.key), cstr_bytes(entry.val)) }),
            )
            .chain(authorization.map(|value| (&b"HTTP_AUTHORIZATION"[..], value)))
            .chain(extra.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    };
    // Two passes over the table: measuring its ~30 short strings twice costs less than the
    // reallocations of a growing payload, or a list of the pairs to measure them once.
    let len = pairs().map(|(key, value)| wire::pair_len(key, value)).sum();
    let mut payload = Vec::with_capacity(len);
    for (key, value) in pairs() {
        wire::push_pair(&mut payload, key, value);
    }
    payload
}

/// The most one read of the client's body asks the input filters for. They gather what the
/// client has sent in 8000-byte buckets, which go back to the connection's allocator and stay
/// there (up to MaxMemFree): asking for a whole body slot at once made every connection that
/// carried an upload keep ~256 KiB of them.
const BODY_READ_MAX: usize = 64 * 1024;

/// The client side of a request, as the proxy sees it.
struct ApacheClient {
    r: *mut ffi::request_rec,
    /// A 200 response with a local `Location: /path`: as mod_cgi, Apache serves that path
    /// instead (an internal redirect), and the app's own body is discarded.
    redirect: Option<Vec<u8>>,
    /// For handing response pieces to the output filters; made at the first piece.
    brigade: *mut ffi::apr_bucket_brigade,
    /// For reading the request body; made at the first read.
    input: *mut ffi::apr_bucket_brigade,
}

/// APR's text for a status (an errno or one of APR's own codes).
fn apr_error_text(status: ffi::apr_status_t) -> String {
    let mut buf = [0 as c_char; 256];
    // SAFETY: apr_strerror writes at most buf.len() bytes, NUL-terminated, and returns buf.
    let text = unsafe { ffi::apr_strerror(status, buf.as_mut_ptr(), buf.len()) };
    let text = if text.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated string in buf (or a static one APR returns).
        unsafe { cstr_lossy(text) }
    };
    format!("{text} (APR status {status})")
}

/// mod_cgi's local redirect: the request becomes a GET for `location`.
fn internal_redirect(r: *mut ffi::request_rec, location: &[u8]) -> c_int {
    // SAFETY: live request; the location is copied into the request pool.
    unsafe {
        ffi::ap_discard_request_body(r);
        (*r).method = c"GET".as_ptr();
        (*r).method_number = ffi::M_GET as c_int;
        ffi::apr_table_unset((*r).headers_in, c"Content-Length".as_ptr());
        ffi::ap_internal_redirect_handler(pstrdup((*r).pool, location), r);
    }
    ffi::OK as c_int
}

impl Client for ApacheClient {
    fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, ClientError> {
        let mut filled = 0;
        self.read_pieces(buf.len(), &mut |pieces| {
            for piece in pieces {
                let n = piece.len().min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&piece[..n]);
                filled += n;
            }
            Ok(())
        })?;
        Ok(filled)
    }

    fn send_headers(
        &mut self,
        status: &[u8],
        headers: &[(&[u8], &[u8])],
    ) -> Result<(), ProxyError> {
        let code = std::str::from_utf8(status.get(..3).unwrap_or(b"500"))
            .ok()
            .and_then(|s| s.parse::<c_int>().ok())
            .unwrap_or(500);
        if code == 200 {
            let local = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(b"Location"))
                .filter(|(_, value)| value.starts_with(b"/"));
            if let Some((_, location)) = local {
                self.redirect = Some(location.to_vec());
                return Ok(());
            }
        }
        // SAFETY: live request; every string is copied into the request pool.
        unsafe {
            let r = self.r;
            (*r).status = code;
            (*r).status_line = pstrdup((*r).pool, status);
            for (name, value) in headers {
                let value_c = pstrdup((*r).pool, value);
                if name.eq_ignore_ascii_case(b"Content-Type") {
                    ffi::ap_set_content_type(r, value_c);
                } else if name.eq_ignore_ascii_case(b"Transfer-Encoding")
                    || name.eq_ignore_ascii_case(b"Connection")
                {
                    // Hop-by-hop: Apache owns the connection and its framing.
                } else if name.eq_ignore_ascii_case(b"Content-Length") {
                    // One value (the relay checked that repeats agree).
                    ffi::apr_table_set((*r).headers_out, c"Content-Length".as_ptr(), value_c);
                } else {
                    ffi::apr_table_add((*r).headers_out, pstrdup((*r).pool, name), value_c);
                }
            }
        }
        Ok(())
    }

    fn write_body(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if self.redirect.is_some() {
            return Ok(());
        }
        let len =
            c_int::try_from(data.len()).map_err(|_| ClientError::Gone("chunk too large".into()))?;
        // SAFETY: live request; data valid for len bytes.
        let written = unsafe { ffi::ap_rwrite(data.as_ptr().cast(), len, self.r) };
        if written < 0 {
            Err(ClientError::Gone("the client closed the connection".into()))
        } else {
            Ok(())
        }
    }

    /// The piece becomes a heap bucket that owns it: the output filters keep it, without a
    /// copy, until it is written, and then `free_piece` gives it back.
    fn write_piece(&mut self, piece: Box<[u8]>, len: usize) -> Result<(), ClientError> {
        if self.redirect.is_some() || piece.len() != proxy::PIECE {
            proxy::give_back_piece(piece);
            return Ok(());
        }
        let len = len.min(piece.len());
        let data = Box::into_raw(piece).cast::<u8>();
        // SAFETY: the bucket takes the piece over: free_piece rebuilds the box from the same
        // pointer and length (PIECE, checked above) once Apache is done with it.
        unsafe { self.pass_owned(data, len, free_piece) }
    }

    /// Reads straight into the shared body slot: the client's bytes are copied once, by
    /// Apache, on their way to the daemon.
    fn read_body_into(
        &mut self,
        slot: proxy::BodySlot<'_>,
        offset: usize,
        max: usize,
    ) -> Result<usize, ClientError> {
        // Written with pwritev, not through Apache's mapping of the region: the slot's pages
        // then never count in this child's memory.
        let max = max
            .min(proxy::BodySlot::LEN.saturating_sub(offset))
            .min(BODY_READ_MAX);
        let mut written = 0;
        self.read_pieces(max, &mut |pieces| {
            written = slot.write_at(offset, pieces)?;
            Ok(())
        })?;
        Ok(written)
    }

    /// Hands the data slot to the output filters as a heap bucket, without a copy; the
    /// lease, kept in `SLOT_LEASES` under the slot's address, is dropped by `free_slot` once
    /// Apache is done with the bytes, which hands the slot back to the daemon.
    fn write_slot(&mut self, lease: proxy::SlotLease, len: usize) -> Result<(), ClientError> {
        if self.redirect.is_some() {
            return Ok(());
        }
        let len = len.min(proxy::SlotLease::LEN);
        let data = lease.as_ptr().cast_mut();
        slot_leases().insert(data as usize, lease);
        // SAFETY: the bytes stay mapped, and unchanged by the daemon, while the lease is
        // held, and free_slot drops the lease once, when the bucket is destroyed.
        unsafe { self.pass_owned(data, len, free_slot) }
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        if self.redirect.is_some() {
            return Ok(());
        }
        // SAFETY: live request.
        if unsafe { ffi::ap_rflush(self.r) } < 0 {
            Err(ClientError::Gone("the client closed the connection".into()))
        } else {
            Ok(())
        }
    }
}

/// A heap bucket's free function for the pieces `write_piece` hands over.
///
/// # Safety
/// `data` must come from `Box::into_raw` on a `Box<[u8]>` of `proxy::PIECE` bytes, once.
unsafe extern "C" fn free_piece(data: *mut std::ffi::c_void) {
    let slice = std::ptr::slice_from_raw_parts_mut(data.cast::<u8>(), proxy::PIECE);
    // SAFETY: see above: this is the box write_piece let go of, with its length.
    let piece = unsafe { Box::from_raw(slice) };
    guarded((), || proxy::give_back_piece(piece));
}

/// The leases of the data slots Apache's output filters are sending from, by slot address.
fn slot_leases() -> std::sync::MutexGuard<'static, HashMap<usize, proxy::SlotLease>> {
    static LEASES: OnceLock<Mutex<HashMap<usize, proxy::SlotLease>>> = OnceLock::new();
    LEASES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A heap bucket's free function for the data slots `write_slot` hands over: gives the slot
/// back to its daemon.
///
/// # Safety
/// `data` must be the address of a slot `write_slot` registered, once.
unsafe extern "C" fn free_slot(data: *mut std::ffi::c_void) {
    guarded((), || {
        // Taken out under the lock, dropped after it: the drop may wake the daemon.
        let lease = slot_leases().remove(&(data as usize));
        drop(lease);
    });
}

impl ApacheClient {
    /// Passes `len` bytes at `data` to the output filters as a heap bucket, without a copy;
    /// `free` is called with `data` once Apache is done with them (at once if the bucket
    /// cannot be made).
    ///
    /// # Safety
    /// `data` must stay valid for `len` bytes until `free(data)` is called, which gives it
    /// back; nothing else may free it.
    unsafe fn pass_owned(
        &mut self,
        data: *mut u8,
        len: usize,
        free: unsafe extern "C" fn(*mut std::ffi::c_void),
    ) -> Result<(), ClientError> {
        // SAFETY: live request and connection; the brigade lives in the request pool; the
        // caller guarantees `data` until `free`.
        unsafe {
            let r = self.r;
            let alloc = (*(*r).connection).bucket_alloc;
            if self.brigade.is_null() {
                self.brigade = ffi::apr_brigade_create((*r).pool, alloc);
            }
            let bucket = ffi::apr_bucket_heap_create(data.cast(), len, Some(free), alloc);
            if bucket.is_null() {
                free(data.cast());
                return Err(ClientError::Gone("no memory for an output bucket".into()));
            }
            ffi::brigade_insert_tail(self.brigade, bucket);
            let status = ffi::ap_pass_brigade((*r).output_filters, self.brigade);
            ffi::apr_brigade_cleanup(self.brigade.cast());
            if status == ffi::APR_SUCCESS as ffi::apr_status_t {
                Ok(())
            } else {
                Err(ClientError::Gone("the client closed the connection".into()))
            }
        }
    }

    /// One read of the client's body through the input filters, as ap_get_client_block does
    /// it (at most `max` bytes: what the client had sent, or at least one socket read), but
    /// the bytes go to `sink` where they lie in Apache's buckets instead of being flattened
    /// into a buffer first. `sink` gets them all at once, in order.
    fn read_pieces(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ClientError> {
        if max == 0 || !self.started_body() {
            return Ok(());
        }
        // SAFETY: live request and connection; the brigade lives in the request pool and is
        // emptied before this returns, so no bucket outlives the slices made from it.
        unsafe {
            let r = self.r;
            // ap_get_client_block's own end: the last read saw EOS.
            if (*r).remaining < 0 || ((*r).read_chunked == 0 && (*r).remaining == 0) {
                return Ok(());
            }
            let alloc = (*(*r).connection).bucket_alloc;
            if self.input.is_null() {
                self.input = ffi::apr_brigade_create((*r).pool, alloc);
            }
            let bb = self.input;
            let status = ffi::ap_get_brigade(
                (*r).input_filters,
                bb,
                ffi::ap_input_mode_t_AP_MODE_READBYTES,
                ffi::apr_read_type_e_APR_BLOCK_READ,
                ffi::apr_off_t::try_from(max).unwrap_or(ffi::apr_off_t::MAX),
            );
            if status != ffi::APR_SUCCESS as ffi::apr_status_t {
                ffi::apr_brigade_cleanup(bb.cast());
                return Err(self.body_read_failed(status));
            }
            let mut pieces: Vec<IoSlice<'_>> = Vec::new();
            let mut eos = false;
            let mut room = max;
            let mut e = (*bb).list.next;
            while e != ffi::brigade_sentinel(bb) {
                if ffi::bucket_is_eos(e) {
                    eos = true;
                    break;
                }
                if !ffi::bucket_is_metadata(e) {
                    match ffi::bucket_read(e, ffi::apr_read_type_e_APR_BLOCK_READ) {
                        Ok((data, len)) if len > 0 && room > 0 => {
                            let len = len.min(room);
                            room -= len;
                            pieces.push(IoSlice::new(std::slice::from_raw_parts(data, len)));
                        }
                        Ok(_) => {}
                        Err(status) => {
                            ffi::apr_brigade_cleanup(bb.cast());
                            return Err(self.body_read_failed(status));
                        }
                    }
                }
                e = (*e).link.next;
            }
            let sunk = sink(&pieces);
            let total = max - room;
            drop(pieces);
            ffi::apr_brigade_cleanup(bb.cast());
            if eos {
                // Left for the next read, as ap_get_client_block does: the body has ended.
                (*r).remaining = if (*r).read_chunked != 0 { -1 } else { 0 };
            }
            (*r).read_length += total as ffi::apr_off_t;
            sunk.map_err(proxy::region_write_failed)
        }
    }

    /// A failed read of the client's body. As ap_get_client_block does, the client gets the
    /// matching error response from Apache itself (413 for LimitRequestBody, 408 for a
    /// timeout, 400 for bad chunking) unless a filter answered already, and the connection
    /// is not kept.
    fn body_read_failed(&mut self, status: ffi::apr_status_t) -> ClientError {
        let detail = apr_error_text(status);
        // SAFETY: live request and connection; the brigade is empty and in the request pool.
        unsafe {
            let r = self.r;
            if status != ffi::AP_FILTER_ERROR {
                let alloc = (*(*r).connection).bucket_alloc;
                let code = ffi::ap_map_http_request_error(status, ffi::HTTP_BAD_REQUEST as c_int);
                let bb = self.input;
                let error = ffi::ap_bucket_error_create(code, std::ptr::null(), (*r).pool, alloc);
                if !error.is_null() {
                    ffi::brigade_insert_tail(bb, error);
                    ffi::brigade_insert_tail(bb, ffi::apr_bucket_eos_create(alloc));
                    ffi::ap_pass_brigade((*r).output_filters, bb);
                    ffi::apr_brigade_cleanup(bb.cast());
                }
            }
            (*(*r).connection).keepalive = ffi::ap_conn_keepalive_e_AP_CONN_CLOSE;
        }
        if status == ffi::APR_TIMEUP as ffi::apr_status_t
            || status == ffi::APR_ETIMEDOUT as ffi::apr_status_t
        {
            ClientError::Timeout(detail)
        } else {
            ClientError::Read(detail)
        }
    }

    /// True when there is a body to read (ap_should_client_block also sends "100 Continue").
    fn started_body(&self) -> bool {
        // SAFETY: live request.
        unsafe {
            ffi::ap_should_client_block(self.r) != 0
                || (*self.r).remaining > 0
                || (*self.r).read_chunked != 0
        }
    }
}
