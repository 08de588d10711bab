//! Test helpers (zero-to-production `tests/api/helpers.rs`): start the real application
//! in-process ([`spawn_app`]) or a real cluster of processes ([`spawn_cluster`]), and talk
//! to them over real sockets with one helper per endpoint ([`Api`]) and three small
//! SignalR clients that speak the JSON hub protocol by hand ([`LpClient`], [`WsClient`],
//! [`SseClient`]).
//!
//! Every wait on the network is bounded by a timeout, so a test fails instead of hanging.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::error::{PayloadError, WsClientError};
use awc::http::header::HeaderMap;
use awc::http::{Method, StatusCode};
use awc::ws;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use stickless::config::Settings;
use stickless::demo;
use stickless::devcluster::{Cluster, ClusterOptions};
use stickless::protocol::token::{ClusterKey, ConnectionId, InstanceId, TokenClaims};
use stickless::startup::AppHandle;

/// The hub's path.
pub const HUB: &str = "/chat";
/// The JSON protocol's record separator.
pub const RS: char = '\u{1e}';
/// The handshake every client sends.
pub const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";
/// Upper bound for one ordinary request/response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a test waits for an expected message by default.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// The long-poll timeout the in-process test apps use, so that idle polls come back soon.
pub const TEST_POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest body read from a response.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Awaits `future` for at most `limit`, failing the test with `what` on timeout.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("not true within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Splits a body of JSON records at the record separator and parses each one.
pub fn parse_records(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("records are UTF-8");
    assert!(
        text.is_empty() || text.ends_with(RS),
        "a batch must hold only whole records: {text:?}"
    );
    text.split(RS)
        .filter(|record| !record.is_empty())
        .map(|record| {
            serde_json::from_str(record)
                .unwrap_or_else(|e| panic!("record {record:?} is not JSON: {e}"))
        })
        .collect()
}

/// A record: the JSON text followed by the separator.
pub fn frame(message: &Value) -> String {
    format!("{message}{RS}")
}

/// Whether `record` is a hub message of type `kind`.
pub fn is_type(record: &Value, kind: u64) -> bool {
    record["type"].as_u64() == Some(kind)
}

/// Whether `record` is an Invocation of `target` (any case) from the server.
pub fn is_call(record: &Value, target: &str) -> bool {
    is_type(record, 1)
        && record["target"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case(target))
}

/// Whether `record` is the Completion of invocation `id`.
pub fn is_completion(record: &Value, id: &str) -> bool {
    is_type(record, 3) && record["invocationId"] == id
}

/// A finished HTTP exchange.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// How long the exchange took.
    pub elapsed: Duration,
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
    client: awc::Client,
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
        let started = Instant::now();
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
                elapsed: started.elapsed(),
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

    /// One sample of `/metrics`, e.g. `stickless_routing_rejections_total{reason="bad_token"}`;
    /// 0 when it is not there (labelled counters appear once they count something).
    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        metric_value(&self.metrics().await, name_with_labels)
    }

    /// Opens a WebSocket to `/chat?{query}` (no SignalR handshake yet).
    pub async fn ws_raw(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, WsClientError> {
        let base = self.base.replacen("http", "ws", 1);
        let url = if query.is_empty() {
            format!("{base}{HUB}")
        } else {
            format!("{base}{HUB}?{query}")
        };
        let mut request = self.client.ws(url).max_frame_size(MAX_BODY);
        for &(name, value) in headers {
            request = request.header(name, value);
        }
        let (_, framed) = within(REQUEST_TIMEOUT, "WebSocket connect", request.connect()).await?;
        Ok(WsClient {
            framed,
            inbox: Inbox::default(),
            connection_id: String::new(),
        })
    }

    /// Opens an event stream `GET /chat?id=…` with `Accept: text/event-stream`.
    /// `Err` carries a refusal (any status but 200).
    pub async fn sse_raw(&self, token: &str, headers: &[(&str, &str)]) -> Result<SseClient, Reply> {
        let mut request = self
            .client
            .get(self.url(&format!("{HUB}?id={token}")))
            .insert_header(("Accept", "text/event-stream"));
        for &(name, value) in headers {
            request = request.append_header((name, value));
        }
        let started = Instant::now();
        let mut response = within(REQUEST_TIMEOUT, "SSE request", request.send())
            .await
            .unwrap_or_else(|e| panic!("SSE request failed: {e}"));
        if response.status() != StatusCode::OK {
            let body = within(REQUEST_TIMEOUT, "SSE refusal body", response.body())
                .await
                .unwrap_or_default();
            return Err(Reply {
                status: response.status(),
                headers: response.headers().clone(),
                body,
                elapsed: started.elapsed(),
            });
        }
        let headers = response.headers().clone();
        let mut client = SseClient {
            api: self.clone(),
            token: token.to_owned(),
            connection_id: String::new(),
            headers,
            stream: Box::pin(response),
            raw: String::new(),
            partial: Vec::new(),
            parsed_up_to: 0,
            inbox: Inbox::default(),
        };
        // The preamble must come at once, before any record exists.
        while client.raw.len() < 3 {
            let chunk = within(Duration::from_secs(5), "SSE preamble", client.stream.next())
                .await
                .expect("the event stream ended before its preamble")
                .expect("the event stream failed");
            client.push_chunk(&chunk);
        }
        Ok(client)
    }
}

/// A value that differs between calls, like the client's `_=` cache buster.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A token that looks right (it names `owner`) but is signed with another key.
pub fn forged_token(owner: &str) -> String {
    ClusterKey::random()
        .mint(&TokenClaims {
            owner: InstanceId::parse(owner).expect("a valid instance id"),
            connection_id: ConnectionId::random(),
            issued_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
        .as_str()
        .to_owned()
}

/// Reads one sample out of a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, name_with_labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == name_with_labels).then(|| value.parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}

/// Reads `/metrics` at `url` and returns one sample (0 when absent).
pub async fn metric(url: &str, name_with_labels: &str) -> f64 {
    Api::new(url).metric(name_with_labels).await
}

/// Sends raw bytes to `127.0.0.1:port` over a plain TCP socket and returns what came
/// back (possibly nothing), for input no HTTP client would produce.
pub async fn raw_tcp(port: u16, bytes: Vec<u8>) -> Vec<u8> {
    let exchange = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("set_read_timeout");
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    });
    within(Duration::from_secs(10), "raw TCP exchange", exchange)
        .await
        .expect("raw TCP task")
}

// ---------------------------------------------------------------------------------------
// The in-process application
// ---------------------------------------------------------------------------------------

/// A running in-process instance.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The bound port.
    pub port: u16,
    /// Stops the instance.
    pub handle: AppHandle,
    /// Its instance id, as `/healthz` reports it.
    pub instance: String,
    /// The endpoints.
    pub api: Api,
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The settings every in-process test app starts from.
pub fn test_settings() -> Settings {
    let mut settings = Settings::for_tests();
    settings.static_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/static"));
    settings.poll_timeout = TEST_POLL_TIMEOUT;
    settings.shutdown_timeout = Duration::from_secs(2);
    settings.workers = Some(2);
    settings
}

/// Starts the chat demo on a free port with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the chat demo with the test settings changed by `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    configure(&mut settings);
    let application = demo::app(settings)
        .build()
        .await
        .expect("the application builds");
    let port = application.port();
    let handle = application.handle();
    actix_web::rt::spawn(application.run_until_stopped());
    let address = format!("http://127.0.0.1:{port}");
    let api = Api::new(address.clone());
    let health = api.healthz().await;
    let instance = health["instance"]
        .as_str()
        .expect("healthz names the instance")
        .to_owned();
    TestApp {
        address,
        port,
        handle,
        instance,
        api,
    }
}

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

/// redis-server, N `stickless` processes and nginx, stopped on drop.
pub struct TestCluster {
    /// The processes.
    pub cluster: Cluster,
    /// The load balancer.
    pub lb: Api,
    /// Each instance, directly.
    pub nodes: Vec<Api>,
    /// Each instance's id.
    pub ids: Vec<String>,
}

/// The long-poll timeout of cluster instances.
pub const CLUSTER_POLL_TIMEOUT: &str = "2s";

/// Starts `instances` instances behind nginx; `configure` adjusts the options (direct
/// routing, extra environment) before the start.
pub async fn spawn_cluster(
    instances: usize,
    configure: impl FnOnce(&mut ClusterOptions) + Send + 'static,
) -> TestCluster {
    let start = move || {
        let mut options = ClusterOptions::new(instances, env!("CARGO_BIN_EXE_stickless"));
        options.nginx_conf = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf"));
        options.static_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/static"));
        options.env = vec![
            ("POLL_TIMEOUT".into(), CLUSTER_POLL_TIMEOUT.into()),
            ("SHUTDOWN_TIMEOUT".into(), "1s".into()),
            ("WORKERS".into(), "2".into()),
        ];
        configure(&mut options);
        Cluster::start(options)
    };
    let cluster = within(
        Duration::from_secs(60),
        "cluster start",
        tokio::task::spawn_blocking(start),
    )
    .await
    .expect("cluster start task")
    .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    let lb = Api::new(cluster.url.clone());
    let nodes = cluster
        .instances
        .iter()
        .map(|i| Api::new(i.url.clone()))
        .collect();
    let ids = cluster.instances.iter().map(|i| i.id.clone()).collect();
    let cluster = TestCluster {
        cluster,
        lb,
        nodes,
        ids,
    };
    wait_until_connected(&cluster).await;
    cluster
}

/// Waits until every instance says `"ok"`: its backplane is connected both ways (the
/// processes answer `/healthz` before that, while `degraded`).
pub async fn wait_until_connected(cluster: &TestCluster) {
    eventually(
        Duration::from_secs(15),
        "every backplane connected",
        || async {
            for node in &cluster.nodes {
                if node.healthz().await["status"] != "ok" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

impl TestCluster {
    /// Stops instance `index` (SIGTERM) and starts it again on the same port. The
    /// instance's [`Api`] is replaced, so no pooled connection to the old process is reused.
    pub fn restart_instance(&mut self, index: usize) {
        self.cluster.stop_instance(index);
        self.cluster
            .start_instance(index)
            .unwrap_or_else(|e| panic!("{} did not restart: {e}", self.ids[index]));
        self.nodes[index] = Api::new(self.cluster.instances[index].url.clone());
    }

    /// The sum of one sample over every instance.
    pub async fn sum_metric(&self, name_with_labels: &str) -> f64 {
        let mut sum = 0.0;
        for node in &self.nodes {
            sum += node.metric(name_with_labels).await;
        }
        sum
    }
}

/// The sum of one sample over every instance of `cluster`.
pub async fn sum_metric(cluster: &TestCluster, name_with_labels: &str) -> f64 {
    cluster.sum_metric(name_with_labels).await
}

// ---------------------------------------------------------------------------------------
// Hub protocol clients
// ---------------------------------------------------------------------------------------

/// Records received and not yet consumed by a test, and the invocation id counter.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Records in arrival order.
    pub records: VecDeque<Value>,
    next_id: u64,
    /// Set when the server ended the connection (204/404 to a poll, a Close frame, the
    /// end of the event stream).
    pub ended: bool,
}

/// What the three transports have in common, seen from a test.
pub trait HubClient {
    /// The public connection id.
    fn connection_id(&self) -> &str;

    /// The unconsumed records.
    fn inbox(&mut self) -> &mut Inbox;

    /// Sends text (one or more whole records) to the server.
    fn send_text<'a>(&'a mut self, text: String) -> LocalBoxFuture<'a, ()>;

    /// Waits up to `wait` for more records and appends them to the inbox; false once the
    /// server has ended the connection.
    fn fetch(&mut self, wait: Duration) -> LocalBoxFuture<'_, bool>;

    /// Sends one hub message.
    fn send<'a>(&'a mut self, message: Value) -> LocalBoxFuture<'a, ()> {
        self.send_text(frame(&message))
    }

    /// A fresh invocation id.
    fn next_id(&mut self) -> String {
        let inbox = self.inbox();
        inbox.next_id += 1;
        inbox.next_id.to_string()
    }

    /// Takes the first record (already received or arriving within `wait`) that `want`
    /// accepts; other records stay in the inbox. Fails the test otherwise.
    fn recv_within<'a>(
        &'a mut self,
        what: &'a str,
        wait: Duration,
        want: &'a dyn Fn(&Value) -> bool,
    ) -> LocalBoxFuture<'a, Value> {
        Box::pin(async move {
            let deadline = Instant::now() + wait;
            loop {
                if let Some(at) = self.inbox().records.iter().position(want) {
                    return self.inbox().records.remove(at).expect("found");
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    panic!(
                        "{what}: nothing matching within {wait:?}; unconsumed: {:?}",
                        self.inbox().records
                    );
                }
                if !self.fetch(left).await {
                    if let Some(at) = self.inbox().records.iter().position(want) {
                        return self.inbox().records.remove(at).expect("found");
                    }
                    panic!(
                        "{what}: the connection ended first; unconsumed: {:?}",
                        self.inbox().records
                    );
                }
            }
        })
    }

    /// The next record, whatever it is, arriving within `wait`; `None` if nothing came or
    /// the connection ended.
    fn next_record(&mut self, wait: Duration) -> LocalBoxFuture<'_, Option<Value>> {
        Box::pin(async move {
            let deadline = Instant::now() + wait;
            loop {
                if let Some(record) = self.inbox().records.pop_front() {
                    return Some(record);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !self.fetch(left).await {
                    return None;
                }
            }
        })
    }

    /// [`HubClient::recv_within`] with the default timeout.
    fn recv<'a>(
        &'a mut self,
        what: &'a str,
        want: &'a dyn Fn(&Value) -> bool,
    ) -> LocalBoxFuture<'a, Value> {
        self.recv_within(what, RECV_TIMEOUT, want)
    }

    /// Calls `target` and returns its Completion.
    fn invoke<'a>(&'a mut self, target: &'a str, arguments: Value) -> LocalBoxFuture<'a, Value> {
        Box::pin(async move {
            let id = self.next_id();
            self.send(json!({
                "type": 1, "invocationId": id, "target": target, "arguments": arguments
            }))
            .await;
            let what = format!("the completion of {target} #{id}");
            self.recv(&what, &|r| is_completion(r, &id)).await
        })
    }

    /// Calls `target` and returns its `result`, failing on an error completion.
    fn call<'a>(&'a mut self, target: &'a str, arguments: Value) -> LocalBoxFuture<'a, Value> {
        Box::pin(async move {
            let completion = self.invoke(target, arguments).await;
            assert!(
                completion.get("error").is_none(),
                "{target} failed: {completion}"
            );
            completion.get("result").cloned().unwrap_or(Value::Null)
        })
    }

    /// A non-blocking invocation (no id, no reply).
    fn fire<'a>(&'a mut self, target: &'a str, arguments: Value) -> LocalBoxFuture<'a, ()> {
        self.send(json!({ "type": 1, "target": target, "arguments": arguments }))
    }

    /// Waits for a server call of `target` whose first argument satisfies `want`.
    fn recv_call<'a>(
        &'a mut self,
        target: &'a str,
        want: &'a dyn Fn(&Value) -> bool,
    ) -> LocalBoxFuture<'a, Value> {
        Box::pin(async move {
            let what = format!("a call of {target}");
            let record = self
                .recv(&what, &|r| is_call(r, target) && want(&r["arguments"][0]))
                .await;
            record["arguments"][0].clone()
        })
    }

    /// Waits for the server call `Send(marker)` and returns (consuming) every record that
    /// arrived before it: with one sender's order kept, this shows what did *not* arrive.
    fn records_before_marker<'a>(&'a mut self, marker: &'a str) -> LocalBoxFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let deadline = Instant::now() + RECV_TIMEOUT;
            let want = |r: &Value| is_call(r, "Send") && r["arguments"][0] == marker;
            loop {
                if let Some(at) = self.inbox().records.iter().position(want) {
                    let before: Vec<Value> = self.inbox().records.drain(..at).collect();
                    self.inbox().records.pop_front();
                    return before;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !self.fetch(left).await {
                    panic!(
                        "the marker {marker} did not arrive; unconsumed: {:?}",
                        self.inbox().records
                    );
                }
            }
        })
    }
}

/// A Long Polling client.
pub struct LpClient {
    /// Where polls, sends and deletes go (may differ from where it negotiated).
    pub api: Api,
    /// The connection token.
    pub token: String,
    /// The public connection id.
    pub connection_id: String,
    /// Headers sent with every poll and send (e.g. `Authorization`).
    pub headers: Vec<(String, String)>,
    /// How long a poll may be held by the server.
    pub poll_wait: Duration,
    inbox: Inbox,
}

impl LpClient {
    /// Negotiates on `api` without starting the transport.
    pub async fn negotiate(api: &Api) -> Self {
        let (connection_id, token) = api.negotiate().await;
        Self {
            api: api.clone(),
            token,
            connection_id,
            headers: Vec::new(),
            poll_wait: Duration::from_secs(30),
            inbox: Inbox::default(),
        }
    }

    /// A client for a connection that is already started (handshake done).
    pub fn resume(api: &Api, connection_id: &str, token: &str) -> Self {
        Self {
            api: api.clone(),
            token: token.to_owned(),
            connection_id: connection_id.to_owned(),
            headers: Vec::new(),
            poll_wait: Duration::from_secs(30),
            inbox: Inbox::default(),
        }
    }

    /// Negotiates and starts on `api`.
    pub async fn connect(api: &Api) -> Self {
        let mut client = Self::negotiate(api).await;
        client.start().await;
        client
    }

    /// Negotiates on `api` and starts with `headers` on every request.
    pub async fn connect_with_headers(api: &Api, headers: &[(&str, &str)]) -> Self {
        let mut client = Self::negotiate(api).await;
        client.headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        client.start().await;
        client
    }

    fn header_pairs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// First poll (answered at once, empty), then the handshake and its `{}` reply.
    pub async fn start(&mut self) {
        let first = self.poll_reply().await;
        assert_eq!(first.status, StatusCode::OK, "first poll: {}", first.text());
        assert!(
            first.body.is_empty(),
            "the first poll is empty: {:?}",
            first.text()
        );
        assert!(
            first.elapsed < Duration::from_secs(1),
            "the first poll is answered at once, not after {:?}",
            first.elapsed
        );
        let sent = self.post(HANDSHAKE).await;
        assert_eq!(
            sent.status,
            StatusCode::OK,
            "handshake POST: {}",
            sent.text()
        );
        let reply = self
            .recv("the handshake reply", &|r| {
                r.as_object().is_some_and(|o| o.is_empty())
            })
            .await;
        assert_eq!(reply, json!({}));
    }

    /// One poll, as a raw reply.
    pub async fn poll_reply(&self) -> Reply {
        self.api
            .poll_with(&self.token, &self.header_pairs(), self.poll_wait)
            .await
    }

    /// One poll: its status and records.
    pub async fn poll(&self) -> (StatusCode, Vec<Value>) {
        let reply = self.poll_reply().await;
        let records = if reply.status == StatusCode::OK {
            reply.records()
        } else {
            Vec::new()
        };
        (reply.status, records)
    }

    /// POSTs raw text.
    pub async fn post(&self, body: impl Into<Bytes>) -> Reply {
        self.api
            .post_with(&self.token, &self.header_pairs(), body)
            .await
    }
}

impl HubClient for LpClient {
    fn connection_id(&self) -> &str {
        &self.connection_id
    }

    fn inbox(&mut self) -> &mut Inbox {
        &mut self.inbox
    }

    fn send_text<'a>(&'a mut self, text: String) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let reply = self.post(text).await;
            assert_eq!(reply.status, StatusCode::OK, "send: {}", reply.text());
        })
    }

    /// One poll; the server holds it for up to its `POLL_TIMEOUT`, whatever `wait` says.
    fn fetch(&mut self, _wait: Duration) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move {
            if self.inbox.ended {
                return false;
            }
            let (status, records) = self.poll().await;
            match status {
                StatusCode::OK => {
                    self.inbox.records.extend(records);
                    true
                }
                StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => {
                    self.inbox.ended = true;
                    false
                }
                other => panic!("a poll got {other}"),
            }
        })
    }
}

/// The WebSocket type awc gives.
pub type WsFramed = Framed<awc::BoxedSocket, ws::Codec>;

/// A WebSocket client.
pub struct WsClient {
    /// The socket.
    pub framed: WsFramed,
    /// The public connection id, once known.
    pub connection_id: String,
    inbox: Inbox,
}

/// What a WebSocket read gave.
#[derive(Debug)]
pub enum WsEvent {
    /// Records from one text frame.
    Records(Vec<Value>),
    /// A binary frame (the JSON protocol must never send one).
    Binary(Bytes),
    /// The server's close frame.
    Closed(Option<ws::CloseReason>),
    /// The socket ended without a close frame, or failed.
    Gone,
    /// Nothing within the wait.
    Nothing,
}

impl WsClient {
    /// Negotiates on `api` and connects and handshakes there.
    pub async fn connect(api: &Api) -> Self {
        Self::connect_via(api, api, &[]).await
    }

    /// Negotiates on `negotiate_on` and opens the socket to `socket_to`.
    pub async fn connect_via(
        negotiate_on: &Api,
        socket_to: &Api,
        headers: &[(&str, &str)],
    ) -> Self {
        let (id, token) = negotiate_on.negotiate().await;
        let mut client = socket_to
            .ws_raw(&format!("id={token}"), headers)
            .await
            .unwrap_or_else(|e| panic!("WebSocket connect: {e:?}"));
        client.connection_id = id;
        client.handshake().await;
        client
    }

    /// Sends the handshake and expects `{}`.
    pub async fn handshake(&mut self) {
        self.send_text(HANDSHAKE.to_owned()).await;
        let reply = self
            .recv("the handshake reply", &|r| {
                r.as_object().is_some_and(|o| o.is_empty())
            })
            .await;
        assert_eq!(reply, json!({}));
    }

    /// Sends one frame.
    pub async fn send_message(&mut self, message: ws::Message) {
        within(REQUEST_TIMEOUT, "WebSocket send", self.framed.send(message))
            .await
            .unwrap_or_else(|e| panic!("WebSocket send failed: {e}"));
    }

    /// Like [`WsClient::send_message`], but a failure (the server already closed) is fine.
    pub async fn try_send_message(&mut self, message: ws::Message) -> bool {
        matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, self.framed.send(message)).await,
            Ok(Ok(()))
        )
    }

    /// Reads the next meaningful frame (answering pings), waiting up to `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> WsEvent {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, self.framed.next()).await {
                Err(_) => return WsEvent::Nothing,
                Ok(None) | Ok(Some(Err(_))) => return WsEvent::Gone,
                Ok(Some(Ok(frame))) => frame,
            };
            match frame {
                ws::Frame::Text(bytes) => return WsEvent::Records(parse_records(&bytes)),
                ws::Frame::Binary(bytes) => return WsEvent::Binary(bytes),
                ws::Frame::Close(reason) => return WsEvent::Closed(reason),
                ws::Frame::Ping(bytes) => {
                    let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                }
                ws::Frame::Pong(_) | ws::Frame::Continuation(_) => {}
            }
        }
    }

    /// Reads until the server closes the socket; returns the close frame, or `None` if
    /// the socket just ended. Records read meanwhile go to the inbox.
    pub async fn wait_closed(&mut self, wait: Duration) -> Option<ws::CloseReason> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the server did not close within {wait:?}");
            match self.next_event(left).await {
                WsEvent::Records(records) => self.inbox.records.extend(records),
                WsEvent::Binary(bytes) => panic!("a binary frame: {bytes:?}"),
                WsEvent::Closed(reason) => {
                    self.inbox.ended = true;
                    return reason;
                }
                WsEvent::Gone => {
                    self.inbox.ended = true;
                    return None;
                }
                WsEvent::Nothing => {}
            }
        }
    }
}

impl HubClient for WsClient {
    fn connection_id(&self) -> &str {
        &self.connection_id
    }

    fn inbox(&mut self) -> &mut Inbox {
        &mut self.inbox
    }

    fn send_text<'a>(&'a mut self, text: String) -> LocalBoxFuture<'a, ()> {
        Box::pin(self.send_message(ws::Message::Text(text.into())))
    }

    fn fetch(&mut self, wait: Duration) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move {
            if self.inbox.ended {
                return false;
            }
            match self.next_event(wait).await {
                WsEvent::Records(records) => {
                    self.inbox.records.extend(records);
                    true
                }
                WsEvent::Binary(bytes) => panic!("the JSON protocol got a binary frame: {bytes:?}"),
                WsEvent::Closed(_) | WsEvent::Gone => {
                    self.inbox.ended = true;
                    false
                }
                WsEvent::Nothing => true,
            }
        })
    }
}

type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// A Server-Sent Events client: a streamed GET down, POSTs up.
pub struct SseClient {
    /// Where sends go.
    pub api: Api,
    /// The connection token.
    pub token: String,
    /// The public connection id, once known.
    pub connection_id: String,
    /// The response headers of the stream.
    pub headers: HeaderMap,
    stream: BodyStream,
    /// Everything received so far, verbatim.
    pub raw: String,
    partial: Vec<u8>,
    parsed_up_to: usize,
    inbox: Inbox,
}

impl SseClient {
    /// Negotiates on `api`, opens the stream there, and handshakes.
    pub async fn connect(api: &Api) -> Self {
        Self::connect_via(api, api).await
    }

    /// Negotiates on `negotiate_on` and opens the stream (and sends) to `stream_to`.
    pub async fn connect_via(negotiate_on: &Api, stream_to: &Api) -> Self {
        let (id, token) = negotiate_on.negotiate().await;
        let mut client = stream_to
            .sse_raw(&token, &[])
            .await
            .unwrap_or_else(|refusal| panic!("SSE refused: {refusal:?}"));
        client.connection_id = id;
        client.handshake().await;
        client
    }

    /// POSTs the handshake and expects `{}` on the stream.
    pub async fn handshake(&mut self) {
        self.send_text(HANDSHAKE.to_owned()).await;
        let reply = self
            .recv("the handshake reply", &|r| {
                r.as_object().is_some_and(|o| o.is_empty())
            })
            .await;
        assert_eq!(reply, json!({}));
    }

    /// Appends received bytes to [`SseClient::raw`]; a character split between two
    /// chunks waits for the rest of its bytes.
    fn push_chunk(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&self.partial) {
            Ok(text) => text.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(error) => panic!("the event stream is not UTF-8: {error}"),
        };
        let text = String::from_utf8(self.partial.drain(..valid).collect()).expect("checked");
        self.raw.push_str(&text);
    }

    /// Parses every complete event received so far into records.
    fn parse_events(&mut self) {
        while let Some(end) = self.raw[self.parsed_up_to..].find("\r\n\r\n") {
            let event = &self.raw[self.parsed_up_to..self.parsed_up_to + end];
            self.parsed_up_to += end + 4;
            let mut data = Vec::new();
            for line in event.split("\r\n") {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let payload = line
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("an SSE line that is not `data: `: {line:?}"));
                data.push(payload);
            }
            let records = parse_records(data.join("\n").as_bytes());
            self.inbox.records.extend(records);
        }
        // The preamble `:\r\n` is a comment line with no blank line after it.
        if self.raw[self.parsed_up_to..].starts_with(":\r\n") {
            self.parsed_up_to += 3;
        }
    }
}

impl HubClient for SseClient {
    fn connection_id(&self) -> &str {
        &self.connection_id
    }

    fn inbox(&mut self) -> &mut Inbox {
        &mut self.inbox
    }

    fn send_text<'a>(&'a mut self, text: String) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let reply = self.api.post(&self.token, text).await;
            assert_eq!(reply.status, StatusCode::OK, "send: {}", reply.text());
        })
    }

    fn fetch(&mut self, wait: Duration) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move {
            self.parse_events();
            if self.inbox.ended {
                return false;
            }
            match tokio::time::timeout(wait, self.stream.next()).await {
                Err(_) => true,
                Ok(Some(Ok(chunk))) => {
                    self.push_chunk(&chunk);
                    self.parse_events();
                    true
                }
                Ok(Some(Err(_))) | Ok(None) => {
                    self.inbox.ended = true;
                    false
                }
            }
        })
    }
}
