//! `WSGIScriptAlias url-path file [options]` and `WSGIScriptAliasMatch regex file [options]`
//! (SPEC §4), plus the shared On|Off flag parser. No ffi here: the regex is left for Apache
//! to compile.
#![forbid(unsafe_code)]

/// The options a script alias may carry. `None` = not given (the directory config applies).
/// Values are kept literal: `%{GLOBAL}` and other `%{…}` templates are expanded per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptAliasOptions {
    pub process_group: Option<String>,
    pub application_group: Option<String>,
    pub callable_object: Option<String>,
    pub pass_authorization: Option<bool>,
}

/// Every option key, case-sensitive as mod_wsgi.
pub const SCRIPT_ALIAS_KEYS: [&str; 4] = [
    "process-group",
    "application-group",
    "callable-object",
    "pass-authorization",
];

/// One option of a script alias, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptAliasOption {
    ProcessGroup,
    ApplicationGroup,
    CallableObject,
    PassAuthorization,
}

impl ScriptAliasOption {
    fn from_key(key: &str) -> Option<Self> {
        match key {
            "process-group" => Some(Self::ProcessGroup),
            "application-group" => Some(Self::ApplicationGroup),
            "callable-object" => Some(Self::CallableObject),
            "pass-authorization" => Some(Self::PassAuthorization),
            _ => None,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Self::ProcessGroup => "process-group",
            Self::ApplicationGroup => "application-group",
            Self::CallableObject => "callable-object",
            Self::PassAuthorization => "pass-authorization",
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Self::ProcessGroup => 153,
            Self::ApplicationGroup => 154,
            Self::CallableObject => 155,
            Self::PassAuthorization => 156,
        }
    }

    /// mod_wsgi's wording, verbatim.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::ProcessGroup => "Invalid name for WSGI process group.",
            Self::ApplicationGroup => "Invalid name for WSGI application group.",
            Self::CallableObject => "Invalid name for WSGI callable object.",
            Self::PassAuthorization => "Invalid value for authorization flag.",
        }
    }

    pub fn allowed(self) -> &'static str {
        match self {
            Self::ProcessGroup => {
                "a WSGIDaemonProcess name, or a %{GLOBAL}, %{SERVER}, %{HOST}, \
                 %{RESOURCE} or %{ENV:NAME} expansion"
            }
            Self::ApplicationGroup => {
                "a non-empty name, or a %{GLOBAL}, %{SERVER}, %{HOST}, %{RESOURCE} \
                 or %{ENV:NAME} expansion"
            }
            Self::CallableObject => "the non-empty name of the WSGI callable, e.g. application",
            Self::PassAuthorization => "On or Off (any case)",
        }
    }
}

/// "URL-path" for WSGIScriptAlias, "regex" for WSGIScriptAliasMatch.
fn first_argument(directive: &str) -> &'static str {
    if directive.ends_with("Match") {
        "regex"
    } else {
        "URL-path"
    }
}

fn usage(directive: &str) -> String {
    format!(
        "{directive} {} file-path [process-group=NAME] [application-group=NAME] \
         [callable-object=NAME] [pass-authorization=On|Off]",
        first_argument(directive)
    )
}

/// A script alias line that cannot be accepted; Display is the full line `apachectl -t` shows.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ScriptAliasError {
    #[error(
        "WSGIRS0150: {directive} requires at least two arguments, got {given}. \
         Usage: {usage}.",
        usage = usage(.directive)
    )]
    MissingArguments { directive: String, given: usize },

    #[error(
        "WSGIRS0151: {directive} requires at least two arguments: the {which} is empty. \
         Usage: {usage}.",
        usage = usage(.directive)
    )]
    EmptyArgument {
        directive: String,
        /// "URL-path", "regex" or "file-path".
        which: &'static str,
    },

    #[error(
        "WSGIRS0152: {directive} '{location}': Invalid option to WSGI script alias definition. \
         Got '{token}': {problem}. Valid options (key=value): {valid}.",
        valid = SCRIPT_ALIAS_KEYS.join(", ")
    )]
    InvalidOption {
        directive: String,
        location: String,
        token: String,
        problem: String,
    },

    #[error(
        "WSGIRS{code:04}: {directive} '{location}': {phrase} Got '{key}={value}'; \
         allowed: {allowed}.",
        code = .option.code(),
        phrase = .option.phrase(),
        key = .option.key(),
        allowed = .option.allowed()
    )]
    InvalidValue {
        directive: String,
        location: String,
        option: ScriptAliasOption,
        value: String,
    },
}

impl ScriptAliasError {
    /// The number in the message's `WSGIRS01NN` id.
    pub fn code(&self) -> u16 {
        match self {
            ScriptAliasError::MissingArguments { .. } => 150,
            ScriptAliasError::EmptyArgument { .. } => 151,
            ScriptAliasError::InvalidOption { .. } => 152,
            ScriptAliasError::InvalidValue { option, .. } => option.code(),
        }
    }
}

/// A bad On|Off flag value, in the words of every mod_wsgi flag directive.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("WSGIRS0160: {directive} must be one of: Off | On. Got '{value}'.")]
pub struct OnOffError {
    pub directive: String,
    pub value: String,
}

impl OnOffError {
    pub fn code(&self) -> u16 {
        160
    }
}

/// `On` / `Off`, any case (httpd's FLAG directives and mod_wsgi's strcasecmp agree).
pub fn parse_on_off(directive: &str, value: &str) -> Result<bool, OnOffError> {
    if value.eq_ignore_ascii_case("on") {
        Ok(true)
    } else if value.eq_ignore_ascii_case("off") {
        Ok(false)
    } else {
        Err(OnOffError {
            directive: directive.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Parse the words of a `WSGIScriptAlias` / `WSGIScriptAliasMatch` line (`directive` is the
/// name, for messages). Returns (URL-path or regex, script file, options). A key given twice:
/// the last one wins, as mod_wsgi.
pub fn parse_script_alias(
    directive: &str,
    args: &[&str],
) -> Result<(String, String, ScriptAliasOptions), ScriptAliasError> {
    let (location, file, options) = match args {
        [location, file, options @ ..] => (*location, *file, options),
        _ => {
            return Err(ScriptAliasError::MissingArguments {
                directive: directive.to_owned(),
                given: args.len(),
            })
        }
    };
    let empty = |which| ScriptAliasError::EmptyArgument {
        directive: directive.to_owned(),
        which,
    };
    if location.is_empty() {
        return Err(empty(first_argument(directive)));
    }
    if file.is_empty() {
        return Err(empty("file-path"));
    }

    let mut parsed = ScriptAliasOptions::default();
    for token in options {
        let invalid_option = |problem: String| ScriptAliasError::InvalidOption {
            directive: directive.to_owned(),
            location: location.to_owned(),
            token: (*token).to_owned(),
            problem,
        };
        let Some((key, value)) = token.split_once('=') else {
            return Err(invalid_option("not of the form key=value".to_owned()));
        };
        let Some(option) = ScriptAliasOption::from_key(key) else {
            let problem = if key.is_empty() {
                "the option name before '=' is missing".to_owned()
            } else if let Some(o) = ScriptAliasOption::from_key(&key.to_ascii_lowercase()) {
                format!("option names are lower-case (did you mean '{}')", o.key())
            } else {
                format!("unknown option '{key}'")
            };
            return Err(invalid_option(problem));
        };
        let invalid_value = || ScriptAliasError::InvalidValue {
            directive: directive.to_owned(),
            location: location.to_owned(),
            option,
            value: value.to_owned(),
        };
        if value.is_empty() {
            return Err(invalid_value());
        }
        match option {
            ScriptAliasOption::ProcessGroup => parsed.process_group = Some(value.to_owned()),
            ScriptAliasOption::ApplicationGroup => {
                parsed.application_group = Some(value.to_owned())
            }
            ScriptAliasOption::CallableObject => parsed.callable_object = Some(value.to_owned()),
            ScriptAliasOption::PassAuthorization => {
                let flag = parse_on_off(key, value).map_err(|_| invalid_value())?;
                parsed.pass_authorization = Some(flag);
            }
        }
    }
    Ok((location.to_owned(), file.to_owned(), parsed))
}

#[cfg(test)]
// A failed unwrap in a test is the test failing, with its message.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const ALIAS: &str = "WSGIScriptAlias";
    const MATCH: &str = "WSGIScriptAliasMatch";

    fn ok(args: &[&str]) -> ScriptAliasOptions {
        match parse_script_alias(ALIAS, args) {
            Ok((_, _, o)) => o,
            Err(e) => panic!("{args:?} should parse: {e}"),
        }
    }

    fn err(args: &[&str]) -> ScriptAliasError {
        match parse_script_alias(ALIAS, args) {
            Ok(r) => panic!("{args:?} should fail, got {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn two_arguments_no_options() {
        let (url, file, opts) = parse_script_alias(ALIAS, &["/app", "/srv/app.wsgi"]).unwrap();
        assert_eq!(url, "/app");
        assert_eq!(file, "/srv/app.wsgi");
        assert_eq!(opts, ScriptAliasOptions::default());
    }

    #[test]
    fn all_options() {
        let opts = ok(&[
            "/",
            "/srv/app.wsgi",
            "process-group=site",
            "application-group=%{GLOBAL}",
            "callable-object=app",
            "pass-authorization=On",
        ]);
        assert_eq!(
            opts,
            ScriptAliasOptions {
                process_group: Some("site".into()),
                application_group: Some("%{GLOBAL}".into()),
                callable_object: Some("app".into()),
                pass_authorization: Some(true),
            }
        );
    }

    #[test]
    fn templates_are_kept_literal() {
        let opts = ok(&["/", "/x.wsgi", "process-group=%{ENV:SITE}"]);
        assert_eq!(opts.process_group.as_deref(), Some("%{ENV:SITE}"));
    }

    #[test]
    fn pass_authorization_any_case() {
        for (v, want) in [
            ("On", true),
            ("on", true),
            ("ON", true),
            ("off", false),
            ("Off", false),
        ] {
            let opts = ok(&["/", "/x.wsgi", &format!("pass-authorization={v}")]);
            assert_eq!(opts.pass_authorization, Some(want), "{v}");
        }
    }

    #[test]
    fn pass_authorization_bad_value() {
        for v in ["yes", "1", "true", "", "o n"] {
            let e = err(&["/app", "/x.wsgi", &format!("pass-authorization={v}")]);
            assert_eq!(e.code(), 156, "{v}");
            assert_eq!(
                e.to_string(),
                format!(
                    "WSGIRS0156: WSGIScriptAlias '/app': Invalid value for authorization flag. \
                     Got 'pass-authorization={v}'; allowed: On or Off (any case)."
                )
            );
        }
    }

    #[test]
    fn empty_values_are_errors() {
        for (key, code, phrase) in [
            ("process-group", 153, "Invalid name for WSGI process group."),
            (
                "application-group",
                154,
                "Invalid name for WSGI application group.",
            ),
            (
                "callable-object",
                155,
                "Invalid name for WSGI callable object.",
            ),
        ] {
            let e = err(&["/app", "/x.wsgi", &format!("{key}=")]);
            assert_eq!(e.code(), code);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "WSGIRS0{code}: WSGIScriptAlias '/app': {phrase} Got '{key}='; allowed: "
                )),
                "{msg}"
            );
        }
    }

    #[test]
    fn too_few_arguments() {
        for args in [&[][..], &["/app"][..]] {
            let e = err(args);
            assert_eq!(e.code(), 150);
            assert_eq!(
                e.to_string(),
                format!(
                    "WSGIRS0150: WSGIScriptAlias requires at least two arguments, got {}. \
                     Usage: WSGIScriptAlias URL-path file-path [process-group=NAME] \
                     [application-group=NAME] [callable-object=NAME] \
                     [pass-authorization=On|Off].",
                    args.len()
                )
            );
        }
        let e = parse_script_alias(MATCH, &["^/x"]).unwrap_err();
        assert!(e
            .to_string()
            .contains("Usage: WSGIScriptAliasMatch regex file-path"));
    }

    #[test]
    fn empty_arguments() {
        let e = err(&["", "/x.wsgi"]);
        assert_eq!(e.code(), 151);
        assert!(e.to_string().contains("the URL-path is empty"), "{e}");
        let e = err(&["/app", ""]);
        assert_eq!(e.code(), 151);
        assert!(e.to_string().contains("the file-path is empty"), "{e}");
        let e = parse_script_alias(MATCH, &["", "/x.wsgi"]).unwrap_err();
        assert!(e.to_string().contains("the regex is empty"), "{e}");
    }

    #[test]
    fn option_without_equals() {
        let e = err(&["/app", "/x.wsgi", "process-group"]);
        assert_eq!(e.code(), 152);
        assert_eq!(
            e.to_string(),
            "WSGIRS0152: WSGIScriptAlias '/app': Invalid option to WSGI script alias definition. \
             Got 'process-group': not of the form key=value. Valid options (key=value): \
             process-group, application-group, callable-object, pass-authorization."
        );
    }

    #[test]
    fn unknown_option() {
        let msg = err(&["/app", "/x.wsgi", "processgroup=x"]).to_string();
        assert!(
            msg.contains("Got 'processgroup=x': unknown option 'processgroup'"),
            "{msg}"
        );
        for k in SCRIPT_ALIAS_KEYS {
            assert!(msg.contains(k));
        }
        let msg = err(&["/app", "/x.wsgi", "Process-Group=x"]).to_string();
        assert!(
            msg.contains("(did you mean 'process-group'). Valid options"),
            "{msg}"
        );
        assert_eq!(err(&["/app", "/x.wsgi", "=x"]).code(), 152);
    }

    #[test]
    fn duplicate_option_last_wins() {
        let opts = ok(&["/", "/x.wsgi", "process-group=a", "process-group=b"]);
        assert_eq!(opts.process_group.as_deref(), Some("b"));
    }

    #[test]
    fn value_may_contain_equals() {
        let opts = ok(&["/", "/x.wsgi", "application-group=a=b"]);
        assert_eq!(opts.application_group.as_deref(), Some("a=b"));
    }

    #[test]
    fn match_regex_is_not_compiled_here() {
        let (re, file, opts) = parse_script_alias(
            MATCH,
            &["^/([^/]+)(/.*)?$", "/srv/$1.wsgi", "process-group=%{ENV:G}"],
        )
        .unwrap();
        assert_eq!(re, "^/([^/]+)(/.*)?$");
        assert_eq!(file, "/srv/$1.wsgi");
        assert_eq!(opts.process_group.as_deref(), Some("%{ENV:G}"));
        // Even an invalid regex passes: Apache reports it.
        assert!(parse_script_alias(MATCH, &["(", "/x.wsgi"]).is_ok());
    }

    #[test]
    fn on_off() {
        assert_eq!(parse_on_off("WSGIScriptReloading", "On"), Ok(true));
        assert_eq!(parse_on_off("WSGIScriptReloading", "oFF"), Ok(false));
        for v in ["", "yes", "0", " On"] {
            let e = parse_on_off("WSGIScriptReloading", v).unwrap_err();
            assert_eq!(e.code(), 160);
            assert_eq!(
                e.to_string(),
                format!("WSGIRS0160: WSGIScriptReloading must be one of: Off | On. Got '{v}'.")
            );
        }
    }

    #[test]
    fn codes_are_in_range() {
        for o in [
            ScriptAliasOption::ProcessGroup,
            ScriptAliasOption::ApplicationGroup,
            ScriptAliasOption::CallableObject,
            ScriptAliasOption::PassAuthorization,
        ] {
            assert!((150..=169).contains(&o.code()));
            assert_eq!(ScriptAliasOption::from_key(o.key()), Some(o));
        }
    }
}
