//! Graceful shutdown: Close messages that allow reconnecting, 503s while stopping.

use std::time::Duration;

use awc::error::WsClientError;
use awc::http::{Method, StatusCode};
use awc::ws;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::helpers::*;

#[actix_web::test]
async fn graceful_shutdown_sends_every_client_a_close_message_that_allows_reconnecting() {
    let app = spawn_app_with(|s| s.poll_timeout = Duration::from_secs(20)).await;
    let mut ws = WsClient::connect(&app).await;
    let lp = LpClient::connect(&app).await;
    let (api, token) = (app.api.clone(), lp.token.clone());
    let pending = actix_web::rt::spawn(async move { api.poll(&token).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let handle = app.handle.clone();
    let stopping = actix_web::rt::spawn(async move { handle.shutdown().await });

    let close = ws.recv("a Close message", &|r| is_type(r, 7)).await;
    assert_eq!(close["allowReconnect"], true, "{close}");
    assert!(close["error"].is_string(), "{close}");
    let reason = ws.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(reason.map(|r| r.code), Some(ws::CloseCode::Normal));

    let pending = within(Duration::from_secs(5), "the pending poll", pending)
        .await
        .expect("poll task");
    assert_eq!(pending.status, StatusCode::OK);
    let records = pending.records();
    let close = records
        .iter()
        .find(|r| is_type(r, 7))
        .unwrap_or_else(|| panic!("no Close message for the long-polling client: {records:?}"));
    assert_eq!(close["allowReconnect"], true, "{close}");

    within(Duration::from_secs(10), "the shutdown", stopping)
        .await
        .expect("shutdown task");
}
