//! Integration tests, in one binary (zero-to-production `tests/api/`).
//!
//! - [`single`]: one instance, started in-process with [`helpers::spawn_app`].
//! - [`cluster`]: redis-server, three `stickless` processes and nginx
//!   ([`helpers::spawn_cluster`]); needs `redis-server` and `nginx` installed.
//! - [`routing`]: the bus route and load-balancer re-forwarding on their own, in such a
//!   cluster.
//!
//! Run with `cargo test --test api -- --test-threads=2`.

mod cluster;
mod helpers;
mod routing;
mod single;
