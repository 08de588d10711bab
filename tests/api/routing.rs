//! The routes to a connection held elsewhere (issue 8): the bus route with nothing
//! advertised, and load-balancer re-forwarding on its own. A real cluster each: redis,
//! three `stickless` processes, nginx with the repo's nginx.conf.

use std::time::Duration;

use awc::http::StatusCode;
use futures_util::SinkExt;
use serde_json::json;

use crate::cluster::routing::every_request_kind_misrouted;
use crate::helpers::{eventually, spawn_cluster, Api, HubClient, LpClient, SseClient, WsClient};

fn forwarded(request: &str, mode: &str, outcome: &str) -> String {
    format!(
        "stickless_forwarded_requests_total{{request=\"{request}\",mode=\"{mode}\",outcome=\"{outcome}\"}}"
    )
}

fn live(transport: &str) -> String {
    format!("stickless_connections{{transport=\"{transport}\"}}")
}

/// Waits until `api`'s gauge `name` reads `value`.
async fn gauge_reaches(api: &Api, name: &str, value: f64) {
    eventually(Duration::from_secs(15), name, || async {
        (api.metric(name).await == value).then_some(())
    })
    .await;
}

/// A cluster whose instances advertise nothing and may only relay over the bus.
async fn bus_only_cluster() -> crate::helpers::TestCluster {
    spawn_cluster(3, |options| {
        options.direct_routing = false;
        options.env.push(("ROUTES".into(), "bus".into()));
    })
    .await
}

#[actix_web::test]
async fn every_request_kind_reaches_its_owner_over_the_bus_with_nothing_advertised() {
    let cluster = bus_only_cluster().await;
    every_request_kind_misrouted(&cluster).await;

    for request in [
        "long_polling",
        "send",
        "delete",
        "server_sent_events",
        "websockets",
    ] {
        assert!(
            cluster
                .sum_metric(&forwarded(request, "bus", "served"))
                .await
                >= 1.0,
            "{request} went over the bus"
        );
        for mode in ["direct", "load_balancer"] {
            assert_eq!(
                cluster
                    .sum_metric(&forwarded(request, mode, "served"))
                    .await,
                0.0
            );
        }
    }
    // The poll after the delete: the owner answered Miss.
    assert_eq!(
        cluster
            .sum_metric(&forwarded("long_polling", "bus", "not_found"))
            .await,
        1.0
    );

    // With nothing to deliver, the owner holds a relayed poll for POLL_TIMEOUT and then
    // answers it empty, as it would a local one (`Accepted` came long before).
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut lp = LpClient::negotiate(a).await;
    lp.api = b.clone();
    lp.start().await;
    let held = b.poll(&lp.token).await;
    assert_eq!((held.status, held.text()), (StatusCode::OK, String::new()));
    assert_eq!(
        lp.call("WhoAmI", json!([])).await["instance"],
        cluster.ids[0]
    );
}

#[actix_web::test]
async fn either_side_ending_a_relayed_stream_or_socket_ends_both() {
    let cluster = bus_only_cluster().await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    // The client leaves an event stream: the receiver cancels, the owner's stream ends.
    let sse = SseClient::connect_via(a, b).await;
    gauge_reaches(a, &live("ServerSentEvents"), 1.0).await;
    drop(sse);
    gauge_reaches(a, &live("ServerSentEvents"), 0.0).await;

    // The client closes a relayed WebSocket: the owner's connection ends.
    let mut ws = WsClient::connect_via(a, b, &[]).await;
    gauge_reaches(a, &live("WebSockets"), 1.0).await;
    ws.framed
        .send(awc::ws::Message::Close(Some(
            awc::ws::CloseCode::Normal.into(),
        )))
        .await
        .expect("close sent");
    gauge_reaches(a, &live("WebSockets"), 0.0).await;
}

#[actix_web::test]
async fn an_owner_that_is_gone_is_answered_404_without_waiting_for_a_poll_timeout() {
    let mut cluster = bus_only_cluster().await;
    let mut lp = LpClient::negotiate(&cluster.nodes[0]).await;
    lp.api = cluster.nodes[1].clone();
    lp.start().await;
    let mut ws = WsClient::connect_via(&cluster.nodes[0], &cluster.nodes[1], &[]).await;
    cluster.cluster.stop_instance(0);
    ws.wait_closed(Duration::from_secs(15)).await;

    let (b, c) = (&cluster.nodes[1], &cluster.nodes[2]);
    let poll = b.poll(&lp.token).await;
    assert_eq!(poll.status, StatusCode::NOT_FOUND, "{}", poll.text());
    let send = c.post(&lp.token, "{}\u{1e}").await;
    assert_eq!(send.status, StatusCode::NOT_FOUND, "{}", send.text());
    assert_eq!(
        b.metric(&forwarded("long_polling", "bus", "not_found"))
            .await
            + c.metric(&forwarded("send", "bus", "not_found")).await,
        2.0
    );
}

#[actix_web::test]
async fn the_load_balancer_alone_never_fails_a_poll_whose_owner_is_alive() {
    // One attempt through the balancer: most polls through node-2 miss the owner.
    let cluster = spawn_cluster(3, |options| {
        options.direct_routing = false;
        options.env.push(("ROUTES".into(), "load-balancer".into()));
        options
            .env
            .push(("MAX_FORWARD_ATTEMPTS".into(), "1".into()));
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    gauge_reaches(b, "stickless_cluster_instances", 3.0).await;
    let mut lp = LpClient::negotiate(a).await;
    lp.start().await;
    let retried = forwarded("long_polling", "load_balancer", "retried");
    for _ in 0..40 {
        let poll = b.poll(&lp.token).await;
        assert_eq!(poll.status, StatusCode::OK, "{}", poll.text());
        if b.metric(&retried).await >= 1.0 {
            break;
        }
    }
    assert!(b.metric(&retried).await >= 1.0, "no poll missed its owner");
    // The connection lives on.
    lp.api = a.clone();
    assert_eq!(
        lp.call("WhoAmI", json!([])).await["instance"],
        cluster.ids[0]
    );
}

#[actix_web::test]
async fn a_stopping_instance_says_goodbye_and_the_others_stop_counting_it_at_once() {
    let mut cluster = spawn_cluster(3, |_| {}).await;
    for node in &cluster.nodes {
        gauge_reaches(node, "stickless_cluster_instances", 3.0).await;
    }
    cluster.stop_instance(2);
    // Without the goodbye its last heartbeat would count for the peer TTL (35 s).
    for node in &cluster.nodes[..2] {
        eventually(
            Duration::from_secs(10),
            "the stopped instance forgotten",
            || async { (node.metric("stickless_cluster_instances").await == 2.0).then_some(()) },
        )
        .await;
    }
}
