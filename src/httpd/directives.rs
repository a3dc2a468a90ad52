//! The command table. Each trampoline converts httpd's arguments to Rust strings, calls the
//! parsers in `config/`, stores the result in our pool-owned config, and returns the parser's
//! message (which names the directive, the value and what is allowed) on error.

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::ptr;

use super::ffi;
use super::module::{guarded, module_config, server_key};
use super::pool::{cstr_lossy, cstring, pstrdup};
use crate::config::daemon_process::{parse_daemon_process, split_raw_args, SystemAccounts};
use crate::config::restrict::RestrictList;
use crate::config::script_alias::{parse_on_off, parse_script_alias};
use crate::config::{self, AliasMatch, DefinedGroup, DirConfig, ScriptAlias, ServerConfig};

type Take1 = unsafe extern "C" fn(*mut ffi::cmd_parms, *mut c_void, *const c_char) -> *const c_char;
type RawArgs =
    unsafe extern "C" fn(*mut ffi::cmd_parms, *mut c_void, *const c_char) -> *const c_char;

/// The command table Apache reads (NULL-terminated). Raw pointers to static strings only.
#[repr(transparent)]
pub struct CommandTable(pub [ffi::command_rec; 16]);

// SAFETY: the table is immutable and holds pointers to static, immutable C strings only.
unsafe impl Sync for CommandTable {}

const fn take1(
    name: &'static std::ffi::CStr,
    func: Take1,
    how: u32,
    help: &'static std::ffi::CStr,
) -> ffi::command_rec {
    ffi::command_rec {
        name: name.as_ptr(),
        func: ffi::cmd_func { take1: Some(func) },
        cmd_data: ptr::null_mut(),
        req_override: how as c_int,
        args_how: ffi::cmd_how_TAKE1,
        errmsg: help.as_ptr(),
    }
}

const fn raw(
    name: &'static std::ffi::CStr,
    func: RawArgs,
    how: u32,
    help: &'static std::ffi::CStr,
) -> ffi::command_rec {
    ffi::command_rec {
        name: name.as_ptr(),
        func: ffi::cmd_func {
            raw_args: Some(func),
        },
        cmd_data: ptr::null_mut(),
        req_override: how as c_int,
        args_how: ffi::cmd_how_RAW_ARGS,
        errmsg: help.as_ptr(),
    }
}

const SERVER: u32 = ffi::RSRC_CONF;
const DIR: u32 = ffi::RSRC_CONF | ffi::ACCESS_CONF;

pub static COMMANDS: CommandTable = CommandTable([
    raw(
        c"WSGIDaemonProcess",
        directive_raw,
        SERVER,
        c"Define a daemon process group: name [option=value ...].",
    ),
    take1(
        c"WSGIProcessGroup",
        directive_take1,
        DIR,
        c"Name of the daemon process group to run scripts in.",
    ),
    raw(
        c"WSGIImportScript",
        directive_raw,
        SERVER,
        c"Load a script when a group's daemons start: file process-group=NAME [application-group=NAME].",
    ),
    raw(
        c"WSGIRestrictProcess",
        directive_raw,
        DIR,
        c"The daemon process groups that may be selected here: name ...",
    ),
    take1(
        c"WSGIApplicationGroup",
        directive_take1,
        DIR,
        c"Name of the application group scripts are reported in.",
    ),
    raw(
        c"WSGIScriptAlias",
        directive_raw,
        SERVER,
        c"Map a URL to a WSGI script: URL-path file [option=value ...].",
    ),
    raw(
        c"WSGIScriptAliasMatch",
        directive_raw,
        SERVER,
        c"Map URLs matching a regex to a WSGI script: regex file [option=value ...].",
    ),
    take1(
        c"WSGISocketPrefix",
        directive_take1,
        SERVER,
        c"Path prefix for the daemon sockets.",
    ),
    take1(
        c"WSGICallableObject",
        directive_take1,
        DIR | ffi::OR_FILEINFO,
        c"Name of the WSGI application object in the script.",
    ),
    take1(
        c"WSGIScriptReloading",
        directive_take1,
        DIR | ffi::OR_FILEINFO,
        c"On | Off: reload scripts whose file changed.",
    ),
    take1(
        c"WSGIPassAuthorization",
        directive_take1,
        DIR | ffi::OR_AUTHCFG,
        c"On | Off: pass HTTP_AUTHORIZATION to the application.",
    ),
    take1(
        c"WSGIChunkedRequest",
        directive_take1,
        DIR | ffi::OR_FILEINFO,
        c"On | Off: accept chunked request bodies.",
    ),
    take1(
        c"WSGIPythonHome",
        directive_take1,
        SERVER,
        c"Python home (virtual environment) for daemon processes.",
    ),
    take1(
        c"WSGIPythonPath",
        directive_take1,
        SERVER,
        c"Extra ':'-separated sys.path entries for daemon processes.",
    ),
    take1(
        c"WSGIRestrictEmbedded",
        directive_take1,
        SERVER,
        c"On | Off: refuse embedded mode (always refused for now).",
    ),
    // SAFETY-free zero: Apache stops at the entry whose name is NULL.
    ffi::command_rec {
        name: ptr::null(),
        func: ffi::cmd_func { take1: None },
        cmd_data: ptr::null_mut(),
        req_override: 0,
        args_how: ffi::cmd_how_RAW_ARGS,
        errmsg: ptr::null(),
    },
]);

/// What a directive may change, borrowed from httpd for the duration of one call.
struct Target<'a> {
    dir: &'a mut DirConfig,
    key: config::ServerKey,
    cmd: *mut ffi::cmd_parms,
}

impl Target<'_> {
    /// The server's config, for server-context directives only: `.htaccess` files are read
    /// by many worker threads at once and must never get a mutable view of it.
    fn server(&mut self) -> &mut ServerConfig {
        // SAFETY: only called from RSRC_CONF directives, which Apache processes while reading
        // the main configuration, in one thread; the slot holds our ServerConfig.
        unsafe { &mut *module_config::<ServerConfig>((*(*self.cmd).server).module_config) }
    }
}

/// # Safety
/// `cmd` and `mconfig` as passed by httpd to a directive function of this module.
unsafe fn with_target(
    cmd: *mut ffi::cmd_parms,
    mconfig: *mut c_void,
    f: impl FnOnce(&str, &mut Target<'_>) -> Result<(), String>,
) -> *const c_char {
    let outcome = guarded(
        Err("WSGIRS0002: internal error while reading this directive".to_string()),
        || {
            // SAFETY: httpd passes live cmd_parms; mconfig is our DirConfig for this section and
            // the server's slot holds our ServerConfig.
            unsafe {
                let name = cstr_lossy((*(*cmd).cmd).name);
                let mut target = Target {
                    dir: &mut *mconfig.cast::<DirConfig>(),
                    key: server_key((*cmd).server),
                    cmd,
                };
                f(&name, &mut target)
            }
        },
    );
    match outcome {
        Ok(()) => ptr::null(),
        // SAFETY: the message is copied into the command's pool, which outlives the report.
        Err(message) => unsafe { pstrdup((*cmd).pool, message.as_bytes()) },
    }
}

/// Apache's own context rule for global-only directives ("cannot occur within …").
fn check_global(target: &Target<'_>) -> Result<(), String> {
    // SAFETY: live cmd_parms for this call.
    let err = unsafe { ffi::ap_check_cmd_context(target.cmd, ffi::GLOBAL_ONLY) };
    if err.is_null() {
        Ok(())
    } else {
        // SAFETY: Apache returns a pool string.
        Err(unsafe { cstr_lossy(err) })
    }
}

unsafe extern "C" fn directive_take1(
    cmd: *mut ffi::cmd_parms,
    mconfig: *mut c_void,
    arg: *const c_char,
) -> *const c_char {
    // SAFETY: httpd passes a NUL-terminated argument.
    let value = unsafe { cstr_lossy(arg) };
    // SAFETY: forwarded httpd arguments.
    unsafe {
        with_target(cmd, mconfig, |name, target| {
            apply_take1(name, &value, target)
        })
    }
}

unsafe extern "C" fn directive_raw(
    cmd: *mut ffi::cmd_parms,
    mconfig: *mut c_void,
    args: *const c_char,
) -> *const c_char {
    // SAFETY: httpd passes the rest of the line, NUL-terminated.
    let line = unsafe { cstr_lossy(args) };
    // SAFETY: forwarded httpd arguments.
    unsafe { with_target(cmd, mconfig, |name, target| apply_raw(name, &line, target)) }
}

fn on_off(name: &str, value: &str) -> Result<Option<bool>, String> {
    parse_on_off(name, value)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn apply_take1(name: &str, value: &str, target: &mut Target<'_>) -> Result<(), String> {
    match name {
        "WSGIProcessGroup" => {
            if !value.contains("%{") {
                config::record_literal_selection(config::LiteralSelection {
                    group: value.to_string(),
                    location: directive_location(target.cmd),
                    server: target.key,
                });
            }
            target.dir.process_group = Some(value.to_string());
        }
        "WSGIApplicationGroup" => target.dir.application_group = Some(value.to_string()),
        "WSGICallableObject" => {
            if value.is_empty() {
                return Err("WSGIRS0180: WSGICallableObject needs the name of a Python object, e.g. application.".into());
            }
            target.dir.callable_object = Some(value.to_string());
        }
        "WSGIScriptReloading" => target.dir.script_reloading = on_off(name, value)?,
        "WSGIPassAuthorization" => target.dir.pass_authorization = on_off(name, value)?,
        "WSGIChunkedRequest" => target.dir.chunked_request = on_off(name, value)?,
        "WSGISocketPrefix" => {
            check_global(target)?;
            target.server().socket_prefix = Some(value.to_string());
        }
        "WSGIPythonHome" => {
            check_global(target)?;
            if !value.starts_with('/') {
                return Err(format!(
                    "WSGIRS0181: WSGIPythonHome '{value}': expected an absolute path."
                ));
            }
            target.server().python_home = Some(PathBuf::from(value));
        }
        "WSGIPythonPath" => {
            check_global(target)?;
            let entries: Vec<PathBuf> = value
                .split(':')
                .filter(|e| !e.is_empty())
                .map(PathBuf::from)
                .collect();
            if let Some(bad) = entries.iter().find(|e| !e.is_absolute()) {
                return Err(format!(
                    "WSGIRS0182: WSGIPythonPath '{value}': entry '{}' is not an absolute path.",
                    bad.display()
                ));
            }
            target.server().python_path = entries;
        }
        "WSGIRestrictEmbedded" => {
            check_global(target)?;
            on_off(name, value)?;
        }
        _ => return Err(format!("WSGIRS0003: unknown directive {name}")),
    }
    Ok(())
}

fn apply_raw(name: &str, line: &str, target: &mut Target<'_>) -> Result<(), String> {
    match name {
        "WSGIDaemonProcess" => {
            let words = split_raw_args(line, 1);
            let args: Vec<&str> = words.iter().map(String::as_str).collect();
            let spec = parse_daemon_process(&args, &SystemAccounts).map_err(|e| e.to_string())?;
            config::define_group(DefinedGroup {
                spec,
                server: target.key,
            })
            .map_err(|e| e.to_string())
        }
        "WSGIScriptAlias" | "WSGIScriptAliasMatch" => {
            let words = split_raw_args(line, 2);
            let args: Vec<&str> = words.iter().map(String::as_str).collect();
            let (location, script, options) =
                parse_script_alias(name, &args).map_err(|e| e.to_string())?;
            if let Some(group) = &options.process_group {
                config::check_literal_group(name, group, target.key, same_server_name)
                    .map_err(|e| e.to_string())?;
            }
            let matcher = if name == "WSGIScriptAliasMatch" {
                compile_regex(target, name, &location)?
            } else {
                AliasMatch::Prefix(location)
            };
            if let Some(import) = config::preload_for_alias(name, &script, &options) {
                config::record_import(import);
            }
            target.server().script_aliases.push(ScriptAlias {
                matcher,
                script,
                options,
            });
            Ok(())
        }
        "WSGIImportScript" => {
            let words = split_raw_args(line, 1);
            let args: Vec<&str> = words.iter().map(String::as_str).collect();
            let import = config::parse_import_script(&args).map_err(|e| e.to_string())?;
            config::check_literal_group(name, &import.process_group, target.key, same_server_name)
                .map_err(|e| e.to_string())?;
            config::record_import(import);
            Ok(())
        }
        "WSGIRestrictProcess" => {
            let names = split_raw_args(line, usize::MAX);
            target.dir.restrict = Some(RestrictList::new(&names));
            Ok(())
        }
        _ => Err(format!("WSGIRS0003: unknown directive {name}")),
    }
}

/// Whether two server blocks have the same ServerName (so far in the configuration).
fn same_server_name(a: config::ServerKey, b: config::ServerKey) -> bool {
    // SAFETY: ServerKey ids are addresses of server_recs of the configuration being read,
    // alive in pconf for the whole pass.
    let name = |key: config::ServerKey| unsafe {
        cstr_lossy((*(key.id as *const ffi::server_rec)).server_hostname)
    };
    let (a, b) = (name(a), name(b));
    !a.is_empty() && a == b
}

/// "file:line" of the directive being read, for startup messages.
fn directive_location(cmd: *mut ffi::cmd_parms) -> String {
    // SAFETY: live cmd_parms; the directive node and its file name live in the config pool.
    unsafe {
        let directive = (*cmd).directive;
        if directive.is_null() {
            return "the configuration".to_string();
        }
        format!(
            "{}:{}",
            cstr_lossy((*directive).filename),
            (*directive).line_num
        )
    }
}

fn compile_regex(target: &Target<'_>, name: &str, pattern: &str) -> Result<AliasMatch, String> {
    let c = cstring(pattern);
    // SAFETY: cmd->pool is live for the configuration's lifetime; Apache frees the regex with it.
    let compiled = unsafe {
        ffi::ap_pregcomp(
            (*target.cmd).pool,
            c.as_ptr(),
            ffi::AP_REG_EXTENDED as c_int,
        )
    };
    if compiled.is_null() {
        return Err(format!(
            "WSGIRS0183: {name} '{pattern}': the regular expression could not be compiled."
        ));
    }
    Ok(AliasMatch::Regex {
        pattern: pattern.to_string(),
        compiled: compiled as usize,
    })
}
