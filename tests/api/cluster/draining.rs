//! An instance that is draining (SIGTERM, a long `SHUTDOWN_TIMEOUT`, a stateful session
//! kept on it) starts no new relays: requests sent straight to it that would start an
//! event stream, a long poll or a relayed WebSocket for another instance's connection
//! get 503 with `Retry-After`, while short sends still reach their owner; and behind the
//! repo's nginx.conf, negotiates and transports all succeed, since nginx moves a 503 on
//! to the next instance.

use awc::http::StatusCode;
use awc::ws;
use serde_json::json;

use crate::helpers::metrics::rejections;
use crate::helpers::records::is_handshake_reply;
use crate::helpers::*;

/// Negotiates and connects through the balancer this many times per transport.
const ROUNDS: usize = 12;

/// Starts a 3-instance cluster and leaves node-1 draining, held there by a stateful
/// session whose client never comes back (the drain waits for it up to the timeout).
async fn cluster_with_node1_draining() -> (TestCluster, WsClient) {
    let cluster = spawn_cluster(3, |options| {
        options.env.push(("SHUTDOWN_TIMEOUT".into(), "120s".into()));
        options
            .env
            .push(("DISCONNECT_TIMEOUT".into(), "120s".into()));
    })
    .await;
    let negotiated = cluster.nodes[0]
        .negotiate_raw("negotiateVersion=1&useStatefulReconnect=true", &[])
        .await
        .json();
    let token = negotiated["connectionToken"].as_str().expect("a token");
    let mut held = cluster.nodes[0]
        .ws_raw(&format!("id={token}"), &[])
        .await
        .expect("a stateful WebSocket on node-1");
    held.send_text(format!("{}{RS}", json!({"protocol": "json", "version": 2})))
        .await;
    held.recv("the handshake reply", &is_handshake_reply).await;

    cluster.signal(0, "TERM");
    eventually(SETTLE_TIMEOUT, "node-1 to drain", || async {
        let reply = cluster.nodes[0].get("/healthz").await;
        (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    (cluster, held)
}

/// Asserts node-1 still drains (so everything since it started draining saw it so).
async fn assert_still_draining(cluster: &TestCluster) {
    let reply = cluster.nodes[0].get("/healthz").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["status"], "draining");
}

#[actix_web::test]
async fn a_draining_instance_refuses_new_relays_with_503_and_still_forwards_sends() {
    let (cluster, _held) = cluster_with_node1_draining().await;
    let draining = &cluster.nodes[0];

    // A connection of node-2, reached through node-1.
    let (_, token) = cluster.nodes[1].negotiate().await;
    let refused = draining.sse_raw(&token, &[]).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.header("retry-after").is_some(), "no Retry-After");
    let (_, token) = cluster.nodes[1].negotiate().await;
    let refused = draining.poll(&token).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.header("retry-after").is_some(), "no Retry-After");
    // A WebSocket would be adopted or relayed here: refused too, also when stale.
    let (_, token) = cluster.nodes[1].negotiate().await;
    assert_refused(
        draining.ws_raw(&format!("id={token}"), &[]).await,
        StatusCode::SERVICE_UNAVAILABLE,
    );

    // Each connection is still whole: it starts on its owner, and a send forwarded by the
    // draining instance reaches it (a POST is short: it ends before the exit).
    let mut lp = LpClient::negotiate(&cluster.nodes[1]).await;
    lp.start().await;
    lp.api = draining.clone();
    let reply = lp
        .post(frame(
            &json!({"type": 1, "invocationId": "1", "target": "WhoAmI", "arguments": []}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    lp.api = cluster.nodes[1].clone();
    let answer = lp.recv("the answer", &|r| is_completion(r, "1")).await;
    assert_eq!(answer["result"]["instance"], "node-2", "{answer}");

    assert!(
        draining.metric(&rejections("draining")).await >= 3.0,
        "the refusals are counted"
    );
    assert_still_draining(&cluster).await;
}

#[actix_web::test]
async fn behind_nginx_nothing_sees_a_draining_instance_503() {
    let (cluster, _held) = cluster_with_node1_draining().await;
    let lb = &cluster.lb;

    for round in 0..ROUNDS {
        // Negotiates: a 503 from node-1 is retried by nginx on the next instance.
        let (_, token) = lb.negotiate().await;
        // An event stream through nginx: if it lands on node-1, node-1 refuses to relay
        // it and nginx tries the next instance.
        let mut sse = lb
            .sse_raw(&token, &[])
            .await
            .unwrap_or_else(|r| panic!("SSE {round}: {} {}", r.status, r.text()));
        sse.handshake().await;
        let me = sse.call("WhoAmI", json!([])).await;
        assert_ne!(me["instance"], "node-1", "{me}");

        // A long-polling client through nginx, every request through the balancer.
        let mut lp = LpClient::negotiate(lb).await;
        lp.start().await;
        let me = lp.call("WhoAmI", json!([])).await;
        assert_ne!(me["instance"], "node-1", "{me}");

        // A WebSocket through nginx.
        let (_, token) = lb.negotiate().await;
        let mut ws = lb
            .ws_raw(&format!("id={token}"), &[])
            .await
            .unwrap_or_else(|e| panic!("WebSocket {round}: {e}"));
        ws.handshake().await;
        let me = ws.call("WhoAmI", json!([])).await;
        assert_ne!(me["instance"], "node-1", "{me}");
        ws.send_message(ws::Message::Close(None)).await;
    }
    assert_still_draining(&cluster).await;
}
