//! Placeholder: filled by the fuzzing work.
