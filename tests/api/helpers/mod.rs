//! Test helpers, one file per job:
//!
//! - [`app`]: the real application in-process, with settings built here (never read from
//!   the shell), and the real `stickless` binary as a child process;
//! - [`cluster`]: redis-server, N `stickless` processes and nginx (the repo's nginx.conf);
//! - [`http`]: one helper per endpoint ([`Api`]) and raw TCP for bytes no client sends;
//! - [`metrics`]: `/metrics` samples, failing loudly when a metric is not there;
//! - [`records`]: the JSON hub protocol's records;
//! - [`hub_client`]: what the three hand-written clients share (inbox, handshake, calls);
//!   one client per transport in [`long_polling`], [`websocket`] and [`sse`].
//!
//! Every wait on the network is bounded by a deadline that only a real hang reaches.

pub mod app;
pub mod cluster;
pub mod http;
pub mod hub_client;
pub mod long_polling;
pub mod metrics;
pub mod records;
pub mod sse;
pub mod websocket;

use std::future::Future;
use std::time::{Duration, Instant};

pub use app::{spawn_app, spawn_app_with, TestApp};
pub use cluster::{spawn_cluster, TestCluster};
pub use http::{assert_cors, raw_tcp, tampered, Api, Reply};
pub use hub_client::HubClient;
pub use long_polling::LpClient;
pub use records::{close_error, frame, is_call, is_completion, is_type, HANDSHAKE, HUB, RS};
pub use sse::SseClient;
pub use websocket::{assert_refused, wait_refused, ws_status, WsClient, WsEvent};

/// Upper bound for one ordinary request/response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a test waits for an expected message: generous, only a hang reaches it.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a test waits for a state to be reached (a metric, a health status).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `future` for at most `limit`, failing the test with `what` on timeout.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("not true within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
