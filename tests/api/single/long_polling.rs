//! Long Polling: first poll, idle polls, overlapping polls, `DELETE`, dropped connections.

use std::time::Duration;

use awc::http::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn the_first_poll_is_answered_at_once_and_the_handshake_and_calls_go_round() {
    // Idle polls are held for a minute here; the first one must not be.
    let app = spawn_app_with(|s| s.poll_timeout = Duration::from_secs(60)).await;
    let (connection_id, token) = app.negotiate().await;

    let first = app.poll_with(&token, &[], REQUEST_TIMEOUT).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.body.is_empty());
    assert_eq!(
        first.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        first.header("cache-control").as_deref(),
        Some("no-cache, no-store")
    );
    assert_eq!(first.header("pragma").as_deref(), Some("no-cache"));
    assert_eq!(
        first.header("expires").as_deref(),
        Some("Thu, 01 Jan 1970 00:00:00 GMT")
    );

    let sent = app.post(&token, HANDSHAKE).await;
    assert_eq!(sent.status, StatusCode::OK);
    assert!(sent.body.is_empty());
    let reply = app.poll(&token).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"{}\x1e");

    let mut client = LpClient::resume(&app, &connection_id, &token);
    let me = client.call("WhoAmI", json!([])).await;
    assert_eq!(
        me,
        json!({
            "instance": app.instance,
            "connectionId": connection_id,
            "transport": "LongPolling",
        })
    );
}

#[actix_web::test]
async fn an_older_overlapping_poll_gets_204_and_the_newer_gets_the_data() {
    let app = spawn_app_with(|s| s.poll_timeout = Duration::from_secs(20)).await;
    let mut client = LpClient::connect(&app).await;

    // Two polls at once: the server ends the older with 204 (checked inside).
    let newer = client.held_poll().await;

    client.fire("Send", json!(["for the newer poll"])).await;
    let newer = within(RECV_TIMEOUT, "the newer poll", newer)
        .await
        .expect("poll task");
    assert_eq!(newer.status, StatusCode::OK);
    let records = newer.records();
    assert!(
        records
            .iter()
            .any(|r| is_call(r, "Send") && r["arguments"][0] == "for the newer poll"),
        "{records:?}"
    );
}

#[actix_web::test]
async fn delete_ends_the_pending_poll_with_204_and_forgets_the_connection() {
    let app = spawn_app_with(|s| s.poll_timeout = Duration::from_secs(20)).await;
    let client = LpClient::connect(&app).await;
    let pending = client.held_poll().await;

    let deleted = app.delete(&client.token).await;

    assert_eq!(deleted.status, StatusCode::ACCEPTED);
    let pending = within(RECV_TIMEOUT, "the pending poll", pending)
        .await
        .expect("poll task");
    assert_eq!(pending.status, StatusCode::NO_CONTENT);
    assert_eq!(app.poll(&client.token).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.post(&client.token, "{\"type\":6}\u{1e}").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.delete(&client.token).await.status,
        StatusCode::NOT_FOUND
    );
}

#[actix_web::test]
async fn delete_on_a_connection_that_is_not_long_polling_is_400() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    ws.handshake().await;

    let deleted = app.delete(&token).await;
    assert_eq!(
        deleted.status,
        StatusCode::BAD_REQUEST,
        "{}",
        deleted.text()
    );
    // The WebSocket is untouched.
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );

    let mut sse = SseClient::connect(&app).await;
    let deleted = app.delete(&sse.token).await;
    assert_eq!(deleted.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        sse.call("WhoAmI", json!([])).await["transport"],
        "ServerSentEvents"
    );
}

#[actix_web::test]
async fn a_connection_never_changes_transport() {
    let app = spawn_app().await;
    let client = LpClient::connect(&app).await;

    let sse = app.sse_raw(&client.token, &[]).await;
    assert_eq!(
        sse.err().map(|r| r.status),
        Some(StatusCode::BAD_REQUEST),
        "SSE on a long-polling connection"
    );
    assert_refused(
        app.ws_raw(&format!("id={}", client.token), &[]).await,
        StatusCode::BAD_REQUEST,
    );
}

#[actix_web::test]
async fn connections_without_a_transport_request_are_dropped_after_the_disconnect_timeout() {
    let app = spawn_app_with(|s| {
        s.disconnect_timeout = Duration::from_secs(1);
        s.poll_timeout = Duration::from_secs(60);
    })
    .await;
    let (_, never_started) = app.negotiate().await;
    let stopped_polling = LpClient::connect(&app).await;
    // Started connections are counted until they are dropped; the one that keeps
    // polling stays.
    let keeps_polling = LpClient::connect(&app).await;
    assert_eq!(app.healthz().await["connections"], 2);
    let polling = keeps_polling.spawn_poll();

    eventually(
        SETTLE_TIMEOUT,
        "the idle started connection dropped",
        || async { (app.healthz().await["connections"] == 1).then_some(()) },
    )
    .await;

    assert_eq!(app.poll(&never_started).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.poll(&stopped_polling.token).await.status,
        StatusCode::NOT_FOUND,
        "a long-polling client that stopped polling is dropped too"
    );
    // The client that kept a poll open is still there (202, not 404). Its poll was
    // answered with the others' `Presence` notices or ends now with 204.
    assert_eq!(
        app.delete(&keeps_polling.token).await.status,
        StatusCode::ACCEPTED
    );
    let polled = within(RECV_TIMEOUT, "the held poll", polling)
        .await
        .expect("poll task");
    assert!(
        [StatusCode::OK, StatusCode::NO_CONTENT].contains(&polled.status),
        "{}",
        polled.status
    );
}

#[actix_web::test]
async fn a_close_message_from_a_long_polling_client_ends_its_connection() {
    let app = spawn_app().await;
    let mut lp = LpClient::connect(&app).await;

    lp.send(json!({"type": 7})).await;

    let (status, records) = lp.poll().await;
    assert!(
        status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
        "{status} {records:?}"
    );
}
