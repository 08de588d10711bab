//! Routing across instances: bad tokens, direct routing, re-forwarding through the load
//! balancer, adoption, and the ends of forwarded connections.

use awc::http::StatusCode;
use serde_json::json;

use crate::helpers::cluster::wait_until_connected;
use crate::helpers::metrics::{forwarded, Forwarding};
use crate::helpers::*;

use super::*;

#[actix_web::test]
async fn forged_and_random_tokens_get_404_everywhere_without_forwarding() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let (_, real) = cluster.nodes[0].negotiate().await;
    assert!(real.starts_with("node-1."), "{real}");
    let tokens = [
        "random-token".to_owned(),
        tampered(&real),
        real.replacen("node-1.", "node-2.", 1),
    ];
    let before = cluster.forwarding().await;

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
        cluster.forwarding().await - before,
        Forwarding {
            bad_token: requests,
            ..Forwarding::default()
        },
        "a bad token must not cause a single internal request"
    );

    // The positive control: the real token, misrouted, is forwarded (1 direct hop).
    let before = cluster.forwarding().await;
    let reply = cluster.nodes[1].poll(&real).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let change = cluster.forwarding().await - before;
    assert_eq!(
        (change.sent, change.forwards, change.bad_token),
        (1.0, 1.0, 0.0)
    );
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

/// Forwarded requests of every kind with `mode` and `outcome`, summed over instances.
async fn forwarded_total(cluster: &TestCluster, mode: &str, outcome: &str) -> f64 {
    let mut total = 0.0;
    for request in REQUEST_KINDS {
        total += cluster.sum_metric(&forwarded(request, mode, outcome)).await;
    }
    total
}

#[actix_web::test]
async fn misrouted_requests_of_every_kind_go_straight_to_their_owner() {
    let cluster = spawn_cluster(3, |options| {
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
    })
    .await;
    let before = cluster.forwarding().await;

    every_request_kind_misrouted(&cluster).await;

    for request in REQUEST_KINDS {
        assert!(
            cluster
                .sum_metric(&forwarded(request, "direct", "served"))
                .await
                >= 1.0,
            "{request} went direct"
        );
    }
    let change = cluster.forwarding().await - before;
    assert!(change.forwards >= 5.0, "{change:?}");
    assert_eq!(
        change,
        Forwarding {
            sent: change.forwards,
            forwards: change.forwards,
            attempts: change.forwards,
            // The poll after the delete: the owner says it no longer holds it.
            gone: 1.0,
            ..Forwarding::default()
        },
        "exactly one hop each, never through the load balancer"
    );
    assert_eq!(
        forwarded_total(&cluster, "load_balancer", "served").await,
        0.0
    );
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
    let before = cluster.forwarding().await;

    every_request_kind_misrouted(&cluster).await;

    for request in REQUEST_KINDS {
        assert!(
            cluster
                .sum_metric(&forwarded(request, "load_balancer", "served"))
                .await
                >= 1.0,
            "{request} went through the load balancer"
        );
    }
    let change = cluster.forwarding().await - before;
    let served = forwarded_total(&cluster, "load_balancer", "served").await;
    assert_eq!(forwarded_total(&cluster, "direct", "served").await, 0.0);
    assert_eq!(change.sent, change.attempts, "{change:?}");
    // Every attempt that did not serve got a 404 from an instance without the
    // connection, or (after the delete) from its owner.
    assert_eq!(
        change.probe_miss + change.gone,
        change.sent - served,
        "{change:?}"
    );
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
    let before = cluster.forwarding().await;

    let mut ws = WsClient::connect_via(a, b, &[]).await;

    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(me["instance"], cluster.ids[1]);
    assert_eq!(me["transport"], "WebSockets");
    assert_eq!(me["connectionId"], ws.connection_id);
    assert_eq!(b.metric(adopted).await, 1.0);
    assert_eq!(
        cluster.forwarding().await - before,
        Forwarding::default(),
        "0 extra hops"
    );
    // The positive control: a misrouted long poll in the same cluster is one hop.
    let (_, token) = a.negotiate().await;
    assert_eq!(b.poll(&token).await.status, StatusCode::OK);
    assert_eq!((cluster.forwarding().await - before).sent, 1.0);
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
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, token) = a.negotiate().await;
    // node-1 drops the unused connection: a DELETE, which changes nothing on a connection
    // that is not long polling (400), is 404 once it is gone.
    assert_eq!(a.delete(&token).await.status, StatusCode::BAD_REQUEST);
    eventually(SETTLE_TIMEOUT, "node-1 to drop the connection", || async {
        (a.delete(&token).await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;

    assert_eq!(
        ws_status(b.ws_raw(&format!("id={token}"), &[]).await),
        Err(StatusCode::NOT_FOUND),
        "a 404 before the upgrade, not an accepted-then-closed socket"
    );
    assert_eq!(
        b.metric(&forwarded("websockets", "direct", "not_found"))
            .await,
        1.0
    );
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

    let before = cluster.forwarding().await;

    assert_eq!(b.poll(&token).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        b.post(&token, "{}\u{1e}").await.status,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        cluster.forwarding().await - before,
        Forwarding {
            no_route: 2.0,
            ..Forwarding::default()
        },
        "nothing sent, two requests without a route"
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
    eventually(SETTLE_TIMEOUT, "two connections on node-1", || async {
        (a.healthz().await["connections"] == 2).then_some(())
    })
    .await;

    ws.send_message(awc::ws::Message::Close(Some(
        awc::ws::CloseCode::Normal.into(),
    )))
    .await;
    ws.wait_closed(SETTLE_TIMEOUT).await;
    eventually(SETTLE_TIMEOUT, "the socket's connection to end", || async {
        (a.healthz().await["connections"] == 1).then_some(())
    })
    .await;
    drop(sse);
    eventually(
        SETTLE_TIMEOUT,
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
async fn a_request_for_a_connection_whose_owner_stopped_gets_404_after_the_budget_without_a_direct_hop(
) {
    let mut cluster = spawn_cluster(3, |options| {
        // The direct hop and the load balancer alone (the bus route has tests of its own),
        // with a fixed budget rather than one sized from the cluster.
        options
            .env
            .push(("ROUTES".into(), "adopt,direct,load-balancer".into()));
        options
            .env
            .push(("MAX_FORWARD_ATTEMPTS".into(), "10".into()));
    })
    .await;
    let client = LpClient::connect(&cluster.nodes[0]).await;

    // A graceful stop: the owner says goodbye, so the others drop its direct URL at once
    // (a direct hop that fails is tested in `load_balancer`).
    cluster.stop_instance(0);
    eventually(
        SETTLE_TIMEOUT,
        "node-2 forgot the stopped owner",
        || async {
            (cluster.nodes[1].metric("stickless_cluster_instances").await == 2.0).then_some(())
        },
    )
    .await;

    // A send (a poll whose owner is still known alive is answered with an empty 200).
    let ping = "{\"type\":6}\u{1e}";
    let reply = cluster.nodes[1].post(&client.token, ping).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    assert_eq!(
        reply.header("x-stickless-forward-attempts").as_deref(),
        Some("10"),
        "no direct hop to an instance that said goodbye, only the budget of 10 through nginx"
    );
    let reply = cluster.lb.post(&client.token, ping).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
}

#[actix_web::test]
async fn close_codes_pass_through_a_forwarded_websocket() {
    let cluster = spawn_cluster(2, |options| {
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
        options.env.push(("MAX_MESSAGE_SIZE".into(), "1024".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let code = |reason: Option<awc::ws::CloseReason>| reason.map(|r| u16::from(r.code));

    // A record over the size limit: the owner's Close message, then 1000.
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    ws.send_text(frame(
        &json!({"type": 1, "target": "Send", "arguments": ["x".repeat(2000)]}),
    ))
    .await;
    let close = ws.recv("a Close message", &|r| is_type(r, 7)).await;
    assert_eq!(close_error(&close), "Connection closed with an error.");
    assert_eq!(code(ws.wait_closed(RECV_TIMEOUT).await), Some(1000));

    // A frame over the limit: 1009, as from the owner itself.
    let mut direct = WsClient::connect(a).await;
    direct
        .send_message(awc::ws::Message::Text("x".repeat(1 << 20).into()))
        .await;
    let direct_code = code(direct.wait_closed(RECV_TIMEOUT).await);
    assert_eq!(direct_code, Some(1009));
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    ws.send_message(awc::ws::Message::Text("x".repeat(1 << 20).into()))
        .await;
    assert_eq!(code(ws.wait_closed(RECV_TIMEOUT).await), direct_code);

    // The client's own close code and reason come back.
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    ws.send_message(awc::ws::Message::Close(Some(awc::ws::CloseReason {
        code: awc::ws::CloseCode::Away,
        description: Some("leaving".into()),
    })))
    .await;
    let reason = ws.wait_closed(RECV_TIMEOUT).await.expect("a close frame");
    assert_eq!(u16::from(reason.code), 1001);
}

#[actix_web::test]
async fn a_forwarded_websocket_whose_owner_breaks_off_is_closed_with_1011() {
    let mut cluster = spawn_cluster(2, |options| {
        options
            .env
            .push(("ADOPT_WEBSOCKETS".into(), "false".into()));
    })
    .await;
    let mut ws = WsClient::connect_via(&cluster.nodes[0], &cluster.nodes[1], &[]).await;
    assert_eq!(ws.call("WhoAmI", json!([])).await["instance"], "node-1");

    // SIGKILL: the owner cannot send a Close message or a close frame.
    cluster.signal(0, "KILL");

    let reason = ws.wait_closed(RECV_TIMEOUT).await.expect("a close frame");
    assert_eq!(u16::from(reason.code), 1011);
    cluster.stop_instance(0);
}

#[actix_web::test]
async fn forwarded_responses_carry_the_owners_instance_header_and_cors_headers_once() {
    let origin = "http://example.test";
    let cluster = spawn_cluster(2, |options| {
        options.env.push(("CORS_ORIGINS".into(), origin.into()));
    })
    .await;
    let (owner, via) = (&cluster.nodes[0], &cluster.nodes[1]);
    let with_origin = [("Origin", origin)];

    let (_, token) = owner.negotiate().await;
    let poll = via.poll_with(&token, &with_origin, REQUEST_TIMEOUT).await;
    assert_eq!(poll.status, StatusCode::OK);
    assert_eq!(
        poll.header("x-stickless-instance").as_deref(),
        Some("node-1")
    );
    assert_eq!(
        poll.header("x-stickless-forward-attempts").as_deref(),
        Some("1")
    );
    assert_cors("forwarded poll", &poll.headers, origin);
    let send = via.post_with(&token, &with_origin, HANDSHAKE).await;
    assert_eq!(send.status, StatusCode::OK);
    assert_eq!(
        send.header("x-stickless-instance").as_deref(),
        Some("node-1")
    );
    assert_cors("forwarded send", &send.headers, origin);

    let (_, token) = owner.negotiate().await;
    let sse = via
        .sse_raw(&token, &with_origin)
        .await
        .expect("a forwarded stream");
    let instance = sse
        .headers
        .get("x-stickless-instance")
        .and_then(|v| v.to_str().ok());
    assert_eq!(instance, Some("node-1"));
    assert_cors("forwarded event stream", &sse.headers, origin);

    // A response served where it lands names that instance and has no attempts header.
    let (_, token) = via.negotiate().await;
    let local = via.poll(&token).await;
    assert_eq!(
        local.header("x-stickless-instance").as_deref(),
        Some("node-2")
    );
    assert!(local.header("x-stickless-forward-attempts").is_none());
}
