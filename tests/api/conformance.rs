//! The wire as ASP.NET Core speaks it, for clients nobody here wrote: the MessagePack hub
//! protocol on WebSockets and long polling (refused on SSE), handshake versions 0-2 and
//! protocol names in any case, negotiate version 0 ids, 404 after a long-polling
//! connection's final poll, invocation ids in use, the Completion of a canceled stream,
//! and error texts with and without detailed errors.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use awc::ws;
use bytes::Bytes;
use serde_json::{json, Value};
use stickless::protocol::hub_protocol::HubProtocol;
use stickless::protocol::message::{HubMessage, Outcome};

use crate::helpers::*;

const MSGPACK_HANDSHAKE: &str = "{\"protocol\":\"messagepack\",\"version\":1}\u{1e}";
const MAX: usize = 1 << 20;

fn invocation(id: Option<&str>, target: &str, arguments: Vec<Value>) -> HubMessage {
    HubMessage::Invocation {
        invocation_id: id.map(str::to_owned),
        target: target.into(),
        arguments,
        stream_ids: vec![],
    }
}

fn msgpack(message: &HubMessage) -> Bytes {
    HubProtocol::MessagePack.encode(message)
}

/// Reads binary frames until a MessagePack message matches, failing after a deadline
/// that only a hang reaches; a text frame after the handshake is a failure.
async fn recv_binary(
    ws: &mut WsClient,
    what: &str,
    matches: impl Fn(&HubMessage) -> bool,
) -> HubMessage {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match ws.next_event(Duration::from_millis(500)).await {
            WsEvent::Binary(bytes) => {
                let messages = HubProtocol::MessagePack
                    .parse(&bytes, MAX)
                    .unwrap_or_else(|e| panic!("{what}: not MessagePack ({e}): {bytes:?}"));
                if let Some(found) = messages.into_iter().find(&matches) {
                    return found;
                }
            }
            WsEvent::Records(records) => panic!("{what}: a text frame on MessagePack: {records:?}"),
            WsEvent::Closed(reason) => panic!("{what}: closed ({reason:?})"),
            WsEvent::Gone => panic!("{what}: the socket ended"),
            WsEvent::Nothing => {}
        }
    }
    panic!("{what}: nothing within the deadline");
}

async fn msgpack_ws(app: &TestApp) -> WsClient {
    let mut ws = app.ws_raw("", &[]).await.expect("ws");
    ws.send_text(MSGPACK_HANDSHAKE.to_owned()).await;
    // ASP.NET switches to binary before writing the reply: `{}` comes in a binary frame.
    match ws.next_event(Duration::from_secs(5)).await {
        WsEvent::Binary(bytes) => assert_eq!(&bytes[..], b"{}\x1e"),
        other => panic!("the handshake reply is not a binary frame: {other:?}"),
    }
    ws
}

fn result_of(message: &HubMessage) -> Value {
    match message {
        HubMessage::Completion {
            outcome: Outcome::Result(value),
            ..
        } => value.clone(),
        other => panic!("not a completion with a result: {other:?}"),
    }
}

fn is_completion_of(id: &str) -> impl Fn(&HubMessage) -> bool + '_ {
    move |m| matches!(m, HubMessage::Completion { invocation_id, .. } if invocation_id == id)
}

#[actix_web::test]
async fn messagepack_over_websockets_uses_binary_frames_and_meets_json_clients() {
    let app = spawn_app().await;
    let mut binary = msgpack_ws(&app).await;
    let mut text = WsClient::connect(&app).await;

    binary
        .send_message(ws::Message::Binary(msgpack(&invocation(
            Some("1"),
            "WhoAmI",
            vec![],
        ))))
        .await;
    let me = recv_binary(&mut binary, "WhoAmI", is_completion_of("1")).await;
    assert_eq!(result_of(&me)["transport"], "WebSockets");

    // One broadcast, each recipient in its own protocol.
    binary
        .send_message(ws::Message::Binary(msgpack(&invocation(
            None,
            "Send",
            vec![json!("hé ✓")],
        ))))
        .await;
    let got = recv_binary(
        &mut binary,
        "the broadcast",
        |m| matches!(m, HubMessage::Invocation { target, .. } if target == "Send"),
    )
    .await;
    assert_eq!(got, invocation(None, "Send", vec![json!("hé ✓")]));
    let got = text.recv_call("Send", &|a| a == "hé ✓").await;
    assert_eq!(got, json!("hé ✓"));

    text.fire("Send", json!(["from json"])).await;
    let got = recv_binary(&mut binary, "the JSON client's broadcast", |m| {
        matches!(m, HubMessage::Invocation { arguments, .. } if arguments == &vec![json!("from json")])
    })
    .await;
    assert!(matches!(got, HubMessage::Invocation { .. }));
}

#[actix_web::test]
async fn messagepack_over_long_polling_uses_binary_bodies() {
    let app = spawn_app().await;
    let client = LpClient::negotiate(&app).await;
    assert_eq!(client.poll_reply().await.status, StatusCode::OK);
    assert_eq!(client.post(MSGPACK_HANDSHAKE).await.status, StatusCode::OK);
    let reply = client.poll_reply().await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"{}\x1e");
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/octet-stream")
    );

    // Two records in one body; bytes that are not UTF-8 must arrive untouched.
    let mut body = msgpack(&invocation(Some("a"), "WhoAmI", vec![])).to_vec();
    body.extend_from_slice(&msgpack(&invocation(
        Some("b"),
        "SendTo",
        vec![json!(client.connection_id), json!("\u{ff}x")],
    )));
    assert_eq!(client.post(body).await.status, StatusCode::OK);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 3 && Instant::now() < deadline {
        let reply = client.poll_reply().await;
        assert_eq!(reply.status, StatusCode::OK);
        seen.extend(
            HubProtocol::MessagePack
                .parse(&reply.body, MAX)
                .expect("MessagePack records"),
        );
    }
    let who = seen
        .iter()
        .find(|m| is_completion_of("a")(m))
        .expect("WhoAmI's completion");
    assert_eq!(result_of(who)["transport"], "LongPolling");
    assert!(
        seen.iter().any(
            |m| matches!(m, HubMessage::Invocation { target, arguments, .. }
            if target == "ReceiveMessage" && arguments[0]["text"] == "\u{ff}x")
        ),
        "{seen:?}"
    );
}

#[actix_web::test]
async fn messagepack_is_refused_on_server_sent_events_with_aspnets_text() {
    let app = spawn_app().await;
    let (_, token) = app.negotiate().await;
    let mut sse = app.sse_raw(&token, &[]).await.expect("sse");
    sse.send_text(MSGPACK_HANDSHAKE.to_owned()).await;
    let reply = sse
        .recv("the handshake reply", &|r| r.get("error").is_some())
        .await;
    assert_eq!(
        reply,
        json!({"error": "Cannot use the 'messagepack' protocol on the current transport. The transport does not support 'Binary' transfer format."})
    );
}

#[actix_web::test]
async fn handshake_versions_zero_to_two_and_names_in_any_case_are_accepted() {
    let app = spawn_app().await;
    for (name, version) in [("json", 0), ("JSON", 1), ("Json", 2)] {
        let mut ws = app.ws_raw("", &[]).await.expect("ws");
        ws.send_text(format!(
            "{{\"protocol\":\"{name}\",\"version\":{version}}}\u{1e}"
        ))
        .await;
        assert_eq!(
            ws.next_record(Duration::from_secs(5)).await,
            Some(json!({})),
            "{name} {version}"
        );
        assert_eq!(
            ws.call("WhoAmI", json!([])).await["transport"],
            "WebSockets"
        );
    }
}

#[actix_web::test]
async fn a_version_zero_connection_id_reaches_its_connection() {
    let app = spawn_app().await;
    let v0 = app.negotiate_raw("", &[]).await.json();
    let id = v0["connectionId"]
        .as_str()
        .expect("connectionId")
        .to_owned();
    // A version-0 client sends its connectionId as the token.
    let mut lp = LpClient::resume(&app, &id, &id);
    lp.start().await;
    assert_eq!(lp.call("WhoAmI", json!([])).await["connectionId"], id);

    let mut other = WsClient::connect(&app).await;
    other.fire("SendTo", json!([id, "hello v0"])).await;
    let got = lp
        .recv_call("ReceiveMessage", &|a| a["text"] == "hello v0")
        .await;
    assert_eq!(got["to"], id);
}

#[actix_web::test]
async fn polls_after_the_final_poll_of_an_ended_connection_get_404() {
    let app = spawn_app().await;
    let mut lp = LpClient::connect(&app).await;
    lp.send(json!({"type": 7})).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let (status, _) = lp.poll().await;
        if status != StatusCode::OK || Instant::now() > deadline {
            break status;
        }
    };
    assert_eq!(status, StatusCode::NO_CONTENT, "the final poll");
    for _ in 0..3 {
        assert_eq!(lp.poll().await.0, StatusCode::NOT_FOUND);
    }
}

#[actix_web::test]
async fn a_stream_id_in_use_is_refused_and_a_canceled_stream_completes() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;
    let start =
        json!({"type": 4, "invocationId": "d", "target": "Counter", "arguments": [1000, 20]});
    ws.send(start.clone()).await;
    ws.recv("a first item", &|r| {
        is_type(r, 2) && r["invocationId"] == "d"
    })
    .await;

    ws.send(start).await;
    let refused = ws.recv("the refusal", &|r| is_completion(r, "d")).await;
    assert_eq!(
        refused,
        json!({"type": 3, "invocationId": "d", "error": "Invocation ID 'd' is already in use."})
    );

    ws.send(json!({"type": 5, "invocationId": "d"})).await;
    let done = ws
        .recv("the canceled stream's completion", &|r| {
            is_completion(r, "d")
        })
        .await;
    assert_eq!(done, json!({"type": 3, "invocationId": "d"}));
}

#[actix_web::test]
async fn hub_errors_are_worded_as_aspnet_and_detailed_only_when_enabled() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;
    let refused = ws.invoke("SetName", json!([""])).await;
    let text = refused["error"].as_str().expect("an error");
    assert!(
        text.starts_with(
            "An unexpected error occurred invoking 'SetName' on the server. HubException: "
        ),
        "{text}"
    );
    let wrong = ws.invoke("WhoAmI", json!([1])).await;
    assert_eq!(
        wrong["error"],
        "Failed to invoke 'WhoAmI' due to an error on the server."
    );

    let detailed = spawn_app_with(|s| s.enable_detailed_errors = true).await;
    let mut ws = WsClient::connect(&detailed).await;
    let wrong = ws.invoke("WhoAmI", json!([1])).await;
    let text = wrong["error"].as_str().expect("an error");
    assert!(
        text.starts_with(
            "Failed to invoke 'WhoAmI' due to an error on the server. InvalidDataException: "
        ),
        "{text}"
    );
}
