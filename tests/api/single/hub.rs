//! The JSON hub protocol through the chat hub: invocations, completions, streams, batching.

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

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
    // Records are handled in order: once this completes, the cancel has been handled.
    ws.call("WhoAmI", json!([])).await;
    ws.inbox().records.clear();
    // The window: a second stream with the same pace, seen to its end (the positive
    // control). The cancelled stream would have sent items meanwhile.
    ws.send(json!({"type": 4, "invocationId": "w", "target": "Counter", "arguments": [5, 20]}))
        .await;
    ws.recv("the window's end", &|r| is_completion(r, "w"))
        .await;

    let late: Vec<Value> = ws.inbox().records.drain(..).collect();
    let window = late
        .iter()
        .filter(|r| is_type(r, 2) && r["invocationId"] == "w")
        .count();
    assert_eq!(window, 5, "{late:?}");
    assert!(
        late.iter().all(|r| r["invocationId"] != "c"),
        "items kept coming after the cancel: {late:?}"
    );
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

#[actix_web::test]
async fn counter_takes_at_most_1000_items_and_10000_ms_between_them() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app).await;
    // A HubError::new text reaches the caller as ASP.NET words a HubException's.
    let limits = "An unexpected error occurred invoking 'Counter' on the server. \
                  HubException: Counter takes at most 1000 items and 10000 ms between them.";

    for (id, arguments) in [
        ("over-count", json!([1001, 0])),
        ("over-delay", json!([1, 10_001])),
    ] {
        ws.send(
            json!({"type": 4, "invocationId": id, "target": "Counter", "arguments": arguments}),
        )
        .await;
        let completion = ws.recv("the refusal", &|r| is_completion(r, id)).await;
        assert_eq!(completion["error"], limits, "{completion}");
    }
    // At the limits, the stream runs (one item, with the longest delay unused).
    ws.send(json!({"type": 4, "invocationId": "max", "target": "Counter", "arguments": [1000, 0]}))
        .await;
    let mut items = 0;
    loop {
        let record = ws.recv("the stream", &|r| r["invocationId"] == "max").await;
        if is_type(&record, 3) {
            assert!(record.get("error").is_none(), "{record}");
            break;
        }
        items += 1;
    }
    assert_eq!(items, 1000);
    ws.send(
        json!({"type": 4, "invocationId": "slow", "target": "Counter", "arguments": [1, 10_000]}),
    )
    .await;
    let first = ws
        .recv("the only item", &|r| r["invocationId"] == "slow")
        .await;
    assert_eq!(first, json!({"type": 2, "invocationId": "slow", "item": 0}));
}

#[actix_web::test]
async fn room_notices_reach_the_rooms_members_and_nobody_else() {
    let app = spawn_app().await;
    let mut member = WsClient::connect(&app).await;
    let mut outsider = WsClient::connect(&app).await;
    let mut newcomer = LpClient::connect(&app).await;
    assert_eq!(member.call("JoinRoom", json!(["blue"])).await, "blue");

    assert_eq!(newcomer.call("JoinRoom", json!(["blue"])).await, "blue");
    assert_eq!(newcomer.call("LeaveRoom", json!(["blue"])).await, "blue");
    // The marker, to everyone, after the notices: one sender keeps its order.
    newcomer
        .fire("Send", json!(["after the room notices"]))
        .await;

    let id = newcomer.connection_id.clone();
    let seen = member.records_before_marker("after the room notices").await;
    let notices: Vec<&serde_json::Value> = seen
        .iter()
        .filter(|r| is_call(r, "Presence") && r["arguments"][0]["connectionId"] == id.as_str())
        .filter(|r| r["arguments"][0]["room"] == "blue")
        .collect();
    let kinds: Vec<&serde_json::Value> =
        notices.iter().map(|r| &r["arguments"][0]["kind"]).collect();
    assert_eq!(
        kinds,
        [&json!("joinedRoom"), &json!("leftRoom")],
        "{seen:?}"
    );
    let seen = outsider
        .records_before_marker("after the room notices")
        .await;
    assert!(
        seen.iter().all(|r| r["arguments"][0]["room"] != "blue"),
        "a non-member got a room notice: {seen:?}"
    );
}
