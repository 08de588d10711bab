//! Talking HTTP to an instance or the load balancer: one helper per endpoint ([`Api`]),
//! and raw TCP for bytes no HTTP client would send.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use awc::http::header::HeaderMap;
use awc::http::{Method, StatusCode};
use bytes::Bytes;
use serde_json::Value;

use super::records::{parse_records, HUB};
use super::{within, REQUEST_TIMEOUT};

/// Largest body read from a response.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// A finished HTTP exchange.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.text()))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The body's records.
    pub fn records(&self) -> Vec<Value> {
        parse_records(&self.body)
    }
}

/// One base URL (an instance or the load balancer) and a helper per endpoint.
#[derive(Clone)]
pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub(super) client: awc::Client,
}

impl Api {
    /// The endpoints at `base`.
    pub fn new(base: impl Into<String>) -> Self {
        let client = awc::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .disable_redirects()
            .finish();
        Self {
            base: base.into(),
            client,
        }
    }

    /// The absolute URL of `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// Any request; `wait` bounds the whole exchange.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
        wait: Duration,
    ) -> Reply {
        let mut request = self
            .client
            .request(method.clone(), self.url(path_and_query))
            .timeout(wait);
        for &(name, value) in headers {
            request = request.append_header((name, value));
        }
        let body = body.into();
        let what = format!("{method} {}{path_and_query}", self.base);
        let exchange = async {
            let mut response = request
                .send_body(body)
                .await
                .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
            let body = response
                .body()
                .limit(MAX_BODY)
                .await
                .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e}"));
            Reply {
                status: response.status(),
                headers: response.headers().clone(),
                body,
            }
        };
        within(wait + Duration::from_secs(2), &what, exchange).await
    }

    /// `GET path`.
    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.request(
            Method::GET,
            path_and_query,
            &[],
            Bytes::new(),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `POST /chat/negotiate?{query}` as the JS client sends it.
    pub async fn negotiate_raw(&self, query: &str, headers: &[(&str, &str)]) -> Reply {
        let path = if query.is_empty() {
            format!("{HUB}/negotiate")
        } else {
            format!("{HUB}/negotiate?{query}")
        };
        let mut all = vec![("X-Requested-With", "XMLHttpRequest")];
        all.extend_from_slice(headers);
        self.request(Method::POST, &path, &all, Bytes::new(), REQUEST_TIMEOUT)
            .await
    }

    /// A successful version 1 negotiate: `(connectionId, connectionToken)`.
    pub async fn negotiate(&self) -> (String, String) {
        let reply = self.negotiate_raw("negotiateVersion=1", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "negotiate: {}", reply.text());
        let body = reply.json();
        let id = body["connectionId"].as_str().expect("a connectionId");
        let token = body["connectionToken"].as_str().expect("a connectionToken");
        (id.to_owned(), token.to_owned())
    }

    /// A long poll `GET /chat?id=…`; `wait` bounds how long the server may hold it.
    pub async fn poll_with(&self, token: &str, headers: &[(&str, &str)], wait: Duration) -> Reply {
        let path = format!("{HUB}?id={token}&_={}", unique());
        self.request(Method::GET, &path, headers, Bytes::new(), wait)
            .await
    }

    /// A long poll, allowed to be held for up to 30 s.
    pub async fn poll(&self, token: &str) -> Reply {
        self.poll_with(token, &[], Duration::from_secs(30)).await
    }

    /// `POST /chat?id=…` with `body`.
    pub async fn post_with(
        &self,
        token: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut all = vec![("Content-Type", "text/plain;charset=UTF-8")];
        all.extend_from_slice(headers);
        self.request(
            Method::POST,
            &format!("{HUB}?id={token}"),
            &all,
            body,
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `POST /chat?id=…` with `body`.
    pub async fn post(&self, token: &str, body: impl Into<Bytes>) -> Reply {
        self.post_with(token, &[], body).await
    }

    /// `DELETE /chat?id=…`.
    pub async fn delete(&self, token: &str) -> Reply {
        self.request(
            Method::DELETE,
            &format!("{HUB}?id={token}"),
            &[],
            Bytes::new(),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `GET /healthz` of a process that may not listen yet: `None` until it answers 200.
    pub async fn healthz_if_up(&self) -> Option<Value> {
        let mut response = self
            .client
            .get(self.url("/healthz"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .ok()?;
        let body = response.body().await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        serde_json::from_slice(&body).ok()
    }

    /// `GET /healthz`, which must answer 200 with JSON.
    pub async fn healthz(&self) -> Value {
        let reply = self.get("/healthz").await;
        assert_eq!(reply.status, StatusCode::OK, "healthz: {}", reply.text());
        reply.json()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.text()
    }
}

/// A value that differs between calls, like the client's `_=` cache buster.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A real token with one character of its signature changed: it names the same owner
impl Api {
    /// The status every kind of request for `token` gets here: WebSocket (101 if it was
    /// accepted), event stream, long poll, send, delete.
    pub async fn every_kind_status(&self, token: &str) -> Vec<(&'static str, StatusCode)> {
        let ws = match super::ws_status(self.ws_raw(&format!("id={token}"), &[]).await) {
            Ok(()) => StatusCode::SWITCHING_PROTOCOLS,
            Err(status) => status,
        };
        let sse = match self.sse_raw(token, &[]).await {
            Ok(_) => StatusCode::OK,
            Err(reply) => reply.status,
        };
        let ping = super::frame(&serde_json::json!({"type": 6}));
        vec![
            ("websockets", ws),
            ("server_sent_events", sse),
            ("long_polling", self.poll(token).await.status),
            ("send", self.post(token, ping).await.status),
            ("delete", self.delete(token).await.status),
        ]
    }
}

/// and connection, but it no longer verifies.
pub fn tampered(token: &str) -> String {
    let mut tampered = token.to_owned();
    let last = tampered.pop().expect("a non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    tampered
}

/// Sends raw bytes to `127.0.0.1:port` over a plain TCP socket and returns what came
/// back (possibly nothing), for input no HTTP client would produce.
pub async fn raw_tcp(port: u16, bytes: Vec<u8>) -> Vec<u8> {
    let exchange = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .expect("set_read_timeout");
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    });
    within(REQUEST_TIMEOUT * 2, "raw TCP exchange", exchange)
        .await
        .expect("raw TCP task")
}

/// Asserts that response headers allow `origin` with credentials, with each header once.
pub fn assert_cors(what: &str, headers: &awc::http::header::HeaderMap, origin: &str) {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(values("access-control-allow-origin"), [origin], "{what}");
    assert_eq!(
        values("access-control-allow-credentials"),
        ["true"],
        "{what}"
    );
}
