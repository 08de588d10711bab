//! Settings: the real binary refuses invalid ones.
