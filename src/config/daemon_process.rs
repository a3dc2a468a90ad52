//! `WSGIDaemonProcess name [option=value …]` → a validated [`ProcessGroupSpec`] (SPEC §2):
//! every option parsed strictly, errors carrying mod_wsgi's phrase plus what was given and
//! what is allowed. No ffi here: accounts are looked up through [`AccountLookup`].
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest timeout we accept, in seconds (one year): anything longer is a typo, not a policy.
const MAX_TIMEOUT_SECS: u64 = 31_536_000;

/// Linux allows 65536 groups per process (NGROUPS_MAX); one slot is the primary group.
const MAX_SUPPLEMENTARY_GROUPS: usize = 65_535;

/// A user from the system's account database (passwd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// The user's primary group. Note: `group=` unset means Apache's Group, not this.
    pub gid: u32,
    pub home: PathBuf,
}

/// A group from the system's group database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupId {
    pub name: String,
    pub gid: u32,
}

/// The account database, behind a trait so option parsing is testable without real users.
pub trait AccountLookup {
    fn user_by_name(&self, name: &str) -> Option<Account>;
    fn user_by_uid(&self, uid: u32) -> Option<Account>;
    fn group_by_name(&self, name: &str) -> Option<GroupId>;
    fn group_by_gid(&self, gid: u32) -> Option<GroupId>;
}

/// The real account database (getpwnam_r / getpwuid_r / getgrnam_r / getgrgid_r via nix).
/// A failed look-up (I/O error, NSS trouble) counts as "not found": config time is the
/// right moment to refuse, and the error names the value so the admin can check it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemAccounts;

impl AccountLookup for SystemAccounts {
    fn user_by_name(&self, name: &str) -> Option<Account> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(account_from_nix)
    }

    fn user_by_uid(&self, uid: u32) -> Option<Account> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(account_from_nix)
    }

    fn group_by_name(&self, name: &str) -> Option<GroupId> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(group_from_nix)
    }

    fn group_by_gid(&self, gid: u32) -> Option<GroupId> {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(group_from_nix)
    }
}

fn account_from_nix(user: nix::unistd::User) -> Account {
    Account {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    }
}

fn group_from_nix(group: nix::unistd::Group) -> GroupId {
    GroupId {
        name: group.name,
        gid: group.gid.as_raw(),
    }
}

/// One `WSGIDaemonProcess` definition, every value validated. `None` means "not given":
/// the consumer applies the documented fallback (Apache's User, WSGIPythonHome, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroupSpec {
    pub name: String,
    pub processes: u32,
    /// True iff `processes=` was given (even `processes=1`): sets `wsgi.multiprocess`.
    pub multiprocess: bool,
    /// 0..=65533; `wsgi.multithread` is `threads != 1`.
    pub threads: u32,
    /// None = Apache's User.
    pub user: Option<Account>,
    /// None = Apache's Group (as mod_wsgi: not the user's primary group).
    pub group: Option<GroupId>,
    /// None = initgroups(user); Some(empty) = no supplementary groups at all.
    pub supplementary_groups: Option<Vec<GroupId>>,
    /// None = the user's home if the user differs from Apache's, else `/`.
    pub home: Option<PathBuf>,
    /// The raw `display-name=` value; see [`ProcessGroupSpec::process_title`].
    pub display_name: Option<String>,
    /// None = WSGIPythonHome.
    pub python_home: Option<PathBuf>,
    /// Empty = WSGIPythonPath.
    pub python_path: Vec<PathBuf>,
    pub umask: Option<u32>,
    pub lang: Option<String>,
    pub locale: Option<String>,
    pub chroot: Option<PathBuf>,
    /// 0 = never recycle.
    pub maximum_requests: u64,
    pub inactivity_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub restart_interval: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    pub graceful_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Zero = deadlock detection off (as mod_wsgi).
    pub deadlock_timeout: Duration,
    pub connect_timeout: Duration,
    /// None = Apache's Timeout.
    pub socket_timeout: Option<Duration>,
    pub queue_timeout: Option<Duration>,
    pub listen_backlog: u32,
    pub header_buffer_size: usize,
    pub response_buffer_size: usize,
    /// Bytes (RLIMIT_DATA).
    pub memory_limit: Option<u64>,
    /// Bytes (RLIMIT_AS).
    pub virtual_memory_limit: Option<u64>,
    /// Seconds (RLIMIT_CPU).
    pub cpu_time_limit: Option<u64>,
    /// None = Apache's User.
    pub socket_user: Option<Account>,
    pub script_user: Option<Account>,
    pub script_group: Option<GroupId>,
}

impl ProcessGroupSpec {
    pub const DEFAULT_PROCESSES: u32 = 1;
    pub const DEFAULT_THREADS: u32 = 15;
    pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(15);
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_DEADLOCK_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
    pub const DEFAULT_LISTEN_BACKLOG: u32 = 100;
    pub const DEFAULT_HEADER_BUFFER_SIZE: usize = 32_768;
    /// Every data slot of a region (4 x 64 KiB; see `wire::region::data_slots_for`), not
    /// mod_wsgi's 65536: one slot would make single big downloads a third slower.
    pub const DEFAULT_RESPONSE_BUFFER_SIZE: usize =
        crate::wire::region::DATA_SLOTS * crate::wire::region::DATA_SLOT_LEN;

    /// A group with every option at its default.
    pub fn new(name: impl Into<String>) -> Self {
        ProcessGroupSpec {
            name: name.into(),
            processes: Self::DEFAULT_PROCESSES,
            multiprocess: false,
            threads: Self::DEFAULT_THREADS,
            user: None,
            group: None,
            supplementary_groups: None,
            home: None,
            display_name: None,
            python_home: None,
            python_path: Vec::new(),
            umask: None,
            lang: None,
            locale: None,
            chroot: None,
            maximum_requests: 0,
            inactivity_timeout: None,
            request_timeout: None,
            restart_interval: None,
            startup_timeout: None,
            graceful_timeout: Self::DEFAULT_GRACEFUL_TIMEOUT,
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
            deadlock_timeout: Self::DEFAULT_DEADLOCK_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            socket_timeout: None,
            queue_timeout: None,
            listen_backlog: Self::DEFAULT_LISTEN_BACKLOG,
            header_buffer_size: Self::DEFAULT_HEADER_BUFFER_SIZE,
            response_buffer_size: Self::DEFAULT_RESPONSE_BUFFER_SIZE,
            memory_limit: None,
            virtual_memory_limit: None,
            cpu_time_limit: None,
            socket_user: None,
            script_user: None,
            script_group: None,
        }
    }

    /// "(wsgi:NAME)" for display-name=%{GROUP}, else the given name.
    pub fn process_title(&self) -> Option<String> {
        self.display_name.as_deref().map(|d| {
            if d == "%{GROUP}" {
                format!("(wsgi:{})", self.name)
            } else {
                d.to_owned()
            }
        })
    }

    /// `wsgi.multithread` as mod_wsgi reports it.
    pub fn multithread(&self) -> bool {
        self.threads != 1
    }
}

/// Every option key `WSGIDaemonProcess` accepts (SPEC §2), in the order error messages list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DaemonOption {
    Processes,
    Threads,
    User,
    Group,
    SupplementaryGroups,
    Home,
    DisplayName,
    PythonHome,
    PythonPath,
    Umask,
    Lang,
    Locale,
    Chroot,
    MaximumRequests,
    InactivityTimeout,
    RequestTimeout,
    RestartInterval,
    StartupTimeout,
    GracefulTimeout,
    ShutdownTimeout,
    DeadlockTimeout,
    ConnectTimeout,
    SocketTimeout,
    QueueTimeout,
    ListenBacklog,
    HeaderBufferSize,
    ResponseBufferSize,
    MemoryLimit,
    VirtualMemoryLimit,
    CpuTimeLimit,
    SocketUser,
    ScriptUser,
    ScriptGroup,
}

/// How a numeric option is checked and described.
struct NumberRule {
    min: u64,
    max: u64,
    /// " of seconds", " of bytes" or "".
    unit: &'static str,
    /// What 0 means when it is special (and, if `min > 0`, allowed anyway).
    zero_means: Option<&'static str>,
}

impl NumberRule {
    fn accepts(&self, n: u64) -> bool {
        (n == 0 && self.zero_means.is_some()) || (self.min..=self.max).contains(&n)
    }

    fn describe(&self) -> String {
        let (min, max, unit) = (self.min, self.max, self.unit);
        match self.zero_means {
            Some(zero) if min == 0 => {
                format!("a whole number{unit} from 0 ({zero}) to {max}")
            }
            Some(zero) => format!("0 ({zero}) or a whole number{unit} from {min} to {max}"),
            None => format!("a whole number{unit} from {min} to {max}"),
        }
    }
}

const fn rule(
    min: u64,
    max: u64,
    unit: &'static str,
    zero_means: Option<&'static str>,
) -> NumberRule {
    NumberRule {
        min,
        max,
        unit,
        zero_means,
    }
}

const SECS: &str = " of seconds";
const BYTES: &str = " of bytes";
const OFF: Option<&str> = Some("off");

impl DaemonOption {
    pub const ALL: [DaemonOption; 33] = [
        DaemonOption::Processes,
        DaemonOption::Threads,
        DaemonOption::User,
        DaemonOption::Group,
        DaemonOption::SupplementaryGroups,
        DaemonOption::Home,
        DaemonOption::DisplayName,
        DaemonOption::PythonHome,
        DaemonOption::PythonPath,
        DaemonOption::Umask,
        DaemonOption::Lang,
        DaemonOption::Locale,
        DaemonOption::Chroot,
        DaemonOption::MaximumRequests,
        DaemonOption::InactivityTimeout,
        DaemonOption::RequestTimeout,
        DaemonOption::RestartInterval,
        DaemonOption::StartupTimeout,
        DaemonOption::GracefulTimeout,
        DaemonOption::ShutdownTimeout,
        DaemonOption::DeadlockTimeout,
        DaemonOption::ConnectTimeout,
        DaemonOption::SocketTimeout,
        DaemonOption::QueueTimeout,
        DaemonOption::ListenBacklog,
        DaemonOption::HeaderBufferSize,
        DaemonOption::ResponseBufferSize,
        DaemonOption::MemoryLimit,
        DaemonOption::VirtualMemoryLimit,
        DaemonOption::CpuTimeLimit,
        DaemonOption::SocketUser,
        DaemonOption::ScriptUser,
        DaemonOption::ScriptGroup,
    ];

    /// The option's spelling in httpd.conf.
    pub fn key(self) -> &'static str {
        use DaemonOption::*;
        match self {
            Processes => "processes",
            Threads => "threads",
            User => "user",
            Group => "group",
            SupplementaryGroups => "supplementary-groups",
            Home => "home",
            DisplayName => "display-name",
            PythonHome => "python-home",
            PythonPath => "python-path",
            Umask => "umask",
            Lang => "lang",
            Locale => "locale",
            Chroot => "chroot",
            MaximumRequests => "maximum-requests",
            InactivityTimeout => "inactivity-timeout",
            RequestTimeout => "request-timeout",
            RestartInterval => "restart-interval",
            StartupTimeout => "startup-timeout",
            GracefulTimeout => "graceful-timeout",
            ShutdownTimeout => "shutdown-timeout",
            DeadlockTimeout => "deadlock-timeout",
            ConnectTimeout => "connect-timeout",
            SocketTimeout => "socket-timeout",
            QueueTimeout => "queue-timeout",
            ListenBacklog => "listen-backlog",
            HeaderBufferSize => "header-buffer-size",
            ResponseBufferSize => "response-buffer-size",
            MemoryLimit => "memory-limit",
            VirtualMemoryLimit => "virtual-memory-limit",
            CpuTimeLimit => "cpu-time-limit",
            SocketUser => "socket-user",
            ScriptUser => "script-user",
            ScriptGroup => "script-group",
        }
    }

    /// Case-sensitive, as mod_wsgi (`strcmp`).
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.key() == key)
    }

    /// The stable id of a bad value for this option (0103–0137, 0124 is root refusal).
    pub fn code(self) -> u16 {
        use DaemonOption::*;
        match self {
            Processes => 103,
            Threads => 104,
            MaximumRequests => 105,
            InactivityTimeout => 106,
            RequestTimeout => 107,
            RestartInterval => 108,
            StartupTimeout => 109,
            GracefulTimeout => 110,
            ShutdownTimeout => 111,
            DeadlockTimeout => 112,
            ConnectTimeout => 113,
            SocketTimeout => 114,
            QueueTimeout => 115,
            ListenBacklog => 116,
            HeaderBufferSize => 117,
            ResponseBufferSize => 118,
            MemoryLimit => 119,
            VirtualMemoryLimit => 120,
            CpuTimeLimit => 121,
            Umask => 122,
            User => 123,
            Group => 125,
            SupplementaryGroups => 126,
            SocketUser => 127,
            ScriptUser => 128,
            ScriptGroup => 129,
            Home => 131,
            PythonHome => 132,
            PythonPath => 133,
            Chroot => 134,
            DisplayName => 135,
            Lang => 136,
            Locale => 137,
        }
    }

    /// mod_wsgi's message for a bad value, verbatim where mod_wsgi has one (users search it).
    pub fn phrase(self) -> &'static str {
        use DaemonOption::*;
        match self {
            Processes => "Invalid process count for WSGI daemon process.",
            Threads => "Invalid thread count for WSGI daemon process.",
            User => "Invalid user for WSGI daemon process.",
            Group => "Invalid group for WSGI daemon process.",
            SupplementaryGroups => "Invalid supplementary groups for WSGI daemon process.",
            Home => "Invalid home directory for WSGI daemon process.",
            DisplayName => "Invalid display name for WSGI daemon process.",
            PythonHome => "Invalid python home directory for WSGI daemon process.",
            PythonPath => "Invalid python path for WSGI daemon process.",
            Umask => "Invalid umask for WSGI daemon process.",
            Lang => "Invalid lang for WSGI daemon process.",
            Locale => "Invalid locale for WSGI daemon process.",
            Chroot => "Invalid chroot directory for WSGI daemon process.",
            // mod_wsgi 4.9's own wording for maximum-requests.
            MaximumRequests => "Invalid request count for WSGI daemon process.",
            InactivityTimeout => "Invalid inactivity timeout for WSGI daemon process.",
            RequestTimeout => "Invalid request timeout for WSGI daemon process.",
            RestartInterval => "Invalid restart interval for WSGI daemon process.",
            StartupTimeout => "Invalid startup timeout for WSGI daemon process.",
            GracefulTimeout => "Invalid graceful timeout for WSGI daemon process.",
            ShutdownTimeout => "Invalid shutdown timeout for WSGI daemon process.",
            DeadlockTimeout => "Invalid deadlock timeout for WSGI daemon process.",
            ConnectTimeout => "Invalid connect timeout for WSGI daemon process.",
            SocketTimeout => "Invalid socket timeout for WSGI daemon process.",
            QueueTimeout => "Invalid queue timeout for WSGI daemon process.",
            ListenBacklog => "Invalid listen backlog for WSGI daemon process.",
            HeaderBufferSize => "Invalid header buffer size for WSGI daemon process.",
            ResponseBufferSize => "Invalid response buffer size for WSGI daemon process.",
            MemoryLimit => "Invalid memory limit for WSGI daemon process.",
            VirtualMemoryLimit => "Invalid virtual memory limit for WSGI daemon process.",
            CpuTimeLimit => "Invalid CPU time limit for WSGI daemon process.",
            SocketUser => "Invalid socket user for WSGI daemon process.",
            ScriptUser => "Invalid script user for WSGI daemon process.",
            ScriptGroup => "Invalid script group for WSGI daemon process.",
        }
    }

    /// The bounds of a numeric option; None for the others.
    fn number_rule(self) -> Option<NumberRule> {
        use DaemonOption::*;
        let t = MAX_TIMEOUT_SECS;
        Some(match self {
            Processes => rule(1, 1_000_000, "", None),
            // mod_wsgi: threads < WSGI_STACK_LAST - 1.
            Threads => rule(0, 65_533, "", None),
            MaximumRequests => rule(0, u64::from(u32::MAX), "", OFF),
            InactivityTimeout | RequestTimeout | RestartInterval | StartupTimeout
            | QueueTimeout => rule(0, t, SECS, OFF),
            GracefulTimeout | ShutdownTimeout | DeadlockTimeout | ConnectTimeout => {
                rule(0, t, SECS, None)
            }
            SocketTimeout => rule(0, t, SECS, Some("Apache's Timeout")),
            // The kernel clamps to net.core.somaxconn anyway.
            ListenBacklog => rule(0, 65_535, "", None),
            HeaderBufferSize => rule(8_192, 1_048_576, BYTES, Some("the default, 32768")),
            ResponseBufferSize => rule(65_536, 67_108_864, BYTES, Some("the default, 262144")),
            // rlim_t values; i64::MAX keeps clear of RLIM_INFINITY.
            MemoryLimit | VirtualMemoryLimit => rule(0, i64::MAX as u64, BYTES, OFF),
            CpuTimeLimit => rule(0, u64::from(u32::MAX), SECS, OFF),
            _ => return None,
        })
    }

    /// What a sysadmin may write, for the error message.
    pub fn allowed(self) -> String {
        use DaemonOption::*;
        if let Some(r) = self.number_rule() {
            return r.describe();
        }
        let text = match self {
            Umask => "an octal mode from 0 to 0777, e.g. 022 or 0007",
            User => "the name or #uid of an existing user other than root",
            SocketUser | ScriptUser => "the name or #uid of an existing user",
            Group | ScriptGroup => "the name or #gid of an existing group",
            SupplementaryGroups => {
                "a comma-separated list of existing group names or #gids \
                 (empty for no supplementary groups)"
            }
            Home | Chroot => "an absolute path, e.g. /srv/www",
            PythonHome => "the absolute path of a Python installation or virtual environment",
            PythonPath => "':'-separated absolute paths, e.g. /srv/app:/srv/lib",
            DisplayName => "a non-empty process title, or %{GROUP} for (wsgi:NAME)",
            Lang | Locale => "a non-empty locale name, e.g. en_US.UTF-8",
            _ => "",
        };
        text.to_owned()
    }
}

/// Options mod_wsgi knows but mod_wsgi_rs does not implement: refused with a clearer reason
/// than "unknown", so nobody hunts for a typo that is not there.
const MOD_WSGI_ONLY_OPTIONS: &[&str] = &[
    "python-eggs",
    "stack-size",
    "eviction-timeout",
    "send-buffer-size",
    "receive-buffer-size",
    "response-socket-timeout",
    "cpu-priority",
    "server-metrics",
    "newrelic-config-file",
    "newrelic-environment",
];

/// "processes, threads, …" for error messages.
pub fn valid_keys() -> String {
    DaemonOption::ALL
        .iter()
        .map(|o| o.key())
        .collect::<Vec<_>>()
        .join(", ")
}

/// " (why)" or "" — keeps the message shape when there is nothing more to say.
fn paren(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// A `WSGIDaemonProcess` line that cannot be accepted. Display is the whole line shown by
/// `apachectl -t`: stable id, the group, mod_wsgi's phrase, what was given, what is allowed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DaemonProcessError {
    #[error(
        "WSGIRS0101: Name of WSGI daemon process not supplied. \
         Usage: WSGIDaemonProcess name [option=value ...]."
    )]
    MissingName,

    #[error(
        "WSGIRS0102: WSGIDaemonProcess '{group}': Invalid option to WSGI daemon process \
         definition. Got '{token}': {problem}. Valid options (key=value): {valid}.",
        valid = valid_keys()
    )]
    InvalidOption {
        group: String,
        token: String,
        problem: String,
    },

    #[error(
        "WSGIRS{code:04}: WSGIDaemonProcess '{group}': {phrase} Got '{key}={value}'{why}; \
         allowed: {allowed}.",
        code = .option.code(),
        phrase = .option.phrase(),
        key = .option.key(),
        why = paren(.reason),
        allowed = .option.allowed()
    )]
    InvalidValue {
        group: String,
        option: DaemonOption,
        value: String,
        /// Extra detail ("no such user"); empty when the value and range say it all.
        reason: String,
    },

    #[error(
        "WSGIRS0124: WSGIDaemonProcess '{group}': WSGI process blocked from running as root. \
         Got 'user={value}' (uid 0); allowed: any existing user other than root."
    )]
    RootBlocked { group: String, value: String },

    #[error(
        "WSGIRS0130: WSGIDaemonProcess '{group}': Only one of script-user and script-group \
         allowed. Got 'script-user={script_user}' and 'script-group={script_group}'; \
         give just one of them."
    )]
    ScriptUserAndGroup {
        group: String,
        script_user: String,
        script_group: String,
    },
}

impl DaemonProcessError {
    /// The number in the message's `WSGIRS01NN` id.
    pub fn code(&self) -> u16 {
        match self {
            DaemonProcessError::MissingName => 101,
            DaemonProcessError::InvalidOption { .. } => 102,
            DaemonProcessError::InvalidValue { option, .. } => option.code(),
            DaemonProcessError::RootBlocked { .. } => 124,
            DaemonProcessError::ScriptUserAndGroup { .. } => 130,
        }
    }
}

/// Why one option's value was refused; turned into a [`DaemonProcessError`] by the caller,
/// which knows the group name and the option.
enum Rejection {
    Invalid(String),
    Root,
}

impl Rejection {
    fn plain() -> Self {
        Rejection::Invalid(String::new())
    }

    fn because(reason: impl Into<String>) -> Self {
        Rejection::Invalid(reason.into())
    }
}

/// Parse `WSGIDaemonProcess` arguments (already split into words; see [`split_raw_args`]).
pub fn parse_daemon_process(
    args: &[&str],
    accounts: &dyn AccountLookup,
) -> Result<ProcessGroupSpec, DaemonProcessError> {
    let (name, options) = match args.split_first() {
        Some((name, rest)) if !name.is_empty() => (*name, rest),
        _ => return Err(DaemonProcessError::MissingName),
    };
    let mut spec = ProcessGroupSpec::new(name);
    // Raw values kept only to quote them back if both script options are given.
    let mut script_user_raw = None;
    let mut script_group_raw = None;

    for token in options {
        let option = classify(name, token)?;
        // classify() guarantees the '='.
        let value = token.split_once('=').map_or("", |(_, v)| v);
        apply(&mut spec, option, value, accounts).map_err(|rejection| match rejection {
            Rejection::Root => DaemonProcessError::RootBlocked {
                group: name.to_owned(),
                value: value.to_owned(),
            },
            Rejection::Invalid(reason) => DaemonProcessError::InvalidValue {
                group: name.to_owned(),
                option,
                value: value.to_owned(),
                reason,
            },
        })?;
        match option {
            DaemonOption::ScriptUser => script_user_raw = Some(value),
            DaemonOption::ScriptGroup => script_group_raw = Some(value),
            _ => {}
        }
    }

    if let (Some(u), Some(g)) = (script_user_raw, script_group_raw) {
        return Err(DaemonProcessError::ScriptUserAndGroup {
            group: name.to_owned(),
            script_user: u.to_owned(),
            script_group: g.to_owned(),
        });
    }
    Ok(spec)
}

/// Check that `token` is `key=value` with a known key.
fn classify(group: &str, token: &str) -> Result<DaemonOption, DaemonProcessError> {
    let invalid = |problem: String| DaemonProcessError::InvalidOption {
        group: group.to_owned(),
        token: token.to_owned(),
        problem,
    };
    let Some((key, _)) = token.split_once('=') else {
        return Err(invalid("not of the form key=value".to_owned()));
    };
    if key.is_empty() {
        return Err(invalid("the option name before '=' is missing".to_owned()));
    }
    if let Some(option) = DaemonOption::from_key(key) {
        return Ok(option);
    }
    let lower = key.to_ascii_lowercase();
    let problem = if let Some(option) = DaemonOption::from_key(&lower) {
        format!(
            "option names are lower-case (did you mean '{}')",
            option.key()
        )
    } else if MOD_WSGI_ONLY_OPTIONS.contains(&key) {
        format!("'{key}' is a mod_wsgi option that mod_wsgi_rs does not support")
    } else {
        format!("unknown option '{key}'")
    };
    Err(invalid(problem))
}

/// Validate one value and store it in `spec`.
fn apply(
    spec: &mut ProcessGroupSpec,
    option: DaemonOption,
    value: &str,
    accounts: &dyn AccountLookup,
) -> Result<(), Rejection> {
    use DaemonOption::*;
    match option {
        Processes => {
            spec.processes = number(option, value)?;
            spec.multiprocess = true;
        }
        Threads => spec.threads = number(option, value)?,
        MaximumRequests => spec.maximum_requests = number(option, value)?,
        InactivityTimeout => spec.inactivity_timeout = seconds_or_off(option, value)?,
        RequestTimeout => spec.request_timeout = seconds_or_off(option, value)?,
        RestartInterval => spec.restart_interval = seconds_or_off(option, value)?,
        StartupTimeout => spec.startup_timeout = seconds_or_off(option, value)?,
        QueueTimeout => spec.queue_timeout = seconds_or_off(option, value)?,
        SocketTimeout => spec.socket_timeout = seconds_or_off(option, value)?,
        GracefulTimeout => spec.graceful_timeout = Duration::from_secs(number(option, value)?),
        ShutdownTimeout => spec.shutdown_timeout = Duration::from_secs(number(option, value)?),
        DeadlockTimeout => spec.deadlock_timeout = Duration::from_secs(number(option, value)?),
        ConnectTimeout => spec.connect_timeout = Duration::from_secs(number(option, value)?),
        ListenBacklog => spec.listen_backlog = number(option, value)?,
        HeaderBufferSize => {
            spec.header_buffer_size = match number(option, value)? {
                0 => ProcessGroupSpec::DEFAULT_HEADER_BUFFER_SIZE,
                n => n,
            }
        }
        ResponseBufferSize => {
            spec.response_buffer_size = match number(option, value)? {
                0 => ProcessGroupSpec::DEFAULT_RESPONSE_BUFFER_SIZE,
                n => n,
            }
        }
        MemoryLimit => spec.memory_limit = nonzero(number(option, value)?),
        VirtualMemoryLimit => spec.virtual_memory_limit = nonzero(number(option, value)?),
        CpuTimeLimit => spec.cpu_time_limit = nonzero(number(option, value)?),
        Umask => spec.umask = Some(umask(value)?),
        User => {
            let account = user(value, accounts)?;
            if account.uid == 0 {
                return Err(Rejection::Root);
            }
            spec.user = Some(account);
        }
        SocketUser => spec.socket_user = Some(user(value, accounts)?),
        ScriptUser => spec.script_user = Some(user(value, accounts)?),
        Group => spec.group = Some(group(value, accounts)?),
        ScriptGroup => spec.script_group = Some(group(value, accounts)?),
        SupplementaryGroups => spec.supplementary_groups = Some(group_list(value, accounts)?),
        Home => spec.home = Some(absolute(value)?),
        PythonHome => spec.python_home = Some(absolute(value)?),
        Chroot => spec.chroot = Some(absolute(value)?),
        PythonPath => spec.python_path = path_list(value)?,
        DisplayName => spec.display_name = Some(non_empty(value)?),
        Lang => spec.lang = Some(non_empty(value)?),
        Locale => spec.locale = Some(non_empty(value)?),
    }
    Ok(())
}

/// Decimal digits only: no sign, no blanks, no fraction, no overflow (unlike atoi).
fn whole_number(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn number<T: TryFrom<u64>>(option: DaemonOption, value: &str) -> Result<T, Rejection> {
    let n = whole_number(value).ok_or_else(Rejection::plain)?;
    let accepted = option.number_rule().is_some_and(|r| r.accepts(n));
    if !accepted {
        return Err(Rejection::plain());
    }
    T::try_from(n).map_err(|_| Rejection::plain())
}

fn seconds_or_off(option: DaemonOption, value: &str) -> Result<Option<Duration>, Rejection> {
    Ok(nonzero(number(option, value)?).map(Duration::from_secs))
}

fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}

/// Octal like strtol(…, 8) but strict: digits 0-7 only, at most 0777.
fn umask(value: &str) -> Result<u32, Rejection> {
    if value.is_empty() || !value.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(Rejection::plain());
    }
    match u32::from_str_radix(value, 8) {
        Ok(mask) if mask <= 0o777 => Ok(mask),
        _ => Err(Rejection::because("more than 0777")),
    }
}

/// `#123` → Some(Ok(123)), `#x` → Some(Err), a name → None.
fn numeric_id(value: &str) -> Option<Result<u32, Rejection>> {
    let digits = value.strip_prefix('#')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err(Rejection::because(
            "'#' must be followed by a numeric id",
        )));
    }
    Some(
        digits
            .parse()
            .map_err(|_| Rejection::because("the id is too large")),
    )
}

fn user(value: &str, accounts: &dyn AccountLookup) -> Result<Account, Rejection> {
    if value.is_empty() {
        return Err(Rejection::plain());
    }
    match numeric_id(value) {
        Some(uid) => {
            let uid = uid?;
            accounts
                .user_by_uid(uid)
                .ok_or_else(|| Rejection::because(format!("no user has uid {uid}")))
        }
        None => accounts
            .user_by_name(value)
            .ok_or_else(|| Rejection::because("no such user")),
    }
}

fn group(value: &str, accounts: &dyn AccountLookup) -> Result<GroupId, Rejection> {
    if value.is_empty() {
        return Err(Rejection::plain());
    }
    match numeric_id(value) {
        Some(gid) => {
            let gid = gid?;
            accounts
                .group_by_gid(gid)
                .ok_or_else(|| Rejection::because(format!("no group has gid {gid}")))
        }
        None => accounts
            .group_by_name(value)
            .ok_or_else(|| Rejection::because("no such group")),
    }
}

/// Empty means "no supplementary groups" (mod_wsgi then calls setgroups with the primary
/// group only); otherwise every comma-separated item must name an existing group.
fn group_list(value: &str, accounts: &dyn AccountLookup) -> Result<Vec<GroupId>, Rejection> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let mut groups = Vec::new();
    for item in value.split(',') {
        if item.is_empty() {
            return Err(Rejection::because("empty item in the list"));
        }
        let found = group(item, accounts).map_err(|rejection| match rejection {
            Rejection::Invalid(why) => Rejection::because(format!("'{item}': {why}")),
            Rejection::Root => Rejection::Root,
        })?;
        groups.push(found);
    }
    if groups.len() > MAX_SUPPLEMENTARY_GROUPS {
        return Err(Rejection::because(format!(
            "more than {MAX_SUPPLEMENTARY_GROUPS} groups"
        )));
    }
    Ok(groups)
}

fn absolute(value: &str) -> Result<PathBuf, Rejection> {
    if value.is_empty() {
        return Err(Rejection::plain());
    }
    if !Path::new(value).is_absolute() {
        return Err(Rejection::because("not an absolute path"));
    }
    Ok(PathBuf::from(value))
}

fn path_list(value: &str) -> Result<Vec<PathBuf>, Rejection> {
    if value.is_empty() {
        return Err(Rejection::plain());
    }
    value
        .split(':')
        .map(|entry| {
            if entry.is_empty() {
                Err(Rejection::because("empty entry in the list"))
            } else if Path::new(entry).is_absolute() {
                Ok(PathBuf::from(entry))
            } else {
                Err(Rejection::because(format!(
                    "'{entry}' is not an absolute path"
                )))
            }
        })
        .collect()
}

fn non_empty(value: &str) -> Result<String, Rejection> {
    if value.is_empty() {
        Err(Rejection::plain())
    } else {
        Ok(value.to_owned())
    }
}

/// Split a RAW_ARGS directive line into words the way mod_wsgi does: the first `positional`
/// words as `ap_getword_conf` (quotes allowed), then `key=value` options whose value may be
/// quoted (`python-path="/a b:/c"`). A word that is not `key=value` is returned as is, so the
/// parser can name it. Use `positional = 1` for WSGIDaemonProcess, 2 for WSGIScriptAlias(Match).
pub fn split_raw_args(raw: &str, positional: usize) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = skip_space(raw);
    while !rest.is_empty() {
        if words.len() < positional {
            let (word, after) = getword_conf(rest);
            words.push(word);
            rest = after;
            continue;
        }
        // mod_wsgi's wsgi_parse_option: the key ends at '=' or a blank.
        let key_end = rest.find(|c| c == '=' || is_space(c)).unwrap_or(rest.len());
        let (key, after_key) = rest.split_at(key_end);
        match after_key.strip_prefix('=') {
            Some(after_eq) => {
                let (value, after) = getword_conf(after_eq);
                words.push(format!("{key}={value}"));
                rest = after;
            }
            None => {
                words.push(key.to_owned());
                rest = skip_space(after_key);
            }
        }
    }
    words
}

/// apr_isspace.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn skip_space(s: &str) -> &str {
    s.trim_start_matches(is_space)
}

/// httpd's `ap_getword_conf`: one word, or a '…'/"…" quoted string in which a backslash
/// escapes the quote character; returns the word and the rest after trailing blanks.
fn getword_conf(s: &str) -> (String, &str) {
    let s = skip_space(s);
    let quote = match s.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            let end = s.find(is_space).unwrap_or(s.len());
            return (s[..end].to_owned(), skip_space(&s[end..]));
        }
    };
    let body = &s[1..];
    let mut word = String::new();
    let mut rest_at = body.len();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            rest_at = i + 1;
            break;
        }
        if c == '\\' && chars.peek().is_some_and(|&(_, n)| n == quote) {
            word.push(quote);
            chars.next();
            continue;
        }
        word.push(c);
    }
    (word, skip_space(&body[rest_at..]))
}

#[cfg(test)]
// A failed unwrap in a test is the test failing, with its message.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    struct FakeAccounts {
        users: Vec<Account>,
        groups: Vec<GroupId>,
    }

    fn acct(name: &str, uid: u32, gid: u32, home: &str) -> Account {
        Account {
            name: name.into(),
            uid,
            gid,
            home: home.into(),
        }
    }

    fn grp(name: &str, gid: u32) -> GroupId {
        GroupId {
            name: name.into(),
            gid,
        }
    }

    fn fake() -> FakeAccounts {
        FakeAccounts {
            users: vec![
                acct("root", 0, 0, "/root"),
                acct("bob", 1001, 1001, "/home/bob"),
                acct("joe", 1002, 1002, "/home/joe"),
            ],
            groups: vec![
                grp("root", 0),
                grp("bob", 1001),
                grp("joe", 1002),
                grp("staff", 50),
            ],
        }
    }

    impl AccountLookup for FakeAccounts {
        fn user_by_name(&self, name: &str) -> Option<Account> {
            self.users.iter().find(|u| u.name == name).cloned()
        }
        fn user_by_uid(&self, uid: u32) -> Option<Account> {
            self.users.iter().find(|u| u.uid == uid).cloned()
        }
        fn group_by_name(&self, name: &str) -> Option<GroupId> {
            self.groups.iter().find(|g| g.name == name).cloned()
        }
        fn group_by_gid(&self, gid: u32) -> Option<GroupId> {
            self.groups.iter().find(|g| g.gid == gid).cloned()
        }
    }

    fn parse(args: &[&str]) -> Result<ProcessGroupSpec, DaemonProcessError> {
        parse_daemon_process(args, &fake())
    }

    fn ok(opts: &[&str]) -> ProcessGroupSpec {
        let mut args = vec!["g"];
        args.extend_from_slice(opts);
        match parse(&args) {
            Ok(spec) => spec,
            Err(e) => panic!("{opts:?} should parse, got: {e}"),
        }
    }

    fn err(opts: &[&str]) -> DaemonProcessError {
        let mut args = vec!["g"];
        args.extend_from_slice(opts);
        match parse(&args) {
            Ok(spec) => panic!("{opts:?} should fail, got {spec:?}"),
            Err(e) => e,
        }
    }

    /// A bad value for `option` given as `key=value`: the right code, phrase and quoting.
    fn assert_bad_value(option: DaemonOption, value: &str) -> String {
        let token = format!("{}={value}", option.key());
        let e = err(&[&token]);
        assert_eq!(e.code(), option.code(), "{token}: {e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "WSGIRS{:04}: WSGIDaemonProcess 'g': ",
                option.code()
            )),
            "{msg}"
        );
        assert!(msg.contains(option.phrase()), "{msg}");
        assert!(msg.contains(&format!("Got '{token}'")), "{msg}");
        assert!(msg.contains("allowed: "), "{msg}");
        msg
    }

    // ---- name, option syntax ----

    #[test]
    fn defaults() {
        let spec = ok(&[]);
        assert_eq!(spec, ProcessGroupSpec::new("g"));
        assert_eq!(spec.name, "g");
        assert_eq!(spec.processes, 1);
        assert!(!spec.multiprocess);
        assert_eq!(spec.threads, 15);
        assert!(spec.multithread());
        assert_eq!(spec.user, None);
        assert_eq!(spec.group, None);
        assert_eq!(spec.supplementary_groups, None);
        assert_eq!(spec.home, None);
        assert_eq!(spec.display_name, None);
        assert_eq!(spec.python_home, None);
        assert!(spec.python_path.is_empty());
        assert_eq!(spec.umask, None);
        assert_eq!(spec.lang, None);
        assert_eq!(spec.locale, None);
        assert_eq!(spec.chroot, None);
        assert_eq!(spec.maximum_requests, 0);
        assert_eq!(spec.inactivity_timeout, None);
        assert_eq!(spec.request_timeout, None);
        assert_eq!(spec.restart_interval, None);
        assert_eq!(spec.startup_timeout, None);
        assert_eq!(spec.graceful_timeout, Duration::from_secs(15));
        assert_eq!(spec.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(spec.deadlock_timeout, Duration::from_secs(300));
        assert_eq!(spec.connect_timeout, Duration::from_secs(15));
        assert_eq!(spec.socket_timeout, None);
        assert_eq!(spec.queue_timeout, None);
        assert_eq!(spec.listen_backlog, 100);
        assert_eq!(spec.header_buffer_size, 32768);
        assert_eq!(spec.response_buffer_size, 262_144);
        assert_eq!(spec.memory_limit, None);
        assert_eq!(spec.virtual_memory_limit, None);
        assert_eq!(spec.cpu_time_limit, None);
        assert_eq!(spec.socket_user, None);
        assert_eq!(spec.script_user, None);
        assert_eq!(spec.script_group, None);
        assert_eq!(spec.process_title(), None);
    }

    #[test]
    fn missing_name() {
        for args in [&[][..], &[""][..], &["", "threads=2"][..]] {
            let e = parse(args).unwrap_err();
            assert_eq!(e, DaemonProcessError::MissingName);
            assert_eq!(e.code(), 101);
            assert!(e
                .to_string()
                .starts_with("WSGIRS0101: Name of WSGI daemon process not supplied."));
        }
    }

    #[test]
    fn name_is_kept_verbatim() {
        let spec = parse(&["bob:1"]).unwrap();
        assert_eq!(spec.name, "bob:1");
    }

    #[test]
    fn missing_equals_is_invalid_option() {
        let e = err(&["threads"]);
        assert_eq!(e.code(), 102);
        let msg = e.to_string();
        assert!(msg.starts_with("WSGIRS0102: WSGIDaemonProcess 'g': Invalid option to WSGI daemon process definition. Got 'threads': not of the form key=value."), "{msg}");
        assert!(msg.contains(&valid_keys()), "{msg}");
    }

    #[test]
    fn unknown_key_is_invalid_option_listing_valid_keys() {
        let msg = err(&["procesess=2"]).to_string();
        assert!(msg.contains("Invalid option to WSGI daemon process definition."));
        assert!(
            msg.contains("Got 'procesess=2': unknown option 'procesess'"),
            "{msg}"
        );
        for o in DaemonOption::ALL {
            assert!(msg.contains(o.key()), "{msg} lacks {}", o.key());
        }
    }

    #[test]
    fn empty_key_is_invalid_option() {
        let e = err(&["=5"]);
        assert_eq!(e.code(), 102);
        assert!(e.to_string().contains("Got '=5': the option name"));
    }

    #[test]
    fn keys_are_case_sensitive() {
        let e = err(&["Processes=2"]);
        assert_eq!(e.code(), 102);
        assert!(
            e.to_string()
                .contains("(did you mean 'processes'). Valid options"),
            "{e}"
        );
    }

    #[test]
    fn mod_wsgi_only_option_says_so() {
        let e = err(&["stack-size=524288"]);
        assert_eq!(e.code(), 102);
        assert!(
            e.to_string().contains("mod_wsgi_rs does not support"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_key_last_one_wins() {
        let spec = ok(&["processes=2", "threads=4", "processes=3"]);
        assert_eq!(spec.processes, 3);
        assert_eq!(spec.threads, 4);
        let spec = ok(&["user=bob", "user=joe"]);
        assert_eq!(spec.user.unwrap().name, "joe");
    }

    #[test]
    fn a_bad_duplicate_still_fails() {
        assert_eq!(err(&["threads=4", "threads=x"]).code(), 104);
    }

    #[test]
    fn value_may_contain_equals() {
        let spec = ok(&["display-name=a=b"]);
        assert_eq!(spec.display_name.as_deref(), Some("a=b"));
    }

    #[test]
    fn example_message_is_exact() {
        let e = parse(&["bob:1", "processes=abc"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "WSGIRS0103: WSGIDaemonProcess 'bob:1': Invalid process count for WSGI daemon \
             process. Got 'processes=abc'; allowed: a whole number from 1 to 1000000."
        );
    }

    #[test]
    fn codes_are_unique_and_in_range() {
        let mut codes: Vec<u16> = DaemonOption::ALL.iter().map(|o| o.code()).collect();
        codes.extend([101, 102, 124, 130]);
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n, "duplicate code");
        assert!(codes.iter().all(|c| (101..=149).contains(c)));
    }

    #[test]
    fn from_key_round_trips() {
        for o in DaemonOption::ALL {
            assert_eq!(DaemonOption::from_key(o.key()), Some(o));
            assert!(!o.allowed().is_empty());
            assert!(o.phrase().ends_with("for WSGI daemon process."));
        }
        assert_eq!(DaemonOption::from_key("nope"), None);
    }

    // ---- numbers ----

    /// Every numeric option: valid bounds, zero, and every class of bad value.
    #[test]
    fn numeric_options_reject_every_bad_class() {
        for option in DaemonOption::ALL {
            let Some(rule) = option.number_rule() else {
                continue;
            };
            let key = option.key();
            ok(&[&format!("{key}={}", rule.max)]);
            ok(&[&format!("{key}={}", rule.min)]);
            if rule.zero_means.is_some() {
                ok(&[&format!("{key}=0")]);
            }
            let max_plus_one = (u128::from(rule.max) + 1).to_string();
            for bad in [
                "",
                "abc",
                "-1",
                "1.5",
                "+5",
                " 5",
                "5 ",
                "0x10",
                "1e3",
                "99999999999999999999999",
                &max_plus_one,
            ] {
                let msg = assert_bad_value(option, bad);
                assert!(msg.contains(&rule.max.to_string()), "{msg}");
            }
            if rule.min > 1 {
                assert_bad_value(option, &(rule.min - 1).to_string());
            }
        }
    }

    #[test]
    fn processes() {
        let spec = ok(&["processes=4"]);
        assert_eq!(spec.processes, 4);
        assert!(spec.multiprocess);
        // Giving it at all makes the group multiprocess, as mod_wsgi.
        let spec = ok(&["processes=1"]);
        assert_eq!(spec.processes, 1);
        assert!(spec.multiprocess);
        assert_bad_value(DaemonOption::Processes, "0");
        assert_eq!(err(&["processes=-1"]).code(), 103);
    }

    #[test]
    fn threads() {
        assert_eq!(ok(&["threads=0"]).threads, 0);
        let one = ok(&["threads=1"]);
        assert_eq!(one.threads, 1);
        assert!(!one.multithread());
        assert_eq!(ok(&["threads=65533"]).threads, 65533);
        assert_bad_value(DaemonOption::Threads, "65534");
        let msg = assert_bad_value(DaemonOption::Threads, "99999999999");
        assert!(
            msg.ends_with("allowed: a whole number from 0 to 65533."),
            "{msg}"
        );
        assert!(ok(&["threads=007"]).threads == 7);
    }

    #[test]
    fn maximum_requests() {
        assert_eq!(ok(&["maximum-requests=1000"]).maximum_requests, 1000);
        assert_eq!(ok(&["maximum-requests=0"]).maximum_requests, 0);
        let msg = assert_bad_value(DaemonOption::MaximumRequests, "x");
        assert!(msg.contains("Invalid request count for WSGI daemon process."));
        assert!(msg.contains("0 (off)"), "{msg}");
    }

    #[test]
    fn off_timeouts() {
        type Get = fn(&ProcessGroupSpec) -> Option<Duration>;
        let cases: [(&str, Get); 6] = [
            ("inactivity-timeout", |s| s.inactivity_timeout),
            ("request-timeout", |s| s.request_timeout),
            ("restart-interval", |s| s.restart_interval),
            ("startup-timeout", |s| s.startup_timeout),
            ("queue-timeout", |s| s.queue_timeout),
            ("socket-timeout", |s| s.socket_timeout),
        ];
        for (key, get) in cases {
            assert_eq!(get(&ok(&[])), None, "{key} default");
            assert_eq!(get(&ok(&[&format!("{key}=0")])), None, "{key}=0");
            assert_eq!(
                get(&ok(&[&format!("{key}=60")])),
                Some(Duration::from_secs(60)),
                "{key}=60"
            );
        }
        let msg = assert_bad_value(DaemonOption::SocketTimeout, "1.5");
        assert!(msg.contains("0 (Apache's Timeout)"), "{msg}");
        let msg = assert_bad_value(DaemonOption::InactivityTimeout, "-1");
        assert!(msg.ends_with("allowed: a whole number of seconds from 0 (off) to 31536000."));
    }

    #[test]
    fn plain_timeouts() {
        type Get = fn(&ProcessGroupSpec) -> Duration;
        let cases: [(&str, Get); 4] = [
            ("graceful-timeout", |s| s.graceful_timeout),
            ("shutdown-timeout", |s| s.shutdown_timeout),
            ("deadlock-timeout", |s| s.deadlock_timeout),
            ("connect-timeout", |s| s.connect_timeout),
        ];
        for (key, get) in cases {
            assert_eq!(get(&ok(&[&format!("{key}=0")])), Duration::ZERO, "{key}=0");
            assert_eq!(
                get(&ok(&[&format!("{key}=42")])),
                Duration::from_secs(42),
                "{key}=42"
            );
        }
        assert_eq!(err(&["graceful-timeout=1.5"]).code(), 110);
        assert_eq!(err(&["shutdown-timeout=abc"]).code(), 111);
        assert_eq!(err(&["deadlock-timeout=-3"]).code(), 112);
        assert_eq!(err(&["connect-timeout="]).code(), 113);
    }

    #[test]
    fn listen_backlog() {
        assert_eq!(ok(&["listen-backlog=500"]).listen_backlog, 500);
        assert_bad_value(DaemonOption::ListenBacklog, "65536");
    }

    #[test]
    fn buffer_sizes() {
        assert_eq!(ok(&["header-buffer-size=0"]).header_buffer_size, 32768);
        assert_eq!(ok(&["header-buffer-size=8192"]).header_buffer_size, 8192);
        assert_eq!(ok(&["header-buffer-size=65536"]).header_buffer_size, 65536);
        let msg = assert_bad_value(DaemonOption::HeaderBufferSize, "8191");
        assert!(msg.ends_with(
            "allowed: 0 (the default, 32768) or a whole number of bytes from 8192 to 1048576."
        ));
        assert_eq!(
            ok(&["response-buffer-size=0"]).response_buffer_size,
            262_144
        );
        assert_eq!(
            ok(&["response-buffer-size=65536"]).response_buffer_size,
            65536
        );
        assert_eq!(
            ok(&["response-buffer-size=131072"]).response_buffer_size,
            131072
        );
        let msg = assert_bad_value(DaemonOption::ResponseBufferSize, "65535");
        assert!(msg.ends_with(&format!(
            "allowed: 0 (the default, {}) or a whole number of bytes from 65536 to 67108864.",
            ProcessGroupSpec::DEFAULT_RESPONSE_BUFFER_SIZE
        )));
        assert_bad_value(DaemonOption::ResponseBufferSize, "1");
    }

    #[test]
    fn rlimits() {
        let spec = ok(&[
            "memory-limit=1000000",
            "virtual-memory-limit=2000000",
            "cpu-time-limit=30",
        ]);
        assert_eq!(spec.memory_limit, Some(1_000_000));
        assert_eq!(spec.virtual_memory_limit, Some(2_000_000));
        assert_eq!(spec.cpu_time_limit, Some(30));
        let spec = ok(&[
            "memory-limit=0",
            "virtual-memory-limit=0",
            "cpu-time-limit=0",
        ]);
        assert_eq!(spec.memory_limit, None);
        assert_eq!(spec.virtual_memory_limit, None);
        assert_eq!(spec.cpu_time_limit, None);
        assert!(assert_bad_value(DaemonOption::CpuTimeLimit, "x")
            .contains("Invalid CPU time limit for WSGI daemon process."));
    }

    #[test]
    fn umask_octal() {
        assert_eq!(ok(&["umask=0007"]).umask, Some(0o7));
        assert_eq!(ok(&["umask=022"]).umask, Some(0o22));
        assert_eq!(ok(&["umask=0"]).umask, Some(0));
        assert_eq!(ok(&["umask=0777"]).umask, Some(0o777));
        assert_eq!(ok(&["umask=777"]).umask, Some(0o777));
        for bad in [
            "", "abc", "-1", "+7", "0778", "8", "1.5", "0x1f", "01000", " 022",
        ] {
            assert_bad_value(DaemonOption::Umask, bad);
        }
        let msg = assert_bad_value(DaemonOption::Umask, "99999999999999999999777");
        assert!(msg.contains("0777"), "{msg}");
        assert!(assert_bad_value(DaemonOption::Umask, "01000").contains("(more than 0777)"));
    }

    // ---- accounts ----

    #[test]
    fn user_by_name_and_id() {
        let bob = acct("bob", 1001, 1001, "/home/bob");
        assert_eq!(ok(&["user=bob"]).user, Some(bob.clone()));
        assert_eq!(ok(&["user=#1001"]).user, Some(bob));
    }

    #[test]
    fn user_bad_values() {
        assert!(assert_bad_value(DaemonOption::User, "nosuch").contains("(no such user)"));
        assert!(assert_bad_value(DaemonOption::User, "#4242").contains("(no user has uid 4242)"));
        assert!(assert_bad_value(DaemonOption::User, "#").contains("numeric id"));
        assert!(assert_bad_value(DaemonOption::User, "#abc").contains("numeric id"));
        assert!(assert_bad_value(DaemonOption::User, "#-1").contains("numeric id"));
        assert!(assert_bad_value(DaemonOption::User, "#99999999999").contains("too large"));
        let msg = assert_bad_value(DaemonOption::User, "");
        assert!(msg.contains("Invalid user for WSGI daemon process. Got 'user='; allowed:"));
        // Names are case-sensitive, as getpwnam.
        assert_bad_value(DaemonOption::User, "Bob");
    }

    #[test]
    fn root_is_refused_for_user_only() {
        for v in ["root", "#0"] {
            let e = err(&[&format!("user={v}")]);
            assert_eq!(
                e,
                DaemonProcessError::RootBlocked {
                    group: "g".into(),
                    value: v.into()
                }
            );
            assert_eq!(e.code(), 124);
            assert!(e
                .to_string()
                .contains("WSGI process blocked from running as root."));
        }
        // Any account with uid 0, whatever its name.
        let mut accounts = fake();
        accounts.users.push(acct("toor", 0, 0, "/root"));
        let e = parse_daemon_process(&["g", "user=toor"], &accounts).unwrap_err();
        assert_eq!(e.code(), 124);
        // socket-user / script-user may be root.
        assert_eq!(ok(&["socket-user=root"]).socket_user.unwrap().uid, 0);
        assert_eq!(ok(&["script-user=#0"]).script_user.unwrap().uid, 0);
    }

    #[test]
    fn group_by_name_and_id() {
        assert_eq!(ok(&["group=staff"]).group, Some(grp("staff", 50)));
        assert_eq!(ok(&["group=#1002"]).group, Some(grp("joe", 1002)));
        assert!(assert_bad_value(DaemonOption::Group, "nosuch").contains("(no such group)"));
        assert!(assert_bad_value(DaemonOption::Group, "#777").contains("(no group has gid 777)"));
        assert_bad_value(DaemonOption::Group, "");
        assert_bad_value(DaemonOption::Group, "#");
    }

    #[test]
    fn supplementary_groups() {
        assert_eq!(
            ok(&["supplementary-groups=bob,staff"]).supplementary_groups,
            Some(vec![grp("bob", 1001), grp("staff", 50)])
        );
        assert_eq!(
            ok(&["supplementary-groups=#50,joe"]).supplementary_groups,
            Some(vec![grp("staff", 50), grp("joe", 1002)])
        );
        // Empty: no supplementary groups at all (replaces initgroups).
        assert_eq!(
            ok(&["supplementary-groups="]).supplementary_groups,
            Some(vec![])
        );
        let msg = assert_bad_value(DaemonOption::SupplementaryGroups, "bob,nosuch");
        assert!(msg.contains("('nosuch': no such group)"), "{msg}");
        assert!(
            assert_bad_value(DaemonOption::SupplementaryGroups, "bob,#9")
                .contains("'#9': no group has gid 9")
        );
        assert!(
            assert_bad_value(DaemonOption::SupplementaryGroups, "bob,,staff")
                .contains("empty item")
        );
        assert_bad_value(DaemonOption::SupplementaryGroups, "bob,");
        assert_bad_value(DaemonOption::SupplementaryGroups, ",bob");
    }

    #[test]
    fn socket_user() {
        assert_eq!(ok(&["socket-user=joe"]).socket_user.unwrap().uid, 1002);
        assert_eq!(ok(&["socket-user=#1001"]).socket_user.unwrap().name, "bob");
        assert_bad_value(DaemonOption::SocketUser, "nosuch");
        assert_bad_value(DaemonOption::SocketUser, "");
    }

    #[test]
    fn script_user_and_group() {
        assert_eq!(ok(&["script-user=bob"]).script_user.unwrap().uid, 1001);
        assert_eq!(ok(&["script-user=#1002"]).script_user.unwrap().name, "joe");
        assert_eq!(
            ok(&["script-group=staff"]).script_group,
            Some(grp("staff", 50))
        );
        assert_eq!(
            ok(&["script-group=#1001"]).script_group,
            Some(grp("bob", 1001))
        );
        assert_bad_value(DaemonOption::ScriptUser, "nosuch");
        assert_bad_value(DaemonOption::ScriptUser, "");
        assert_bad_value(DaemonOption::ScriptGroup, "nosuch");
        assert_bad_value(DaemonOption::ScriptGroup, "#5");
    }

    #[test]
    fn script_user_with_script_group_is_refused() {
        let e = err(&["script-user=bob", "threads=3", "script-group=staff"]);
        assert_eq!(e.code(), 130);
        assert_eq!(
            e.to_string(),
            "WSGIRS0130: WSGIDaemonProcess 'g': Only one of script-user and script-group \
             allowed. Got 'script-user=bob' and 'script-group=staff'; give just one of them."
        );
    }

    // ---- paths and strings ----

    #[test]
    fn absolute_paths() {
        let spec = ok(&["home=/srv/app", "python-home=/srv/venv", "chroot=/jail"]);
        assert_eq!(spec.home, Some(PathBuf::from("/srv/app")));
        assert_eq!(spec.python_home, Some(PathBuf::from("/srv/venv")));
        assert_eq!(spec.chroot, Some(PathBuf::from("/jail")));
        for option in [
            DaemonOption::Home,
            DaemonOption::PythonHome,
            DaemonOption::Chroot,
        ] {
            assert!(assert_bad_value(option, "srv/app").contains("(not an absolute path)"));
            assert!(assert_bad_value(option, "./x").contains("(not an absolute path)"));
            assert_bad_value(option, "");
        }
        assert!(assert_bad_value(DaemonOption::Home, "rel")
            .contains("Invalid home directory for WSGI daemon process."));
    }

    #[test]
    fn python_path() {
        assert_eq!(
            ok(&["python-path=/srv/app:/srv/lib"]).python_path,
            vec![PathBuf::from("/srv/app"), PathBuf::from("/srv/lib")]
        );
        assert_eq!(
            ok(&["python-path=/one"]).python_path,
            vec![PathBuf::from("/one")]
        );
        assert!(assert_bad_value(DaemonOption::PythonPath, "/a:lib")
            .contains("('lib' is not an absolute path)"));
        assert!(assert_bad_value(DaemonOption::PythonPath, "/a::/b").contains("empty entry"));
        assert_bad_value(DaemonOption::PythonPath, "/a:");
        assert_bad_value(DaemonOption::PythonPath, "");
    }

    #[test]
    fn display_name_and_process_title() {
        let spec = parse(&["site1", "display-name=%{GROUP}"]).unwrap();
        assert_eq!(spec.display_name.as_deref(), Some("%{GROUP}"));
        assert_eq!(spec.process_title().as_deref(), Some("(wsgi:site1)"));
        let spec = ok(&["display-name=my-app"]);
        assert_eq!(spec.process_title().as_deref(), Some("my-app"));
        // Only the exact %{GROUP} is special, as mod_wsgi.
        let spec = ok(&["display-name=x%{GROUP}"]);
        assert_eq!(spec.process_title().as_deref(), Some("x%{GROUP}"));
        assert_bad_value(DaemonOption::DisplayName, "");
    }

    #[test]
    fn lang_and_locale() {
        let spec = ok(&["lang=en_US.UTF-8", "locale=C.UTF-8"]);
        assert_eq!(spec.lang.as_deref(), Some("en_US.UTF-8"));
        assert_eq!(spec.locale.as_deref(), Some("C.UTF-8"));
        assert_bad_value(DaemonOption::Lang, "");
        assert_bad_value(DaemonOption::Locale, "");
    }

    #[test]
    fn a_full_line() {
        let spec = ok(&[
            "user=bob",
            "group=bob",
            "processes=2",
            "threads=25",
            "display-name=%{GROUP}",
            "home=/home/bob",
            "python-home=/home/bob/venv",
            "maximum-requests=500",
            "graceful-timeout=30",
            "socket-user=#1002",
        ]);
        assert_eq!(spec.user.as_ref().map(|u| u.uid), Some(1001));
        assert_eq!(spec.group.as_ref().map(|g| g.gid), Some(1001));
        assert_eq!((spec.processes, spec.threads), (2, 25));
        assert_eq!(spec.process_title().as_deref(), Some("(wsgi:g)"));
        assert_eq!(spec.maximum_requests, 500);
        assert_eq!(spec.graceful_timeout, Duration::from_secs(30));
        assert_eq!(spec.socket_user.map(|u| u.name).as_deref(), Some("joe"));
    }

    // ---- raw argument splitting ----

    #[test]
    fn split_raw_args_like_mod_wsgi() {
        assert_eq!(
            split_raw_args("  site  processes=2   threads=15 ", 1),
            ["site", "processes=2", "threads=15"]
        );
        assert_eq!(
            split_raw_args(r#"site python-path="/a b:/c" display-name='%{GROUP}'"#, 1),
            ["site", "python-path=/a b:/c", "display-name=%{GROUP}"]
        );
        assert_eq!(
            split_raw_args(r#""my site" lang="x\"y""#, 1),
            ["my site", r#"lang=x"y"#]
        );
        // A word without '=' stays a word, so the parser can name it.
        assert_eq!(
            split_raw_args("site bogus user=bob", 1),
            ["site", "bogus", "user=bob"]
        );
        // mod_wsgi's ap_getword_conf skips blanks after '='.
        assert_eq!(split_raw_args("site user= bob", 1), ["site", "user=bob"]);
        assert_eq!(split_raw_args("site threads=", 1), ["site", "threads="]);
        // Unterminated quote runs to the end of the line, as httpd.
        assert_eq!(
            split_raw_args(r#"site home="/x y"#, 1),
            ["site", "home=/x y"]
        );
        assert_eq!(
            split_raw_args(r#"/app "/srv/my app.wsgi" process-group=g"#, 2),
            ["/app", "/srv/my app.wsgi", "process-group=g"]
        );
        assert!(split_raw_args("   ", 1).is_empty());
    }

    #[test]
    fn split_then_parse() {
        let words = split_raw_args(r#"bob python-path="/srv/a:/srv/b" threads=2"#, 1);
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        let spec = parse(&args).unwrap();
        assert_eq!(spec.python_path.len(), 2);
        assert_eq!(spec.threads, 2);
    }

    // ---- the real account database ----

    #[test]
    fn system_accounts_find_root() {
        let sys = SystemAccounts;
        let root = sys.user_by_name("root").expect("root in passwd");
        assert_eq!(root.uid, 0);
        assert_eq!(sys.user_by_uid(0).map(|u| u.name).as_deref(), Some("root"));
        assert_eq!(sys.group_by_gid(0).map(|g| g.gid), Some(0));
        assert!(sys.user_by_name("no-such-user-wsgirs").is_none());
    }
}
