//! `WSGIProcessGroup` / `WSGIApplicationGroup` values: a literal name or one of mod_wsgi's
//! whole-value `%{…}` templates. No ffi here; `route` expands them per request.

#![forbid(unsafe_code)]

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupTemplate<'a> {
    /// `%{GLOBAL}`: the empty name (embedded mode).
    Global,
    /// `%{SERVER}`: the vhost's ServerName (and port unless 80/443).
    Server,
    /// `%{HOST}`: the Host header's name (and port unless 80/443).
    Host,
    /// `%{RESOURCE}`: `<SERVER>|<lower-cased SCRIPT_NAME>`.
    Resource,
    /// `%{ENV:NAME}`: a request note or environment variable.
    Env(&'a str),
    /// Anything else, used as written (group names are case-sensitive).
    Literal(&'a str),
}

impl<'a> GroupTemplate<'a> {
    /// Only whole values are templates, as in mod_wsgi: `%{ENV:X}-suffix` is a literal name.
    pub fn parse(value: &'a str) -> GroupTemplate<'a> {
        match value {
            "%{GLOBAL}" => GroupTemplate::Global,
            "%{SERVER}" => GroupTemplate::Server,
            "%{HOST}" => GroupTemplate::Host,
            "%{RESOURCE}" => GroupTemplate::Resource,
            _ => match value
                .strip_prefix("%{ENV:")
                .and_then(|r| r.strip_suffix('}'))
            {
                Some(name) if !name.is_empty() && !name.contains('}') => GroupTemplate::Env(name),
                _ => GroupTemplate::Literal(value),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_value_templates_only() {
        assert_eq!(GroupTemplate::parse("%{GLOBAL}"), GroupTemplate::Global);
        assert_eq!(GroupTemplate::parse("%{SERVER}"), GroupTemplate::Server);
        assert_eq!(GroupTemplate::parse("%{HOST}"), GroupTemplate::Host);
        assert_eq!(GroupTemplate::parse("%{RESOURCE}"), GroupTemplate::Resource);
        assert_eq!(GroupTemplate::parse("%{ENV:PG}"), GroupTemplate::Env("PG"));
        assert_eq!(
            GroupTemplate::parse("%{ENV:}"),
            GroupTemplate::Literal("%{ENV:}")
        );
        assert_eq!(
            GroupTemplate::parse("%{ENV:PG}x"),
            GroupTemplate::Literal("%{ENV:PG}x")
        );
        assert_eq!(
            GroupTemplate::parse("%{global}"),
            GroupTemplate::Literal("%{global}")
        );
        assert_eq!(
            GroupTemplate::parse("bob:1"),
            GroupTemplate::Literal("bob:1")
        );
    }
}
