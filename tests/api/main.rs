//! Integration tests, in one binary (zero-to-production `tests/api/`).
//!
//! - [`single`]: one instance, started in-process with [`helpers::spawn_app`].
//! - [`conformance`]: one instance, the wire as ASP.NET Core speaks it (MessagePack,
//!   handshake and negotiate versions, error texts).
//! - [`cluster`]: redis-server, three `stickless` processes and nginx
//!   ([`helpers::spawn_cluster`]); needs `redis-server` and `nginx` installed.
//! - [`routing`]: the bus route and load-balancer re-forwarding on their own, in such a
//!   cluster.
//!
//! - [`logs`]: a real cluster's logs hold no connection token and no access token.
//!
//! Run with `cargo test --test api -- --test-threads=2`.

mod cluster;
mod conformance;
mod helpers;
mod logs;
mod redis_cluster;
mod routing;
mod single;
