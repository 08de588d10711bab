//! Malformed input of every kind gets the protocol's answer (asserted reply by reply) and
//! never disturbs other connections.

use std::fmt::Write as _;

use awc::http::Method;
use awc::ws;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::helpers::*;

/// Records, short enough to read in a failure message.
fn show(records: &[Value]) -> String {
    let text = serde_json::to_string(records).unwrap_or_default();
    if text.len() > 160 {
        format!("{}…", &text[..160])
    } else {
        text
    }
}

/// The invocation sent after a malformed record to see whether the connection lives on.
fn probe() -> String {
    frame(&json!({"type": 1, "invocationId": "probe", "target": "WhoAmI", "arguments": []}))
}

/// Opens a socket (handshaken or not), sends `payload` (then, if handshaken, a probe
/// invocation) and describes what came back: `alive` when the probe was answered,
/// `closed <code>` when the socket was closed, with the records received before.
async fn ws_outcome(app: &TestApp, handshake: bool, payload: ws::Message) -> String {
    let mut ws = app.ws_raw("", &[]).await.expect("the upgrade");
    if handshake {
        ws.handshake().await;
    }
    let sent = ws.try_send_message(payload).await
        && (!handshake || ws.try_send_message(ws::Message::Text(probe().into())).await);
    let mut seen = Vec::new();
    loop {
        match ws.next_event(RECV_TIMEOUT).await {
            WsEvent::Records(records) => {
                for record in records {
                    if is_completion(&record, "probe") {
                        return format!("alive {}", show(&seen));
                    }
                    // Other sockets of this test coming and going are announced to all.
                    if !is_call(&record, "Presence") {
                        seen.push(record);
                    }
                }
            }
            WsEvent::Closed(reason) => {
                let code = reason.map(|r| u16::from(r.code)).unwrap_or(0);
                return format!("closed {code} {}", show(&seen));
            }
            WsEvent::Gone => return format!("gone {} (sent: {sent})", show(&seen)),
            WsEvent::Binary(bytes) => panic!("a binary frame: {bytes:?}"),
            WsEvent::Nothing => panic!("no answer within {RECV_TIMEOUT:?}: {}", show(&seen)),
        }
    }
}

/// Sends `body` as one POST on a started long-polling connection, then a probe, and
/// describes the POST's status and what the polls brought (`alive` or `ended <status>`).
async fn lp_outcome(app: &TestApp, started: bool, body: Bytes) -> String {
    let mut client = LpClient::negotiate(app).await;
    let (first, _) = client.poll().await;
    assert_eq!(first, awc::http::StatusCode::OK);
    if started {
        client.handshake().await;
    }
    let post = client.post(body).await;
    let mut out = format!("POST {} {:?} → ", post.status.as_u16(), post.text());
    if started {
        client.post(probe()).await;
    }
    let mut seen = Vec::new();
    loop {
        let (status, records) = client.poll().await;
        for record in records {
            if is_completion(&record, "probe") {
                let _ = write!(out, "alive {}", show(&seen));
                return out;
            }
            if !is_call(&record, "Presence") {
                seen.push(record);
            }
        }
        if status != awc::http::StatusCode::OK {
            let _ = write!(out, "ended {} {}", status.as_u16(), show(&seen));
            return out;
        }
    }
}

/// The first line of a raw HTTP answer, or what happened instead.
fn status_line(answer: &[u8]) -> String {
    if answer.is_empty() {
        return "(closed without an answer)".into();
    }
    String::from_utf8_lossy(answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Compares every outcome with its expectation and fails listing all differences.
fn check(outcomes: &[(String, String)], expected: &[&str]) {
    let mut differences = String::new();
    for (index, (case, outcome)) in outcomes.iter().enumerate() {
        let want = expected.get(index).copied().unwrap_or("(no expectation)");
        if outcome != want {
            let _ = writeln!(
                differences,
                "#{index} {case}\n   got:  {outcome}\n   want: {want}"
            );
        }
    }
    if expected.len() != outcomes.len() {
        let _ = writeln!(
            differences,
            "{} outcomes, {} expectations",
            outcomes.len(),
            expected.len()
        );
    }
    if !differences.is_empty() {
        let all: String = outcomes
            .iter()
            .map(|(_, o)| format!("        {o:?},\n"))
            .collect();
        panic!("{differences}\nall outcomes:\n{all}");
    }
}

fn malformed_texts() -> Vec<String> {
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    vec![
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
        deep,
    ]
}

#[actix_web::test]
async fn malformed_websocket_frames_get_the_protocols_answer_one_by_one() {
    let app = spawn_app_with(|s| s.max_message_size = 4096).await;
    let mut survivor = WsClient::connect(&app).await;
    let mut outcomes = Vec::new();
    for text in malformed_texts() {
        let record = format!("{text}{RS}");
        let case = format!("{:.60}", record);
        for handshake in [true, false] {
            let outcome =
                ws_outcome(&app, handshake, ws::Message::Text(record.clone().into())).await;
            outcomes.push((format!("text {case} (handshake {handshake})"), outcome));
        }
    }
    for junk in [
        vec![0xff, 0xfe, 0x00, 0x1e],
        vec![0xc3, 0x28, 0x1e],
        vec![0x1e; 1000],
        vec![0u8; 100_000],
    ] {
        for handshake in [true, false] {
            let outcome = ws_outcome(
                &app,
                handshake,
                ws::Message::Binary(Bytes::from(junk.clone())),
            )
            .await;
            outcomes.push((
                format!("binary {:?}… (handshake {handshake})", &junk[..3]),
                outcome,
            ));
        }
    }
    for (what, message) in [
        (
            "1 MiB without a separator",
            ws::Message::Text("x".repeat(1 << 20).into()),
        ),
        (
            "a ping frame",
            ws::Message::Ping(Bytes::from_static(b"ping")),
        ),
        ("a close frame", ws::Message::Close(None)),
    ] {
        outcomes.push((what.to_owned(), ws_outcome(&app, true, message).await));
    }
    check(&outcomes, WS_EXPECTED);

    // The connection opened before the barrage still works.
    assert_eq!(
        survivor.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
}

#[actix_web::test]
async fn malformed_long_polling_sends_get_the_protocols_answer_one_by_one() {
    let app = spawn_app_with(|s| {
        s.max_message_size = 4096;
        s.handshake_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let mut survivor = LpClient::connect(&app).await;
    let mut outcomes = Vec::new();
    for text in malformed_texts() {
        let case = format!("{text:.60}");
        for started in [true, false] {
            let outcome = lp_outcome(&app, started, Bytes::from(format!("{text}{RS}"))).await;
            outcomes.push((format!("{case} (started {started})"), outcome));
        }
    }
    let outcome = lp_outcome(&app, true, Bytes::from_static(&[0xff, 0xfe, 0x1e])).await;
    outcomes.push(("invalid UTF-8".into(), outcome));
    // A send to a connection that never started its transport.
    let (_, unstarted) = app.negotiate().await;
    let reply = app.post(&unstarted, "garbage\u{1e}").await;
    outcomes.push((
        "a send before the first poll".into(),
        format!("POST {} {:?}", reply.status.as_u16(), reply.text()),
    ));
    check(&outcomes, LP_EXPECTED);

    assert_eq!(
        survivor.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );
}

#[actix_web::test]
async fn odd_queries_and_raw_bytes_get_http_errors_and_the_server_stays_up() {
    let app = spawn_app().await;
    let mut survivor = WsClient::connect(&app).await;
    let mut outcomes = Vec::new();

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
            let reply = app
                .request(method.clone(), &path, &[], Bytes::new(), REQUEST_TIMEOUT)
                .await;
            outcomes.push((
                format!("{method} {path:.60}"),
                format!("{} {:.60}", reply.status.as_u16(), reply.text()),
            ));
        }
    }
    for query in [
        "negotiateVersion=99999999999999999999999",
        "negotiateVersion=1&negotiateVersion=2",
    ] {
        let reply = app.negotiate_raw(query, &[]).await;
        let body = reply.json();
        let shape = if body.get("error").is_some() {
            format!("error {}", body["error"])
        } else {
            format!("version {}", body["negotiateVersion"])
        };
        outcomes.push((
            format!("negotiate {query}"),
            format!("{} {shape}", reply.status.as_u16()),
        ));
    }

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
        let case = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        outcomes.push((case, status_line(&raw_tcp(app.port, bytes).await)));
    }
    check(&outcomes, HTTP_EXPECTED);

    assert_eq!(app.healthz().await["status"], "ok");
    let mut fresh = WsClient::connect(&app).await;
    survivor.fire("Send", json!(["after the barrage"])).await;
    fresh.recv_call("Send", &|a| a == "after the barrage").await;
}

/// What each malformed WebSocket frame gets, in the order sent. Detailed errors are off, so
/// every text is ASP.NET's without the cause ("Connection closed with an error.", "An
/// unexpected error occurred during connection handshake."): the cause stays in the log.
const WS_EXPECTED: &[&str] = &[
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive [{\"error\":\"Failed to invoke 'Send' due to an error on the server.\",\"invocationId\":\"x\",\"type\":3}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive [{\"error\":\"Unknown hub method ''\",\"invocationId\":\"\",\"type\":3}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive [{\"error\":\"Failed to invoke 'Counter' due to an error on the server.\",\"invocationId\":\"s\",\"type\":3}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive [{\"error\":\"Failed to invoke 'Counter' due to an error on the server.\",\"invocationId\":\"s\",\"type\":3}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive []",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive []",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "alive []",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1009 []",
        "closed 1009 []",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1000 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "closed 1000 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "closed 1009 []",
        "closed 1009 []",
        "closed 1009 []",
        "alive []",
        "closed 1000 []",
];

/// What each malformed long-polling send gets, in the order sent (texts without the cause,
/// as above).
const LP_EXPECTED: &[&str] = &[
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive [{\"error\":\"Failed to invoke 'Send' due to an error on the server.\",\"invocationId\":\"x\",\"type\":3}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive [{\"error\":\"Unknown hub method ''\",\"invocationId\":\"\",\"type\":3}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive [{\"error\":\"Failed to invoke 'Counter' due to an error on the server.\",\"invocationId\":\"s\",\"type\":3}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive [{\"error\":\"Failed to invoke 'Counter' due to an error on the server.\",\"invocationId\":\"s\",\"type\":3}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive []",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive []",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → alive []",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"An unexpected error occurred during connection handshake.\"}]",
        "POST 413 \"Request body too large: the limit is 32768 bytes\" → alive []",
        "POST 413 \"Request body too large: the limit is 32768 bytes\" → ended 204 [{\"error\":\"Handshake was canceled.\"}]",
        "POST 200 \"\" → ended 204 [{\"error\":\"Connection closed with an error.\",\"type\":7}]",
        "POST 200 \"\"",
];

/// What each odd request gets, in the order sent.
const HTTP_EXPECTED: &[&str] = &[
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "400 Connection ID required",
    "400 Connection ID required",
    "400 Connection ID required",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "404 No Connection with that ID",
    "200 error \"The client requested an invalid protocol version '99999999999999999999999'\"",
    "200 version 1",
    "HTTP/1.1 400 Bad Request",
    "HTTP/1.1 400 Bad Request",
    "HTTP/1.1 400 Bad Request",
    "HTTP/1.1 200 OK",
    "HTTP/1.1 404 Not Found",
    "HTTP/1.1 400 Bad Request",
    "HTTP/1.1 404 Not Found",
    "HTTP/1.1 400 WebSocket version header is required",
    "HTTP/1.1 200 OK",
    "HTTP/1.1 400 Bad Request",
];
