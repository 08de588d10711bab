//! Server-Sent Events: preamble, `data:` framing, ends of the stream.

use awc::http::StatusCode;
use serde_json::json;

use crate::helpers::*;

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

#[actix_web::test]
async fn closing_the_event_stream_ends_the_connection() {
    let app = spawn_app().await;
    let sse = SseClient::connect(&app).await;
    let token = sse.token.clone();

    drop(sse);

    eventually(SETTLE_TIMEOUT, "the connection to end", || async {
        (app.post(&token, "{\"type\":6}\u{1e}").await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    eventually(SETTLE_TIMEOUT, "no connection left", || async {
        (app.healthz().await["connections"] == 0).then_some(())
    })
    .await;
}
