//! Integration tests, in one binary (zero-to-production `tests/api/`).
//!
//! - [`single`]: one instance, in-process ([`helpers::spawn_app`]) or the real binary,
//!   one file per area;
//! - [`cluster`]: redis-server, `stickless` processes and nginx
//!   ([`helpers::spawn_cluster`]); needs `redis-server` and `nginx` installed.
//! - [`routing`]: the bus route and load-balancer re-forwarding on their own, in such a
//!   cluster.
//!
//! Settings and environments are built by the tests, never read from the shell.
//! Run with `cargo test --test api`.

mod cluster;
mod helpers;
mod redis_cluster;
mod routing;
mod single;
