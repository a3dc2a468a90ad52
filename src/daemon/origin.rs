//! The origin check (SPEC §6): a request is served only if it comes from an Apache worker of
//! this generation. The worker proves it with the group's random secret (compared in constant
//! time), the kernel vouches for the peer's uid (SO_PEERCRED), and the request must name this
//! daemon's own group. Apache's children know every secret; each daemon forgets all but its
//! own right after the fork, so one group's app cannot forge requests to another group.

#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::sync::Mutex;

pub const SECRET_LEN: usize = 32;
pub type Secret = [u8; SECRET_LEN];

/// The key of the pair that carries the secret: the empty name, which no environ variable has.
pub const SECRET_KEY: &[u8] = b"";
/// The environ key naming the group the worker chose.
pub const GROUP_KEY: &[u8] = b"mod_wsgi.process_group";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OriginError {
    #[error("the connecting process runs as uid {uid}, not as Apache's worker user (uid {expected}) or root")]
    PeerUid { uid: u32, expected: u32 },
    #[error("the request carries no origin secret")]
    NoSecret,
    #[error("the request's origin secret is wrong")]
    BadSecret,
    #[error("the request is addressed to group '{asked}', not to this group '{ours}'")]
    WrongGroup { asked: String, ours: String },
}

/// A fresh random secret from the kernel.
pub fn new_secret() -> io::Result<Secret> {
    let mut secret = [0u8; SECRET_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    Ok(secret)
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn check_peer(uid: u32, worker_uid: u32) -> Result<(), OriginError> {
    if uid == worker_uid || uid == 0 {
        Ok(())
    } else {
        Err(OriginError::PeerUid {
            uid,
            expected: worker_uid,
        })
    }
}

/// Checks the secret (the first pair) and the group name of a decoded Request.
pub fn check_request(
    pairs: &[(&[u8], &[u8])],
    secret: &Secret,
    group: &str,
) -> Result<(), OriginError> {
    match pairs.first() {
        Some((key, value)) if *key == SECRET_KEY => {
            if !constant_time_eq(value, secret) {
                return Err(OriginError::BadSecret);
            }
        }
        _ => return Err(OriginError::NoSecret),
    }
    let asked = pairs
        .iter()
        .rev()
        .find(|(key, _)| *key == GROUP_KEY)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        .unwrap_or_default();
    if asked != group {
        return Err(OriginError::WrongGroup {
            asked,
            ours: group.to_string(),
        });
    }
    Ok(())
}

/// Every group's secret, by group index. Set by the parent before it forks anything.
static SECRETS: Mutex<Vec<Secret>> = Mutex::new(Vec::new());

fn secrets() -> std::sync::MutexGuard<'static, Vec<Secret>> {
    SECRETS.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn install_secrets(all: Vec<Secret>) {
    *secrets() = all;
}

pub fn secret_for(group_index: usize) -> Option<Secret> {
    secrets().get(group_index).copied()
}

/// In a daemon: overwrite every other group's secret.
pub fn forget_secrets_except(group_index: usize) {
    for (index, secret) in secrets().iter_mut().enumerate() {
        if index != group_index {
            secret.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_are_random_and_compared_exactly() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(constant_time_eq(&a, &a));
        assert!(!constant_time_eq(&a, &b));
        assert!(!constant_time_eq(&a, &a[..31]));
    }

    #[test]
    fn request_needs_secret_first_and_own_group() {
        let secret = [7u8; SECRET_LEN];
        let good: Vec<(&[u8], &[u8])> = vec![
            (b"", &secret),
            (b"REQUEST_METHOD", b"GET"),
            (GROUP_KEY, b"bob:1"),
        ];
        assert_eq!(check_request(&good, &secret, "bob:1"), Ok(()));
        assert_eq!(
            check_request(&good, &secret, "joe:1"),
            Err(OriginError::WrongGroup {
                asked: "bob:1".into(),
                ours: "joe:1".into()
            })
        );
        let wrong = [8u8; SECRET_LEN];
        let forged: Vec<(&[u8], &[u8])> = vec![(b"", &wrong), (GROUP_KEY, b"bob:1")];
        assert_eq!(
            check_request(&forged, &secret, "bob:1"),
            Err(OriginError::BadSecret)
        );
        let missing: Vec<(&[u8], &[u8])> = vec![(GROUP_KEY, b"bob:1")];
        assert_eq!(
            check_request(&missing, &secret, "bob:1"),
            Err(OriginError::NoSecret)
        );
        assert_eq!(
            check_request(&[], &secret, "bob:1"),
            Err(OriginError::NoSecret)
        );
        // A zeroed (forgotten) secret never matches a real one.
        let zero = [0u8; SECRET_LEN];
        assert_eq!(
            check_request(&good, &zero, "bob:1"),
            Err(OriginError::BadSecret)
        );
    }

    #[test]
    fn peer_must_be_the_worker_user_or_root() {
        assert!(check_peer(33, 33).is_ok());
        assert!(check_peer(0, 33).is_ok());
        assert_eq!(
            check_peer(1001, 33),
            Err(OriginError::PeerUid {
                uid: 1001,
                expected: 33
            })
        );
    }

    #[test]
    fn daemons_forget_other_secrets() {
        install_secrets(vec![[1; SECRET_LEN], [2; SECRET_LEN], [3; SECRET_LEN]]);
        forget_secrets_except(1);
        assert_eq!(secret_for(0), Some([0; SECRET_LEN]));
        assert_eq!(secret_for(1), Some([2; SECRET_LEN]));
        assert_eq!(secret_for(2), Some([0; SECRET_LEN]));
        assert_eq!(secret_for(3), None);
    }
}
