//! Request time: which daemon group runs this request. Pure Rust, no ffi: the handler passes
//! in the configured value and the request's virtual host, and gets a group or a RouteError
//! that knows its HTTP status and log line.
//!
//! This is the foundation's routing: literal group names, `%{GLOBAL}`, and the virtual-host
//! scope rule. `%{ENV:…}` templates and WSGIRestrictProcess come with the routing issue.

#![forbid(unsafe_code)]

use crate::daemon::{GroupRuntime, Registry};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error(
        "WSGIRS0201: Embedded mode of mod_wsgi disabled by runtime configuration: {script} \
         (mod_wsgi_rs runs applications only in daemon process groups; set WSGIProcessGroup \
         or process-group= to one defined with WSGIDaemonProcess)"
    )]
    Embedded { script: String },
    #[error("WSGIRS0202: No WSGI daemon process called '{group}' has been configured: {script}")]
    Unknown { group: String, script: String },
    #[error(
        "WSGIRS0203: Daemon process called '{group}' cannot be accessed by this WSGI application: \
         {script} (the group belongs to virtual host '{group_host}', the request to '{request_host}')"
    )]
    OtherVirtualHost {
        group: String,
        script: String,
        group_host: String,
        request_host: String,
    },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        500
    }
}

/// The literal group name a configured value stands for (empty = embedded mode).
pub fn expand(value: &str) -> String {
    let value = value.trim();
    if value == "%{GLOBAL}" {
        String::new()
    } else {
        value.to_string()
    }
}

/// Picks the group for a request. `request_host` is the ServerName of the request's vhost.
pub fn select<'r>(
    registry: &'r Registry,
    configured: &str,
    request_host: &str,
    script: &str,
) -> Result<&'r GroupRuntime, RouteError> {
    let name = expand(configured);
    if name.is_empty() {
        return Err(RouteError::Embedded {
            script: script.to_string(),
        });
    }
    let group = registry.find(&name).ok_or_else(|| RouteError::Unknown {
        group: name.clone(),
        script: script.to_string(),
    })?;
    match &group.scope {
        Some(group_host) if group_host != request_host => Err(RouteError::OtherVirtualHost {
            group: name,
            script: script.to_string(),
            group_host: group_host.clone(),
            request_host: request_host.to_string(),
        }),
        _ => Ok(group),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::daemon_process::ProcessGroupSpec;
    use crate::daemon::privileges::Identity;
    use std::path::PathBuf;
    use std::time::Duration;

    fn group(name: &str, scope: Option<&str>) -> GroupRuntime {
        GroupRuntime {
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
        }
    }

    fn registry() -> Registry {
        Registry {
            groups: vec![group("default", None), group("bob:1", Some("www.site.com"))],
        }
    }

    #[test]
    fn literal_names_and_global() {
        let reg = registry();
        assert_eq!(
            select(&reg, "default", "other.example", "/s.wsgi")
                .unwrap()
                .spec
                .name,
            "default"
        );
        assert_eq!(
            select(&reg, " bob:1 ", "www.site.com", "/s.wsgi")
                .unwrap()
                .spec
                .name,
            "bob:1"
        );
        assert_eq!(
            select(&reg, "%{GLOBAL}", "www.site.com", "/s.wsgi").unwrap_err(),
            RouteError::Embedded {
                script: "/s.wsgi".into()
            }
        );
        assert!(matches!(
            select(&reg, "", "x", "/s"),
            Err(RouteError::Embedded { .. })
        ));
    }

    #[test]
    fn unknown_and_case_sensitive() {
        let reg = registry();
        let err = select(&reg, "Default", "x", "/s.wsgi").unwrap_err();
        assert_eq!(
            err,
            RouteError::Unknown {
                group: "Default".into(),
                script: "/s.wsgi".into()
            }
        );
        assert!(err
            .to_string()
            .contains("No WSGI daemon process called 'Default' has been configured: /s.wsgi"));
    }

    #[test]
    fn vhost_groups_only_from_the_same_server_name() {
        let reg = registry();
        let err = select(&reg, "bob:1", "evil.example", "/s.wsgi").unwrap_err();
        assert!(matches!(err, RouteError::OtherVirtualHost { .. }));
        assert!(err
            .to_string()
            .contains("cannot be accessed by this WSGI application: /s.wsgi"));
        assert!(err.to_string().contains("www.site.com"));
        assert_eq!(err.status(), 500);
    }
}
