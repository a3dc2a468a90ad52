//! How much freed memory malloc keeps for reuse (`mallopt`), and giving it back to the system
//! (`malloc_trim`). Here because these are raw libc calls; it touches no httpd types (daemons
//! and Apache children use it, and so do unit tests).

use std::time::Instant;

/// Gives the memory that malloc holds free (in every thread's arena) back to the system.
/// True if any was given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back_free_memory() -> bool {
    // SAFETY: malloc_trim takes each arena's own lock while it works, so it may run on any
    // thread while others allocate; it frees nothing that is in use.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries have no malloc_trim; their memory stays as it is.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_free_memory() -> bool {
    false
}

/// Allocations this big or bigger get their own mapping, given back as soon as they are freed.
/// glibc's own adaptive rule raises its threshold up to this (from 128 KiB, on 64-bit) as it
/// sees big blocks freed; a daemon starts there.
const OWN_MAPPING_FROM: libc::c_int = 32 << 20;

/// Freed memory at the top of the heap stays there for the next allocations until it reaches
/// this much; then glibc gives all of it back (twice the above, as glibc's adaptive rule
/// would have it).
const GIVEN_BACK_FROM: libc::c_int = 64 << 20;

/// What `keep_freed_memory_while_busy` did, for the daemon's debug line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocTuning {
    /// All of it.
    Applied,
    /// Nothing: the sysadmin tuned malloc in the environment.
    LeftToSysadmin,
    /// malloc refused some of it (or is not glibc's).
    Refused,
}

impl std::fmt::Display for MallocTuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MallocTuning::Applied => {
                "one arena for every thread, blocks of 32 MiB or more mapped on their own, freed \
                 memory given back from 64 MiB at the top of the heap"
            }
            MallocTuning::LeftToSysadmin => {
                "left as the environment sets it (MALLOC_* or GLIBC_TUNABLES=glibc.malloc.*)"
            }
            MallocTuning::Refused => "glibc's defaults (malloc refused the daemon's settings)",
        })
    }
}

/// Lets malloc keep the memory a big request body or response freed for the next request,
/// instead of giving it back at once: glibc's default gives back the free top of the heap
/// once it reaches 128 KiB, so every big body faults all its pages in again (2,048 page faults
/// for 8 MiB). A daemon gives the memory back anyway once it has been quiet for a second
/// (`give_back_free_memory`), which needs one arena for every thread: malloc_trim never
/// reaches what stays free at the top of a thread's own arena. One arena also means one lock:
/// the threads of a daemon mostly take turns under the GIL anyway.
///
/// To be called before the process starts a thread, in a process forked from a single-threaded
/// one (Apache's parent): a thread takes an arena the parent's threads left before it looks at
/// the limit. The sysadmin's own settings in the environment are kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory_while_busy() -> MallocTuning {
    if malloc_tuned_by_sysadmin(|name| std::env::var(name).ok()) {
        return MallocTuning::LeftToSysadmin;
    }
    let settings = [
        (libc::M_ARENA_MAX, 1),
        (libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM),
        (libc::M_TRIM_THRESHOLD, GIVEN_BACK_FROM),
    ];
    // Each on its own: one that malloc refuses does not keep the others from taking effect.
    let applied = settings
        .iter()
        // SAFETY: mallopt only changes malloc's settings; called before the daemon starts its
        // threads.
        .filter(|&&(option, value)| unsafe { libc::mallopt(option, value) } == 1)
        .count();
    if applied == settings.len() {
        MallocTuning::Applied
    } else {
        MallocTuning::Refused
    }
}

/// Whether the environment (`var`) tunes malloc already.
fn malloc_tuned_by_sysadmin(var: impl Fn(&str) -> Option<String>) -> bool {
    [
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_ARENA_MAX",
        "MALLOC_ARENA_TEST",
    ]
    .iter()
    .any(|name| var(name).is_some())
        || var("GLIBC_TUNABLES").is_some_and(|tunables| tunables.contains("glibc.malloc."))
}

/// Other C libraries keep their own rules.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory_while_busy() -> MallocTuning {
    MallocTuning::Refused
}

/// This process's resident memory (VmRSS), from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * u64::try_from(page).ok()?)
}

/// How the resident size changed over some work, and how long it took, for a debug line.
/// /proc is read only when the line is `wanted`.
pub struct ResidentChange {
    before: Option<u64>,
    started: Instant,
}

impl ResidentChange {
    pub fn start(wanted: bool) -> ResidentChange {
        ResidentChange {
            before: wanted.then(resident_bytes).flatten(),
            started: Instant::now(),
        }
    }

    /// "resident A MiB -> B MiB, in C ms"; None when not wanted.
    pub fn finish(self) -> Option<String> {
        let (before, after) = (self.before?, resident_bytes()?);
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        Some(format!(
            "resident {:.1} MiB -> {:.1} MiB, in {:.1} ms",
            mib(before),
            mib(after),
            self.started.elapsed().as_secs_f64() * 1000.0
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn resident_mib() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib / 1024
    }

    #[test]
    fn a_sysadmins_malloc_settings_are_noticed() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!malloc_tuned_by_sysadmin(env(&[])));
        assert!(!malloc_tuned_by_sysadmin(env(&[(
            "GLIBC_TUNABLES",
            "glibc.rtld.nns=2"
        )])));
        assert!(malloc_tuned_by_sysadmin(env(&[(
            "GLIBC_TUNABLES",
            "glibc.rtld.nns=2:glibc.malloc.trim_threshold=0"
        )])));
        assert!(malloc_tuned_by_sysadmin(env(&[(
            "MALLOC_TRIM_THRESHOLD_",
            "0"
        )])));
        assert!(malloc_tuned_by_sysadmin(env(&[(
            "MALLOC_MMAP_THRESHOLD_",
            "1"
        )])));
    }

    #[test]
    fn a_resident_change_is_measured_only_when_wanted() {
        assert_eq!(ResidentChange::start(false).finish(), None);
        let line = ResidentChange::start(true).finish().unwrap();
        assert!(
            line.starts_with("resident ") && line.contains(" MiB -> "),
            "{line}"
        );
    }

    #[test]
    fn freed_memory_held_between_live_allocations_is_given_back() {
        // 256 MiB in 64 KiB blocks, each followed by a small block that stays: once the big
        // ones are freed, malloc cannot hand their memory back by itself (it is not at the
        // top of the heap). Big enough that other tests running meanwhile do not matter.
        let (kept, before, freed) = std::thread::spawn(|| {
            let before = resident_mib();
            let mut big = Vec::new();
            let mut kept = Vec::new();
            for i in 0..4096u32 {
                big.push(vec![i as u8; 64 * 1024]);
                kept.push(vec![1u8; 1024]);
            }
            drop(big);
            (kept, before, resident_mib())
        })
        .join()
        .unwrap();
        assert!(
            freed >= before + 192,
            "the freed blocks stayed resident: {before} -> {freed} MiB"
        );
        assert!(give_back_free_memory());
        let after = resident_mib();
        assert!(after + 192 <= freed, "given back: {freed} -> {after} MiB");
        drop(kept);
    }
}
