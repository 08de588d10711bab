//! A real cluster: redis-server, `stickless` processes and nginx (plain round robin, the
//! repo's nginx.conf), one per test. Requests go through nginx and, to force misrouting,
//! straight to chosen instances.

mod backplane;
mod draining;
mod failover;
mod launcher;
mod load_balancer;
pub(crate) mod routing;
mod tokens;

use serde_json::{json, Value};

use crate::helpers::*;

/// Every kind of request a client sends for a connection.
pub const REQUEST_KINDS: [&str; 5] = [
    "long_polling",
    "send",
    "delete",
    "server_sent_events",
    "websockets",
];

/// Whether `record` is a `ReceiveMessage` with this text.
fn is_chat(record: &Value, text: &str) -> bool {
    is_call(record, "ReceiveMessage") && record["arguments"][0]["text"] == text
}

/// One WebSocket and one long-polling client on every instance, connected directly.
async fn clients_on_every_instance(cluster: &TestCluster) -> Vec<Box<dyn HubClient>> {
    let mut clients: Vec<Box<dyn HubClient>> = Vec::new();
    for node in &cluster.nodes {
        clients.push(Box::new(WsClient::connect(node).await));
        clients.push(Box::new(LpClient::connect(node).await));
    }
    clients
}

/// Sends `Send(marker)` from `clients[from]`, then returns, for every client, what it
/// received before the marker (one sender's order is kept end to end).
async fn before_marker(
    clients: &mut [Box<dyn HubClient>],
    from: usize,
    marker: &str,
) -> Vec<Vec<Value>> {
    clients[from].fire("Send", json!([marker])).await;
    let mut seen = Vec::new();
    for client in clients.iter_mut() {
        seen.push(client.records_before_marker(marker).await);
    }
    seen
}
