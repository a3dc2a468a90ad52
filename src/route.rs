//! Request time: which daemon group runs this request. Pure Rust, no ffi. The handler passes in
//! the configured value, the restrict list in force and a view of the request's variables; it
//! gets back a group, or a RouteError that knows its HTTP status and its audit log line.
//!
//! Order (SPEC §3): expand the template; the restrict list first (so unknown names chosen from
//! a restricted directory are refused as not allowed); then embedded mode; then unknown
//! groups; then the virtual-host scope.

#![forbid(unsafe_code)]

use std::fmt;

use crate::config::process_group::GroupTemplate;
use crate::config::restrict::RestrictList;
use crate::daemon::{GroupRuntime, Registry};

/// What a template may read from the request.
pub trait RequestVars {
    /// The request's notes table.
    fn note(&self, name: &str) -> Option<String>;
    /// The request's environment (subprocess_env: SetEnv, SetEnvIf, RewriteRule [E=]).
    fn request_env(&self, name: &str) -> Option<String>;
    /// `%{SERVER}`: the vhost's ServerName, with `:port` unless 80 or 443.
    fn server(&self) -> String;
    /// `%{HOST}`: like `%{SERVER}` but from the request's Host header.
    fn host(&self) -> String;
    /// The request's SCRIPT_NAME (for `%{RESOURCE}`).
    fn script_name(&self) -> String;
    /// Directories whose .htaccess Apache applied to this request. Asked only when a refusal
    /// is being explained, never on the path of a request that is served.
    fn htaccess_dirs(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Where an `%{ENV:NAME}` value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Notes,
    RequestEnv,
    ProcessEnv,
    Unset,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Notes => "the request notes",
            Origin::RequestEnv => "the request environment (SetEnv, SetEnvIf or RewriteRule [E=])",
            Origin::ProcessEnv => "Apache's process environment",
            Origin::Unset => "nowhere: the variable is not set",
        })
    }
}

/// The result of expanding a WSGIProcessGroup / WSGIApplicationGroup value, with enough
/// history to explain it in a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub name: String,
    pub configured: String,
    /// The `%{ENV:NAME}` variable that supplied the value.
    pub variable: Option<Variable>,
}

/// An `%{ENV:NAME}` lookup: the variable, where it was found, and its raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub origin: Origin,
    pub value: String,
}

impl fmt::Display for Expansion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configured value '{}'", self.configured)?;
        if let Some(var) = &self.variable {
            if var.origin == Origin::Unset {
                write!(f, ", {} is not set", var.name)?;
            } else {
                write!(f, ", {}='{}' from {}", var.name, var.value, var.origin)?;
                if var.value != self.name {
                    write!(f, ", expanded to '{}'", self.name)?;
                }
            }
        }
        Ok(())
    }
}

/// Expands one template (whole-value forms only, as mod_wsgi; anything else is literal).
pub fn expand(configured: &str, vars: &dyn RequestVars) -> Expansion {
    let mut expansion = Expansion {
        name: String::new(),
        configured: configured.to_string(),
        variable: None,
    };
    expansion.name = expand_value(configured, vars, &mut expansion.variable, true);
    expansion
}

fn expand_value(
    value: &str,
    vars: &dyn RequestVars,
    variable: &mut Option<Variable>,
    may_recurse: bool,
) -> String {
    match GroupTemplate::parse(value) {
        GroupTemplate::Global => String::new(),
        GroupTemplate::Server => vars.server(),
        GroupTemplate::Host => vars.host(),
        GroupTemplate::Resource => {
            format!("{}|{}", vars.server(), vars.script_name().to_lowercase())
        }
        GroupTemplate::Literal(literal) => literal.to_string(),
        GroupTemplate::Env(name) => {
            let found = vars
                .note(name)
                .map(|v| (v, Origin::Notes))
                .or_else(|| vars.request_env(name).map(|v| (v, Origin::RequestEnv)))
                .or_else(|| std::env::var(name).ok().map(|v| (v, Origin::ProcessEnv)));
            match found {
                Some((found, origin)) => {
                    *variable = Some(Variable {
                        name: name.to_string(),
                        origin,
                        value: found.clone(),
                    });
                    // One more expansion of e.g. "%{SERVER}", never of another %{ENV:…}
                    // (which could loop or chain through variables a user controls).
                    if may_recurse && found.starts_with("%{") && !found.starts_with("%{ENV") {
                        expand_value(&found, vars, &mut None, false)
                    } else {
                        found
                    }
                }
                None => {
                    *variable = Some(Variable {
                        name: name.to_string(),
                        origin: Origin::Unset,
                        value: String::new(),
                    });
                    value.to_string()
                }
            }
        }
    }
}

/// Everything the decision needs besides the registry.
pub struct RouteRequest<'a> {
    /// The WSGIProcessGroup (or process-group=) value in force, "" when none is set.
    pub configured: &'a str,
    pub restrict: Option<&'a RestrictList>,
    /// ServerName of the request's virtual host.
    pub server_name: &'a str,
    pub script: &'a str,
}

/// The facts a refusal log line gives a sysadmin: who asked for what, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub expansion: Expansion,
    pub server_name: String,
    pub htaccess_dirs: Vec<String>,
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}; request vhost '{}'",
            self.expansion, self.server_name
        )?;
        if !self.htaccess_dirs.is_empty() {
            write!(
                f,
                "; .htaccess applied from {}",
                self.htaccess_dirs.join(", ")
            )?;
        }
        f.write_str("]")
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error(
        "WSGIRS0204: Daemon process called '{group}' cannot be accessed by this WSGI application \
         as not a member of allowed groups: {script} (WSGIRestrictProcess allows: {allowed}) {audit}"
    )]
    NotAllowed {
        group: String,
        script: String,
        allowed: String,
        audit: Box<Audit>,
    },
    #[error(
        "WSGIRS0201: Embedded mode of mod_wsgi disabled by runtime configuration: {script} \
         (mod_wsgi_rs runs applications only in daemon process groups; set WSGIProcessGroup \
         or process-group= to a group defined with WSGIDaemonProcess) {audit}"
    )]
    Embedded { script: String, audit: Box<Audit> },
    #[error(
        "WSGIRS0202: No WSGI daemon process called '{group}' has been configured: {script} {audit}"
    )]
    Unknown {
        group: String,
        script: String,
        audit: Box<Audit>,
    },
    #[error(
        "WSGIRS0203: Daemon process called '{group}' cannot be accessed by this WSGI application: \
         {script} (the group belongs to virtual host '{group_host}', the request to '{request_host}') \
         {audit}"
    )]
    OtherVirtualHost {
        group: String,
        script: String,
        group_host: String,
        request_host: String,
        audit: Box<Audit>,
    },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        500
    }
}

/// Picks the group for a request, in SPEC §3's order.
pub fn select<'r>(
    registry: &'r Registry,
    request: &RouteRequest<'_>,
    vars: &dyn RequestVars,
) -> Result<(&'r GroupRuntime, Expansion), RouteError> {
    let expansion = expand(request.configured, vars);
    let name = expansion.name.clone();
    let script = request.script.to_string();
    let audit = || {
        Box::new(Audit {
            expansion: expansion.clone(),
            server_name: request.server_name.to_string(),
            htaccess_dirs: vars.htaccess_dirs(),
        })
    };
    if let Some(list) = request.restrict {
        if !list.permits(&name) {
            return Err(RouteError::NotAllowed {
                group: name,
                script,
                allowed: list.describe(),
                audit: audit(),
            });
        }
    }
    if name.is_empty() {
        return Err(RouteError::Embedded {
            script,
            audit: audit(),
        });
    }
    let Some(group) = registry.find(&name) else {
        return Err(RouteError::Unknown {
            group: name,
            script,
            audit: audit(),
        });
    };
    if let Some(group_host) = &group.scope {
        if group_host != request.server_name {
            return Err(RouteError::OtherVirtualHost {
                group: name,
                script,
                group_host: group_host.clone(),
                request_host: request.server_name.to_string(),
                audit: audit(),
            });
        }
    }
    Ok((group, expansion))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::daemon_process::ProcessGroupSpec;
    use crate::daemon::privileges::Identity;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::Duration;

    #[derive(Default)]
    struct Vars {
        notes: HashMap<String, String>,
        env: HashMap<String, String>,
    }

    impl RequestVars for Vars {
        fn note(&self, name: &str) -> Option<String> {
            self.notes.get(name).cloned()
        }
        fn request_env(&self, name: &str) -> Option<String> {
            self.env.get(name).cloned()
        }
        fn server(&self) -> String {
            "www.site.com:8080".into()
        }
        fn host(&self) -> String {
            "alias.site.com:8080".into()
        }
        fn script_name(&self) -> String {
            "/Blog/App.wsgi".into()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vars {
        Vars {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Vars::default()
        }
    }

    fn group(name: &str, scope: Option<&str>) -> GroupRuntime {
        GroupRuntime {
            index: 0,
            worker_uid: 33,
            import_scripts: Vec::new(),
            spec: ProcessGroupSpec::new(name),
            scope: scope.map(str::to_string),
            socket_path: PathBuf::from(format!("/run/{name}.sock")),
            socket_timeout: Duration::from_secs(60),
            identity: Identity {
                user_name: "www-data".into(),
                uid: 33,
                gid: 33,
                supplementary: None,
            },
            home: PathBuf::from("/"),
            load: crate::load::LoadBoard::default(),
        }
    }

    fn registry() -> Registry {
        Registry {
            groups: vec![
                group("default", None),
                group("bob:1", Some("www.site.com")),
                group("bob:2", Some("www.site.com")),
                group("joe:1", Some("www.site.com")),
                group("other:1", Some("other.site.com")),
                group("www.site.com:8080", None),
            ],
        }
    }

    fn request<'a>(configured: &'a str, restrict: Option<&'a RestrictList>) -> RouteRequest<'a> {
        RouteRequest {
            configured,
            restrict,
            server_name: "www.site.com",
            script: "/home/bob/public_html/blog.wsgi",
        }
    }

    #[test]
    fn every_expansion_form() {
        let vars = env(&[
            ("PG", "bob:2"),
            ("TWICE", "%{SERVER}"),
            ("LOOP", "%{ENV:PG}"),
        ]);
        assert_eq!(expand("%{GLOBAL}", &vars).name, "");
        assert_eq!(expand("%{SERVER}", &vars).name, "www.site.com:8080");
        assert_eq!(expand("%{HOST}", &vars).name, "alias.site.com:8080");
        assert_eq!(
            expand("%{RESOURCE}", &vars).name,
            "www.site.com:8080|/blog/app.wsgi"
        );
        let e = expand("%{ENV:PG}", &vars);
        assert_eq!(e.name, "bob:2");
        assert_eq!(
            e.variable,
            Some(Variable {
                name: "PG".into(),
                origin: Origin::RequestEnv,
                value: "bob:2".into()
            })
        );
        // A found %{…} value is expanded once more, but never another %{ENV:…}.
        assert_eq!(expand("%{ENV:TWICE}", &vars).name, "www.site.com:8080");
        assert_eq!(expand("%{ENV:LOOP}", &vars).name, "%{ENV:PG}");
        // Unset: the literal text becomes the name.
        let unset = expand("%{ENV:NOPE_NOT_SET_ANYWHERE}", &vars);
        assert_eq!(unset.name, "%{ENV:NOPE_NOT_SET_ANYWHERE}");
        assert_eq!(unset.variable.unwrap().origin, Origin::Unset);
        // Anything else is literal, including partial templates.
        assert_eq!(expand("bob:1", &vars).name, "bob:1");
        assert_eq!(expand("%{ENV:PG}-x", &vars).name, "%{ENV:PG}-x");
        assert_eq!(expand("%{OTHER}", &vars).name, "%{OTHER}");
    }

    #[test]
    fn notes_win_over_request_env_and_process_env() {
        let mut vars = env(&[("PG", "from-env")]);
        vars.notes.insert("PG".into(), "from-notes".into());
        let e = expand("%{ENV:PG}", &vars);
        assert_eq!(e.name, "from-notes");
        assert_eq!(e.variable.unwrap().origin, Origin::Notes);
        // PATH is set in every test process and in no request table here.
        let e = expand("%{ENV:PATH}", &Vars::default());
        assert_eq!(e.variable.unwrap().origin, Origin::ProcessEnv);
    }

    #[test]
    fn restrict_check_comes_first() {
        let reg = registry();
        let list = RestrictList::new(&["bob:1", "bob:2"]);
        let vars = env(&[("PG", "joe:1")]);
        let err = select(&reg, &request("%{ENV:PG}", Some(&list)), &vars).unwrap_err();
        assert!(matches!(err, RouteError::NotAllowed { ref group, .. } if group == "joe:1"));
        let text = err.to_string();
        assert!(text.contains(
            "Daemon process called 'joe:1' cannot be accessed by this WSGI application as not a \
             member of allowed groups: /home/bob/public_html/blog.wsgi"
        ));
        assert!(
            text.contains("'%{ENV:PG}'") && text.contains("PG='joe:1'"),
            "{text}"
        );
        assert!(text.contains("request vhost 'www.site.com'"), "{text}");
        // Unknown names from a restricted place get the restrict message, not "No WSGI…".
        let err = select(&reg, &request("bob:9", Some(&list)), &vars).unwrap_err();
        assert!(matches!(err, RouteError::NotAllowed { .. }));
        // The global group and the empty name are refused by the list too.
        assert!(matches!(
            select(&reg, &request("default", Some(&list)), &vars).unwrap_err(),
            RouteError::NotAllowed { .. }
        ));
        assert!(matches!(
            select(&reg, &request("%{GLOBAL}", Some(&list)), &vars).unwrap_err(),
            RouteError::NotAllowed { .. }
        ));
        // Names on the list match case-insensitively; group names themselves do not.
        let upper = RestrictList::new(&["BOB:2"]);
        let (g, _) = select(&reg, &request("bob:2", Some(&upper)), &vars).unwrap();
        assert_eq!(g.spec.name, "bob:2");
    }

    #[test]
    fn global_entry_lets_embedded_through_to_its_own_refusal() {
        let reg = registry();
        let list = RestrictList::new(&["%{GLOBAL}"]);
        let err = select(&reg, &request("%{GLOBAL}", Some(&list)), &Vars::default()).unwrap_err();
        assert!(matches!(err, RouteError::Embedded { .. }));
        assert!(err
            .to_string()
            .contains("Embedded mode of mod_wsgi disabled by runtime configuration"));
        let empty = RestrictList::new::<&str>(&[]);
        assert!(matches!(
            select(&reg, &request("bob:1", Some(&empty)), &Vars::default()).unwrap_err(),
            RouteError::NotAllowed { .. }
        ));
    }

    #[test]
    fn unknown_and_case_sensitive_without_a_list() {
        let reg = registry();
        let err = select(&reg, &request("Default", None), &Vars::default()).unwrap_err();
        assert!(matches!(err, RouteError::Unknown { .. }));
        assert!(err
            .to_string()
            .contains("No WSGI daemon process called 'Default' has been configured"));
        let vars = Vars::default();
        let err = select(&reg, &request("%{ENV:UNSET_VARIABLE_X}", None), &vars).unwrap_err();
        assert!(err
            .to_string()
            .contains("No WSGI daemon process called '%{ENV:UNSET_VARIABLE_X}'"));
        assert!(err.to_string().contains("UNSET_VARIABLE_X is not set"));
    }

    #[test]
    fn vhost_scope() {
        let reg = registry();
        let vars = Vars::default();
        // Same ServerName (any port): allowed; global group: allowed from anywhere.
        assert_eq!(
            select(&reg, &request("bob:1", None), &vars)
                .unwrap()
                .0
                .spec
                .name,
            "bob:1"
        );
        assert_eq!(
            select(&reg, &request("default", None), &vars)
                .unwrap()
                .0
                .spec
                .name,
            "default"
        );
        let err = select(&reg, &request("other:1", None), &vars).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RouteError::OtherVirtualHost { .. }));
        assert!(text.contains("cannot be accessed by this WSGI application: /home/bob"));
        assert!(text.contains("'other.site.com'") && text.contains("'www.site.com'"));
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn second_expansion_selects_a_server_named_group() {
        let reg = registry();
        let vars = env(&[("PG", "%{SERVER}")]);
        let (g, e) = select(&reg, &request("%{ENV:PG}", None), &vars).unwrap();
        assert_eq!(g.spec.name, "www.site.com:8080");
        let var = e.variable.unwrap();
        assert_eq!((var.name.as_str(), var.value.as_str()), ("PG", "%{SERVER}"));
        let err = select(
            &reg,
            &request("%{ENV:PG}", Some(&RestrictList::new(&["bob:1"]))),
            &vars,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("PG='%{SERVER}'") && err.contains("expanded to 'www.site.com:8080'"),
            "{err}"
        );
    }

    #[test]
    fn audit_names_htaccess_dirs() {
        struct WithDirs(Vars);
        impl RequestVars for WithDirs {
            fn note(&self, name: &str) -> Option<String> {
                self.0.note(name)
            }
            fn request_env(&self, name: &str) -> Option<String> {
                self.0.request_env(name)
            }
            fn server(&self) -> String {
                self.0.server()
            }
            fn host(&self) -> String {
                self.0.host()
            }
            fn script_name(&self) -> String {
                self.0.script_name()
            }
            fn htaccess_dirs(&self) -> Vec<String> {
                vec!["/home/bob/public_html".to_string()]
            }
        }
        let reg = registry();
        let list = RestrictList::new(&["bob:1"]);
        let vars = WithDirs(env(&[("PG", "joe:1")]));
        let err = select(&reg, &request("%{ENV:PG}", Some(&list)), &vars).unwrap_err();
        assert!(err
            .to_string()
            .contains(".htaccess applied from /home/bob/public_html"));
        // Served requests never ask for them.
        assert!(select(&reg, &request("bob:1", Some(&list)), &vars).is_ok());
    }
}
