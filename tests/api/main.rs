//! Integration tests, in one binary (zero-to-production `tests/api/`).
//!
//! - [`single`]: one instance, in-process ([`helpers::spawn_app`]) or the real binary,
//!   one file per area;
//! - [`conformance`]: one instance, the wire as ASP.NET Core speaks it (MessagePack,
//!   handshake and negotiate versions, error texts).
//! - [`cluster`]: redis-server, `stickless` processes and nginx
//!   ([`helpers::spawn_cluster`]); needs `redis-server` and `nginx` installed.
//! - [`routing`]: the bus route and load-balancer re-forwarding on their own, in such a
//!   cluster.
//! - [`logs`]: a real cluster's logs hold no connection token and no access token.
//!
//! Settings and environments are built by the tests, never read from the shell.
//! Run with `cargo test --test api`.

mod cluster;
// The cluster launcher's code, shared with the `stickless-cluster` binary: it is dev
// tooling, so it stays out of the library.
mod conformance;
#[path = "../../src/bin/stickless-cluster/devcluster.rs"]
#[allow(dead_code)]
mod devcluster;
mod helpers;
mod logs;
mod redis_cluster;
mod routing;
mod single;
