//! A real cluster: redis-server, three `stickless` processes and nginx (plain round
//! robin, the repo's nginx.conf), each test with its own. Requests are sent through nginx
//! and, to force misrouting, straight to chosen instances.

use std::time::Duration;

use awc::error::WsClientError;
use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    eventually, forged_token, is_call, metric, metric_value, spawn_cluster, sum_metric,
    wait_until_connected, Api, HubClient, LpClient, SseClient, TestCluster, WsClient,
};

const SENT: &str = "stickless_forward_requests_sent_total";
const BAD_TOKEN: &str = "stickless_routing_rejections_total{reason=\"bad_token\"}";
const REQUEST_KINDS: [&str; 5] = [
    "long_polling",
    "send",
    "delete",
    "server_sent_events",
    "websockets",
];

fn forwarded(request: &str, mode: &str, outcome: &str) -> String {
    format!(
        "stickless_forwarded_requests_total{{request=\"{request}\",mode=\"{mode}\",outcome=\"{outcome}\"}}"
    )
}

fn ws_status(result: Result<WsClient, WsClientError>) -> Result<(), StatusCode> {
    match result {
        Ok(_) => Ok(()),
        Err(WsClientError::InvalidResponseStatus(status)) => Err(status),
        Err(other) => panic!("the WebSocket failed without a status: {other:?}"),
    }
}

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

// ---------------------------------------------------------------------------------------
// Bad tokens
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn forged_and_random_tokens_get_404_everywhere_without_forwarding() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let (_, real) = cluster.nodes[0].negotiate().await;
    assert!(real.starts_with("node-1."), "{real}");
    let tokens = [
        "random-token".to_owned(),
        forged_token("node-2"),
        real.replacen("node-1.", "node-2.", 1),
    ];
    let sent_before = sum_metric(&cluster, SENT).await;
    let bad_before = sum_metric(&cluster, BAD_TOKEN).await;

    let mut requests = 0.0;
    let targets: Vec<&Api> = std::iter::once(&cluster.lb)
        .chain(cluster.nodes.iter())
        .collect();
    for api in targets {
        for token in &tokens {
            let what = format!("{} {token}", api.base);
            assert_eq!(
                api.poll(token).await.status,
                StatusCode::NOT_FOUND,
                "poll {what}"
            );
            assert_eq!(
                api.post(token, "{}\u{1e}").await.status,
                StatusCode::NOT_FOUND,
                "POST {what}"
            );
            assert_eq!(
                api.delete(token).await.status,
                StatusCode::NOT_FOUND,
                "DELETE {what}"
            );
            assert_eq!(
                api.sse_raw(token, &[]).await.err().map(|r| r.status),
                Some(StatusCode::NOT_FOUND),
                "SSE {what}"
            );
            assert_eq!(
                ws_status(api.ws_raw(&format!("id={token}"), &[]).await),
                Err(StatusCode::NOT_FOUND),
                "WebSocket {what}"
            );
            requests += 5.0;
        }
    }

    assert_eq!(
        cluster.sum_metric(SENT).await,
        sent_before,
        "a bad token must not cause a single internal request"
    );
    assert_eq!(cluster.sum_metric(BAD_TOKEN).await - bad_before, requests);
}

#[actix_web::test]
async fn a_forged_probe_marker_is_not_trusted() {
    let cluster = spawn_cluster(3, |_| {}).await;
    // A real connection owned by node-1, polled on node-2 with a made-up probe marker:
    // node-2 must still forward it (a trusted probe would be answered 404).
    let mut client = LpClient::negotiate(&cluster.nodes[0]).await;
    client.api = cluster.nodes[1].clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    client.headers = vec![(
        "x-stickless-probe".into(),
        format!("{now}.AAAAAAAAAAAAAAAAAAAAAA"),
    )];
    client.start().await;
    assert_eq!(
        client.call("WhoAmI", json!([])).await["instance"],
        cluster.ids[0]
    );
}

// ---------------------------------------------------------------------------------------
// Misrouting
// ---------------------------------------------------------------------------------------

/// Negotiates every transport on node-1 and sends all its other requests straight to
/// node-2 (and, for SSE sends, node-3); each must be served by node-1.
pub(crate) async fn every_request_kind_misrouted(cluster: &TestCluster) {
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let owner = cluster.ids[0].as_str();

    // Long polling: polls, sends and the delete all on node-2.
    let mut lp = LpClient::negotiate(a).await;
    lp.api = b.clone();
    lp.start().await;
    let me = lp.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], owner);
    assert_eq!(me["transport"], "LongPolling");
    lp.fire("Send", json!(["misrouted poll"])).await;
    lp.recv_call("Send", &|a| a == "misrouted poll").await;

    // Server-Sent Events: the stream from node-2, the sends to node-3.
    let (id, token) = a.negotiate().await;
    let mut sse = b.sse_raw(&token, &[]).await.expect("a forwarded stream");
    assert!(sse.raw.starts_with(":\r\n"));
    sse.connection_id = id;
    sse.api = c.clone();
    sse.handshake().await;
    let me = sse.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], owner);
    assert_eq!(me["transport"], "ServerSentEvents");

    // WebSockets, relayed frame by frame.
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], owner);
    assert_eq!(me["transport"], "WebSockets");
    ws.fire("Send", json!(["misrouted socket"])).await;
    ws.recv_call("Send", &|a| a == "misrouted socket").await;
    lp.recv_call("Send", &|a| a == "misrouted socket").await;
    sse.recv_call("Send", &|a| a == "misrouted socket").await;

    // The delete reaches the owner; afterwards the owner says the connection is gone.
    let deleted = b.delete(&lp.token).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{}", deleted.text());
    assert_eq!(b.poll(&lp.token).await.status, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn misrouted_requests_of_every_kind_go_straight_to_their_owner() {
    let cluster = spawn_cluster(3, |options| {
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
    })
    .await;

    every_request_kind_misrouted(&cluster).await;

    for request in REQUEST_KINDS {
        assert!(
            cluster
                .sum_metric(&forwarded(request, "direct", "served"))
                .await
                >= 1.0,
            "{request} went direct"
        );
        assert_eq!(
            cluster
                .sum_metric(&forwarded(request, "load_balancer", "served"))
                .await,
            0.0,
            "{request} needed no load balancer"
        );
    }
    assert_eq!(
        cluster
            .sum_metric(&forwarded("long_polling", "direct", "not_found"))
            .await,
        1.0,
        "the poll after the delete"
    );
}

#[actix_web::test]
async fn misrouted_requests_of_every_kind_go_back_through_the_load_balancer_without_direct_routing()
{
    let cluster = spawn_cluster(3, |options| {
        options.direct_routing = false;
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
        // Only re-forwarding: the bus route would otherwise reach the owner first.
        options
            .env
            .push(("ROUTES".into(), "adopt,load-balancer".into()));
    })
    .await;

    every_request_kind_misrouted(&cluster).await;

    for request in REQUEST_KINDS {
        assert!(
            cluster
                .sum_metric(&forwarded(request, "load_balancer", "served"))
                .await
                >= 1.0,
            "{request} went through the load balancer"
        );
        assert_eq!(
            cluster
                .sum_metric(&forwarded(request, "direct", "served"))
                .await,
            0.0,
            "{request} cannot go direct"
        );
    }
}

#[actix_web::test]
async fn instances_route_directly_to_each_other_as_soon_as_they_are_ready() {
    let mut cluster = spawn_cluster(3, |_| {}).await;
    // A restarted instance must learn its peers' URLs at once, as a new one does.
    cluster.restart_instance(0);
    wait_until_connected(&cluster).await;

    let direct = forwarded("long_polling", "direct", "served");
    for owner in 0..3 {
        for via in (0..3).filter(|&via| via != owner) {
            let (_, token) = cluster.nodes[owner].negotiate().await;
            let before = cluster.nodes[via].metric(&direct).await;
            assert_eq!(cluster.nodes[via].poll(&token).await.status, StatusCode::OK);
            assert_eq!(
                cluster.nodes[via].metric(&direct).await - before,
                1.0,
                "{} reaches the owner {} directly",
                cluster.ids[via],
                cluster.ids[owner]
            );
        }
    }
}

#[actix_web::test]
async fn a_fresh_websocket_sent_to_another_instance_is_adopted_there() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let adopted = "stickless_adopted_websockets_total";
    assert_eq!(b.metric(adopted).await, 0.0);
    let sent_before = cluster.sum_metric(SENT).await;

    let mut ws = WsClient::connect_via(a, b, &[]).await;

    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[1]);
    assert_eq!(me["transport"], "WebSockets");
    assert_eq!(me["connectionId"], ws.connection_id);
    assert_eq!(metric(&b.base, adopted).await, 1.0);
    assert_eq!(cluster.sum_metric(SENT).await, sent_before, "0 extra hops");
    // The adopted connection is an ordinary one for the rest of the cluster.
    let mut other = LpClient::connect(&cluster.nodes[2]).await;
    other
        .call("SendTo", json!([ws.connection_id, "to the adopted socket"]))
        .await;
    ws.recv("the message", &|r| is_chat(r, "to the adopted socket"))
        .await;
}

#[actix_web::test]
async fn a_websocket_forwarded_to_an_owner_that_dropped_the_connection_gets_404() {
    let cluster = spawn_cluster(3, |options| {
        options.env.push(("DISCONNECT_TIMEOUT".into(), "1s".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, token) = a.negotiate().await;
    // node-1 drops the unused connection; the token is too old to be adopted.
    tokio::time::sleep(Duration::from_millis(3500)).await;

    assert_eq!(
        ws_status(b.ws_raw(&format!("id={token}"), &[]).await),
        Err(StatusCode::NOT_FOUND),
        "a 404 before the upgrade, not an accepted-then-closed socket"
    );
    let metrics = b.metrics().await;
    let not_found = metric_value(&metrics, &forwarded("websockets", "direct", "not_found"))
        + metric_value(
            &metrics,
            &forwarded("websockets", "load_balancer", "not_found"),
        );
    assert_eq!(not_found, 1.0, "{metrics}");
    assert_eq!(
        ws_status(cluster.lb.ws_raw(&format!("id={token}"), &[]).await),
        Err(StatusCode::NOT_FOUND)
    );
}

#[actix_web::test]
async fn a_forward_budget_of_zero_without_direct_routing_disables_forwarding() {
    let cluster = spawn_cluster(3, |options| {
        options.direct_routing = false;
        options
            .env
            .push(("MAX_FORWARD_ATTEMPTS".into(), "0".into()));
        // Without the bus route too, nothing is left to reach the owner.
        options
            .env
            .push(("ROUTES".into(), "adopt,direct,load-balancer".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, token) = a.negotiate().await;

    assert_eq!(b.poll(&token).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        b.post(&token, "{}\u{1e}").await.status,
        StatusCode::NOT_FOUND
    );

    assert_eq!(cluster.sum_metric(SENT).await, 0.0);
    assert_eq!(
        b.metric("stickless_routing_rejections_total{reason=\"no_route\"}")
            .await,
        2.0
    );
    // The owner still serves it.
    let first = a.poll(&token).await;
    assert_eq!(first.status, StatusCode::OK);
}

#[actix_web::test]
async fn every_transport_works_through_the_round_robin_load_balancer() {
    let cluster = spawn_cluster(3, |_| {}).await;
    for node in &cluster.nodes {
        assert_eq!(node.healthz().await["backplane"], "redis");
    }
    // nginx spreads requests over the instances.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let health = cluster.lb.healthz().await;
        seen.insert(health["instance"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    let lb = &cluster.lb;
    let mut lp = LpClient::connect(lb).await;
    let mut sse = SseClient::connect(lb).await;
    let mut ws = WsClient::connect(lb).await;
    for _ in 0..5 {
        assert_eq!(
            lp.call("WhoAmI", json!([])).await["transport"],
            "LongPolling"
        );
        assert_eq!(
            sse.call("WhoAmI", json!([])).await["transport"],
            "ServerSentEvents"
        );
    }
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );

    lp.fire("Send", json!(["through nginx"])).await;
    for client in [
        &mut lp as &mut dyn HubClient,
        &mut sse as &mut dyn HubClient,
        &mut ws as &mut dyn HubClient,
    ] {
        client.recv_call("Send", &|a| a == "through nginx").await;
    }
}

// ---------------------------------------------------------------------------------------
// Broadcasts through the backplane
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn send_reaches_every_client_on_every_instance() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let mut clients = clients_on_every_instance(&cluster).await;

    for from in [0, 3, 5] {
        let text = format!("hello from client {from}");
        clients[from].fire("Send", json!([text])).await;
        for client in clients.iter_mut() {
            client.recv_call("Send", &|a| a == text.as_str()).await;
        }
    }
}

#[actix_web::test]
async fn send_to_room_reaches_exactly_the_members_on_every_instance() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let mut clients = clients_on_every_instance(&cluster).await;
    // Members: client 0 (node-1, WebSocket) and client 3 (node-2, long polling).
    for member in [0, 3] {
        assert_eq!(
            clients[member].call("JoinRoom", json!(["blue"])).await,
            "blue"
        );
    }

    clients[5]
        .fire("SendToRoom", json!(["blue", "for the blue room"]))
        .await;
    let seen = before_marker(&mut clients, 5, "after the room message").await;

    for (index, records) in seen.iter().enumerate() {
        let got: Vec<&Value> = records
            .iter()
            .filter(|r| is_chat(r, "for the blue room"))
            .collect();
        let expected = usize::from([0, 3].contains(&index));
        assert_eq!(got.len(), expected, "client {index}: {records:?}");
        if let Some(message) = got.first() {
            assert_eq!(message["arguments"][0]["room"], "blue");
        }
    }
}

#[actix_web::test]
async fn send_to_reaches_exactly_that_connection_on_another_instance() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let mut clients = clients_on_every_instance(&cluster).await;
    let target = 4; // node-3, WebSocket
    let target_id = clients[target].connection_id().to_owned();

    clients[1]
        .call("SendTo", json!([target_id, "just for you"]))
        .await;
    let seen = before_marker(&mut clients, 1, "after the direct message").await;

    for (index, records) in seen.iter().enumerate() {
        let got: Vec<&Value> = records
            .iter()
            .filter(|r| is_chat(r, "just for you"))
            .collect();
        assert_eq!(
            got.len(),
            usize::from(index == target),
            "client {index}: {records:?}"
        );
        if let Some(message) = got.first() {
            assert_eq!(message["arguments"][0]["to"], target_id.as_str());
        }
    }
}

#[actix_web::test]
async fn send_to_user_reaches_that_users_connections_on_every_instance() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let mut clients = clients_on_every_instance(&cluster).await;
    let alice = [("Authorization", "Bearer alice")];
    clients.push(Box::new(
        WsClient::connect_via(&cluster.nodes[1], &cluster.nodes[1], &alice).await,
    ));
    clients.push(Box::new(
        LpClient::connect_with_headers(&cluster.nodes[2], &alice).await,
    ));
    let alices = [6, 7];

    clients[0]
        .call("SendToUser", json!(["alice", "for alice"]))
        .await;
    let seen = before_marker(&mut clients, 0, "after alice's message").await;

    for (index, records) in seen.iter().enumerate() {
        let got: Vec<&Value> = records.iter().filter(|r| is_chat(r, "for alice")).collect();
        assert_eq!(
            got.len(),
            usize::from(alices.contains(&index)),
            "client {index}: {records:?}"
        );
        if let Some(message) = got.first() {
            assert_eq!(message["arguments"][0]["toUser"], "alice");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redis going away
// ---------------------------------------------------------------------------------------

async fn statuses(cluster: &TestCluster) -> Vec<String> {
    let mut all = Vec::new();
    for node in &cluster.nodes {
        let health = node.healthz().await;
        all.push(health["status"].as_str().unwrap_or_default().to_owned());
    }
    all
}

#[actix_web::test]
async fn instances_survive_redis_going_away_and_recover_when_it_returns() {
    let mut cluster = spawn_cluster(3, |_| {}).await;
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let mut a_ws = WsClient::connect(&a).await;
    let mut a_lp = LpClient::connect(&a).await;
    let mut b_ws = WsClient::connect(&b).await;
    let reconnects = "stickless_backplane_reconnects_total";
    let reconnects_before = cluster.sum_metric(reconnects).await;

    cluster.cluster.stop_redis();

    eventually(
        Duration::from_secs(10),
        "every instance degraded",
        || async {
            statuses(&cluster)
                .await
                .iter()
                .all(|s| s == "degraded")
                .then_some(())
        },
    )
    .await;
    // Local delivery goes on.
    a_ws.fire("Send", json!(["while redis is away"])).await;
    a_ws.recv_call("Send", &|m| m == "while redis is away")
        .await;
    a_lp.recv_call("Send", &|m| m == "while redis is away")
        .await;
    assert_eq!(
        a_lp.call("WhoAmI", json!([])).await["instance"],
        cluster.ids[0]
    );

    cluster
        .cluster
        .start_redis()
        .unwrap_or_else(|e| panic!("redis did not restart: {e}"));

    eventually(
        Duration::from_secs(15),
        "every instance ok again",
        || async {
            statuses(&cluster)
                .await
                .iter()
                .all(|s| s == "ok")
                .then_some(())
        },
    )
    .await;
    b_ws.fire("Send", json!(["redis is back"])).await;
    a_ws.recv_call("Send", &|m| m == "redis is back").await;
    a_lp.recv_call("Send", &|m| m == "redis is back").await;
    b_ws.recv_call("Send", &|m| m == "redis is back").await;
    assert!(
        cluster.sum_metric(reconnects).await >= reconnects_before + 3.0,
        "every instance counted its reconnect"
    );
}

// ---------------------------------------------------------------------------------------
// Ends of forwarded connections
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn closing_a_forwarded_socket_or_stream_ends_the_connection_at_its_owner() {
    let cluster = spawn_cluster(3, |options| {
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    let sse = SseClient::connect_via(a, b).await;
    let sse_token = sse.token.clone();
    eventually(
        Duration::from_secs(5),
        "two connections on node-1",
        || async { (a.healthz().await["connections"] == 2).then_some(()) },
    )
    .await;

    ws.send_message(awc::ws::Message::Close(Some(
        awc::ws::CloseCode::Normal.into(),
    )))
    .await;
    ws.wait_closed(Duration::from_secs(5)).await;
    eventually(
        Duration::from_secs(5),
        "the socket's connection to end",
        || async { (a.healthz().await["connections"] == 1).then_some(()) },
    )
    .await;
    drop(sse);
    eventually(
        Duration::from_secs(5),
        "the event stream's connection to end",
        || async { (a.healthz().await["connections"] == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        a.post(&sse_token, "{\"type\":6}\u{1e}").await.status,
        StatusCode::NOT_FOUND
    );
}

#[actix_web::test]
async fn a_request_for_a_connection_whose_owner_is_down_gets_404() {
    let mut cluster = spawn_cluster(3, |_| {}).await;
    let client = LpClient::connect(&cluster.nodes[0]).await;

    cluster.cluster.stop_instance(0);

    for api in [&cluster.nodes[1], &cluster.lb] {
        let reply = api.poll(&client.token).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
        assert!(
            reply.elapsed < Duration::from_secs(5),
            "took {:?}",
            reply.elapsed
        );
    }
}
