//! Keep-alive Pings, the client timeout, and the handshake timeout on every transport.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn keep_alive_pings_reach_websocket_and_sse_clients() {
    let app = spawn_app_with(|s| s.keep_alive_interval = Duration::from_secs(1)).await;
    let mut ws = WsClient::connect(&app).await;
    let mut sse = SseClient::connect(&app).await;

    let ping = ws.recv("a Ping", &|r| is_type(r, 6)).await;
    assert_eq!(ping, json!({"type": 6}));
    let ping = sse.recv("a Ping", &|r| is_type(r, 6)).await;
    assert_eq!(ping, json!({"type": 6}));
}

#[actix_web::test]
async fn long_polling_clients_get_no_pings_while_websocket_clients_do() {
    let app = spawn_app_with(|s| s.keep_alive_interval = Duration::from_secs(1)).await;
    let mut lp = LpClient::connect(&app).await;
    let mut ws = WsClient::connect(&app).await;

    // The positive control: two Pings reach the WebSocket client meanwhile.
    for _ in 0..2 {
        ws.recv("a Ping", &|r| is_type(r, 6)).await;
    }
    ws.fire("Send", json!(["after two pings"])).await;

    let before = lp.records_before_marker("after two pings").await;
    assert!(
        before.iter().all(|r| !is_type(r, 6)),
        "a long-polling client got a Ping: {before:?}"
    );
}

#[actix_web::test]
async fn a_websocket_client_silent_after_its_first_ping_is_closed_after_the_client_timeout() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(2)).await;
    let mut ws = WsClient::connect(&app).await;
    ws.send(json!({"type": 6})).await;

    let close = ws.recv("a Close message", &|r| is_type(r, 7)).await;

    assert_eq!(close_error(&close), "Connection closed with an error.");
    ws.wait_closed(RECV_TIMEOUT).await;
}

#[actix_web::test]
async fn a_websocket_client_that_never_pings_is_not_timed_out() {
    // Detailed errors name the cause, so the control's Close is shown to be the timeout's.
    let app = spawn_app_with(|s| {
        s.client_timeout = Duration::from_secs(1);
        s.enable_detailed_errors = true;
    })
    .await;
    let mut silent = WsClient::connect(&app).await;
    // The control, connected after the silent one: it pings once, then is timed out.
    let mut control = WsClient::connect(&app).await;
    control.send(json!({"type": 6})).await;
    let close = control
        .recv("the control's Close message", &|r| is_type(r, 7))
        .await;
    assert_eq!(
        close_error(&close),
        "Connection closed with an error. \
         TimeoutException: The client sent nothing for 1s (client timeout)."
    );

    // The silent client has been silent longer than the control, and is still served.
    assert_eq!(
        silent.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

#[actix_web::test]
async fn a_client_that_never_finishes_its_handshake_gets_handshake_was_canceled_on_every_transport()
{
    let app = spawn_app_with(|s| s.handshake_timeout = Duration::from_secs(1)).await;
    let canceled = json!({"error": "Handshake was canceled."});

    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    ws.send_text("{\"protocol\":\"json\",\"ver".to_owned())
        .await;
    let reply = ws
        .recv("the handshake reply", &|r| r.get("error").is_some())
        .await;
    assert_eq!(reply, canceled);
    ws.wait_closed(RECV_TIMEOUT).await;

    let (_, token) = app.negotiate().await;
    let mut sse = app.sse_raw(&token, &[]).await.expect("an event stream");
    let reply = sse
        .recv("the handshake reply", &|r| r.get("error").is_some())
        .await;
    assert_eq!(reply, canceled);
    sse.wait_ended().await;

    let lp = LpClient::negotiate(&app).await;
    let mut records = Vec::new();
    let status = loop {
        let (status, got) = lp.poll().await;
        records.extend(got);
        if status != awc::http::StatusCode::OK || !records.is_empty() {
            break status;
        }
    };
    assert_eq!(records, vec![canceled], "{status}");
    let (status, _) = lp.poll().await;
    assert!(
        status == awc::http::StatusCode::NO_CONTENT || status == awc::http::StatusCode::NOT_FOUND,
        "the connection is over: {status}"
    );
}
