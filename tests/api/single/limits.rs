//! Limits: message and body size, bounded outbound queues, handshake errors and timeout.

use awc::http::StatusCode;
use awc::ws;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn a_post_body_over_the_limit_is_413() {
    let app = spawn_app_with(|s| s.max_message_size = 1024).await;
    let mut client = LpClient::connect(&app).await;
    // The body limit is eight records' worth.
    let record = frame(&json!({"type": 1, "target": "Send", "arguments": ["x".repeat(900)]}));
    let body = record.repeat(12);
    assert!(body.len() > 8 * 1024);

    let reply = client.post(body).await;

    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing of it reached the connection, which carries on.
    assert_eq!(
        client.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );
}

#[actix_web::test]
async fn a_record_over_the_maximum_message_size_closes_the_connection_with_an_error() {
    let app = spawn_app_with(|s| s.max_message_size = 1024).await;
    let big = frame(&json!({"type": 1, "target": "Send", "arguments": ["x".repeat(2000)]}));

    let mut lp = LpClient::connect(&app).await;
    let sent = lp.post(big.clone()).await;
    assert_eq!(sent.status, StatusCode::OK);
    let close = lp.recv("a Close message", &|r| is_type(r, 7)).await;
    // ASP.NET's text; the detail only with ENABLE_DETAILED_ERRORS (see below).
    assert_eq!(close_error(&close), "Connection closed with an error.");
    assert_ne!(close["allowReconnect"], true);
    let (status, _) = lp.poll().await;
    assert!(
        status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
        "{status}"
    );

    let mut sse = SseClient::connect(&app).await;
    sse.send_text(big.clone()).await;
    let close = sse.recv("a Close message", &|r| is_type(r, 7)).await;
    assert_eq!(close_error(&close), "Connection closed with an error.");
    sse.wait_ended().await;

    let detailed = spawn_app_with(|s| {
        s.max_message_size = 1024;
        s.enable_detailed_errors = true;
    })
    .await;
    let mut ws = WsClient::connect(&detailed).await;
    ws.send_text(big).await;
    let close = ws.recv("a Close message", &|r| is_type(r, 7)).await;
    let error = close_error(&close);
    assert!(
        error.starts_with("Connection closed with an error. InvalidDataException: ")
            && error.contains("maximum message size"),
        "{error}"
    );
    let reason = ws.wait_closed(RECV_TIMEOUT).await;
    assert_eq!(
        reason.map(|r| r.code),
        Some(ws::CloseCode::Normal),
        "a Close message explains the end, so the socket closes normally"
    );
}

#[actix_web::test]
async fn handshake_errors_get_an_error_reply_and_end_the_connection() {
    let app = spawn_app().await;
    let cases = [
        (
            "{\"protocol\":\"msgpack\",\"version\":1}\u{1e}",
            Some("The protocol 'msgpack' is not supported."),
        ),
        (
            "{\"protocol\":\"MessagePack\",\"version\":3}\u{1e}",
            Some("The server does not support version 3 of the 'MessagePack' protocol."),
        ),
        (
            "{\"protocol\":\"json\",\"version\":3}\u{1e}",
            Some("The server does not support version 3 of the 'json' protocol."),
        ),
        ("hello\u{1e}", None),
        ("{\"protocol\":\"json\"}\u{1e}", None),
        ("[]\u{1e}", None),
    ];
    for (handshake, expected) in cases {
        let mut ws = app.ws_raw("", &[]).await.expect("ws");
        ws.send_text(handshake.to_owned()).await;
        let reply = ws
            .recv("the handshake reply", &|r| r.get("error").is_some())
            .await;
        assert!(reply.get("type").is_none(), "{reply}");
        let error = reply["error"].as_str().expect("error text");
        match expected {
            Some(text) => assert_eq!(error, text, "{handshake:?}"),
            None => assert!(!error.is_empty(), "{handshake:?}"),
        }
        assert_eq!(reply.as_object().map(|o| o.len()), Some(1), "{reply}");
        ws.wait_closed(RECV_TIMEOUT).await;
    }

    // The same over long polling.
    let client = LpClient::negotiate(&app).await;
    assert_eq!(client.poll().await.0, StatusCode::OK);
    client
        .post("{\"protocol\":\"xml\",\"version\":1}\u{1e}")
        .await;
    let (status, records) = client.poll().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        records,
        vec![json!({"error": "The protocol 'xml' is not supported."})]
    );
    let (status, _) = client.poll().await;
    assert!(
        status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
        "{status}"
    );
}

#[actix_web::test]
async fn version_two_of_the_json_protocol_is_accepted() {
    let app = spawn_app().await;
    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    ws.send_text("{\"protocol\":\"json\",\"version\":2}\u{1e}".to_owned())
        .await;
    let reply = ws.next_record(RECV_TIMEOUT).await;
    assert_eq!(reply, Some(json!({})));
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

#[actix_web::test]
async fn a_slow_consumer_is_disconnected_while_the_broadcaster_keeps_working() {
    let app = spawn_app_with(|s| s.outbound_queue_length = 8).await;
    let slow = LpClient::connect(&app).await;
    let mut broadcaster = WsClient::connect(&app).await;
    let closes = "stickless_slow_consumer_closes_total";
    let before = app.metric(closes).await;

    for i in 0..50 {
        let text = format!("m{i}");
        broadcaster.call("Send", json!([text])).await;
        broadcaster.recv_call("Send", &|a| a == text.as_str()).await;
    }
    assert_eq!(
        broadcaster.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );

    // The slow client gets at most what fitted in its queue, then a Close message that
    // says why, and then it is no longer served.
    let (status, records) = slow.poll().await;
    assert_eq!(status, StatusCode::OK, "{records:?}");
    let sends = records.iter().filter(|r| is_call(r, "Send")).count();
    assert!(sends <= 8, "{sends} records queued past the limit");
    let close = records
        .last()
        .unwrap_or_else(|| panic!("no Close message: {records:?}"));
    assert!(close_error(close).contains("fast enough"), "{close}");
    let (status, records) = slow.poll().await;
    assert!(
        status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
        "{status} {records:?}"
    );
    assert_eq!(
        app.metric(closes).await - before,
        1.0,
        "only the slow client"
    );
}

#[actix_web::test]
async fn websocket_and_sse_clients_that_do_not_read_are_closed_as_too_slow() {
    let app = spawn_app_with(|s| {
        s.max_message_size = 1 << 20;
        s.outbound_queue_length = 8;
    })
    .await;
    let slow_ws = WsClient::connect(&app).await;
    let slow_sse = SseClient::connect(&app).await;
    let mut broadcaster = WsClient::connect(&app).await;
    let closes = "stickless_slow_consumer_closes_total";
    let before = app.metric(closes).await;

    // Large broadcasts until both non-readers overflowed: the socket buffers fill first,
    // then their queues of 8.
    let text = "x".repeat(256 * 1024);
    let mut sent = 0;
    while app.metric(closes).await - before < 2.0 {
        assert!(sent < 400, "{sent} broadcasts and still not closed");
        broadcaster.fire("Send", json!([text])).await;
        broadcaster
            .recv_call("Send", &|a| {
                a.as_str().is_some_and(|t| t.len() == text.len())
            })
            .await;
        sent += 1;
    }
    assert_eq!(
        app.metric(closes).await - before,
        2.0,
        "the broadcaster reads and stays"
    );
    assert_eq!(
        broadcaster.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );

    for mut slow in [Box::new(slow_ws) as Box<dyn HubClient>, Box::new(slow_sse)] {
        let close = slow.recv("the Close message", &|r| is_type(r, 7)).await;
        assert!(close_error(&close).contains("fast enough"), "{close}");
        slow.wait_ended().await;
    }
}
