//! Dropping root in a daemon process: setgid → setgroups/initgroups → setuid, then checking
//! that every id is what was asked and that root cannot be regained. The system calls sit
//! behind `Credentials` so the order and the checks are unit-tested without root.

#![forbid(unsafe_code)]

use std::ffi::CString;
use std::io;

use nix::unistd::{self, Gid, Uid};

/// Who a group's daemons run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_name: String,
    pub uid: u32,
    pub gid: u32,
    /// supplementary-groups=; None means the user's groups from the group database.
    pub supplementary: Option<Vec<u32>>,
}

/// The ids a process has, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentIds {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
}

pub trait Credentials {
    fn setgid(&mut self, gid: u32) -> io::Result<()>;
    fn setgroups(&mut self, groups: &[u32]) -> io::Result<()>;
    fn initgroups(&mut self, user: &str, gid: u32) -> io::Result<()>;
    fn setuid(&mut self, uid: u32) -> io::Result<()>;
    /// The supplementary groups initgroups would give `user` (getgrouplist).
    fn group_list(&self, user: &str, gid: u32) -> io::Result<Vec<u32>>;
    fn current(&self) -> io::Result<CurrentIds>;
    /// Tries setuid(0) and seteuid(0); true if either succeeded (which must never happen).
    fn can_regain_root(&mut self) -> bool;
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PrivilegeError {
    #[error("WSGIRS0410: Unable to change to group id {gid}: {cause}")]
    SetGid { gid: u32, cause: String },
    #[error("WSGIRS0411: Unable to set supplementary groups for user '{user}': {cause}")]
    Groups { user: String, cause: String },
    #[error("WSGIRS0412: Unable to change to uid {uid}: {cause}")]
    SetUid { uid: u32, cause: String },
    #[error(
        "WSGIRS0413: Privilege drop did not take effect: wanted uid={want_uid} gid={want_gid} \
         groups={want_groups:?}, have uid={have_uid} euid={have_euid} gid={have_gid} \
         egid={have_egid} groups={have_groups:?}"
    )]
    Mismatch {
        want_uid: u32,
        want_gid: u32,
        want_groups: Vec<u32>,
        have_uid: u32,
        have_euid: u32,
        have_gid: u32,
        have_egid: u32,
        have_groups: Vec<u32>,
    },
    #[error(
        "WSGIRS0414: Daemon process could regain root after dropping privileges; refusing to run"
    )]
    RootRegained,
}

fn sorted(mut groups: Vec<u32>) -> Vec<u32> {
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Switches to `id` and proves it worked. Must run before any user code (Python) runs.
pub fn drop_to(creds: &mut impl Credentials, id: &Identity) -> Result<(), PrivilegeError> {
    let cause = |e: io::Error| e.to_string();
    creds.setgid(id.gid).map_err(|e| PrivilegeError::SetGid {
        gid: id.gid,
        cause: cause(e),
    })?;
    let groups_error = |e: io::Error| PrivilegeError::Groups {
        user: id.user_name.clone(),
        cause: e.to_string(),
    };
    let want_groups = match &id.supplementary {
        Some(list) => {
            creds.setgroups(list).map_err(groups_error)?;
            sorted(list.clone())
        }
        None => {
            creds
                .initgroups(&id.user_name, id.gid)
                .map_err(groups_error)?;
            sorted(
                creds
                    .group_list(&id.user_name, id.gid)
                    .map_err(groups_error)?,
            )
        }
    };
    creds.setuid(id.uid).map_err(|e| PrivilegeError::SetUid {
        uid: id.uid,
        cause: cause(e),
    })?;

    let have = creds.current().map_err(|e| PrivilegeError::SetUid {
        uid: id.uid,
        cause: cause(e),
    })?;
    let have_groups = sorted(have.groups.clone());
    if have.uid != id.uid
        || have.euid != id.uid
        || have.gid != id.gid
        || have.egid != id.gid
        || have_groups != want_groups
    {
        return Err(PrivilegeError::Mismatch {
            want_uid: id.uid,
            want_gid: id.gid,
            want_groups,
            have_uid: have.uid,
            have_euid: have.euid,
            have_gid: have.gid,
            have_egid: have.egid,
            have_groups,
        });
    }
    if id.uid != 0 && creds.can_regain_root() {
        return Err(PrivilegeError::RootRegained);
    }
    Ok(())
}

/// The real system calls.
pub struct System;

impl Credentials for System {
    fn setgid(&mut self, gid: u32) -> io::Result<()> {
        unistd::setgid(Gid::from_raw(gid)).map_err(io::Error::from)
    }

    fn setgroups(&mut self, groups: &[u32]) -> io::Result<()> {
        let gids: Vec<Gid> = groups.iter().map(|&g| Gid::from_raw(g)).collect();
        unistd::setgroups(&gids).map_err(io::Error::from)
    }

    fn initgroups(&mut self, user: &str, gid: u32) -> io::Result<()> {
        let name = CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        unistd::initgroups(&name, Gid::from_raw(gid)).map_err(io::Error::from)
    }

    fn setuid(&mut self, uid: u32) -> io::Result<()> {
        unistd::setuid(Uid::from_raw(uid)).map_err(io::Error::from)
    }

    fn group_list(&self, user: &str, gid: u32) -> io::Result<Vec<u32>> {
        let name = CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let groups = unistd::getgrouplist(&name, Gid::from_raw(gid)).map_err(io::Error::from)?;
        Ok(groups.into_iter().map(|g| g.as_raw()).collect())
    }

    fn current(&self) -> io::Result<CurrentIds> {
        Ok(CurrentIds {
            uid: unistd::getuid().as_raw(),
            euid: unistd::geteuid().as_raw(),
            gid: unistd::getgid().as_raw(),
            egid: unistd::getegid().as_raw(),
            groups: unistd::getgroups()
                .map_err(io::Error::from)?
                .into_iter()
                .map(|g| g.as_raw())
                .collect(),
        })
    }

    fn can_regain_root(&mut self) -> bool {
        unistd::setuid(Uid::from_raw(0)).is_ok() || unistd::seteuid(Uid::from_raw(0)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Records calls and simulates the kernel's ids.
    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        ids: Option<CurrentIds>,
        fail_setuid: bool,
        regain: bool,
        skew_groups: bool,
    }

    impl Credentials for Fake {
        fn setgid(&mut self, gid: u32) -> io::Result<()> {
            self.calls.push(format!("setgid {gid}"));
            let ids = self.ids.get_or_insert(CurrentIds {
                uid: 0,
                euid: 0,
                gid: 0,
                egid: 0,
                groups: vec![0],
            });
            ids.gid = gid;
            ids.egid = gid;
            Ok(())
        }
        fn setgroups(&mut self, groups: &[u32]) -> io::Result<()> {
            self.calls.push(format!("setgroups {groups:?}"));
            if let Some(ids) = self.ids.as_mut() {
                ids.groups = groups.to_vec();
            }
            Ok(())
        }
        fn initgroups(&mut self, user: &str, gid: u32) -> io::Result<()> {
            self.calls.push(format!("initgroups {user} {gid}"));
            let list = self.group_list(user, gid)?;
            if let Some(ids) = self.ids.as_mut() {
                ids.groups = if self.skew_groups { vec![0] } else { list };
            }
            Ok(())
        }
        fn setuid(&mut self, uid: u32) -> io::Result<()> {
            self.calls.push(format!("setuid {uid}"));
            if self.fail_setuid {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            if let Some(ids) = self.ids.as_mut() {
                ids.uid = uid;
                ids.euid = uid;
            }
            Ok(())
        }
        fn group_list(&self, _user: &str, gid: u32) -> io::Result<Vec<u32>> {
            Ok(vec![gid, 27])
        }
        fn current(&self) -> io::Result<CurrentIds> {
            Ok(self.ids.clone().unwrap())
        }
        fn can_regain_root(&mut self) -> bool {
            self.calls.push("try root".into());
            self.regain
        }
    }

    fn bob() -> Identity {
        Identity {
            user_name: "bob".into(),
            uid: 1001,
            gid: 1001,
            supplementary: None,
        }
    }

    #[test]
    fn order_is_gid_groups_uid_then_checks() {
        let mut fake = Fake::default();
        drop_to(&mut fake, &bob()).unwrap();
        assert_eq!(
            fake.calls,
            [
                "setgid 1001",
                "initgroups bob 1001",
                "setuid 1001",
                "try root"
            ]
        );
    }

    #[test]
    fn explicit_supplementary_groups_replace_initgroups() {
        let mut fake = Fake::default();
        let id = Identity {
            supplementary: Some(vec![50, 1001]),
            ..bob()
        };
        drop_to(&mut fake, &id).unwrap();
        assert_eq!(fake.calls[1], "setgroups [50, 1001]");
    }

    #[test]
    fn failures_and_mismatches_are_refused() {
        let mut fake = Fake {
            fail_setuid: true,
            ..Fake::default()
        };
        assert!(matches!(
            drop_to(&mut fake, &bob()),
            Err(PrivilegeError::SetUid { uid: 1001, .. })
        ));

        let mut fake = Fake {
            regain: true,
            ..Fake::default()
        };
        assert_eq!(
            drop_to(&mut fake, &bob()),
            Err(PrivilegeError::RootRegained)
        );

        let mut fake = Fake {
            skew_groups: true,
            ..Fake::default()
        };
        let err = drop_to(&mut fake, &bob()).unwrap_err();
        assert!(matches!(err, PrivilegeError::Mismatch { .. }));
        assert!(err.to_string().contains("did not take effect"));
    }
}
