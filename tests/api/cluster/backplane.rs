//! The Redis backplane: messages to everyone, rooms, connections and users on every
//! instance, and Redis going away.

use serde_json::{json, Value};

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
    wait_subscribers(&cluster, "stickless:chat:group:blue", 2).await;

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
    wait_subscribers(
        &cluster,
        &format!("stickless:chat:connection:{target_id}"),
        1,
    )
    .await;

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
    // Subscribing is asynchronous: wait until both instances listen for alice.
    wait_subscribers(&cluster, "stickless:chat:user:alice", 2).await;

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

/// Waits until instances `which` all report `status` on `/healthz`.
async fn wait_status(cluster: &TestCluster, which: &[usize], status: &str) {
    eventually(SETTLE_TIMEOUT, &format!("{which:?} {status}"), || async {
        for &index in which {
            if cluster.nodes[index].healthz().await["status"] != status {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// How many Redis connections subscribe to `channel`.
fn subscribers(cluster: &TestCluster, channel: &str) -> u64 {
    let answer = cluster.redis_cli(&["PUBSUB", "NUMSUB", channel]);
    let mut lines = answer.lines();
    assert_eq!(lines.next(), Some(channel), "{answer}");
    lines
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB {channel}: {answer}"))
}

/// Waits until `count` Redis connections subscribe to `channel`.
async fn wait_subscribers(cluster: &TestCluster, channel: &str, count: u64) {
    eventually(
        SETTLE_TIMEOUT,
        &format!("{count} subscribers to {channel}"),
        || async { (subscribers(cluster, channel) == count).then_some(()) },
    )
    .await;
}

#[actix_web::test]
async fn each_instance_subscribes_only_to_the_channels_of_its_own_connections() {
    let cluster = spawn_cluster(3, |_| {}).await;
    let mut on_1 = WsClient::connect(&cluster.nodes[0]).await;
    let alice = [("Authorization", "Bearer alice")];
    let _alice_2 = WsClient::connect_via(&cluster.nodes[1], &cluster.nodes[1], &alice).await;
    let _alice_3 = LpClient::connect_with_headers(&cluster.nodes[2], &alice).await;
    assert_eq!(on_1.call("JoinRoom", json!(["blue"])).await, "blue");

    // The positive control: every instance subscribes to `all`.
    assert_eq!(subscribers(&cluster, "stickless:chat:all"), 3);
    let own = format!("stickless:chat:connection:{}", on_1.connection_id);
    wait_subscribers(&cluster, &own, 1).await;
    wait_subscribers(&cluster, "stickless:chat:group:blue", 1).await;
    wait_subscribers(&cluster, "stickless:chat:user:alice", 2).await;
    assert_eq!(subscribers(&cluster, "stickless:chat:user:bob"), 0);
}

#[actix_web::test]
async fn a_message_sent_while_redis_is_down_reaches_the_other_instances_once_it_is_back() {
    let mut cluster = spawn_cluster(2, |_| {}).await;
    let mut on_1 = WsClient::connect(&cluster.nodes[0]).await;
    let mut on_2 = WsClient::connect(&cluster.nodes[1]).await;

    cluster.cluster.stop_redis();
    wait_status(&cluster, &[0, 1], "degraded").await;
    on_2.fire("Send", json!(["sent while redis was down"]))
        .await;
    on_2.recv_call("Send", &|m| m == "sent while redis was down")
        .await;

    // node-2 stays paused until node-1 has resubscribed, so that what node-2 publishes
    // when it is back can reach it (Redis pub/sub keeps nothing for absent subscribers).
    cluster.signal(1, "STOP");
    cluster
        .cluster
        .start_redis()
        .unwrap_or_else(|e| panic!("redis did not restart: {e}"));
    wait_status(&cluster, &[0], "ok").await;
    cluster.signal(1, "CONT");

    on_1.recv_call("Send", &|m| m == "sent while redis was down")
        .await;
    wait_status(&cluster, &[0, 1], "ok").await;
    assert_eq!(
        cluster
            .sum_metric("stickless_backplane_publish_errors_total")
            .await,
        0.0
    );
}

#[actix_web::test]
async fn while_redis_is_down_at_most_8192_messages_wait_and_the_rest_are_dropped_and_counted() {
    let mut cluster = spawn_cluster(2, |options| {
        options.direct_routing = false;
        options
            .env
            .push(("OUTBOUND_QUEUE_LENGTH".into(), "1000000".into()));
    })
    .await;
    let sender = LpClient::connect(&cluster.nodes[0]).await;
    let errors = "stickless_backplane_publish_errors_total";
    let node_1 = cluster.nodes[0].clone();

    cluster.cluster.stop_redis();
    wait_status(&cluster, &[0, 1], "degraded").await;
    assert_eq!(node_1.metric(errors).await, 0.0);

    // 8192 + 500 broadcasts, batched in POSTs below the body limit.
    let total = 8192 + 500;
    let record =
        |i: usize| frame(&json!({"type": 1, "target": "Send", "arguments": [format!("m{i}")]}));
    let mut sent = 0;
    while sent < total {
        let batch: String = (sent..total.min(sent + 3000)).map(record).collect();
        let reply = sender.post(batch).await;
        assert_eq!(reply.status, awc::http::StatusCode::OK, "{}", reply.text());
        sent = total.min(sent + 3000);
    }
    // Besides the queue, the publisher may hold the one pipeline (at most 256 messages) that
    // failed when Redis went away; it is sent first once Redis is back.
    let dropped = eventually(SETTLE_TIMEOUT, "the overflow counted", || async {
        let dropped = node_1.metric(errors).await;
        (dropped >= 500.0 - 256.0).then_some(dropped)
    })
    .await;
    assert!((244.0..=500.0).contains(&dropped), "{dropped} dropped");
    // The queue is not lost: once Redis is back, what waited is published.
    let published = "stickless_backplane_published_total";
    let published_before = node_1.metric(published).await;
    cluster
        .cluster
        .start_redis()
        .unwrap_or_else(|e| panic!("redis did not restart: {e}"));
    eventually(SETTLE_TIMEOUT, "the queue published", || async {
        (node_1.metric(published).await - published_before >= 8192.0).then_some(())
    })
    .await;
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

    eventually(SETTLE_TIMEOUT, "every instance degraded", || async {
        statuses(&cluster)
            .await
            .iter()
            .all(|s| s == "degraded")
            .then_some(())
    })
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

    eventually(SETTLE_TIMEOUT, "every instance ok again", || async {
        statuses(&cluster)
            .await
            .iter()
            .all(|s| s == "ok")
            .then_some(())
    })
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
