//! The Redis backplane: messages to everyone, rooms, connections and users on every
//! instance, and Redis going away.

use std::time::Duration;

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::metrics::{forwarded, rejections, SENT};
use crate::helpers::*;

use super::*;

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
