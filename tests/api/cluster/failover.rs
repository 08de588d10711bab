//! SIGTERM on an instance of a real cluster: its clients get a Close message that allows
//! reconnecting, and, negotiating again through the load balancer, land on an instance
//! that still runs and get the cluster's messages there.

use awc::http::StatusCode;
use serde_json::json;

use crate::helpers::*;

/// Negotiates through the balancer until an instance other than a stopping one answers
/// (a stopping instance answers 503, as a client with automatic reconnect would retry).
async fn renegotiate(lb: &Api) -> (String, String) {
    eventually(
        SETTLE_TIMEOUT,
        "a running instance to negotiate",
        || async {
            let reply = lb.negotiate_raw("negotiateVersion=1", &[]).await;
            if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                return None;
            }
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            let body = reply.json();
            Some((
                body["connectionId"].as_str().expect("an id").to_owned(),
                body["connectionToken"]
                    .as_str()
                    .expect("a token")
                    .to_owned(),
            ))
        },
    )
    .await
}

#[actix_web::test]
async fn clients_of_an_instance_stopped_with_sigterm_reconnect_to_another_through_the_balancer() {
    let mut cluster = spawn_cluster(3, |_| {}).await;
    let lb = cluster.lb.clone();
    // One client of each transport on node-1 (SSE and long polling reached through
    // nginx, forwarded when it picks another instance; a WebSocket would be adopted where
    // it lands), and a watcher on node-3.
    let mut ws = WsClient::connect(&cluster.nodes[0]).await;
    let mut sse = SseClient::connect_via(&cluster.nodes[0], &lb).await;
    let mut lp = LpClient::negotiate(&cluster.nodes[0]).await;
    lp.api = lb.clone();
    lp.start().await;
    for client in [&mut ws as &mut dyn HubClient, &mut sse, &mut lp] {
        let me = client.call("WhoAmI", json!([])).await;
        assert_eq!(me["instance"], "node-1", "{me}");
    }
    let mut watcher = WsClient::connect(&cluster.nodes[2]).await;

    cluster.signal(0, "TERM");

    for client in [&mut ws as &mut dyn HubClient, &mut sse, &mut lp] {
        let close = client.recv("a Close message", &|r| is_type(r, 7)).await;
        assert_eq!(close["allowReconnect"], true, "{close}");
        client.wait_ended().await;
    }
    cluster.stop_instance(0);

    // Each reconnects through nginx and lands on an instance that runs.
    let (_, token) = renegotiate(&lb).await;
    let mut ws = lb
        .ws_raw(&format!("id={token}"), &[])
        .await
        .expect("a WebSocket through nginx");
    ws.handshake().await;
    let (_, token) = renegotiate(&lb).await;
    let mut sse = lb
        .sse_raw(&token, &[])
        .await
        .expect("a stream through nginx");
    sse.handshake().await;
    let (id, token) = renegotiate(&lb).await;
    let mut lp = LpClient::resume(&lb, &id, &token);
    lp.start().await;
    for client in [&mut ws as &mut dyn HubClient, &mut sse, &mut lp] {
        let me = client.call("WhoAmI", json!([])).await;
        assert_ne!(me["instance"], "node-1", "{me}");
    }
    watcher.fire("Send", json!(["after the failover"])).await;
    for client in [&mut ws as &mut dyn HubClient, &mut sse, &mut lp] {
        client
            .recv_call("Send", &|m| m == "after the failover")
            .await;
    }
}
