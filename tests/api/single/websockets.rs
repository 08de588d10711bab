//! WebSockets: upgrade, text frames, refusals before the upgrade, close codes.

use awc::error::WsClientError;
use awc::http::StatusCode;
use awc::ws;
use bytes::Bytes;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn websocket_connects_handshakes_and_invokes_over_text_frames() {
    let app = spawn_app().await;
    let (connection_id, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");

    // The handshake reply may share a frame with later records; `fetch` fails the test
    // on any binary frame.
    ws.handshake().await;
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(
        me,
        json!({"instance": app.instance, "connectionId": connection_id, "transport": "WebSockets"})
    );
    ws.fire("Send", json!(["over a websocket"])).await;
    let sent = ws.recv_call("Send", &|a| a == "over a websocket").await;
    assert_eq!(sent, "over a websocket");

    // A bare Close from the client ends the connection gracefully.
    ws.send(json!({"type": 7})).await;
    ws.wait_closed(RECV_TIMEOUT).await;
}

#[actix_web::test]
async fn a_websocket_for_an_unknown_id_is_refused_with_404_before_the_upgrade() {
    let app = spawn_app().await;
    assert_refused(app.ws_raw("id=forged", &[]).await, StatusCode::NOT_FOUND);
    assert_refused(
        app.ws_raw(&format!("id={}", tampered(&app.negotiate().await.1)), &[])
            .await,
        StatusCode::NOT_FOUND,
    );
}

#[actix_web::test]
async fn a_second_stream_for_the_same_token_is_409() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut first = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    first.handshake().await;

    assert_refused(
        app.ws_raw(&format!("id={token}"), &[]).await,
        StatusCode::CONFLICT,
    );
    // The first socket is unaffected.
    assert_eq!(
        first.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );

    let sse = SseClient::connect(&app).await;
    let second = app.sse_raw(&sse.token, &[]).await;
    assert_eq!(second.err().map(|r| r.status), Some(StatusCode::CONFLICT));
}

#[actix_web::test]
async fn post_to_a_websocket_connection_is_405() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    ws.handshake().await;

    let post = app.post(&token, "{\"type\":6}\u{1e}").await;

    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

#[actix_web::test]
async fn a_websocket_without_an_id_skips_negotiation() {
    let app = spawn_app().await;
    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    ws.handshake().await;

    let me = ws.call("WhoAmI", json!([])).await;

    assert_eq!(me["transport"], "WebSockets");
    assert_eq!(me["instance"], app.instance.as_str());
    assert!(me["connectionId"].as_str().is_some_and(|id| !id.is_empty()));
}

#[actix_web::test]
async fn a_closed_websocket_connection_cannot_be_reopened() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    ws.handshake().await;

    ws.send_message(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
        .await;
    ws.wait_closed(RECV_TIMEOUT).await;

    // This server offers no stateful reconnect: the token is spent.
    eventually(SETTLE_TIMEOUT, "the token to be spent", || async {
        match app.ws_raw(&format!("id={token}"), &[]).await {
            Err(WsClientError::InvalidResponseStatus(StatusCode::NOT_FOUND)) => Some(()),
            _ => None,
        }
    })
    .await;
}

#[actix_web::test]
async fn on_one_instance_a_live_token_gets_409_for_a_second_socket_and_a_closed_one_404_for_all() {
    // The in-process bus keeps no claims: the instance's own registry answers.
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    ws.handshake().await;
    assert_refused(
        app.ws_raw(&format!("id={token}"), &[]).await,
        StatusCode::CONFLICT,
    );
    let me = ws.call("WhoAmI", json!([])).await;
    assert_eq!(
        me["transport"], "WebSockets",
        "the first socket is unaffected"
    );

    ws.send_message(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
        .await;
    ws.wait_closed(RECV_TIMEOUT).await;
    eventually(SETTLE_TIMEOUT, "the connection to end", || async {
        (app.poll(&token).await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    for (kind, status) in app.every_kind_status(&token).await {
        assert_eq!(status, StatusCode::NOT_FOUND, "{kind} with a spent token");
    }
}

/// A WebSocket upgrade request written by hand, followed in the same write by `extra`.
fn raw_upgrade(app: &TestApp, query: &str, extra: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "GET {HUB}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        app.port
    )
    .into_bytes();
    request.extend_from_slice(extra);
    request
}

/// A masked client text frame (RFC 6455, 5.3), for payloads under 126 bytes.
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![
        0x81,
        0x80 | u8::try_from(payload.len()).expect("short payload"),
    ];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[actix_web::test]
async fn frames_written_right_behind_the_upgrade_request_reach_the_connection() {
    // The upgraded connection is served apart from the HTTP/1 dispatcher (`src/upgrade.rs`):
    // whatever the dispatcher already read behind the request head must not be lost.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let handshake = masked_text_frame(b"{\"protocol\":\"json\",\"version\":1}\x1e");
    socket
        .write_all(&raw_upgrade(&app, &format!("id={token}"), &handshake))
        .await
        .expect("write");
    let mut received = Vec::new();
    within(RECV_TIMEOUT, "the 101 and the handshake reply", async {
        // The reply is the text frame `{}` + record separator, unmasked.
        while !received.windows(5).any(|w| w == b"\x81\x03{}\x1e") {
            let mut buf = [0u8; 1024];
            let read = socket.read(&mut buf).await.expect("read");
            assert!(
                read > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buf[..read]);
        }
    })
    .await;
    assert!(
        received.starts_with(b"HTTP/1.1 101 "),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
}

#[actix_web::test]
async fn a_refused_upgrade_is_answered_and_the_connection_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    socket
        .write_all(&raw_upgrade(&app, "id=forged", b""))
        .await
        .expect("write");
    let mut received = Vec::new();
    // Read to the end: the server closes the connection after its answer.
    within(
        RECV_TIMEOUT,
        "the answer and the end of the connection",
        socket.read_to_end(&mut received),
    )
    .await
    .expect("read");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 404 "), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

#[actix_web::test]
async fn fragmented_messages_are_joined_and_broken_frames_get_their_close_codes() {
    let app = spawn_app_with(|s| s.max_message_size = 1024).await;
    let limit = 8 * 1024; // The frame limit: eight times the message limit.
    let mut bystander = WsClient::connect(&app).await;

    // A record split over three continuation frames is one message (RFC 6455, 5.4).
    let mut ws = WsClient::connect(&app).await;
    let record = format!(
        "{}\u{1e}",
        json!({"type": 1, "invocationId": "split", "target": "WhoAmI", "arguments": []})
    );
    let (a, rest) = record.split_at(10);
    let (b, c) = rest.split_at(10);
    for item in [
        actix_http::ws::Item::FirstText(Bytes::copy_from_slice(a.as_bytes())),
        actix_http::ws::Item::Continue(Bytes::copy_from_slice(b.as_bytes())),
        actix_http::ws::Item::Last(Bytes::copy_from_slice(c.as_bytes())),
    ] {
        ws.send_message(ws::Message::Continuation(item)).await;
    }
    let completion = ws
        .recv("the split invocation's completion", &|r| {
            r["invocationId"] == "split"
        })
        .await;
    assert_eq!(completion["result"]["transport"], "WebSockets");

    // Continuations adding up to more than the frame limit: 1009.
    let chunk = Bytes::from(vec![b' '; limit / 2 + 1]);
    ws.send_message(ws::Message::Continuation(actix_http::ws::Item::FirstText(
        chunk.clone(),
    )))
    .await;
    ws.try_send_message(ws::Message::Continuation(actix_http::ws::Item::Last(chunk)))
        .await;
    let reason = ws.wait_closed(RECV_TIMEOUT).await;
    assert_eq!(reason.map(|r| r.code), Some(ws::CloseCode::Size));

    // A text message that is not UTF-8: 1007 (awc sends only valid text in a Text
    // message; a text continuation carries raw bytes).
    let mut ws = WsClient::connect(&app).await;
    ws.send_message(ws::Message::Continuation(actix_http::ws::Item::FirstText(
        Bytes::from_static(b"\xff\xfe"),
    )))
    .await;
    ws.try_send_message(ws::Message::Continuation(actix_http::ws::Item::Last(
        Bytes::new(),
    )))
    .await;
    let reason = ws.wait_closed(RECV_TIMEOUT).await;
    assert_eq!(reason.map(|r| r.code), Some(ws::CloseCode::Invalid));

    // The other connection was never touched.
    let me = bystander.call("WhoAmI", json!([])).await;
    assert_eq!(me["transport"], "WebSockets");
}
