//! The server side of ASP.NET Core's functional tests for the JavaScript client
//! (dotnet/aspnetcore `src/SignalR/clients/ts/FunctionalTests/`), served by stickless, so
//! that suite can be pointed at stickless instead of its ASP.NET test server.
//!
//! ```sh
//! cargo run --example testhub          # LISTEN_ADDR and the other settings apply
//! ```
//!
//! What it serves (the contract of that suite's `Startup.cs` and `TestHub.cs`):
//!
//! | path | what |
//! |---|---|
//! | `/testhub` | the test hub, every transport |
//! | `/testhub-nowebsockets` | the same hub, Server-Sent Events and Long Polling only |
//! | `/testHub` | the same hub again, for the URL `/redirect` hands out (routes here are case-sensitive) |
//! | `/authorizedhub` | a hub for users only: 401 without a token from `/generateJwtToken` |
//! | `GET /generateJwtToken` | a bearer token for user `testuser` |
//! | `GET /redirect` | a negotiate redirect: `{"url": "<baseUrl>/testHub?numRedirects=N"}` |
//! | `/bad-negotiate/negotiate` | 400 with a text body |
//!
//! Negotiate responses set the cookies `testCookie`, `testCookie2` and an expired
//! `expiredCookie`, which `GetCookie` reads back. Detailed errors are on, as in that
//! server. `docs/testhub.md` lists the scenarios that cannot apply to stickless and why.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{HeaderName, HeaderValue, SET_COOKIE};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use clap::Parser;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use stickless::{
    App, ClientStream, Hub, HubBuilder, HubContext, HubError, Settings, TransportKind,
};

/// How long a token from `/generateJwtToken` is good for (ASP.NET's test server: 5 s;
/// longer here so that a slow machine does not fail a long-polling test).
const TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The user every token names.
const TEST_USER: &str = "testuser";
/// The claim type of the user's id in ASP.NET (`ClaimTypes.NameIdentifier`).
const NAME_IDENTIFIER: &str =
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier";

/// Signs the tokens `/generateJwtToken` hands out (a new key per process, as there).
struct TokenKey(Vec<u8>);

impl TokenKey {
    fn random() -> Self {
        Self((0..32).map(|_| rand::random::<u8>()).collect())
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(payload.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// `<user>.<expiry>.<signature>`: not a JWT, which the client never reads; only this
    /// server checks it.
    fn mint(&self) -> String {
        let expires = now_secs() + TOKEN_LIFETIME.as_secs();
        let payload = format!("{TEST_USER}.{expires}");
        format!("{payload}.{}", self.sign(&payload))
    }

    /// The user of a valid, unexpired token.
    fn verify(&self, token: &str) -> Option<String> {
        let (payload, signature) = token.rsplit_once('.')?;
        let (user, expires) = payload.split_once('.')?;
        let fresh = expires.parse::<u64>().ok()? > now_secs();
        let genuine = self.sign(payload) == signature;
        (fresh && genuine).then(|| user.to_owned())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The bearer token of a request: `Authorization: Bearer …`, else `?access_token=…` (which
/// browsers use for WebSockets and Server-Sent Events).
fn bearer(req: &HttpRequest) -> Option<String> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .get(..7)
                .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                .map(|_| value[7..].trim().to_owned())
        });
    header.or_else(|| {
        web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .ok()?
            .into_inner()
            .into_iter()
            .find(|(key, _)| key == "access_token")
            .map(|(_, value)| value)
    })
}

/// `Stream()`'s items.
const STREAM_ITEMS: [&str; 3] = ["a", "b", "c"];

/// Tells the caller `StreamCanceled` when `InfiniteStream` is dropped: the client
/// canceled it (or left), as the ASP.NET hub's cancellation callback does.
struct OnCancel(HubContext);

impl Drop for OnCancel {
    fn drop(&mut self) {
        let ctx = self.0.clone();
        tokio::spawn(async move {
            let _ = ctx.clients().caller().send("StreamCanceled", ()).await;
        });
    }
}

/// The test hub (`TestHub.cs`), under bus name `name`.
fn test_hub(name: &str) -> HubBuilder {
    Hub::builder(name)
        .method(
            "Echo",
            |_ctx: HubContext, (message,): (String,)| async move { Ok::<_, HubError>(message) },
        )
        .method("GetCallerConnectionId", |ctx: HubContext, ()| async move {
            Ok::<_, HubError>(ctx.connection_id.to_string())
        })
        .method("GetNumRedirects", |ctx: HubContext, ()| async move {
            ctx.request
                .query("numRedirects")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| HubError::exception("FormatException", "no numRedirects"))
        })
        .method(
            "ThrowException",
            |_ctx: HubContext, (message,): (String,)| async move {
                Err::<(), _>(HubError::exception("InvalidOperationException", message))
            },
        )
        .method(
            "InvokeWithString",
            |ctx: HubContext, (message,): (String,)| async move {
                ctx.clients().caller().send("Message", (message,)).await?;
                Ok::<_, HubError>(())
            },
        )
        .method(
            "SendCustomObject",
            |ctx: HubContext, (object,): (Value,)| async move {
                ctx.clients()
                    .caller()
                    .send("CustomObject", (object,))
                    .await?;
                Ok::<_, HubError>(())
            },
        )
        .stream("Stream", |_ctx: HubContext, ()| {
            Ok(futures_util::stream::iter(STREAM_ITEMS))
        })
        .stream("InfiniteStream", |ctx: HubContext, ()| {
            let guard = OnCancel(ctx);
            // Never yields; dropping it (a CancelInvocation) runs the guard.
            Ok(futures_util::stream::pending::<String>().map(move |item| {
                let _ = &guard;
                item
            }))
        })
        .method(
            "StreamingConcat",
            |_ctx: HubContext, (mut parts,): (ClientStream<String>,)| async move {
                let mut whole = String::new();
                while let Some(part) = parts.next().await {
                    whole.push_str(&part?);
                }
                Ok::<_, HubError>(whole)
            },
        )
        .stream("EmptyStream", |_ctx: HubContext, ()| {
            Ok(futures_util::stream::empty::<i32>())
        })
        .stream(
            "StreamThrowException",
            |_ctx: HubContext, (message,): (String,)| {
                Err::<futures_util::stream::Empty<i32>, _>(HubError::exception(
                    "InvalidOperationException",
                    message,
                ))
            },
        )
        .method("GetActiveTransportName", |ctx: HubContext, ()| async move {
            Ok::<_, HubError>(ctx.transport.name())
        })
        .method(
            "EchoComplexObject",
            |_ctx: HubContext, (object,): (Value,)| async move { Ok::<_, HubError>(object) },
        )
        .method("SendComplexObject", |_ctx: HubContext, ()| async move {
            // Property names as the test server writes them (no camel-casing). Bytes and
            // the date travel as JSON writes them (base64, ISO 8601), in MessagePack too.
            Ok::<_, HubError>(json!({
                "String": "hello world",
                "IntArray": [1, 2, 3],
                "ByteArray": "AQID",
                "Guid": "00010203-0405-0607-0706-050403020100",
                "DateTime": "2000-01-01T00:00:00Z",
            }))
        })
        .method("GetContentTypeHeader", |ctx: HubContext, ()| async move {
            Ok::<_, HubError>(ctx.request.header("content-type").map(str::to_owned))
        })
        .method(
            "GetCookie",
            |ctx: HubContext, (name,): (String,)| async move {
                Ok::<_, HubError>(ctx.request.cookie(&name).map(str::to_owned))
            },
        )
}

/// The hub for users only (`AuthorizedHub.cs`).
fn authorized_hub() -> HubBuilder {
    Hub::builder("authorizedhub")
        .require_user()
        .method(
            "Echo",
            |_ctx: HubContext, (message,): (String,)| async move { Ok::<_, HubError>(message) },
        )
        .method("GetUserNameIdentifier", |ctx: HubContext, ()| async move {
            Ok::<_, HubError>(ctx.user.unwrap_or_default())
        })
        .method(
            "GetUserClaim",
            |ctx: HubContext, (kind,): (String,)| async move {
                let value = (kind == NAME_IDENTIFIER).then(|| ctx.user.unwrap_or_default());
                Ok::<_, HubError>(value.unwrap_or_default())
            },
        )
}

/// The cookies every negotiate response sets, one of them already expired.
fn negotiate_cookies(req: &HttpRequest) -> Vec<(HeaderName, HeaderValue)> {
    if !req.path().contains("/negotiate") {
        return Vec::new();
    }
    [
        "testCookie=testValue; Path=/",
        "testCookie2=testValue2; Path=/",
        "expiredCookie=doesntmatter; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
    ]
    .into_iter()
    .map(|cookie| (SET_COOKIE, HeaderValue::from_static(cookie)))
    .collect()
}

/// A negotiate redirect to `/testHub`, counting redirects (`GetNumRedirects` reads the
/// count back from the query).
async fn redirect(req: HttpRequest, count: web::Data<AtomicU64>) -> HttpResponse {
    let base = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .ok()
        .and_then(|query| {
            query
                .into_inner()
                .into_iter()
                .find(|(key, _)| key == "baseUrl")
        })
        .map(|(_, url)| url)
        .unwrap_or_default();
    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
    HttpResponse::Ok().json(json!({ "url": format!("{base}/testHub?numRedirects={n}") }))
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let mut settings = Settings::parse();
    settings.enable_detailed_errors = true;
    env_logger::Builder::new()
        .parse_filters(&settings.log_filter)
        .init();
    let listen = settings.listen_addr;
    let key = web::Data::new(TokenKey::random());
    let redirects = web::Data::new(AtomicU64::new(0));
    let users = key.clone();
    let app = App::new(settings)
        .hub("/testhub", test_hub("testhub"))
        .hub(
            "/testhub-nowebsockets",
            test_hub("testhub-nowebsockets")
                .transports(&[TransportKind::ServerSentEvents, TransportKind::LongPolling]),
        )
        .hub("/testHub", test_hub("testhub-redirected"))
        .hub("/authorizedhub", authorized_hub())
        .user_id(move |req| bearer(req).and_then(|token| users.verify(&token)))
        .response_headers(negotiate_cookies)
        .routes(move |cfg| {
            cfg.app_data(key.clone())
                .app_data(redirects.clone())
                .route(
                    "/generateJwtToken",
                    web::get().to(|key: web::Data<TokenKey>| async move { key.mint() }),
                )
                // The client negotiates at `{url}/negotiate`: `/redirect/negotiate?…`.
                .route("/redirect/negotiate", web::to(redirect))
                .route(
                    "/bad-negotiate/negotiate",
                    web::to(|| async {
                        HttpResponse::BadRequest().body("Some response from server")
                    }),
                );
        })
        .build()
        .await?;
    let address = std::net::SocketAddr::new(listen.ip(), app.port());
    println!("stickless listening on http://{address}");
    std::io::stdout().flush()?;
    app.run_until_stopped().await?;
    Ok(())
}
