//! Tokens are single-use across a real cluster, as on one ASP.NET server: a second
//! transport for a live connection gets 409 on whichever instance it lands (the client on
//! the first one is unaffected), and once the connection ended its token gets 404 on
//! every instance, for every kind of request — through the cluster-wide claims in Redis.

use std::time::Duration;

use awc::http::StatusCode;
use awc::ws;
use serde_json::json;

use crate::helpers::metrics::rejections;
use crate::helpers::*;

/// Asserts `token` is spent on every node: 404 for everything.
async fn assert_spent_everywhere(cluster: &TestCluster, token: &str) {
    for (index, node) in cluster.nodes.iter().enumerate() {
        for (kind, status) in node.every_kind_status(token).await {
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{kind} on {} for a closed connection's token",
                cluster.ids[index]
            );
        }
    }
}

/// A WebSocket for `token` on `node`, past its handshake.
async fn open(node: &Api, token: &str, what: &str) -> WsClient {
    let mut ws = node
        .ws_raw(&format!("id={token}"), &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    ws.handshake().await;
    ws
}

/// Closes `ws` and waits until the instance that served it answers 404 for its token, and
/// every instance refuses a WebSocket for it with 404 (the closed marker is in Redis).
async fn close_and_wait_spent(
    ws: &mut WsClient,
    served_by: &Api,
    token: &str,
    cluster: &TestCluster,
) {
    ws.send_message(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
        .await;
    ws.wait_closed(RECV_TIMEOUT).await;
    eventually(SETTLE_TIMEOUT, "the connection to end", || async {
        (served_by.poll(token).await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    for node in &cluster.nodes {
        wait_refused(node, token, StatusCode::NOT_FOUND).await;
    }
}

#[actix_web::test]
async fn a_second_websocket_on_another_instance_gets_409_and_a_closed_token_404_everywhere() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (_, token) = a.negotiate().await;
    let mut ws = open(a, &token, "the WebSocket on its owner").await;

    // A fresh token on B and C would be adopted there: it is in use on A.
    for node in [b, c] {
        assert_refused(
            node.ws_raw(&format!("id={token}"), &[]).await,
            StatusCode::CONFLICT,
        );
    }
    assert_eq!(b.metric(&rejections("in_use")).await, 1.0);
    // A's client did not notice.
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[0], "{me}");

    close_and_wait_spent(&mut ws, a, &token, &cluster).await;
    assert_spent_everywhere(&cluster, &token).await;
    assert!(
        b.metric(&rejections("reused")).await >= 1.0,
        "the reuse on B is counted"
    );
}

#[actix_web::test]
async fn an_adopted_connection_is_in_use_everywhere_also_on_its_owner_and_spent_after() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (_, token) = a.negotiate().await;
    // Adopted by B.
    let mut ws = open(b, &token, "the WebSocket adopted by B").await;
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[1], "{me}");

    // C would adopt it too, and A, its owner, would start the connection it negotiated.
    for node in [c, a] {
        assert_refused(
            node.ws_raw(&format!("id={token}"), &[]).await,
            StatusCode::CONFLICT,
        );
    }
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[1], "{me}");

    close_and_wait_spent(&mut ws, b, &token, &cluster).await;
    assert_spent_everywhere(&cluster, &token).await;
}

#[actix_web::test]
async fn after_the_adoption_window_the_owner_answers_409_for_a_connection_another_adopted() {
    let cluster = spawn_cluster(3, |options| {
        options.env.push(("DISCONNECT_TIMEOUT".into(), "2s".into()));
    })
    .await;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (_, token) = a.negotiate().await;
    let mut ws = open(b, &token, "the WebSocket adopted by B").await;

    // Once the window has passed, C forwards the WebSocket to the owner named in the
    // token, A, which does not hold it: A answers 409 (B serves it), not 404. Until then
    // C refuses it itself (409 too); A's counter tells which one answered.
    eventually(
        SETTLE_TIMEOUT,
        "the owner to answer for the token",
        || async {
            assert_refused(
                c.ws_raw(&format!("id={token}"), &[]).await,
                StatusCode::CONFLICT,
            );
            (a.metric(&rejections("in_use")).await >= 1.0).then_some(())
        },
    )
    .await;
    // The client kept its connection all along (its pings keep it).
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[1], "{me}");
}

#[actix_web::test]
async fn with_redis_down_a_fresh_websocket_is_still_adopted_and_the_outage_logged_once() {
    let mut cluster = spawn_cluster(2, |_| {}).await;
    cluster.cluster.stop_redis();
    let b = &cluster.nodes[1];
    eventually(SETTLE_TIMEOUT, "node-2 to see Redis gone", || async {
        (b.healthz().await["status"] == "degraded").then_some(())
    })
    .await;

    // Claims cannot be taken: served as without them, every time.
    for round in 0..3 {
        let (_, token) = cluster.nodes[0].negotiate().await;
        let mut ws = open(b, &token, "a WebSocket adopted without Redis").await;
        let me = ws.call("WhoAmI", json!([])).await;
        assert_eq!(me["instance"], cluster.ids[1], "round {round}: {me}");
    }
    let log = std::fs::read_to_string(cluster.cluster.dir.join(format!("{}.log", cluster.ids[1])))
        .expect("node-2's log");
    assert_eq!(
        log.matches("connection claims unavailable").count(),
        1,
        "logged once"
    );
}

#[actix_web::test]
async fn an_instance_keeps_the_claims_of_its_connections_alive() {
    // More connections than one refresh call carries (256), all on one instance.
    let cluster = spawn_cluster(2, |_| {}).await;
    // An HTTP client keeps at most 100 connections to one host: 80 sockets per client.
    let apis: Vec<Api> = (0..4)
        .map(|_| Api::new(cluster.cluster.instances[0].url.clone()))
        .collect();
    let mut clients = Vec::new();
    for i in 0..300 {
        clients.push(WsClient::connect(&apis[i / 80]).await);
    }
    let pattern = "stickless:chat:claim:*";
    // Every claim loses 6 s of its 30: 24 s left, longer than the wait below, so a claim
    // that is not refreshed stays short rather than expiring out of sight.
    let shortened = cluster.redis_cli(&[
        "EVAL",
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
         redis.call('PEXPIRE', k, 24000) n = n + 1 end return n",
        "0",
        pattern,
    ]);
    let shortened: usize = shortened.trim().parse().expect("a count");
    assert!(shortened >= 300, "only {shortened} claims in Redis");
    // The next refresh (every 10 s) gives each its 30 s again.
    eventually(Duration::from_secs(13), "every claim refreshed", || async {
        let low = cluster.redis_cli(&[
            "EVAL",
            "local low = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
             if redis.call('PTTL', k) < 25000 then low = low + 1 end end return low",
            "0",
            pattern,
        ]);
        (low.trim() == "0").then_some(())
    })
    .await;
    // And they still say who holds them.
    let held = cluster.redis_cli(&[
        "EVAL",
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
         if redis.call('GET', k) == ARGV[2] then n = n + 1 end end return n",
        "0",
        pattern,
        &cluster.ids[0],
    ]);
    assert_eq!(held.trim().parse::<usize>().expect("a count"), shortened);
    drop(clients);
}
