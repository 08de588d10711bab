//! The HTTP surface around the transports: status codes, the instance header, CORS,
//! `/healthz`, the chat page.

use awc::http::{Method, StatusCode};
use bytes::Bytes;
use serde_json::json;

use crate::helpers::metrics::rejections;
use crate::helpers::*;

#[actix_web::test]
async fn methods_the_endpoints_do_not_take_are_405() {
    let app = spawn_app().await;
    let empty = || Bytes::new();
    let timeout = REQUEST_TIMEOUT;

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
    let timeout = REQUEST_TIMEOUT;
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
async fn a_token_that_does_not_verify_gets_404_on_every_transport_and_is_counted_as_bad() {
    let app = spawn_app().await;
    // A token signed with another key: a real one from another instance.
    let other = spawn_app().await;
    let (_, foreign) = other.negotiate().await;
    // A random string, that foreign token, and a real token with its signature changed.
    let (_, real) = app.negotiate().await;
    let bad_token = rejections("bad_token");
    let bad_before = app.metric(&bad_token).await;
    for token in ["forged".to_owned(), foreign, tampered(&real)] {
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
    // Each of the 3 tokens was refused 5 times, counted as a bad token.
    assert_eq!(app.metric(&bad_token).await - bad_before, 15.0);
    // The real token was not disturbed by its tampered copy.
    assert_eq!(app.poll(&real).await.status, StatusCode::OK);
}

#[actix_web::test]
async fn every_response_carries_the_instance_header() {
    let app = spawn_app_with(|s| s.max_message_size = 256).await;
    let timeout = REQUEST_TIMEOUT;
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
async fn the_chat_page_is_served_at_the_root() {
    let app = spawn_app().await;
    let root = app.get("/").await;
    assert_eq!(root.status, StatusCode::OK);
    assert!(root
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    assert!(root.text().contains("<html"), "{}", root.text());
    assert_eq!(app.get("/no/such/page").await.status, StatusCode::NOT_FOUND);
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
            REQUEST_TIMEOUT,
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
            REQUEST_TIMEOUT,
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
            REQUEST_TIMEOUT,
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

    let health = app.healthz().await;
    assert_eq!(
        health,
        json!({"status": "ok", "instance": app.instance, "backplane": "in-process", "connections": 0})
    );

    let _ws = WsClient::connect(&app).await;
    eventually(SETTLE_TIMEOUT, "one connection counted", || async {
        (app.healthz().await["connections"] == 1).then_some(())
    })
    .await;
}

#[actix_web::test]
async fn cors_headers_come_on_polls_sends_deletes_and_event_streams() {
    let origin = "http://example.test";
    let app = spawn_app_with(|s| s.cors_origins = vec![origin.into()]).await;
    let with_origin = [("Origin", origin)];

    let lp = LpClient::negotiate(&app).await;
    let poll = app
        .poll_with(&lp.token, &with_origin, REQUEST_TIMEOUT)
        .await;
    assert_eq!(poll.status, StatusCode::OK);
    assert_cors("poll", &poll.headers, origin);
    let send = app.post_with(&lp.token, &with_origin, HANDSHAKE).await;
    assert_eq!(send.status, StatusCode::OK);
    assert_cors("send", &send.headers, origin);
    let delete = app
        .request(
            Method::DELETE,
            &format!("{HUB}?id={}", lp.token),
            &with_origin,
            Bytes::new(),
            REQUEST_TIMEOUT,
        )
        .await;
    assert_eq!(delete.status, StatusCode::ACCEPTED);
    assert_cors("delete", &delete.headers, origin);

    let (_, token) = app.negotiate().await;
    let sse = app.sse_raw(&token, &with_origin).await.expect("a stream");
    assert_cors("event stream", &sse.headers, origin);

    // The negative control: no Origin, no CORS headers.
    let (_, token) = app.negotiate().await;
    let plain = app.poll(&token).await;
    assert!(plain.header("access-control-allow-origin").is_none());
}

#[actix_web::test]
async fn a_token_its_owner_no_longer_holds_is_404_counted_as_gone() {
    let app = spawn_app().await;
    let lp = LpClient::connect(&app).await;
    let gone = rejections("gone");
    let before = app.metric(&gone).await;
    // The positive control: while held, the same token is served.
    assert_eq!(app.poll(&lp.token).await.status, StatusCode::OK);
    assert_eq!(app.metric(&gone).await, before);

    assert_eq!(app.delete(&lp.token).await.status, StatusCode::ACCEPTED);
    let poll = app.poll(&lp.token).await;

    assert_eq!(poll.status, StatusCode::NOT_FOUND);
    assert_eq!(poll.text(), "No Connection with that ID");
    assert_eq!(app.metric(&gone).await - before, 1.0);
}

#[actix_web::test]
async fn metrics_declares_every_metric_the_readme_lists_and_counts_with_them() {
    use crate::helpers::metrics::{families, DOCUMENTED_FAMILIES};
    let app = spawn_app().await;
    let text = app.metrics().await;
    let declared = families(&text);
    for family in DOCUMENTED_FAMILIES {
        assert!(
            declared.iter().any(|d| d == family),
            "/metrics does not declare {family}:\n{text}"
        );
    }
    // And they count: one WebSocket connection, one negotiation, one message each way.
    let sample = |name: &str| {
        let app = &app;
        let name = name.to_owned();
        async move { app.metric(&name).await }
    };
    let started = "stickless_connections_started_total{transport=\"WebSockets\"}";
    let now = "stickless_connections{transport=\"WebSockets\"}";
    let before = [
        sample(started).await,
        sample("stickless_negotiations_total").await,
        sample("stickless_messages_received_total").await,
        sample("stickless_messages_sent_total").await,
    ];
    let mut ws = WsClient::connect(&app).await;
    ws.call("WhoAmI", json!([])).await;
    let after = [
        sample(started).await,
        sample("stickless_negotiations_total").await,
        sample("stickless_messages_received_total").await,
        sample("stickless_messages_sent_total").await,
    ];
    assert_eq!(after[0] - before[0], 1.0, "connections started");
    assert_eq!(after[1] - before[1], 1.0, "negotiations");
    assert!(after[2] > before[2], "messages received");
    assert!(after[3] > before[3], "messages sent");
    assert_eq!(sample(now).await, 1.0);
    assert_eq!(sample("stickless_backplane_up").await, 1.0);
}
