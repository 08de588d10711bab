//! `POST /chat/negotiate`: versions, transports, errors (signalr-protocol.md, "Negotiate").

use awc::http::{Method, StatusCode};
use bytes::Bytes;
use serde_json::json;

use crate::helpers::*;

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
async fn negotiate_offers_stateful_reconnect_only_when_asked_and_allowed() {
    let app = spawn_app().await;
    let asked = app
        .negotiate_raw("negotiateVersion=1&useStatefulReconnect=true", &[])
        .await
        .json();
    assert!(asked["connectionToken"].is_string(), "{asked}");
    assert_eq!(asked["useStatefulReconnect"], true, "{asked}");
    let unasked = app.negotiate_raw("negotiateVersion=1", &[]).await.json();
    assert!(unasked.get("useStatefulReconnect").is_none(), "{unasked}");
    let forbidden = spawn_app_with(|s| s.allow_stateful_reconnect = false).await;
    let refused = forbidden
        .negotiate_raw("negotiateVersion=1&useStatefulReconnect=true", &[])
        .await
        .json();
    assert!(refused.get("useStatefulReconnect").is_none(), "{refused}");
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
            REQUEST_TIMEOUT,
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
}
