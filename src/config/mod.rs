//! Directive values: parsed, validated and merged in plain Rust. No ffi here: the httpd layer
//! hands us strings and stores what we return in its pools.

#![forbid(unsafe_code)]

pub mod daemon_process;
pub mod process_group;
pub mod restrict;
pub mod script_alias;

use std::path::PathBuf;
use std::sync::Mutex;

use daemon_process::ProcessGroupSpec;
use restrict::RestrictList;
use script_alias::ScriptAliasOptions;

/// Per-directory settings (`<Directory>`, `<Location>`, `<Files>`, `.htaccess`, and the
/// server's defaults). `None` means "not set here": the merge keeps the outer value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirConfig {
    pub process_group: Option<String>,
    pub application_group: Option<String>,
    pub callable_object: Option<String>,
    pub pass_authorization: Option<bool>,
    pub script_reloading: Option<bool>,
    pub chunked_request: Option<bool>,
    /// The innermost WSGIRestrictProcess list in force (inner lists replace outer ones).
    pub restrict: Option<RestrictList>,
}

impl DirConfig {
    /// `inner` is the more specific section; its settings win.
    pub fn merge(outer: &DirConfig, inner: &DirConfig) -> DirConfig {
        DirConfig {
            process_group: inner
                .process_group
                .clone()
                .or_else(|| outer.process_group.clone()),
            application_group: inner
                .application_group
                .clone()
                .or_else(|| outer.application_group.clone()),
            callable_object: inner
                .callable_object
                .clone()
                .or_else(|| outer.callable_object.clone()),
            pass_authorization: inner.pass_authorization.or(outer.pass_authorization),
            script_reloading: inner.script_reloading.or(outer.script_reloading),
            chunked_request: inner.chunked_request.or(outer.chunked_request),
            restrict: inner.restrict.clone().or_else(|| outer.restrict.clone()),
        }
    }

    pub fn callable_object(&self) -> &str {
        self.callable_object.as_deref().unwrap_or("application")
    }

    pub fn script_reloading(&self) -> bool {
        self.script_reloading.unwrap_or(true)
    }
}

/// How a `WSGIScriptAlias` or `WSGIScriptAliasMatch` matches a URL.
#[derive(Debug, Clone, PartialEq)]
pub enum AliasMatch {
    /// A URL-path prefix, matched on whole path segments.
    Prefix(String),
    /// A regular expression compiled by Apache; the index names it in the httpd layer's table.
    Regex { pattern: String, compiled: usize },
}

/// How many bytes of `uri` a `WSGIScriptAlias` location matches, on whole path segments; the
/// rest of the URI becomes PATH_INFO. A trailing slash on the location is not required in the
/// URI, so `/` mounts an application on the whole site with an empty SCRIPT_NAME.
/// Works on bytes: a URI is not necessarily UTF-8 (`%ff` decodes to a lone byte).
pub fn match_prefix(location: &str, uri: &[u8]) -> Option<usize> {
    let location = location.trim_end_matches('/').as_bytes();
    let rest = uri.strip_prefix(location)?;
    (rest.is_empty() || rest.starts_with(b"/")).then_some(location.len())
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScriptAlias {
    pub matcher: AliasMatch,
    pub script: String,
    pub options: ScriptAliasOptions,
}

/// Per-server settings (the main server and each `<VirtualHost>`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerConfig {
    pub script_aliases: Vec<ScriptAlias>,
    /// Global only (WSGISocketPrefix, WSGIPythonHome, WSGIPythonPath); stored on the main server.
    pub socket_prefix: Option<String>,
    pub python_home: Option<PathBuf>,
    pub python_path: Vec<PathBuf>,
}

impl ServerConfig {
    /// A vhost's own aliases are tried before the main server's, as mod_alias does.
    pub fn merge(outer: &ServerConfig, inner: &ServerConfig) -> ServerConfig {
        let mut script_aliases = inner.script_aliases.clone();
        script_aliases.extend(outer.script_aliases.iter().cloned());
        ServerConfig {
            script_aliases,
            socket_prefix: inner
                .socket_prefix
                .clone()
                .or_else(|| outer.socket_prefix.clone()),
            python_home: inner
                .python_home
                .clone()
                .or_else(|| outer.python_home.clone()),
            python_path: if inner.python_path.is_empty() {
                outer.python_path.clone()
            } else {
                inner.python_path.clone()
            },
        }
    }
}

/// Identifies the server block (main server or a `<VirtualHost>`) a directive appeared in.
/// The httpd layer derives it from the `server_rec` address, stable for one config pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerKey {
    pub id: usize,
    pub is_virtual: bool,
}

/// A `WSGIDaemonProcess` and where it was defined.
#[derive(Debug, Clone, PartialEq)]
pub struct DefinedGroup {
    pub spec: ProcessGroupSpec,
    pub server: ServerKey,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GroupTableError {
    #[error(
        "WSGIRS0170: WSGIDaemonProcess '{0}': Name duplicates previous WSGI daemon definition."
    )]
    Duplicate(String),
    #[error(
        "WSGIRS0171: {directive} process-group='{group}': WSGI process group not yet configured. \
         Define it with WSGIDaemonProcess before this line."
    )]
    NotYetConfigured { directive: String, group: String },
    #[error(
        "WSGIRS0172: {directive} process-group='{group}': WSGI process group not accessible. \
         It is defined inside another <VirtualHost>; use a group defined in this virtual host \
         or outside every virtual host."
    )]
    NotAccessible { directive: String, group: String },
}

/// Every daemon group of the configuration being read. Apache reads its configuration in one
/// thread; the table is emptied at pre_config so each pass (start, restart) starts clean.
static GROUPS: Mutex<Vec<DefinedGroup>> = Mutex::new(Vec::new());

fn groups() -> std::sync::MutexGuard<'static, Vec<DefinedGroup>> {
    // A poisoned lock only means a panic elsewhere was already reported; the data is plain.
    GROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn reset_groups() {
    groups().clear();
    literal_selections().clear();
    imports().clear();
}

pub fn define_group(group: DefinedGroup) -> Result<(), GroupTableError> {
    let mut table = groups();
    if table.iter().any(|g| g.spec.name == group.spec.name) {
        return Err(GroupTableError::Duplicate(group.spec.name));
    }
    table.push(group);
    Ok(())
}

/// The config-time check for a literal `process-group=` on a script alias.
pub fn check_literal_group(
    directive: &str,
    group: &str,
    from: ServerKey,
    same_server_name: impl Fn(ServerKey, ServerKey) -> bool,
) -> Result<(), GroupTableError> {
    if group.contains("%{") {
        return Ok(());
    }
    let table = groups();
    match table.iter().find(|g| g.spec.name == group) {
        None => Err(GroupTableError::NotYetConfigured {
            directive: directive.to_string(),
            group: group.to_string(),
        }),
        // The runtime rule: a vhost's group serves every vhost with the same ServerName.
        Some(g) if g.server.is_virtual && g.server != from && !same_server_name(g.server, from) => {
            Err(GroupTableError::NotAccessible {
                directive: directive.to_string(),
                group: group.to_string(),
            })
        }
        Some(_) => Ok(()),
    }
}

pub fn defined_groups() -> Vec<DefinedGroup> {
    groups().clone()
}

/// `WSGIImportScript file process-group=G [application-group=A]`: a script each daemon of
/// group G loads when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportScript {
    pub script: String,
    pub process_group: String,
    pub application_group: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImportScriptError {
    #[error("WSGIRS0184: WSGIImportScript needs a script path, e.g. WSGIImportScript /srv/app.wsgi process-group=site")]
    MissingScript,
    #[error(
        "WSGIRS0185: WSGIImportScript '{script}': Invalid option to WSGI import script definition. \
         Got '{token}'; allowed: process-group=NAME and application-group=NAME."
    )]
    InvalidOption { script: String, token: String },
    #[error(
        "WSGIRS0186: WSGIImportScript '{script}' needs process-group=NAME naming a group defined \
         with WSGIDaemonProcess (embedded mode is not available, and templates cannot be \
         expanded outside a request)."
    )]
    NeedsGroup { script: String },
}

/// Parses WSGIImportScript's words (already split, quotes removed).
pub fn parse_import_script(args: &[&str]) -> Result<ImportScript, ImportScriptError> {
    let (script, options) = args.split_first().ok_or(ImportScriptError::MissingScript)?;
    let mut import = ImportScript {
        script: script.to_string(),
        process_group: String::new(),
        application_group: None,
    };
    for token in options {
        match token.split_once('=') {
            Some(("process-group", value)) if !value.is_empty() => {
                import.process_group = value.to_string()
            }
            Some(("application-group", value)) if !value.is_empty() => {
                import.application_group = Some(value.to_string())
            }
            _ => {
                return Err(ImportScriptError::InvalidOption {
                    script: import.script,
                    token: token.to_string(),
                })
            }
        }
    }
    if import.process_group.is_empty() || import.process_group.contains("%{") {
        return Err(ImportScriptError::NeedsGroup {
            script: import.script,
        });
    }
    Ok(import)
}

static IMPORTS: Mutex<Vec<ImportScript>> = Mutex::new(Vec::new());

fn imports() -> std::sync::MutexGuard<'static, Vec<ImportScript>> {
    IMPORTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn record_import(import: ImportScript) {
    imports().push(import);
}

/// As mod_wsgi: a `WSGIScriptAlias` to a script file that names both its process group (a
/// literal one) and its application group preloads the script when the group's daemons
/// start, as `WSGIImportScript` would. Not for `WSGIScriptAliasMatch`, whose file may depend on
/// the URL, nor for an alias to a directory.
pub fn preload_for_alias(
    directive: &str,
    script: &str,
    options: &ScriptAliasOptions,
) -> Option<ImportScript> {
    let group = options.process_group.as_ref()?;
    let application_group = options.application_group.as_ref()?;
    if directive != "WSGIScriptAlias" || script.ends_with('/') || group.contains("%{") {
        return None;
    }
    Some(ImportScript {
        script: script.to_string(),
        process_group: group.clone(),
        application_group: Some(application_group.clone()),
    })
}

/// The scripts the daemons of `group` import at start, in configuration order, each once
/// (several aliases may name the same script).
pub fn imports_for(group: &str) -> Vec<String> {
    let mut scripts: Vec<String> = Vec::new();
    for import in imports().iter().filter(|i| i.process_group == group) {
        if !scripts.contains(&import.script) {
            scripts.push(import.script.clone());
        }
    }
    scripts
}

/// A literal `WSGIProcessGroup` value and where it was written, checked once all groups are
/// known (a group may be defined after the line that selects it).
#[derive(Debug, Clone, PartialEq)]
pub struct LiteralSelection {
    pub group: String,
    pub location: String,
    pub server: ServerKey,
}

static LITERAL_SELECTIONS: Mutex<Vec<LiteralSelection>> = Mutex::new(Vec::new());

fn literal_selections() -> std::sync::MutexGuard<'static, Vec<LiteralSelection>> {
    LITERAL_SELECTIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn record_literal_selection(selection: LiteralSelection) {
    literal_selections().push(selection);
}

/// Startup warnings for literal WSGIProcessGroup values that name no defined group.
pub fn unconfigured_selections() -> Vec<String> {
    let table = groups();
    literal_selections()
        .iter()
        .filter(|sel| !table.iter().any(|g| g.spec.name == sel.group))
        .map(|sel| {
            format!(
                "WSGIRS0173: WSGIProcessGroup '{}' at {}: WSGI process group not yet configured; \
                 no WSGIDaemonProcess defines it, so requests there will get 500.",
                sel.group, sel.location
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_an_alias_to_a_file_naming_both_groups_preloads() {
        let both = ScriptAliasOptions {
            process_group: Some("site".into()),
            application_group: Some("%{GLOBAL}".into()),
            ..Default::default()
        };
        let import = preload_for_alias("WSGIScriptAlias", "/srv/a.wsgi", &both).unwrap();
        assert_eq!(import.process_group, "site");
        assert_eq!(import.script, "/srv/a.wsgi");
        assert!(preload_for_alias("WSGIScriptAliasMatch", "/srv/a.wsgi", &both).is_none());
        assert!(preload_for_alias("WSGIScriptAlias", "/srv/apps/", &both).is_none());
        let group_only = ScriptAliasOptions {
            application_group: None,
            ..both.clone()
        };
        assert!(preload_for_alias("WSGIScriptAlias", "/srv/a.wsgi", &group_only).is_none());
        let templated = ScriptAliasOptions {
            process_group: Some("%{ENV:G}".into()),
            ..both.clone()
        };
        assert!(preload_for_alias("WSGIScriptAlias", "/srv/a.wsgi", &templated).is_none());
    }

    #[test]
    fn dir_merge_inner_wins_and_unset_inherits() {
        let outer = DirConfig {
            process_group: Some("outer".into()),
            callable_object: Some("app".into()),
            script_reloading: Some(false),
            ..DirConfig::default()
        };
        let inner = DirConfig {
            process_group: Some("inner".into()),
            ..DirConfig::default()
        };
        let merged = DirConfig::merge(&outer, &inner);
        assert_eq!(merged.process_group.as_deref(), Some("inner"));
        assert_eq!(merged.callable_object(), "app");
        assert!(!merged.script_reloading());
        assert_eq!(DirConfig::default().callable_object(), "application");
        assert!(DirConfig::default().script_reloading());
    }

    #[test]
    fn import_script_options() {
        let ok = parse_import_script(&[
            "/srv/a.wsgi",
            "process-group=site",
            "application-group=%{GLOBAL}",
        ])
        .unwrap();
        assert_eq!(ok.script, "/srv/a.wsgi");
        assert_eq!(ok.process_group, "site");
        assert_eq!(ok.application_group.as_deref(), Some("%{GLOBAL}"));
        assert_eq!(
            parse_import_script(&[]),
            Err(ImportScriptError::MissingScript)
        );
        assert!(matches!(
            parse_import_script(&["/srv/a.wsgi", "bogus=1"]),
            Err(ImportScriptError::InvalidOption { .. })
        ));
        assert!(matches!(
            parse_import_script(&["/srv/a.wsgi", "process-group"]),
            Err(ImportScriptError::InvalidOption { .. })
        ));
        assert!(matches!(
            parse_import_script(&["/srv/a.wsgi"]),
            Err(ImportScriptError::NeedsGroup { .. })
        ));
        assert!(matches!(
            parse_import_script(&["/srv/a.wsgi", "process-group=%{ENV:X}"]),
            Err(ImportScriptError::NeedsGroup { .. })
        ));
    }

    #[test]
    fn prefix_matches_whole_segments() {
        assert_eq!(match_prefix("/", b"/"), Some(0));
        assert_eq!(match_prefix("/", b"/a/b"), Some(0));
        assert_eq!(match_prefix("/app", b"/app"), Some(4));
        assert_eq!(match_prefix("/app", b"/app/x"), Some(4));
        assert_eq!(match_prefix("/app/", b"/app"), Some(4));
        assert_eq!(match_prefix("/app", b"/apple"), None);
        assert_eq!(match_prefix("/app", b"/other"), None);
        assert_eq!(match_prefix("/m", b"/m/\xff/x"), Some(2));
    }

    #[test]
    fn server_merge_puts_vhost_aliases_first() {
        let alias = |p: &str| ScriptAlias {
            matcher: AliasMatch::Prefix(p.into()),
            script: format!("/srv{p}.wsgi"),
            options: ScriptAliasOptions::default(),
        };
        let outer = ServerConfig {
            script_aliases: vec![alias("/main")],
            socket_prefix: Some("run/wsgi".into()),
            ..ServerConfig::default()
        };
        let inner = ServerConfig {
            script_aliases: vec![alias("/vhost")],
            ..ServerConfig::default()
        };
        let merged = ServerConfig::merge(&outer, &inner);
        let order: Vec<_> = merged
            .script_aliases
            .iter()
            .map(|a| a.script.as_str())
            .collect();
        assert_eq!(order, ["/srv/vhost.wsgi", "/srv/main.wsgi"]);
        assert_eq!(merged.socket_prefix.as_deref(), Some("run/wsgi"));
    }

    #[test]
    fn group_table_checks_duplicates_and_scope() {
        // One test owns the global table to avoid races between parallel tests.
        reset_groups();
        let main = ServerKey {
            id: 1,
            is_virtual: false,
        };
        let vhost_a = ServerKey {
            id: 2,
            is_virtual: true,
        };
        let vhost_b = ServerKey {
            id: 3,
            is_virtual: true,
        };
        define_group(DefinedGroup {
            spec: ProcessGroupSpec::new("global"),
            server: main,
        })
        .unwrap();
        define_group(DefinedGroup {
            spec: ProcessGroupSpec::new("a:1"),
            server: vhost_a,
        })
        .unwrap();
        assert_eq!(
            define_group(DefinedGroup {
                spec: ProcessGroupSpec::new("a:1"),
                server: vhost_b
            }),
            Err(GroupTableError::Duplicate("a:1".into()))
        );
        assert!(check_literal_group("WSGIScriptAlias", "global", vhost_b, |_, _| false).is_ok());
        assert!(check_literal_group("WSGIScriptAlias", "a:1", vhost_a, |_, _| false).is_ok());
        assert!(matches!(
            check_literal_group("WSGIScriptAlias", "a:1", vhost_b, |_, _| false),
            Err(GroupTableError::NotAccessible { .. })
        ));
        // Another vhost with the same ServerName (e.g. the :443 one) may use it.
        assert!(check_literal_group("WSGIScriptAlias", "a:1", vhost_b, |_, _| true).is_ok());
        assert!(matches!(
            check_literal_group("WSGIScriptAlias", "nope", main, |_, _| false),
            Err(GroupTableError::NotYetConfigured { .. })
        ));
        assert!(check_literal_group("WSGIScriptAlias", "%{ENV:X}", main, |_, _| false).is_ok());
        let message = GroupTableError::Duplicate("a:1".into()).to_string();
        assert!(message.contains("Name duplicates previous WSGI daemon definition."));
        reset_groups();
        assert!(defined_groups().is_empty());
    }
}
