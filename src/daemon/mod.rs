//! Daemon process groups: the registry every process of a generation shares, the parent's
//! supervisor, and the code a daemon process runs. No httpd types here: the httpd layer gives
//! us plain values and two callbacks (`ParentHooks`).

pub mod connection;
pub mod lifecycle;
pub mod listener;
pub mod origin;
pub mod privileges;
pub mod spawn;
pub mod supervisor;
pub mod worker;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::daemon_process::ProcessGroupSpec;
use crate::load::LoadBoard;

/// One daemon group as every process of this generation sees it.
#[derive(Debug, Clone)]
pub struct GroupRuntime {
    /// Position in the registry (and in the origin secrets table).
    pub index: usize,
    pub spec: ProcessGroupSpec,
    /// ServerName of the `<VirtualHost>` that defined it; None for a global group.
    pub scope: Option<String>,
    pub socket_path: PathBuf,
    /// socket-timeout, or Apache's Timeout when unset.
    pub socket_timeout: Duration,
    /// The identity the daemons run as, resolved at startup.
    pub identity: privileges::Identity,
    pub home: PathBuf,
    /// Apache's worker uid: the only non-root peer a daemon accepts requests from.
    pub worker_uid: u32,
    /// WSGIImportScript files to load when a daemon starts.
    pub import_scripts: Vec<String>,
    /// One slot per process of the group (see `crate::load`), in its own shared mapping so a
    /// daemon can be left with its group's board only.
    pub load: LoadBoard,
}

/// All groups of the current generation, in definition order.
#[derive(Debug, Default)]
pub struct Registry {
    pub groups: Vec<GroupRuntime>,
}

impl Registry {
    pub fn find(&self, name: &str) -> Option<&GroupRuntime> {
        self.groups.iter().find(|g| g.spec.name == name)
    }
}

/// FNV-1a of a group name: stable across builds and restarts, for socket file names (group
/// names may hold characters that do not belong in a path).
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

static REGISTRY: RwLock<Option<Arc<Registry>>> = RwLock::new(None);

/// Published by the parent at post_config, before any worker or daemon is forked, so every
/// child inherits it.
pub fn publish_arc(registry: Arc<Registry>) {
    let mut slot = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    *slot = Some(registry);
}

pub fn registry() -> Option<Arc<Registry>> {
    REGISTRY.read().unwrap_or_else(|p| p.into_inner()).clone()
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "WSGIRS0401: Daemon socket path '{path}' for group '{group}' is {len} bytes long; \
         UNIX sockets allow at most 107. Choose a shorter WSGISocketPrefix."
    )]
    SocketPathTooLong {
        group: String,
        path: String,
        len: usize,
    },
    #[error("WSGIRS0402: Couldn't create socket '{path}' for WSGI daemon process group '{group}': {cause}")]
    Socket {
        group: String,
        path: String,
        cause: String,
    },
    #[error("WSGIRS0403: Couldn't spawn process for WSGI daemon process group '{group}': {cause}")]
    Fork { group: String, cause: String },
    #[error("WSGIRS0404: WSGI daemon process group '{group}': {cause}")]
    Identity { group: String, cause: String },
}
