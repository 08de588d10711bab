//! Graceful shutdown: Close messages that allow reconnecting, `/healthz` 503 `draining`
//! and negotiate 503 while stopping, and `SHUTDOWN_TIMEOUT` bounding the wait.

use std::time::Duration;

use awc::http::StatusCode;
use awc::ws;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn shutdown_closes_every_client_with_allow_reconnect_and_answers_503_until_they_have_it() {
    let app = spawn_app_with(|s| {
        s.poll_timeout = Duration::from_secs(60);
        // Long enough that only the clients collecting their Close message end the wait.
        s.shutdown_timeout = Duration::from_secs(60);
    })
    .await;
    let mut ws = WsClient::connect(&app).await;
    let mut sse = SseClient::connect(&app).await;
    let mut polling = LpClient::connect(&app).await;
    let pending = polling.held_poll().await;
    // This one has no poll open: its Close message waits for its next poll.
    let mut idle = LpClient::connect(&app).await;

    let handle = app.handle.clone();
    let stopping = actix_web::rt::spawn(async move { handle.shutdown().await });

    for client in [&mut ws as &mut dyn HubClient, &mut sse] {
        let close = client.recv("a Close message", &|r| is_type(r, 7)).await;
        // ASP.NET's plain shutdown Close: no error, which some clients (pysignalr) take as
        // fatal and would not reconnect after.
        assert_eq!(close, json!({"type": 7, "allowReconnect": true}));
    }
    let reason = ws.wait_closed(RECV_TIMEOUT).await;
    assert_eq!(reason.map(|r| r.code), Some(ws::CloseCode::Normal));
    sse.wait_ended().await;
    let pending = within(RECV_TIMEOUT, "the pending poll", pending)
        .await
        .expect("poll task");
    assert_eq!(pending.status, StatusCode::OK);
    // The held poll brings the Close message (or, first, others' notices).
    polling.inbox().records.extend(pending.records());
    let close = polling.recv("a Close message", &|r| is_type(r, 7)).await;
    assert_eq!(close["allowReconnect"], true, "{close}");

    // Still serving while the idle client has not collected its Close message.
    let health = app.get("/healthz").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json()["status"], "draining");
    let negotiate = app.negotiate_raw("negotiateVersion=1", &[]).await;
    assert_eq!(negotiate.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !stopping.is_finished(),
        "the shutdown waits for the idle client"
    );

    let close = idle
        .recv("the idle client's Close", &|r| is_type(r, 7))
        .await;
    assert_eq!(close["allowReconnect"], true, "{close}");
    within(
        RECV_TIMEOUT,
        "the shutdown, once every client has its Close",
        stopping,
    )
    .await
    .expect("shutdown task");
}

#[actix_web::test]
async fn shutdown_waits_no_longer_than_the_shutdown_timeout_for_a_client_that_never_polls() {
    let app = spawn_app_with(|s| {
        s.poll_timeout = Duration::from_secs(60);
        s.shutdown_timeout = Duration::from_secs(1);
    })
    .await;
    let mut never_polls = LpClient::connect(&app).await;
    assert_eq!(
        never_polls.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );

    let handle = app.handle.clone();
    let stopping = actix_web::rt::spawn(async move { handle.shutdown().await });

    within(
        RECV_TIMEOUT,
        "the shutdown after SHUTDOWN_TIMEOUT",
        stopping,
    )
    .await
    .expect("shutdown task");
}
