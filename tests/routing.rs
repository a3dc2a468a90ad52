//! Integration tests of SPEC §3, choosing the daemon group for a request: `WSGIProcessGroup`
//! templates (`%{ENV:…}`, `%{SERVER}`, `%{HOST}`, `%{GLOBAL}`), `WSGIRestrictProcess`, the
//! virtual-host scope, the precedence of `WSGIScriptAlias … process-group=`, the config-time
//! checks, and the audit line a refusal writes.
//!
//! Most tests build one scenario, mod_wsgi's `WSGIRestrictProcess` example: a site
//! `www.site.com` whose scripts run in the global group `default`, and whose user bob delegates
//! his scripts, from his `.htaccess`, to his own groups `bob:1`…`bob:3`, which run as bob. His
//! neighbour joe has `joe:1`…`joe:3`, which run as joe and which bob must never reach, whatever
//! he writes in his `.htaccess`. The doc's configuration is used line for line (see
//! `SEED_VHOST`); what the tests need beyond it is added around it and says why.
//!
//! Every test starts its own Apache (own ServerRoot, own ports), so they run in parallel. They
//! need root (daemons that setuid to bob and joe) and the users bob and joe (`make test` creates
//! them); without them they skip loudly. The phrases asserted are the contract of SPEC §3.
//!
//! With `MOD_WSGI_RS_REFERENCE=1 MOD_WSGI_RS_SO=/usr/lib/apache2/modules/mod_wsgi.so` the same
//! tests run against Debian's mod_wsgi, leaving out what only mod_wsgi_rs promises (the
//! WSGIRS ids, the audit details, the startup warning, refusing embedded mode): that keeps
//! what they expect of Apache and of mod_wsgi honest.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const LOG_WAIT: Duration = Duration::from_secs(10);

/// The seed's site, and a second site (another ServerName) on the same port.
const WWW: &str = "www.site.com";
const OTHER: &str = "other.site.com";

/// What the tests add at server level (outside every `<VirtualHost>`). `default` is the seed's
/// global group; the rest are fixtures.
const SERVER_LEVEL: &str = r#"
# ---- server level -------------------------------------------------------------------------
# Where tests/apps/routing.wsgi leaves its canary (one file per uid that ran it).
SetEnv CANARY_DIR @ROOT@/canary

# The seed's global group (usable from every vhost) ...
WSGIDaemonProcess default processes=2 threads=25
# ... and a second global group for the precedence and restrict-list tests.
WSGIDaemonProcess spare processes=1 threads=2

# The users' directories under /~user/ (mod_userdir would do the same on a real box).
Alias /~bob/ @ROOT@/home/bob/public_html/
Alias /~joe/ @ROOT@/home/joe/public_html/
# base.conf denies / ; on Debian, userdir.conf grants /home/*/public_html the same way.
<Directory @ROOT@/home>
    Require all granted
</Directory>

# "The rest of the site": scripts under the DocumentRoot, one directory per test concern.
<Directory @ROOT@/htdocs>
    Options ExecCGI
    AddHandler wsgi-script .wsgi
</Directory>

# Nested restrict lists: the client picks the group with an X-Group header.
<Directory @ROOT@/htdocs/nest>
    SetEnvIf X-Group "^(.+)$" PROCESS_GROUP=$1
    WSGIRestrictProcess default
</Directory>
<Directory @ROOT@/htdocs/nest/inner>
    WSGIRestrictProcess spare
</Directory>
<Directory @ROOT@/htdocs/nest/none>
    WSGIRestrictProcess
</Directory>

# %{GLOBAL} on a restrict list permits embedded mode (which mod_wsgi_rs then refuses).
<Directory @ROOT@/htdocs/embedded>
    WSGIRestrictProcess %{GLOBAL} default
    WSGIProcessGroup %{GLOBAL}
    <Files pick-default.wsgi>
        WSGIProcessGroup default
    </Files>
    <Files pick-spare.wsgi>
        WSGIProcessGroup spare
    </Files>
</Directory>

# A template whose variable nobody sets.
<Directory @ROOT@/htdocs/unset>
    WSGIProcessGroup %{ENV:ROUTING_TEST_UNSET}
</Directory>

# Values that are themselves templates: expanded once more, except %{ENV:…}.
<Directory @ROOT@/htdocs/byserver>
    SetEnv PROCESS_GROUP %{SERVER}
</Directory>
<Directory @ROOT@/htdocs/byhost>
    SetEnv PROCESS_GROUP %{HOST}
</Directory>
<Directory @ROOT@/htdocs/byenv>
    SetEnv PICKED spare
    SetEnv PROCESS_GROUP %{ENV:PICKED}
</Directory>

# A literal WSGIProcessGroup that WSGIScriptAlias ... process-group= overrides.
<Directory @ROOT@/htdocs/aliased>
    WSGIProcessGroup default
</Directory>
"#;

/// mod_wsgi's WSGIRestrictProcess example, unchanged but for the port and where bob's home is.
const SEED_VHOST: &str = r#"
    # ---- the seed, line for line -------------------------------------------------------
    WSGIDaemonProcess bob:1 user=bob group=bob threads=25
    WSGIDaemonProcess bob:2 user=bob group=bob threads=25
    WSGIDaemonProcess bob:3 user=bob group=bob threads=25

    WSGIDaemonProcess joe:1 user=joe group=joe threads=25
    WSGIDaemonProcess joe:2 user=joe group=joe threads=25
    WSGIDaemonProcess joe:3 user=joe group=joe threads=25

    SetEnv PROCESS_GROUP default
    WSGIProcessGroup %{ENV:PROCESS_GROUP}

    <Directory @ROOT@/home/bob/public_html>
    Options ExecCGI
    AllowOverride FileInfo
    AddHandler wsgi-script .wsgi
    WSGIRestrictProcess bob:1 bob:2 bob:3
    SetEnv PROCESS_GROUP bob:1
    </Directory>
    # ---- end of the seed ---------------------------------------------------------------
"#;

/// The rest of the www.site.com vhost: fixtures around the seed.
const WWW_FIXTURES: &str = r#"
    # A RewriteRule in .htaccess needs FollowSymLinks or SymLinksIfOwnerMatch (mod_rewrite
    # refuses it otherwise); the seed's Options ExecCGI has neither.
    <Directory @ROOT@/home/bob/public_html/rw>
        Options +SymLinksIfOwnerMatch
    </Directory>
    # An inner list replaces bob's (not merged), and its names are upper case.
    <Directory @ROOT@/home/bob/public_html/case>
        WSGIRestrictProcess BOB:1 BOB:2
    </Directory>

    # joe's directory, set up like bob's: the positive control that joe's groups serve.
    <Directory @ROOT@/home/joe/public_html>
        Options ExecCGI
        AllowOverride FileInfo
        AddHandler wsgi-script .wsgi
        WSGIRestrictProcess joe:1 joe:2 joe:3
        SetEnv PROCESS_GROUP joe:1
    </Directory>

    # Groups named like what %{SERVER} / %{HOST} expand to (port not 80/443, so included).
    ServerAlias alt.site.com
    WSGIDaemonProcess www.site.com:@PORT@ threads=2
    WSGIDaemonProcess alt.site.com:@PORT@ threads=2

    # Outside bob's directory, a sysadmin's mistake points a script at another site's group.
    <Location /site/steal-other.wsgi>
        SetEnv PROCESS_GROUP other:1
    </Location>

    # WSGIScriptAlias: no process-group= (the vhost's template decides), and process-group=
    # beating a WSGIProcessGroup.
    WSGIScriptAlias /app @ROOT@/htdocs/site/index.wsgi
    WSGIScriptAlias /by-alias @ROOT@/htdocs/aliased/index.wsgi process-group=spare
    WSGIScriptAlias /alias-bob2 @ROOT@/home/bob/public_html/index.wsgi process-group=bob:2
"#;

/// A second site on the same port, with a group of its own.
const OTHER_VHOST: &str = r#"
<VirtualHost *:@PORT@>
    ServerName other.site.com
    WSGIDaemonProcess other:1 threads=2
    WSGIProcessGroup other:1
    # Innermost wins (Files > vhost): the global group, from a second vhost.
    <Files global.wsgi>
        WSGIProcessGroup default
    </Files>
</VirtualHost>
"#;

/// www.site.com again, on a second port (as :80 and :443 are): it shares the groups defined in
/// the first www.site.com vhost, because the ServerName is the same.
const SECOND_PORT_VHOST: &str = r#"
Listen 127.0.0.1:@PORT2@
<VirtualHost *:@PORT2@>
    ServerName www.site.com
    SetEnv PROCESS_GROUP default
    WSGIProcessGroup %{ENV:PROCESS_GROUP}
    <Directory @ROOT@/home/bob/public_html>
    Options ExecCGI
    AllowOverride FileInfo
    AddHandler wsgi-script .wsgi
    WSGIRestrictProcess bob:1 bob:2 bob:3
    SetEnv PROCESS_GROUP bob:1
    </Directory>
</VirtualHost>
"#;

/// bob's `.htaccess`: the seed's two `<Files>` blocks, then what the tests need bob to do,
/// legitimately or not.
const BOB_HTACCESS: &str = r#"# ---- the seed's delegation ----
<Files blog.wsgi>
SetEnv PROCESS_GROUP bob:2
</Files>

<Files wiki.wsgi>
SetEnv PROCESS_GROUP bob:3
</Files>

# ---- SetEnvIf: the request picks (SetEnvIf's value wins over the <Directory>'s SetEnv) ----
SetEnvIf X-Group "^(.+)$" PROCESS_GROUP=$1
SetEnvIfExpr "%{QUERY_STRING} == 'wiki'" PROCESS_GROUP=bob:3
SetEnvIfExpr "%{QUERY_STRING} == 'joe'" PROCESS_GROUP=joe:1

# ---- a hostile bob ----
<Files steal-joe.wsgi>
SetEnv PROCESS_GROUP joe:1
</Files>
<Files steal-joe-case.wsgi>
SetEnv PROCESS_GROUP JOE:1
</Files>
<Files steal-default.wsgi>
SetEnv PROCESS_GROUP default
</Files>
<Files steal-empty.wsgi>
SetEnv PROCESS_GROUP ""
</Files>
<Files steal-global.wsgi>
SetEnv PROCESS_GROUP %{GLOBAL}
</Files>
"#;

/// bob's `rw/.htaccess`: mod_rewrite's `[E=…]` sets the variable.
const BOB_RW_HTACCESS: &str = r#"RewriteEngine On
RewriteRule ^wiki\.wsgi$ - [E=PROCESS_GROUP:bob:3]
RewriteCond %{HTTP:X-Rewrite-Group} ^(.+)$
RewriteRule ^ - [E=PROCESS_GROUP:%1]
"#;

/// Scripts (copies of tests/apps/routing.wsgi), relative to the ServerRoot.
const SCRIPTS: &[&str] = &[
    "home/bob/public_html/index.wsgi",
    "home/bob/public_html/blog.wsgi",
    "home/bob/public_html/wiki.wsgi",
    "home/bob/public_html/steal-joe.wsgi",
    "home/bob/public_html/steal-joe-case.wsgi",
    "home/bob/public_html/steal-default.wsgi",
    "home/bob/public_html/steal-empty.wsgi",
    "home/bob/public_html/steal-global.wsgi",
    "home/bob/public_html/rw/index.wsgi",
    "home/bob/public_html/rw/wiki.wsgi",
    "home/bob/public_html/case/index.wsgi",
    "home/bob/public_html/evil-pg/index.wsgi",
    "home/bob/public_html/evil-rp/index.wsgi",
    "home/joe/public_html/index.wsgi",
    "htdocs/site/index.wsgi",
    "htdocs/site/global.wsgi",
    "htdocs/site/steal-other.wsgi",
    "htdocs/nest/index.wsgi",
    "htdocs/nest/inner/index.wsgi",
    "htdocs/nest/none/index.wsgi",
    "htdocs/embedded/index.wsgi",
    "htdocs/embedded/pick-default.wsgi",
    "htdocs/embedded/pick-spare.wsgi",
    "htdocs/unset/index.wsgi",
    "htdocs/byserver/index.wsgi",
    "htdocs/byhost/index.wsgi",
    "htdocs/byenv/index.wsgi",
    "htdocs/aliased/index.wsgi",
];

/// The whole httpd.conf fragment of the scenario.
fn scenario_fragment() -> String {
    format!(
        "{SERVER_LEVEL}\n<VirtualHost *:@PORT@>\n    ServerName www.site.com\n{SEED_VHOST}{WWW_FIXTURES}</VirtualHost>\n{OTHER_VHOST}{SECOND_PORT_VHOST}"
    )
}

/// The running scenario.
struct Site {
    server: TestServer,
    bob: UserInfo,
    joe: UserInfo,
}

/// `let site = site!();` — skips (loudly) without root or the users bob and joe.
macro_rules! site {
    () => {{
        require_root!();
        let bob = require_user!("bob");
        let joe = require_user!("joe");
        Site::start(bob, joe)
    }};
}

impl Site {
    fn start(bob: UserInfo, joe: UserInfo) -> Site {
        let app = app_source("routing.wsgi");
        let mut files: Vec<(&str, &str)> = SCRIPTS.iter().map(|p| (*p, app.as_str())).collect();
        files.push(("home/bob/public_html/.htaccess", BOB_HTACCESS));
        files.push(("home/bob/public_html/rw/.htaccess", BOB_RW_HTACCESS));
        files.push((
            "home/bob/public_html/evil-pg/.htaccess",
            "# bob names joe's group himself: Apache must refuse the directive here.\nWSGIProcessGroup joe:1\n",
        ));
        files.push((
            "home/bob/public_html/evil-rp/.htaccess",
            "# bob widens his own restrict list: Apache must refuse the directive here.\nWSGIRestrictProcess bob:1 joe:1\n",
        ));
        files.push(("canary/README", "routing.wsgi writes uid-<uid> here\n"));
        let server = TestServer::start_with_files(&scenario_fragment(), &files);
        let root = server.root().to_path_buf();
        // The users own their directories, as on a real box; anyone may leave a canary.
        chown_tree(&root.join("home/bob"), bob.uid, bob.gid);
        chown_tree(&root.join("home/joe"), joe.uid, joe.gid);
        fs::set_permissions(root.join("canary"), fs::Permissions::from_mode(0o1777))
            .expect("chmod canary");
        Site { server, bob, joe }
    }

    fn root(&self) -> String {
        self.server.root().display().to_string()
    }

    /// The filesystem path of a script (what the refusal messages name).
    fn script(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root())
    }

    fn bob_dir(&self) -> String {
        self.script("home/bob/public_html")
    }

    fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut all = vec![("Host", host)];
        all.extend_from_slice(headers);
        self.server.request("GET", path, &all, b"")
    }

    /// GET on www.site.com; asserts 200 and returns the app's JSON.
    fn served(&self, path: &str, headers: &[(&str, &str)]) -> Json {
        self.served_on(WWW, path, headers)
    }

    fn served_on(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Json {
        let r = self.get(host, path, headers);
        assert_eq!(
            r.status,
            200,
            "GET {path} (Host {host}, {headers:?}): {r:?}\n--- error_log ---\n{}",
            self.server.error_log()
        );
        r.json()
    }

    /// GET on `host` that must be refused: 500 from Apache, nothing from the app, and exactly
    /// one new error-log line containing `needle` (once per request). Returns that line.
    fn refused_on(&self, host: &str, path: &str, headers: &[(&str, &str)], needle: &str) -> String {
        let before = self.lines_with(needle).len();
        let r = self.get(host, path, headers);
        assert_eq!(
            r.status,
            500,
            "GET {path} (Host {host}, {headers:?}) must be refused: {r:?}\n--- error_log ---\n{}",
            self.server.error_log()
        );
        assert!(
            !r.text().contains("\"process_group\""),
            "the app answered a refused request: {r:?}"
        );
        let appeared = wait_until(LOG_WAIT, || self.lines_with(needle).len() > before);
        let lines = self.lines_with(needle);
        assert!(
            appeared,
            "GET {path} ({headers:?}): no new error-log line contains {needle:?}\n--- error_log ---\n{}",
            self.server.error_log()
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = self.lines_with(needle);
        assert_eq!(
            now.len(),
            before + 1,
            "GET {path}: one refusal must log one line with {needle:?}, got:\n{}",
            now[before..].join("\n")
        );
        let line = lines[before].clone();
        if let Some(id) = our_id() {
            assert!(line.contains(id), "no {id} id in: {line}");
        }
        line
    }

    fn refused(&self, path: &str, headers: &[(&str, &str)], needle: &str) -> String {
        self.refused_on(WWW, path, headers, needle)
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.server
            .error_log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// The uids that ran routing.wsgi so far (from the canary files).
    fn canary_uids(&self) -> Vec<u32> {
        let mut uids: Vec<u32> = fs::read_dir(self.server.root().join("canary"))
            .expect("read canary dir")
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("uid-"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        uids.sort_unstable();
        uids
    }

    /// Asserts the app never ran as joe (no canary of joe's uid).
    fn assert_never_ran_as_joe(&self, after: &str) {
        let uids = self.canary_uids();
        assert!(
            !uids.contains(&self.joe.uid),
            "after {after}: a script ran as joe (uid {}); canary:\n{}",
            self.joe.uid,
            fs::read_to_string(
                self.server
                    .root()
                    .join(format!("canary/uid-{}", self.joe.uid))
            )
            .unwrap_or_default()
        );
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for entry in fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&entry.path(), uid, gid);
        }
    }
}

/// (uid, gid) of the JSON the app returned.
fn ids(j: &Json) -> (u32, u32) {
    (j.u64_of("uid") as u32, j.u64_of("gid") as u32)
}

fn www_data() -> (u32, u32) {
    let www = lookup_user(APACHE_USER).expect("www-data exists");
    (
        www.uid,
        group_gid(APACHE_GROUP).expect("group www-data exists"),
    )
}

/// Needle of the restrict refusal (step 1) for `group` and `script`.
fn not_a_member(group: &str, script: &str) -> String {
    format!(
        "Daemon process called '{group}' cannot be accessed by this WSGI application as not a member of allowed groups: {script}"
    )
}

/// Needle of the unknown-group refusal (step 3).
fn no_such_group(group: &str, script: &str) -> String {
    format!("No WSGI daemon process called '{group}' has been configured: {script}")
}

/// Needle of the virtual-host refusal (step 4): the phrase followed directly by the script,
/// so it never matches the restrict refusal.
fn other_vhost(group: &str, script: &str) -> String {
    format!("Daemon process called '{group}' cannot be accessed by this WSGI application: {script}")
}

/// SPEC §3 **beyond**: the audit details of a refusal line (not checked in reference mode).
fn assert_audit(line: &str, parts: &[&str]) {
    if reference_mode() {
        return;
    }
    for part in parts {
        assert!(
            line.contains(part),
            "the refusal line does not name {part:?}:\n{line}"
        );
    }
}

/// SPEC §3 **beyond**: a refusal line names the directory of the `.htaccess` files Apache
/// used. That directory is a prefix of the script's path, so count: it must occur more often
/// than the script path does.
fn assert_names_htaccess_dir(line: &str, dir: &str, script: &str) {
    if reference_mode() {
        return;
    }
    let dirs = line.matches(dir).count();
    let scripts = line.matches(script).count();
    assert!(
        dirs > scripts,
        "the refusal line does not name the .htaccess directory {dir} (beside the script {script}):\n{line}"
    );
}

/// A startup warning about a literal `WSGIProcessGroup` naming `name`, which no
/// `WSGIDaemonProcess` defines: "not configured", or mod_wsgi's own "not yet configured".
fn warns_unconfigured(line: &str, name: &str) -> bool {
    line.contains("WSGIProcessGroup")
        && line.contains(name)
        && (line.contains("not configured") || line.contains("not yet configured"))
}

// ---- the seed scenario: what works -----------------------------------------------------------

#[test]
fn rest_of_site_runs_in_default_group() {
    let site = site!();
    let (www_uid, www_gid) = www_data();
    for path in ["/site/index.wsgi", "/app"] {
        let j = site.served(path, &[]);
        assert_eq!(j.str_of("process_group"), "default", "{path}: {j:?}");
        assert_eq!(
            ids(&j),
            (www_uid, www_gid),
            "{path} runs as Apache's user: {j:?}"
        );
        assert_eq!(j.str_of("PROCESS_GROUP"), "default", "{j:?}");
    }
    // Templates are not group names: no startup warning about them.
    if !reference_mode() {
        let log = site.server.error_log();
        let warned: Vec<&str> = log.lines().filter(|l| warns_unconfigured(l, "")).collect();
        assert!(warned.is_empty(), "unexpected startup warnings: {warned:?}");
    }
}

#[test]
fn bob_directory_default_and_files_delegation() {
    let site = site!();
    let bob = (site.bob.uid, site.bob.gid);
    let mut pids = Vec::new();
    for (path, group) in [
        ("/~bob/index.wsgi", "bob:1"),
        ("/~bob/blog.wsgi", "bob:2"),
        ("/~bob/wiki.wsgi", "bob:3"),
    ] {
        let j = site.served(path, &[]);
        assert_eq!(j.str_of("process_group"), group, "{path}: {j:?}");
        assert_eq!(ids(&j), bob, "{path} runs as bob: {j:?}");
        assert_eq!(
            (j.u64_of("euid") as u32, j.u64_of("egid") as u32),
            bob,
            "{j:?}"
        );
        assert_eq!(j.str_of("PROCESS_GROUP"), group, "{j:?}");
        pids.push(j.u64_of("pid"));
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three groups, three processes: {pids:?}");
}

#[test]
fn bob_picks_bob3_with_setenvif() {
    let site = site!();
    let bob = (site.bob.uid, site.bob.gid);
    // A request header (SetEnvIf), beating the <Directory>'s SetEnv and the <Files> SetEnv.
    for path in ["/~bob/index.wsgi", "/~bob/blog.wsgi"] {
        let j = site.served(path, &[("X-Group", "bob:3")]);
        assert_eq!(j.str_of("process_group"), "bob:3", "{path}: {j:?}");
        assert_eq!(ids(&j), bob, "{j:?}");
    }
    // The query string (SetEnvIfExpr).
    let j = site.served("/~bob/index.wsgi?wiki", &[]);
    assert_eq!(j.str_of("process_group"), "bob:3", "{j:?}");
    assert_eq!(ids(&j), bob, "{j:?}");
    // Without either, the directory's default.
    let j = site.served("/~bob/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "bob:1", "{j:?}");
}

#[test]
fn bob_picks_bob3_with_rewriterule() {
    let site = site!();
    let bob = (site.bob.uid, site.bob.gid);
    let j = site.served("/~bob/rw/wiki.wsgi", &[]);
    assert_eq!(
        j.str_of("process_group"),
        "bob:3",
        "RewriteRule [E=]: {j:?}"
    );
    assert_eq!(ids(&j), bob, "{j:?}");
    let j = site.served("/~bob/rw/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "bob:1", "no rule matched: {j:?}");
    let j = site.served("/~bob/rw/index.wsgi", &[("X-Rewrite-Group", "bob:2")]);
    assert_eq!(j.str_of("process_group"), "bob:2", "{j:?}");
    assert_eq!(ids(&j), bob, "{j:?}");
}

// ---- the seed scenario: what bob must not do ------------------------------------------------

#[test]
fn bob_cannot_reach_joes_groups() {
    let site = site!();
    let bob_dir = site.bob_dir();
    // joe's daemons are up (so each refusal below is the restrict list's doing).
    // (They drop to joe's uid just after the fork: give them a moment under load.)
    assert!(
        wait_until(Duration::from_secs(10), || !pids_of_user(site.joe.uid)
            .is_empty()),
        "joe's daemons are not running"
    );

    // SetEnv in bob's .htaccess.
    let script = site.script("home/bob/public_html/steal-joe.wsgi");
    let line = site.refused("/~bob/steal-joe.wsgi", &[], &not_a_member("joe:1", &script));
    assert_audit(
        &line,
        &["%{ENV:PROCESS_GROUP}", "PROCESS_GROUP", "joe:1", WWW],
    );
    assert_names_htaccess_dir(&line, &bob_dir, &script);

    // SetEnvIf on a header bob lets the client send.
    let script = site.script("home/bob/public_html/index.wsgi");
    let line = site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "joe:2")],
        &not_a_member("joe:2", &script),
    );
    assert_audit(
        &line,
        &["%{ENV:PROCESS_GROUP}", "PROCESS_GROUP", "joe:2", WWW],
    );
    assert_names_htaccess_dir(&line, &bob_dir, &script);

    // SetEnvIfExpr on the query string.
    let line = site.refused("/~bob/index.wsgi?joe", &[], &not_a_member("joe:1", &script));
    assert_audit(&line, &["%{ENV:PROCESS_GROUP}", "joe:1", WWW]);

    // RewriteRule [E=PROCESS_GROUP:…].
    let rw_script = site.script("home/bob/public_html/rw/index.wsgi");
    let line = site.refused(
        "/~bob/rw/index.wsgi",
        &[("X-Rewrite-Group", "joe:3")],
        &not_a_member("joe:3", &rw_script),
    );
    assert_audit(
        &line,
        &["%{ENV:PROCESS_GROUP}", "PROCESS_GROUP", "joe:3", WWW],
    );
    assert_names_htaccess_dir(&line, &bob_dir, &rw_script);

    // Mixed case: the list matches case-insensitively, but JOE:1 is on no list.
    let case_script = site.script("home/bob/public_html/steal-joe-case.wsgi");
    site.refused(
        "/~bob/steal-joe-case.wsgi",
        &[],
        &not_a_member("JOE:1", &case_script),
    );
    site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "Joe:2")],
        &not_a_member("Joe:2", &script),
    );

    // A value that is itself an %{ENV:…} template is not expanded again.
    site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "%{ENV:JOE_GROUP}")],
        &not_a_member("%{ENV:JOE_GROUP}", &script),
    );

    site.assert_never_ran_as_joe("every attack");

    // Positive control: joe's own directory reaches joe:1, as joe.
    let j = site.served("/~joe/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "joe:1", "{j:?}");
    assert_eq!(ids(&j), (site.joe.uid, site.joe.gid), "{j:?}");
    assert!(site.canary_uids().contains(&site.joe.uid));
}

#[test]
fn restrict_list_refuses_every_other_name() {
    let site = site!();
    let index = site.script("home/bob/public_html/index.wsgi");

    // The global group, named in bob's .htaccess.
    let script = site.script("home/bob/public_html/steal-default.wsgi");
    site.refused(
        "/~bob/steal-default.wsgi",
        &[],
        &not_a_member("default", &script),
    );

    // An unknown name: the restrict message, checked first, not "No WSGI daemon process".
    site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "bob:9")],
        &not_a_member("bob:9", &index),
    );
    assert!(
        site.lines_with("No WSGI daemon process called 'bob:9'")
            .is_empty(),
        "the unknown name got past the restrict list:\n{}",
        site.server.error_log()
    );

    // Empty, and %{GLOBAL} (expanded once more, to empty): the list has no %{GLOBAL}.
    let script = site.script("home/bob/public_html/steal-empty.wsgi");
    site.refused("/~bob/steal-empty.wsgi", &[], &not_a_member("", &script));
    let script = site.script("home/bob/public_html/steal-global.wsgi");
    site.refused("/~bob/steal-global.wsgi", &[], &not_a_member("", &script));
    site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "%{GLOBAL}")],
        &not_a_member("", &index),
    );
    assert!(
        site.lines_with("Embedded mode of mod_wsgi disabled")
            .is_empty(),
        "empty names from bob's directory must stop at the restrict list:\n{}",
        site.server.error_log()
    );

    // Another vhost's group: the restrict message, not the vhost one.
    site.refused(
        "/~bob/index.wsgi",
        &[("X-Group", "other:1")],
        &not_a_member("other:1", &index),
    );

    // A template value expanded once more is still checked against the list: %{SERVER} names
    // a real group of this vhost, which bob's list does not have.
    let host = format!("{WWW}:{}", site.server.port());
    let line = site.refused_on(
        &host,
        "/~bob/index.wsgi",
        &[("X-Group", "%{SERVER}")],
        &not_a_member(&host, &index),
    );
    // The audit names the value the variable had, before its expansion.
    assert_audit(&line, &["%{ENV:PROCESS_GROUP}", "%{SERVER}", WWW]);

    // No refused script ran, as anyone.
    assert!(
        site.canary_uids().is_empty(),
        "a refused script ran: {:?}",
        site.canary_uids()
    );
}

#[test]
fn routing_directives_refused_in_htaccess() {
    let site = site!();
    for (dir, directive) in [
        ("evil-pg", "WSGIProcessGroup"),
        ("evil-rp", "WSGIRestrictProcess"),
    ] {
        let path = format!("/~bob/{dir}/index.wsgi");
        let r = site.get(WWW, &path, &[]);
        assert_eq!(
            r.status,
            500,
            "{directive} in .htaccess: {r:?}\n--- error_log ---\n{}",
            site.server.error_log()
        );
        assert!(!r.text().contains("\"process_group\""), "{r:?}");
        let htaccess = format!("{}/{dir}/.htaccess", site.bob_dir());
        let phrase = format!("{directive} not allowed here");
        let found = wait_until(LOG_WAIT, || {
            site.lines_with(&phrase)
                .iter()
                .any(|l| l.contains(&htaccess))
        });
        assert!(
            found,
            "no \"{htaccess}: {phrase}\" in the error log:\n{}",
            site.server.error_log()
        );
    }
    site.assert_never_ran_as_joe("WSGIProcessGroup / WSGIRestrictProcess in .htaccess");
    // The rest of bob's directory is unaffected.
    let j = site.served("/~bob/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "bob:1", "{j:?}");
}

// ---- virtual-host scope ----------------------------------------------------------------------

#[test]
fn group_of_another_vhost_is_refused() {
    let site = site!();
    let script = site.script("htdocs/site/steal-other.wsgi");
    let line = site.refused(
        "/site/steal-other.wsgi",
        &[],
        &other_vhost("other:1", &script),
    );
    assert!(
        !line.contains("not a member"),
        "no restrict list is in force here: {line}"
    );
    assert_audit(
        &line,
        &[
            WWW,
            OTHER,
            "%{ENV:PROCESS_GROUP}",
            "PROCESS_GROUP",
            "other:1",
        ],
    );
    // The group itself works, from its own vhost.
    let j = site.served_on(OTHER, "/site/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "other:1", "{j:?}");
    assert_eq!(j.str_of("server_name"), OTHER, "{j:?}");
}

#[test]
fn global_group_usable_from_every_vhost() {
    let site = site!();
    let j = site.served_on(OTHER, "/site/global.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
    assert_eq!(ids(&j), www_data(), "{j:?}");
    let j = site.served_on(WWW, "/site/global.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
}

#[test]
fn same_servername_on_two_ports_shares_groups() {
    let site = site!();
    let get2 = |path: &str, headers: &[(&str, &str)]| {
        let mut all = vec![("Host", WWW)];
        all.extend_from_slice(headers);
        http_request(site.server.addr2(), "GET", path, &all, b"").unwrap_or_else(|e| {
            panic!(
                "GET {path} on port 2: {e}\n--- error_log ---\n{}",
                site.server.error_log()
            )
        })
    };
    let bob = (site.bob.uid, site.bob.gid);
    for (path, group) in [
        ("/~bob/index.wsgi", "bob:1"),
        ("/~bob/blog.wsgi", "bob:2"),
        ("/~bob/wiki.wsgi", "bob:3"),
    ] {
        let r = get2(path, &[]);
        assert_eq!(
            r.status,
            200,
            "{path} on the second port: {r:?}\n--- error_log ---\n{}",
            site.server.error_log()
        );
        let j = r.json();
        assert_eq!(j.str_of("process_group"), group, "{j:?}");
        assert_eq!(ids(&j), bob, "{j:?}");
    }
    // Its restrict list works the same.
    let r = get2("/~bob/steal-joe.wsgi", &[]);
    assert_eq!(r.status, 500, "{r:?}");
    let script = site.script("home/bob/public_html/steal-joe.wsgi");
    site.server
        .expect_log(&not_a_member("joe:1", &script), LOG_WAIT);
    site.assert_never_ran_as_joe("steal-joe.wsgi on the second port");
}

// ---- precedence and restrict lists -----------------------------------------------------------

#[test]
fn script_alias_process_group_beats_wsgiprocessgroup() {
    let site = site!();
    // <Directory> WSGIProcessGroup default, but process-group=spare.
    let j = site.served("/by-alias", &[]);
    assert_eq!(j.str_of("process_group"), "spare", "{j:?}");
    let j = site.served("/aliased/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
    // bob's directory says bob:1 (and allows bob:2): process-group=bob:2 wins.
    let j = site.served("/alias-bob2", &[]);
    assert_eq!(j.str_of("process_group"), "bob:2", "{j:?}");
    assert_eq!(ids(&j), (site.bob.uid, site.bob.gid), "{j:?}");
    // <Files> inside <Directory> beats the <Directory>.
    let j = site.served("/embedded/pick-default.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
}

#[test]
fn nested_restrict_lists_replace_outer_ones() {
    let site = site!();
    let outer = site.script("htdocs/nest/index.wsgi");
    let inner = site.script("htdocs/nest/inner/index.wsgi");
    let none = site.script("htdocs/nest/none/index.wsgi");

    // Outer list: default.
    let j = site.served("/nest/index.wsgi", &[("X-Group", "default")]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
    site.refused(
        "/nest/index.wsgi",
        &[("X-Group", "spare")],
        &not_a_member("spare", &outer),
    );

    // Inner list: spare only; the outer one is hidden, not merged.
    let j = site.served("/nest/inner/index.wsgi", &[("X-Group", "spare")]);
    assert_eq!(j.str_of("process_group"), "spare", "{j:?}");
    site.refused(
        "/nest/inner/index.wsgi",
        &[("X-Group", "default")],
        &not_a_member("default", &inner),
    );

    // An empty WSGIRestrictProcess permits nothing.
    for group in ["default", "spare"] {
        site.refused(
            "/nest/none/index.wsgi",
            &[("X-Group", group)],
            &not_a_member(group, &none),
        );
    }
}

#[test]
fn restrict_list_matches_case_insensitively() {
    let site = site!();
    let script = site.script("home/bob/public_html/case/index.wsgi");
    // The list says BOB:1 BOB:2.
    let j = site.served("/~bob/case/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "bob:1", "{j:?}");
    let j = site.served("/~bob/case/index.wsgi", &[("X-Group", "bob:2")]);
    assert_eq!(j.str_of("process_group"), "bob:2", "{j:?}");
    assert_eq!(ids(&j), (site.bob.uid, site.bob.gid), "{j:?}");
    // The inner list replaced bob's: bob:3 is no longer allowed here.
    site.refused(
        "/~bob/case/index.wsgi",
        &[("X-Group", "bob:3")],
        &not_a_member("bob:3", &script),
    );
    // BOB:2 passes the list, but group names are case-sensitive: no such group.
    let line = site.refused(
        "/~bob/case/index.wsgi",
        &[("X-Group", "BOB:2")],
        &no_such_group("BOB:2", &script),
    );
    assert_audit(&line, &["%{ENV:PROCESS_GROUP}", "PROCESS_GROUP", WWW]);
    assert_names_htaccess_dir(&line, &site.bob_dir(), &script);
}

#[test]
fn global_on_restrict_list_permits_embedded() {
    let site = site!();
    // %{GLOBAL} is on the list, so the empty name passes it and meets embedded mode, which
    // mod_wsgi_rs refuses (mod_wsgi would run the script in the Apache worker).
    if !reference_mode() {
        let script = site.script("htdocs/embedded/index.wsgi");
        let r = site.get(WWW, "/embedded/index.wsgi", &[]);
        assert_eq!(r.status, 500, "{r:?}");
        site.server.expect_log(
            &format!("Embedded mode of mod_wsgi disabled by runtime configuration: {script}"),
            LOG_WAIT,
        );
        assert!(
            site.lines_with("not a member of allowed groups").is_empty(),
            "%{{GLOBAL}} on the list must permit the empty name:\n{}",
            site.server.error_log()
        );
    }
    let j = site.served("/embedded/pick-default.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "default", "{j:?}");
    let script = site.script("htdocs/embedded/pick-spare.wsgi");
    site.refused(
        "/embedded/pick-spare.wsgi",
        &[],
        &not_a_member("spare", &script),
    );
}

// ---- expansion -------------------------------------------------------------------------------

#[test]
fn unset_variable_becomes_the_literal_group_name() {
    let site = site!();
    let script = site.script("htdocs/unset/index.wsgi");
    let line = site.refused(
        "/unset/index.wsgi",
        &[],
        &no_such_group("%{ENV:ROUTING_TEST_UNSET}", &script),
    );
    assert_audit(&line, &["ROUTING_TEST_UNSET", WWW]);
    // A value that is an %{ENV:…} template is taken literally, not expanded again.
    let script = site.script("htdocs/byenv/index.wsgi");
    site.refused(
        "/byenv/index.wsgi",
        &[],
        &no_such_group("%{ENV:PICKED}", &script),
    );
}

#[test]
fn server_and_host_values_are_expanded_once_more() {
    let site = site!();
    let port = site.server.port();
    let www_host = format!("{WWW}:{port}");
    let alt_host = format!("alt.site.com:{port}");

    // SetEnv PROCESS_GROUP %{SERVER}: the vhost's ServerName with the port (not 80/443).
    let j = site.served_on(&www_host, "/byserver/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), www_host, "{j:?}");
    assert_eq!(j.str_of("PROCESS_GROUP"), "%{SERVER}", "{j:?}");
    // %{SERVER} is the ServerName even when the client said the alias.
    let j = site.served_on(&alt_host, "/byserver/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), www_host, "{j:?}");
    // %{HOST} is what the client said.
    let j = site.served_on(&alt_host, "/byhost/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), alt_host, "{j:?}");

    // The default WSGIApplicationGroup is %{RESOURCE}: <SERVER form>|<lower-cased SCRIPT_NAME>.
    let j = site.served_on(&www_host, "/~bob/index.wsgi", &[]);
    assert_eq!(j.str_of("process_group"), "bob:1", "{j:?}");
    assert_eq!(
        j.str_of("application_group"),
        format!("{www_host}|/~bob/index.wsgi"),
        "{j:?}"
    );
}

// ---- config time -----------------------------------------------------------------------------

#[test]
fn literal_process_group_checked_at_config_time() {
    // application-group= is literal too, so the reference mod_wsgi checks these as well.
    let undefined = "<VirtualHost *:@PORT@>\n\
                     ServerName www.site.com\n\
                     WSGIDaemonProcess bob:1 threads=2\n\
                     WSGIScriptAlias /x @APPS@/hello.wsgi process-group=bob:9 application-group=app\n\
                     </VirtualHost>\n";
    let (ok, out) = config_test(undefined);
    assert!(!ok, "an undefined process-group= was accepted:\n{out}");
    assert!(
        out.contains("WSGI process group not yet configured."),
        "{out}"
    );
    if let Some(id) = our_id() {
        assert!(out.contains(id), "no {id} id: {out}");
    }

    let other_vhost = "<VirtualHost *:@PORT@>\n\
                       ServerName other.site.com\n\
                       WSGIDaemonProcess other:1 threads=2\n\
                       </VirtualHost>\n\
                       <VirtualHost *:@PORT@>\n\
                       ServerName www.site.com\n\
                       WSGIScriptAlias /x @APPS@/hello.wsgi process-group=other:1 application-group=app\n\
                       </VirtualHost>\n";
    let (ok, out) = config_test(other_vhost);
    assert!(!ok, "another vhost's group was accepted:\n{out}");
    assert!(out.contains("WSGI process group not accessible."), "{out}");

    // Accepted: a group of the same ServerName on another port, a global group, a template.
    let good = "WSGIDaemonProcess global threads=2\n\
                Listen 127.0.0.1:@PORT2@\n\
                <VirtualHost *:@PORT@>\n\
                ServerName www.site.com\n\
                WSGIDaemonProcess site:1 threads=2\n\
                </VirtualHost>\n\
                <VirtualHost *:@PORT2@>\n\
                ServerName www.site.com\n\
                WSGIScriptAlias /a @APPS@/hello.wsgi process-group=site:1 application-group=app\n\
                WSGIScriptAlias /b @APPS@/hello.wsgi process-group=global application-group=app\n\
                WSGIScriptAlias /c @APPS@/hello.wsgi process-group=%{ENV:PICK} application-group=app\n\
                </VirtualHost>\n";
    let (ok, out) = config_test(good);
    assert!(ok && out.contains("Syntax OK"), "{out}");
}

#[test]
fn literal_wsgiprocessgroup_naming_no_group_warns_at_startup() {
    if reference_mode() {
        skip("SPEC §3 beyond: mod_wsgi does not warn");
        return;
    }
    let server = TestServer::start(
        "WSGIDaemonProcess real threads=2\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=real\n\
         <Location /ghost/>\n    WSGIProcessGroup ghost-group\n</Location>\n\
         <Location /tmpl/>\n    WSGIProcessGroup %{ENV:WHATEVER}\n</Location>\n\
         <Location /glob/>\n    WSGIProcessGroup %{GLOBAL}\n</Location>\n\
         <Location /real/>\n    WSGIProcessGroup real\n</Location>\n",
    );
    // Apache started (TestServer::start waited for it) and serves.
    let r = server.get("/hello");
    assert_eq!(r.status, 200, "{r:?}");

    // The warning goes to the error log, or to apache2's stderr if given while parsing.
    let startup = || {
        let mut text = server.error_log();
        if let Ok(entries) = fs::read_dir(server.root().join("logs")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("apache2-start-") {
                    text.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        text
    };
    let warned = |text: &str, name: &str| text.lines().any(|l| warns_unconfigured(l, name));
    let found = wait_until(LOG_WAIT, || warned(&startup(), "ghost-group"));
    assert!(
        found,
        "no startup warning naming WSGIProcessGroup 'ghost-group' … not configured:\n{}",
        startup()
    );
    let text = startup();
    let line = text
        .lines()
        .find(|l| warns_unconfigured(l, "ghost-group"))
        .unwrap_or_default();
    if let Some(id) = our_id() {
        assert!(line.contains(id), "no {id} id: {line}");
    }
    for name in ["%{ENV:WHATEVER}", "%{GLOBAL}", "'real'"] {
        assert!(!warned(&text, name), "a warning about {name}:\n{text}");
    }
}

// ---- the shipped example ---------------------------------------------------------------------

/// apache-conf/examples/shared-hosting.conf, made to run under a test ServerRoot: /home and
/// /srv move under it, *:80 becomes the test port, and its LoadModule is left to base.conf.
fn example_fragment() -> String {
    let text = fs::read_to_string(manifest_dir().join("apache-conf/examples/shared-hosting.conf"))
        .expect("read apache-conf/examples/shared-hosting.conf");
    text.lines()
        .map(|line| {
            if line.trim_start().starts_with("LoadModule") {
                format!("# (base.conf loads it) {line}")
            } else {
                line.replace(" /home/", " @ROOT@/home/")
                    .replace(" /srv/", " @ROOT@/srv/")
                    .replace("*:80", "*:@PORT@")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_example_serves_the_seed_scenario() {
    require_root!();
    let bob = require_user!("bob");
    let joe = require_user!("joe");
    let app = app_source("routing.wsgi");
    let htaccess = "<Files blog.wsgi>\nSetEnv PROCESS_GROUP bob:2\n</Files>\n\n\
                    <Files wiki.wsgi>\nSetEnv PROCESS_GROUP bob:3\n</Files>\n\n\
                    <Files steal.wsgi>\nSetEnv PROCESS_GROUP joe:1\n</Files>\n";
    let server = TestServer::start_with_files(
        &example_fragment(),
        &[
            ("srv/www.site.com/app.wsgi", app.as_str()),
            ("home/bob/public_html/index.wsgi", app.as_str()),
            ("home/bob/public_html/blog.wsgi", app.as_str()),
            ("home/bob/public_html/wiki.wsgi", app.as_str()),
            ("home/bob/public_html/steal.wsgi", app.as_str()),
            ("home/bob/public_html/.htaccess", htaccess),
            ("home/joe/public_html/index.wsgi", app.as_str()),
        ],
    );
    chown_tree(&server.root().join("home/bob"), bob.uid, bob.gid);
    chown_tree(&server.root().join("home/joe"), joe.uid, joe.gid);
    let get = |path: &str| server.request("GET", path, &[("Host", WWW)], b"");
    let served = |path: &str, group: &str, uid: u32| {
        let r = get(path);
        assert_eq!(
            r.status,
            200,
            "{path}: {r:?}\n--- error_log ---\n{}",
            server.error_log()
        );
        let j = r.json();
        assert_eq!(j.str_of("process_group"), group, "{path}: {j:?}");
        assert_eq!(j.u64_of("uid") as u32, uid, "{path}: {j:?}");
    };
    served("/app", "default", www_data().0);
    served("/~bob/index.wsgi", "bob:1", bob.uid);
    served("/~bob/blog.wsgi", "bob:2", bob.uid);
    served("/~bob/wiki.wsgi", "bob:3", bob.uid);
    served("/~joe/index.wsgi", "joe:1", joe.uid);
    let r = get("/~bob/steal.wsgi");
    assert_eq!(r.status, 500, "{r:?}");
    let script = format!(
        "{}/home/bob/public_html/steal.wsgi",
        server.root().display()
    );
    server.expect_log(&not_a_member("joe:1", &script), LOG_WAIT);
}
