//! `WSGIRestrictProcess name …`: the daemon groups a part of the site may select. No ffi here.
//!
//! Lists replace, never merge (the innermost list in force hides outer ones: the DirConfig
//! merge keeps the inner `Option`), names match case-insensitively as in mod_wsgi, the entry
//! `%{GLOBAL}` permits embedded mode (the empty name), and an empty list permits nothing.

#![forbid(unsafe_code)]

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestrictList {
    names: Vec<String>,
    embedded: bool,
}

impl RestrictList {
    pub fn new<S: AsRef<str>>(entries: &[S]) -> RestrictList {
        let mut list = RestrictList::default();
        for entry in entries {
            let entry = entry.as_ref();
            if entry == "%{GLOBAL}" {
                list.embedded = true;
            } else {
                list.names.push(entry.to_string());
            }
        }
        list
    }

    /// Whether a resolved group name (empty = embedded mode) may be used.
    pub fn permits(&self, group: &str) -> bool {
        if group.is_empty() {
            return self.embedded;
        }
        self.names
            .iter()
            .any(|name| name.eq_ignore_ascii_case(group))
    }

    /// The list as written, for log lines.
    pub fn describe(&self) -> String {
        let mut entries: Vec<&str> = self.names.iter().map(String::as_str).collect();
        if self.embedded {
            entries.push("%{GLOBAL}");
        }
        if entries.is_empty() {
            "(empty: no group allowed)".to_string()
        } else {
            entries.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_case_insensitively() {
        let list = RestrictList::new(&["bob:1", "BOB:2"]);
        assert!(list.permits("bob:1"));
        assert!(list.permits("Bob:1"));
        assert!(list.permits("bob:2"));
        assert!(!list.permits("bob:3"));
        assert!(!list.permits("joe:1"));
        assert!(!list.permits(""));
    }

    #[test]
    fn global_entry_permits_only_embedded() {
        let list = RestrictList::new(&["%{GLOBAL}"]);
        assert!(list.permits(""));
        assert!(!list.permits("%{GLOBAL}"));
        assert!(!list.permits("default"));
        assert_eq!(list.describe(), "%{GLOBAL}");
    }

    #[test]
    fn empty_list_permits_nothing() {
        let list = RestrictList::new::<&str>(&[]);
        assert!(!list.permits(""));
        assert!(!list.permits("default"));
        assert!(list.describe().contains("no group allowed"));
    }
}
