//! One instance, in-process: the HTTP surface, the three transports, the hub protocol,
//! limits, timeouts, shutdown and robustness.

use std::time::{Duration, Instant};

use awc::error::WsClientError;
use awc::http::{Method, StatusCode};
use awc::ws;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::helpers::{
    eventually, forged_token, frame, is_call, is_completion, is_type, raw_tcp, spawn_app,
    spawn_app_with, within, HubClient, LpClient, SseClient, TestApp, WsClient, WsEvent, HANDSHAKE,
    HUB, RS,
};

/// Asserts that a WebSocket upgrade was refused with `status` before the upgrade.
fn assert_refused(result: Result<WsClient, WsClientError>, status: StatusCode) {
    match result {
        Err(WsClientError::InvalidResponseStatus(got)) => assert_eq!(got, status),
        Err(other) => panic!("expected a {status} refusal, got the error {other:?}"),
        Ok(_) => panic!("expected a {status} refusal, but the upgrade was accepted"),
    }
}

/// The `error` of a Close record, which must not allow reconnecting.
fn close_error(record: &Value) -> String {
    assert!(is_type(record, 7), "not a Close message: {record}");
    record["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a Close message without error: {record}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// Negotiate and status codes
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn negotiate_lists_websockets_sse_and_long_polling_in_that_order() {
    let app = spawn_app().await;

    let reply = app.negotiate_raw("negotiateVersion=1", &[]).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json")));
    let body = reply.json();
    let keys: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "availableTransports",
            "connectionId",
            "connectionToken",
            "negotiateVersion"
        ],
        "no useStatefulReconnect, no ProtocolVersion, nothing else"
    );
    assert_eq!(body["negotiateVersion"], 1);
    assert_eq!(
        body["availableTransports"],
        json!([
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
            {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
            {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
        ])
    );
    let id = body["connectionId"].as_str().expect("connectionId");
    let token = body["connectionToken"].as_str().expect("connectionToken");
    assert!(!id.is_empty() && !token.is_empty());
    assert_ne!(id, token, "the token is a secret, not the public id");
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c)),
        "the client does not URL-encode the token: {token}"
    );
}

#[actix_web::test]
async fn negotiate_without_a_version_has_no_connection_token() {
    let app = spawn_app().await;

    let v0 = app.negotiate_raw("", &[]).await.json();
    assert_eq!(v0["negotiateVersion"], 0);
    assert!(v0["connectionId"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(v0.get("connectionToken").is_none(), "{v0}");

    // Version 0 clients send the connectionId as `id`: it must work as the token.
    let id = v0["connectionId"].as_str().expect("connectionId");
    let first = app.poll(id).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());

    let v5 = app.negotiate_raw("negotiateVersion=5", &[]).await.json();
    assert_eq!(v5["negotiateVersion"], 1, "versions above 1 are lowered");
    assert!(v5["connectionToken"].is_string());
}

#[actix_web::test]
async fn negotiate_with_an_invalid_version_answers_200_with_an_error() {
    let app = spawn_app().await;
    for version in ["abc", "-1", "1.5", ""] {
        let reply = app
            .negotiate_raw(&format!("negotiateVersion={version}"), &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "version {version:?}");
        let body = reply.json();
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "version {version:?}: {body}"
        );
        assert!(body.get("connectionId").is_none(), "{body}");
    }
}

#[actix_web::test]
async fn methods_the_endpoints_do_not_take_are_405() {
    let app = spawn_app().await;
    let empty = || Bytes::new();
    let timeout = Duration::from_secs(5);

    let get_negotiate = app
        .request(Method::GET, "/chat/negotiate", &[], empty(), timeout)
        .await;
    assert_eq!(get_negotiate.status, StatusCode::METHOD_NOT_ALLOWED);
    let put_negotiate = app
        .request(Method::PUT, "/chat/negotiate", &[], empty(), timeout)
        .await;
    assert_eq!(put_negotiate.status, StatusCode::METHOD_NOT_ALLOWED);
    let put_hub = app.request(Method::PUT, HUB, &[], empty(), timeout).await;
    assert_eq!(put_hub.status, StatusCode::METHOD_NOT_ALLOWED);
    let patch_hub = app
        .request(Method::PATCH, "/chat?id=x", &[], empty(), timeout)
        .await;
    assert_eq!(patch_hub.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[actix_web::test]
async fn requests_without_an_id_are_400() {
    let app = spawn_app().await;
    let timeout = Duration::from_secs(5);
    for method in [Method::GET, Method::POST, Method::DELETE] {
        let reply = app
            .request(method.clone(), HUB, &[], Bytes::new(), timeout)
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method}");
        assert_eq!(reply.text(), "Connection ID required", "{method}");
    }
    let sse = app
        .request(
            Method::GET,
            HUB,
            &[("Accept", "text/event-stream")],
            Bytes::new(),
            timeout,
        )
        .await;
    assert_eq!(sse.status, StatusCode::BAD_REQUEST);
}

#[actix_web::test]
async fn long_poll_returns_404_for_an_unknown_connection() {
    let app = spawn_app().await;
    // A random string, a token signed with another key, and a real token with its
    // signature changed.
    let (_, real) = app.negotiate().await;
    let mut tampered = real.clone();
    let last = tampered.pop().expect("a non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for token in ["forged".to_owned(), forged_token(&app.instance), tampered] {
        let poll = app.poll(&token).await;
        assert_eq!(poll.status, StatusCode::NOT_FOUND, "poll {token}");
        assert_eq!(poll.text(), "No Connection with that ID");
        let post = app.post(&token, HANDSHAKE).await;
        assert_eq!(post.status, StatusCode::NOT_FOUND, "POST {token}");
        let delete = app.delete(&token).await;
        assert_eq!(delete.status, StatusCode::NOT_FOUND, "DELETE {token}");
        let sse = app.sse_raw(&token, &[]).await;
        assert_eq!(
            sse.err().map(|refusal| refusal.status),
            Some(StatusCode::NOT_FOUND),
            "SSE {token}"
        );
        assert_refused(
            app.ws_raw(&format!("id={token}"), &[]).await,
            StatusCode::NOT_FOUND,
        );
    }
    // The real token was not disturbed by its tampered copy.
    assert_eq!(app.poll(&real).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Long polling
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn long_polling_round_trip_and_who_am_i() {
    let app = spawn_app().await;
    let (connection_id, token) = app.negotiate().await;

    let first = app.poll(&token).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.body.is_empty());
    assert!(
        first.elapsed < Duration::from_secs(1),
        "the first poll must be answered at once (took {:?})",
        first.elapsed
    );
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
async fn an_unknown_hub_method_gets_an_error_completion() {
    let app = spawn_app().await;
    let mut client = LpClient::connect(&app).await;

    let completion = client.invoke("NoSuchMethod", json!([1, 2])).await;

    let error = completion["error"].as_str().expect("an error");
    assert!(
        error.contains("Unknown hub method 'NoSuchMethod'"),
        "{error}"
    );
    assert!(completion.get("result").is_none());
    // The connection carries on.
    assert_eq!(
        client.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );
}

#[actix_web::test]
async fn a_non_blocking_invocation_gets_no_completion() {
    let app = spawn_app().await;
    let mut client = LpClient::connect(&app).await;

    client.fire("Send", json!(["no reply please"])).await;
    client.fire("NoSuchMethod", json!([])).await;
    client.fire("Send", json!([1, 2, 3])).await; // wrong arguments, still no reply
    client.call("WhoAmI", json!([])).await;

    // Invocations run in order, so everything the first three caused is in by now.
    let sent = client
        .recv("the Send broadcast", &|r| is_call(r, "Send"))
        .await;
    assert_eq!(sent["arguments"], json!(["no reply please"]));
    let records: Vec<Value> = client.inbox().records.drain(..).collect();
    assert!(
        records.iter().all(|r| !is_type(r, 3)),
        "a non-blocking invocation was answered: {records:?}"
    );
}

#[actix_web::test]
async fn several_records_in_one_post_are_all_handled() {
    let app = spawn_app().await;
    let mut client = LpClient::connect(&app).await;

    let body = [
        json!({"type": 1, "invocationId": "a", "target": "WhoAmI", "arguments": []}),
        json!({"type": 1, "target": "Send", "arguments": ["batched"]}),
        json!({"type": 6}),
        json!({"arguments": [], "target": "WhoAmI", "invocationId": "b", "type": 1}),
    ]
    .iter()
    .map(frame)
    .collect::<String>();
    let sent = client.post(body).await;
    assert_eq!(sent.status, StatusCode::OK);

    let a = client
        .recv("completion a", &|r| is_completion(r, "a"))
        .await;
    assert_eq!(a["result"]["transport"], "LongPolling");
    let sent = client.recv("the Send", &|r| is_call(r, "Send")).await;
    assert_eq!(sent["arguments"], json!(["batched"]));
    let b = client
        .recv("completion b", &|r| is_completion(r, "b"))
        .await;
    assert_eq!(b["result"]["connectionId"], client.connection_id);
}

#[actix_web::test]
async fn hub_method_names_match_ignoring_case() {
    let app = spawn_app().await;
    let mut client = LpClient::connect(&app).await;
    for name in ["whoami", "WHOAMI", "wHoAmI"] {
        let completion = client.invoke(name, json!([])).await;
        assert_eq!(
            completion["result"]["connectionId"], client.connection_id,
            "{name}: {completion}"
        );
    }
}

#[actix_web::test]
async fn an_older_overlapping_poll_gets_204_and_the_newer_gets_the_data() {
    let app = spawn_app_with(|s| s.poll_timeout = Duration::from_secs(20)).await;
    let mut client = LpClient::connect(&app).await;

    let (api, token) = (app.api.clone(), client.token.clone());
    let older = actix_web::rt::spawn(async move { api.poll(&token).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (api, token) = (app.api.clone(), client.token.clone());
    let newer = actix_web::rt::spawn(async move { api.poll(&token).await });

    let older = within(Duration::from_secs(5), "the older poll", older)
        .await
        .expect("poll task");
    assert_eq!(older.status, StatusCode::NO_CONTENT);

    client.fire("Send", json!(["for the newer poll"])).await;
    let newer = within(Duration::from_secs(5), "the newer poll", newer)
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
    let (api, token) = (app.api.clone(), client.token.clone());
    let pending = actix_web::rt::spawn(async move { api.poll(&token).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let deleted = app.delete(&client.token).await;

    assert_eq!(deleted.status, StatusCode::ACCEPTED);
    let pending = within(Duration::from_secs(5), "the pending poll", pending)
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
    let app = spawn_app_with(|s| s.disconnect_timeout = Duration::from_secs(1)).await;
    let (_, never_started) = app.negotiate().await;
    let stopped_polling = LpClient::connect(&app).await;

    tokio::time::sleep(Duration::from_millis(3500)).await;

    assert_eq!(app.poll(&never_started).await.status, StatusCode::NOT_FOUND);
    let status = app.poll(&stopped_polling.token).await.status;
    assert!(
        status == StatusCode::NOT_FOUND || status == StatusCode::NO_CONTENT,
        "a long-polling client that stopped polling is dropped too, got {status}"
    );
    eventually(Duration::from_secs(5), "no connection left", || async {
        (app.healthz().await["connections"] == 0).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Limits and handshake errors
// ---------------------------------------------------------------------------------------

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
    let error = close_error(&close);
    assert!(error.contains("maximum message size"), "{error}");
    assert_ne!(close["allowReconnect"], true);
    let (status, _) = lp.poll().await;
    assert!(
        status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND,
        "{status}"
    );

    let mut ws = WsClient::connect(&app).await;
    ws.send_text(big).await;
    let close = ws.recv("a Close message", &|r| is_type(r, 7)).await;
    assert!(close_error(&close).contains("maximum message size"));
    let reason = ws.wait_closed(Duration::from_secs(5)).await;
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
            "{\"protocol\":\"messagepack\",\"version\":1}\u{1e}",
            Some("The protocol 'messagepack' is not supported."),
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
        ws.wait_closed(Duration::from_secs(5)).await;
    }

    // The same over long polling.
    let client = LpClient::negotiate(&app).await;
    assert_eq!(client.poll().await.0, StatusCode::OK);
    client
        .post("{\"protocol\":\"messagepack\",\"version\":1}\u{1e}")
        .await;
    let (status, records) = client.poll().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        records,
        vec![json!({"error": "The protocol 'messagepack' is not supported."})]
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
    let reply = ws.next_record(Duration::from_secs(5)).await;
    assert_eq!(reply, Some(json!({})));
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

#[actix_web::test]
async fn a_client_that_never_finishes_its_handshake_gets_handshake_was_canceled() {
    let app = spawn_app_with(|s| s.handshake_timeout = Duration::from_secs(1)).await;
    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    ws.send_text("{\"protocol\":\"json\",\"ver".to_owned())
        .await;

    let reply = ws
        .recv_within("the handshake reply", Duration::from_secs(5), &|r| {
            r.get("error").is_some()
        })
        .await;

    assert_eq!(reply, json!({"error": "Handshake was canceled."}));
    ws.wait_closed(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------
// WebSockets
// ---------------------------------------------------------------------------------------

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
    ws.wait_closed(Duration::from_secs(5)).await;
}

#[actix_web::test]
async fn a_websocket_for_an_unknown_id_is_refused_with_404_before_the_upgrade() {
    let app = spawn_app().await;
    assert_refused(app.ws_raw("id=forged", &[]).await, StatusCode::NOT_FOUND);
    assert_refused(
        app.ws_raw(&format!("id={}", forged_token(&app.instance)), &[])
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

// ---------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn sse_starts_with_a_comment_and_frames_records_as_data_lines() {
    let app = spawn_app().await;
    let (connection_id, token) = app.negotiate().await;

    let mut sse = app.sse_raw(&token, &[]).await.expect("an event stream");

    assert!(sse.raw.starts_with(":\r\n"), "{:?}", sse.raw);
    let header = |name: &str| {
        sse.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert!(header("cache-control").is_some_and(|v| v.contains("no-cache")));
    assert!(header("content-length").is_none());

    sse.connection_id = connection_id.clone();
    sse.handshake().await;
    assert!(
        sse.raw.contains(&format!("data: {{}}{RS}\r\n\r\n")),
        "{:?}",
        sse.raw
    );
    let me = sse.call("WhoAmI", json!([])).await;
    assert_eq!(
        me,
        json!({"instance": app.instance, "connectionId": connection_id, "transport": "ServerSentEvents"})
    );
    assert!(!sse.raw.contains("event:") && !sse.raw.contains("id:") && !sse.raw.contains("retry:"));
}

// ---------------------------------------------------------------------------------------
// Keep-alive and timeouts
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn keep_alive_pings_reach_websocket_and_sse_clients() {
    let app = spawn_app_with(|s| s.keep_alive_interval = Duration::from_secs(1)).await;
    let mut ws = WsClient::connect(&app).await;
    let mut sse = SseClient::connect(&app).await;

    let ping = ws
        .recv_within("a Ping", Duration::from_secs(3), &|r| is_type(r, 6))
        .await;
    assert_eq!(ping, json!({"type": 6}));
    let ping = sse
        .recv_within("a Ping", Duration::from_secs(3), &|r| is_type(r, 6))
        .await;
    assert_eq!(ping, json!({"type": 6}));
}

#[actix_web::test]
async fn long_polling_clients_get_no_pings() {
    let app = spawn_app_with(|s| s.keep_alive_interval = Duration::from_secs(1)).await;
    let client = LpClient::connect(&app).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        let (status, records) = client.poll().await;
        assert_eq!(status, StatusCode::OK);
        assert!(records.is_empty(), "{records:?}");
    }
}

#[actix_web::test]
async fn a_websocket_client_silent_after_its_first_ping_is_closed_after_the_client_timeout() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(2)).await;
    let mut ws = WsClient::connect(&app).await;
    ws.send(json!({"type": 6})).await;

    let close = ws
        .recv_within("a Close message", Duration::from_secs(6), &|r| {
            is_type(r, 7)
        })
        .await;

    let error = close_error(&close);
    assert!(error.contains("timeout"), "{error}");
    ws.wait_closed(Duration::from_secs(5)).await;
}

#[actix_web::test]
async fn a_websocket_client_that_never_pings_is_not_timed_out() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(1)).await;
    let mut ws = WsClient::connect(&app).await;

    tokio::time::sleep(Duration::from_millis(2500)).await;

    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn counter_streams_items_then_a_completion_without_result() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;

    ws.send(json!({"type": 4, "invocationId": "s1", "target": "Counter", "arguments": [3, 10]}))
        .await;

    let mut items = Vec::new();
    let completion = loop {
        let record = ws
            .recv("the stream", &|r| {
                r["invocationId"] == "s1" && (is_type(r, 2) || is_type(r, 3))
            })
            .await;
        if is_type(&record, 3) {
            break record;
        }
        items.push(record["item"].clone());
    };
    assert_eq!(items, vec![json!(0), json!(1), json!(2)]);
    assert_eq!(completion, json!({"type": 3, "invocationId": "s1"}));
}

#[actix_web::test]
async fn invoking_a_stream_method_without_streaming_and_the_reverse_are_errors() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;

    let completion = ws.invoke("Counter", json!([3, 10])).await;
    assert!(completion["error"].is_string(), "{completion}");
    assert!(completion.get("result").is_none());

    ws.send(json!({"type": 4, "invocationId": "s2", "target": "WhoAmI", "arguments": []}))
        .await;
    let completion = ws
        .recv("the stream's completion", &|r| is_completion(r, "s2"))
        .await;
    assert!(completion["error"].is_string(), "{completion}");

    let too_many = {
        ws.send(
            json!({"type": 4, "invocationId": "s3", "target": "Counter", "arguments": [1001, 0]}),
        )
        .await;
        ws.recv("the refused stream", &|r| is_completion(r, "s3"))
            .await
    };
    assert!(too_many["error"].is_string(), "{too_many}");
}

#[actix_web::test]
async fn cancelling_a_stream_stops_its_items() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;
    ws.send(json!({"type": 4, "invocationId": "c", "target": "Counter", "arguments": [1000, 20]}))
        .await;
    ws.recv("a first item", &|r| {
        is_type(r, 2) && r["invocationId"] == "c"
    })
    .await;

    ws.send(json!({"type": 5, "invocationId": "c"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.call("WhoAmI", json!([])).await;
    ws.inbox().records.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.call("WhoAmI", json!([])).await;

    let late: Vec<Value> = ws.inbox().records.drain(..).collect();
    assert!(
        late.iter().all(|r| !is_type(r, 2)),
        "items kept coming after the cancel: {late:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Shutdown, headers, CORS, health
// ---------------------------------------------------------------------------------------

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

#[actix_web::test]
async fn every_response_carries_the_instance_header() {
    let app = spawn_app_with(|s| s.max_message_size = 256).await;
    let timeout = Duration::from_secs(5);
    let (_, token) = app.negotiate().await;
    let replies = vec![
        ("healthz", app.get("/healthz").await),
        ("metrics", app.get("/metrics").await),
        (
            "negotiate",
            app.negotiate_raw("negotiateVersion=1", &[]).await,
        ),
        ("first poll", app.poll(&token).await),
        ("unknown id", app.poll("forged").await),
        ("no id", app.get(HUB).await),
        (
            "GET negotiate",
            app.request(Method::GET, "/chat/negotiate", &[], Bytes::new(), timeout)
                .await,
        ),
        ("too large", app.post(&token, "x".repeat(4096)).await),
        ("static /", app.get("/").await),
        ("no such page", app.get("/no/such/page").await),
    ];
    for (what, reply) in replies {
        assert_eq!(
            reply.header("x-stickless-instance").as_deref(),
            Some(app.instance.as_str()),
            "{what} ({})",
            reply.status
        );
    }
}

#[actix_web::test]
async fn the_chat_page_is_served_at_the_root_when_present() {
    let app = spawn_app().await;
    let has_page =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/static/index.html")).is_file();
    let root = app.get("/").await;
    if has_page {
        assert_eq!(root.status, StatusCode::OK);
        assert!(root
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/html")));
    } else {
        assert_eq!(root.status, StatusCode::NOT_FOUND);
    }
}

#[actix_web::test]
async fn cors_is_off_by_default() {
    let app = spawn_app().await;
    let origin = ("Origin", "http://example.test");

    let preflight = app
        .request(
            Method::OPTIONS,
            "/chat/negotiate",
            &[origin, ("Access-Control-Request-Method", "POST")],
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;
    let negotiate = app.negotiate_raw("negotiateVersion=1", &[origin]).await;

    assert!(preflight.header("access-control-allow-origin").is_none());
    assert!(negotiate.header("access-control-allow-origin").is_none());
    assert!(negotiate
        .header("access-control-allow-credentials")
        .is_none());
}

#[actix_web::test]
async fn cors_allows_the_configured_origin_with_credentials() {
    let app = spawn_app_with(|s| s.cors_origins = vec!["http://example.test".into()]).await;

    let preflight = app
        .request(
            Method::OPTIONS,
            "/chat/negotiate",
            &[
                ("Origin", "http://example.test"),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "x-requested-with,x-signalr-user-agent,authorization,content-type",
                ),
            ],
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;

    assert!(preflight.status.is_success(), "{}", preflight.status);
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some("http://example.test")
    );
    assert_eq!(
        preflight
            .header("access-control-allow-credentials")
            .as_deref(),
        Some("true")
    );
    let methods = preflight
        .header("access-control-allow-methods")
        .unwrap_or_default();
    for method in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(method), "{method} in {methods}");
    }
    let headers = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for header in [
        "x-requested-with",
        "x-signalr-user-agent",
        "authorization",
        "content-type",
    ] {
        assert!(headers.contains(header), "{header} in {headers}");
    }

    let negotiate = app
        .negotiate_raw("negotiateVersion=1", &[("Origin", "http://example.test")])
        .await;
    assert_eq!(negotiate.status, StatusCode::OK);
    assert_eq!(
        negotiate.header("access-control-allow-origin").as_deref(),
        Some("http://example.test")
    );
    assert_eq!(
        negotiate
            .header("access-control-allow-credentials")
            .as_deref(),
        Some("true")
    );

    let other = app
        .request(
            Method::OPTIONS,
            "/chat/negotiate",
            &[
                ("Origin", "http://evil.test"),
                ("Access-Control-Request-Method", "POST"),
            ],
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;
    assert_ne!(
        other.header("access-control-allow-origin").as_deref(),
        Some("http://evil.test")
    );
}

#[actix_web::test]
async fn healthz_reports_status_instance_backplane_and_connections() {
    let app = spawn_app().await;

    assert_eq!(app.address, format!("http://127.0.0.1:{}", app.port));
    let health = app.healthz().await;
    assert_eq!(
        health,
        json!({"status": "ok", "instance": app.instance, "backplane": "in-process", "connections": 0})
    );

    let _ws = WsClient::connect(&app).await;
    eventually(Duration::from_secs(5), "one connection counted", || async {
        (app.healthz().await["connections"] == 1).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------

/// Opens a socket (handshaken or not), sends `payload`, and reads whatever comes back
/// for a moment. The server may answer or close; it must not fall over.
async fn ws_junk(app: &TestApp, handshake: bool, payload: ws::Message) {
    let Ok(mut ws) = app.ws_raw("", &[]).await else {
        return;
    };
    if handshake {
        ws.handshake().await;
    }
    if !ws.try_send_message(payload).await {
        return;
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        match ws.next_event(Duration::from_millis(100)).await {
            WsEvent::Closed(_) | WsEvent::Gone => return,
            _ => {}
        }
    }
}

#[actix_web::test]
async fn a_barrage_of_malformed_input_does_not_take_the_server_down() {
    let app = spawn_app_with(|s| s.max_message_size = 4096).await;
    let mut lp_survivor = LpClient::connect(&app).await;
    let mut ws_survivor = WsClient::connect(&app).await;

    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let texts: Vec<String> = vec![
        "{\"type\":\"1\"}".into(),
        "{\"type\":1,\"target\":5,\"arguments\":[]}".into(),
        "{\"type\":1,\"target\":\"Send\",\"arguments\":\"not an array\"}".into(),
        "{\"type\":1,\"invocationId\":7,\"target\":\"Send\",\"arguments\":[]}".into(),
        "{\"type\":1,\"invocationId\":\"x\",\"target\":\"Send\",\"arguments\":[1,2,3]}".into(),
        "{\"type\":1,\"invocationId\":\"\",\"target\":\"\",\"arguments\":[]}".into(),
        "{\"type\":4,\"invocationId\":\"s\",\"target\":\"Counter\",\"arguments\":[1e300,-1]}"
            .into(),
        "{\"type\":4,\"invocationId\":\"s\",\"target\":\"Counter\",\"arguments\":[2,0],\"streamIds\":[\"1\"]}"
            .into(),
        "{\"type\":2,\"invocationId\":\"nope\",\"item\":1}".into(),
        "{\"type\":3,\"invocationId\":\"nope\",\"result\":1}".into(),
        "{\"type\":5}".into(),
        "{\"type\":8,\"sequenceId\":\"x\"}".into(),
        "{\"type\":99}".into(),
        "{\"type\":-1}".into(),
        "{\"type\":18446744073709551616}".into(),
        "[1,2,3]".into(),
        "null".into(),
        "\"a string\"".into(),
        "".into(),
        "{".into(),
        "{\"type\":1,\"target\":\"Send\",\"arguments\":[\"\\ud800\"]}".into(),
        deep.clone(),
    ];

    // Over WebSockets, before and after the handshake, as text and as binary.
    for text in &texts {
        let record = format!("{text}{RS}");
        ws_junk(&app, true, ws::Message::Text(record.clone().into())).await;
        ws_junk(&app, false, ws::Message::Text(record.into())).await;
    }
    for junk in [
        vec![0xff, 0xfe, 0x00, 0x1e],
        vec![0xc3, 0x28, 0x1e],
        vec![0x1e; 1000],
        vec![0u8; 100_000],
    ] {
        ws_junk(&app, true, ws::Message::Binary(Bytes::from(junk.clone()))).await;
        ws_junk(&app, false, ws::Message::Binary(Bytes::from(junk))).await;
    }
    ws_junk(&app, true, ws::Message::Text("x".repeat(1 << 20).into())).await;
    ws_junk(&app, true, ws::Message::Ping(Bytes::from_static(b"ping"))).await;
    ws_junk(&app, true, ws::Message::Close(None)).await;
    // A truncated handshake, then the socket goes away.
    if let Ok(mut ws) = app.ws_raw("", &[]).await {
        ws.send_text("{\"protocol\":\"js".to_owned()).await;
    }

    // Over long polling: junk handshakes and junk records.
    for text in texts.iter().take(8) {
        let victim = LpClient::negotiate(&app).await;
        victim.poll().await;
        victim.post(format!("{text}{RS}")).await;
        let started = LpClient::connect(&app).await;
        started.post(format!("{text}{RS}")).await;
        started.post(Bytes::from_static(&[0xff, 0xfe, 0x1e])).await;
    }
    // Sends to a connection that never started its transport.
    let (_, unstarted) = app.negotiate().await;
    app.post(&unstarted, "garbage\u{1e}").await;

    // Odd queries and headers through a real client.
    let long_id = "a".repeat(6000);
    for query in [
        format!("id={long_id}"),
        "id=".into(),
        "id=%ZZ%".into(),
        "id=a&id=b".into(),
        "ID=x".into(),
        "id=..&&==".into(),
        "id=a.b.c.d".into(),
        "id=node.x.ffffffffffffffffffffff.AAAA".into(),
    ] {
        let path = format!("{HUB}?{query}");
        for method in [Method::GET, Method::POST, Method::DELETE] {
            app.request(method, &path, &[], Bytes::new(), Duration::from_secs(5))
                .await;
        }
    }
    app.negotiate_raw("negotiateVersion=99999999999999999999999", &[])
        .await;
    app.negotiate_raw("negotiateVersion=1&negotiateVersion=2", &[])
        .await;

    // Bytes no HTTP client would send.
    let raw_requests: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET /chat?id=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        format!(
            "GET /chat?id={} HTTP/1.1\r\nHost: x\r\n\r\n",
            "b".repeat(100_000)
        )
        .into_bytes(),
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "c".repeat(100_000)
        )
        .into_bytes(),
        b"POST /chat?id=x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc".to_vec(),
        b"POST /chat?id=x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"POST /chat?id=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            .to_vec(),
        b"POST /chat/negotiate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n".to_vec(),
        vec![0u8; 10_000],
    ];
    for bytes in raw_requests {
        raw_tcp(app.port, bytes).await;
    }

    // Still up, and the connections opened before the barrage still work.
    assert_eq!(app.healthz().await["status"], "ok");
    assert_eq!(
        lp_survivor.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );
    assert_eq!(
        ws_survivor.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
    let mut fresh = WsClient::connect(&app).await;
    ws_survivor.fire("Send", json!(["after the barrage"])).await;
    fresh.recv_call("Send", &|a| a == "after the barrage").await;
}

#[actix_web::test]
async fn a_slow_consumer_is_disconnected_while_the_broadcaster_keeps_working() {
    let app = spawn_app_with(|s| s.outbound_queue_length = 8).await;
    let slow = LpClient::connect(&app).await;
    let mut broadcaster = WsClient::connect(&app).await;

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
    assert!(app.metric("stickless_slow_consumer_closes_total").await >= 1.0);
}

// ---------------------------------------------------------------------------------------
// More protocol details
// ---------------------------------------------------------------------------------------

#[actix_web::test]
async fn negotiate_never_offers_stateful_reconnect() {
    let app = spawn_app().await;
    let body = app
        .negotiate_raw("negotiateVersion=1&useStatefulReconnect=true", &[])
        .await
        .json();
    assert!(body["connectionToken"].is_string(), "{body}");
    assert_ne!(body["useStatefulReconnect"], true, "{body}");
}

#[actix_web::test]
async fn query_parameter_names_are_case_insensitive() {
    let app = spawn_app().await;
    let body = app.negotiate_raw("NegotiateVersion=1", &[]).await.json();
    assert_eq!(body["negotiateVersion"], 1);
    let token = body["connectionToken"].as_str().expect("a token");
    let first = app
        .request(
            Method::GET,
            &format!("{HUB}?ID={token}"),
            &[],
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
}

#[actix_web::test]
async fn records_sent_with_the_handshake_and_several_per_frame_are_handled() {
    let app = spawn_app().await;
    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    let invocation = |id: &str| {
        frame(&json!({"type": 1, "invocationId": id, "target": "WhoAmI", "arguments": []}))
    };

    ws.send_text(format!("{HANDSHAKE}{}", invocation("with-handshake")))
        .await;
    let reply = ws
        .recv("the handshake reply", &|r| {
            r.as_object().is_some_and(|o| o.is_empty())
        })
        .await;
    assert_eq!(reply, json!({}));
    ws.recv("the first completion", &|r| {
        is_completion(r, "with-handshake")
    })
    .await;

    ws.send_text(format!("{}{}", invocation("x"), invocation("y")))
        .await;
    ws.recv("x", &|r| is_completion(r, "x")).await;
    ws.recv("y", &|r| is_completion(r, "y")).await;
}

#[actix_web::test]
async fn a_record_split_over_two_frames_is_joined() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;
    let record =
        frame(&json!({"type": 1, "invocationId": "split", "target": "WhoAmI", "arguments": []}));
    let (head, tail) = record.split_at(20);

    ws.send_text(head.to_owned()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.send_text(tail.to_owned()).await;

    let completion = ws
        .recv("the completion", &|r| is_completion(r, "split"))
        .await;
    assert_eq!(completion["result"]["transport"], "WebSockets");
}

#[actix_web::test]
async fn text_round_trips_unchanged_on_every_transport() {
    let app = spawn_app().await;
    let text = "héllo 🌍 \"quoted\" \\ back\nslash \u{7f} <tag>";
    let mut ws = WsClient::connect(&app).await;
    let mut sse = SseClient::connect(&app).await;
    let mut lp = LpClient::connect(&app).await;

    sse.fire("Send", json!([text])).await;

    for client in [
        &mut ws as &mut dyn HubClient,
        &mut sse as &mut dyn HubClient,
        &mut lp as &mut dyn HubClient,
    ] {
        let got = client.recv_call("Send", &|a| a.is_string()).await;
        assert_eq!(got, text);
    }
}

#[actix_web::test]
async fn a_closed_websocket_connection_cannot_be_reopened() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut ws = app.ws_raw(&format!("id={token}"), &[]).await.expect("ws");
    ws.handshake().await;

    ws.send_message(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
        .await;
    ws.wait_closed(Duration::from_secs(5)).await;

    // This server offers no stateful reconnect: the token is spent.
    eventually(Duration::from_secs(5), "the token to be spent", || async {
        match app.ws_raw(&format!("id={token}"), &[]).await {
            Err(WsClientError::InvalidResponseStatus(StatusCode::NOT_FOUND)) => Some(()),
            _ => None,
        }
    })
    .await;
}

#[actix_web::test]
async fn closing_the_event_stream_ends_the_connection() {
    let app = spawn_app().await;
    let sse = SseClient::connect(&app).await;
    let token = sse.token.clone();

    drop(sse);

    eventually(Duration::from_secs(5), "the connection to end", || async {
        (app.post(&token, "{\"type\":6}\u{1e}").await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "no connection left", || async {
        (app.healthz().await["connections"] == 0).then_some(())
    })
    .await;
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

#[actix_web::test]
async fn presence_announces_joins_and_leaves_to_the_others() {
    let app = spawn_app().await;
    let mut watcher = WsClient::connect(&app).await;
    // A batch (`{ events, omitted }`) that names `kind` for the connection `id`.
    fn names(batch: &Value, kind: &str, id: &str) -> bool {
        batch["events"].as_array().is_some_and(|events| {
            events
                .iter()
                .any(|e| e["kind"] == kind && e["connectionId"] == id)
        })
    }

    let mut newcomer = LpClient::connect(&app).await;
    let id = newcomer.connection_id.clone();
    let joined = newcomer.call("Join", json!(["  Ada  "])).await;
    assert_eq!(joined["name"], "Ada");
    let batch = watcher
        .recv_call("Presence", &|b| names(b, "joined", id.as_str()))
        .await;
    let event = &batch["events"][0];
    assert_eq!(event["instance"], app.instance.as_str());
    assert_eq!(event["name"], "Ada", "{batch}");

    assert_eq!(newcomer.call("SetName", json!(["Bea"])).await, "Bea");
    let batch = watcher
        .recv_call("Presence", &|b| names(b, "renamed", id.as_str()))
        .await;
    assert_eq!(batch["events"][0]["oldName"], "Ada", "{batch}");

    let deleted = app.delete(&newcomer.token).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED);
    watcher
        .recv_call("Presence", &|b| names(b, "left", id.as_str()))
        .await;
}
