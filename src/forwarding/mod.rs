//! Forwarding: moves a request to another instance and its answer back — over awc
//! (DESIGN.md, "Layers"; modelled on actix/examples `http-proxy`) or over the bus
//! ([`relay`]).
//!
//! [`crate::routing`] decides *where*; this module only carries bytes, trying the owner's
//! direct URL once, then the bus once, then the load balancer up to the attempt budget,
//! until the owner answers. Every request it sends carries the signed probe marker, so
//! the receiving instance serves or 404s it but never forwards it again. A 404 from the
//! owner itself (direct, over the bus, or recognised by its `X-Stickless-Instance` through
//! the balancer) is final: the connection is gone, and no more attempts are spent.
//!
//! - HTTP bodies are already buffered (within the body limit) so they can be replayed;
//!   responses are buffered too, except event streams, which are relayed as they come.
//! - Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions.
//! - WebSockets: the upstream socket is opened first, so a 404 upstream becomes a 404 to
//!   the client instead of an accepted-then-closed socket; then frames flow both ways,
//!   close codes and reasons pass through, and either side closing closes both.

pub mod frame;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use awc::error::WsClientError;
use awc::ws::{Frame as WsFrame, Message};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{FutureExt, SinkExt, StreamExt};

use crate::metrics::{ForwardOutcome, Metrics};
use crate::protocol::token::ClusterKey;
use crate::routing::{ForwardPlan, RequestKind, PROBE_HEADER};
use crate::startup::INSTANCE_HEADER;
use frame::{Frame, Open};
use relay::{Exchange, Opened, Relay};

/// Time to open a TCP connection to an instance or the load balancer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for an answer to a send, a delete or the start of an event stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time a forwarded long poll gets beyond the poll timeout.
pub const POLL_GRACE: Duration = Duration::from_secs(15);
/// Largest forwarded response read into memory (a poll batch is far smaller).
const MAX_RESPONSE_BODY: usize = 8 * 1024 * 1024;
/// Tells how many attempts a forwarded response took.
pub const ATTEMPTS_HEADER: &str = "x-stickless-forward-attempts";
/// The longest pause before a retry through the balancer (see [`retry_pause`]).
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(8);
/// The pause window grows by this much per repeated miss, up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE_STEP: Duration = Duration::from_millis(1);

/// The pause before a request's next attempt through the balancer, after `repeats` of its
/// misses through the balancer came from an instance that had already missed it: none
/// while there are none, then a random moment of up to `repeats + 1` milliseconds (at
/// most [`RETRY_PAUSE_MAX`]).
///
/// Why: under round robin, two instances that each forward a request for the other's
/// connection at the same moment can each be handed back to themselves; if both retry the
/// moment their miss comes back, they reach the balancer in the same order again and miss
/// again, until both budgets run out (seen with 2 instances: 8 of 600 paired sends ended
/// in 404 after 10 attempts each). Random pauses make the order random, so each further
/// attempt misses with the chance a random balancer gives, which is what the `auto` budget
/// is sized for ([`crate::routing::ForwardBudget`]). Only repeated misses pause: a request
/// that walks round the instances, as a lone one does under round robin, meets each once
/// before it meets its owner and pays nothing; pausing after every miss made such a
/// forward at N = 16 ten times slower. Pauses of under a millisecond did not break the
/// lockstep (the gap between two instances' retries can be that long).
fn retry_pause(repeats: u32) -> Duration {
    if repeats == 0 {
        return Duration::ZERO;
    }
    RETRY_PAUSE_STEP
        .saturating_mul(repeats.saturating_add(1))
        .min(RETRY_PAUSE_MAX)
        .mul_f64(rand::random::<f64>())
}

/// Waits `pause`, to within a few microseconds. The runtime's timer works in whole
/// milliseconds: two pauses that round to the same tick would wake in the same order every
/// time, which is the lockstep [`retry_pause`] is there to break. So the whole milliseconds
/// are slept on the timer and the rest (under 1 ms) on a blocking-pool thread.
async fn pause_precisely(pause: Duration) {
    let whole = Duration::from_millis(pause.as_millis() as u64);
    if !whole.is_zero() {
        tokio::time::sleep(whole).await;
    }
    let rest = pause - whole;
    if !rest.is_zero() {
        // A blocking-pool thread is held for under 1 ms (a busy pool only makes the pause
        // longer, which is harmless); a failed join ends the pause early, also harmless.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// Headers that belong to one hop and must not be forwarded (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Whether a client request header is copied to the forwarded request.
fn forwards_request_header(name: &HeaderName) -> bool {
    !is_hop_by_hop(name)
        && name != HOST
        && name != CONTENT_LENGTH
        && name.as_str() != PROBE_HEADER
        && !name.as_str().starts_with("sec-websocket-")
}

/// Whether a response header is copied back to the client (hop-by-hop ones are not, and
/// the length is the relaying server's to set).
pub(crate) fn relays_response_header(name: &HeaderName) -> bool {
    !is_hop_by_hop(name) && name != CONTENT_LENGTH
}

/// Carries misrouted requests to their owner. One per worker thread: awc's client is
/// not `Send`.
pub struct Forwarder {
    client: awc::Client,
    key: ClusterKey,
    metrics: Arc<Metrics>,
    poll_timeout: Duration,
    max_frame_size: usize,
    relay: Option<Arc<Relay>>,
}

/// One attempt to reach the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// An HTTP request to this base URL, counted under this mode.
    Http(&'a str, &'static str),
    /// A relay over the bus.
    Bus,
}

/// The attempts to make, in order: direct once, the bus once, the balancer `attempts`
/// times.
fn targets(plan: &ForwardPlan) -> Vec<Target<'_>> {
    let direct = plan
        .direct
        .iter()
        .map(|url| Target::Http(url.as_str(), "direct"));
    let bus = plan.bus.then_some(Target::Bus);
    let balanced = plan.load_balancer.iter().flat_map(|(url, attempts)| {
        std::iter::repeat_n(
            Target::Http(url.as_str(), "load_balancer"),
            *attempts as usize,
        )
    });
    direct.chain(bus).chain(balanced).collect()
}

/// The request headers worth relaying, as the bus carries them.
fn relayed_headers(req: &HttpRequest) -> Vec<(String, Bytes)> {
    req.headers()
        .iter()
        .filter(|(name, _)| forwards_request_header(name))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a forward ended, before it is counted and answered.
#[derive(Default)]
struct Tally {
    attempts: u64,
    /// The instances whose answer through the balancer was a miss (their
    /// `X-Stickless-Instance`).
    missed_by: Vec<HeaderValue>,
    /// Misses through the balancer from an instance already in `missed_by`, or from one
    /// that could not be told (they pace the next attempt, [`retry_pause`]).
    repeated_misses: u32,
    mode: &'static str,
    not_found: bool,
    /// The owner itself said it does not hold the connection, or did not answer over
    /// the bus at all: either way no empty 200 may keep the client polling.
    owner_said_gone: bool,
    failure: Option<String>,
}

impl Tally {
    /// Counts the start of one more attempt.
    fn begin(&mut self, mode: &'static str, metrics: &Metrics) {
        self.attempts += 1;
        self.mode = mode;
        metrics.forward_request_sent();
    }

    /// Counts the start of one more HTTP attempt; one through the balancer first waits
    /// its [`retry_pause`].
    async fn begin_http(&mut self, mode: &'static str, metrics: &Metrics) {
        if mode == "load_balancer" {
            pause_precisely(retry_pause(self.repeated_misses)).await;
        }
        self.begin(mode, metrics);
    }

    /// An attempt through the balancer reached an instance without the connection: `by`,
    /// if its answer said which (a WebSocket refusal does not).
    fn missed_through_balancer(&mut self, by: Option<&HeaderValue>) {
        match by {
            Some(by) if !self.missed_by.contains(by) => self.missed_by.push(by.clone()),
            _ => self.repeated_misses += 1,
        }
    }
}

impl Forwarder {
    /// A forwarder; `poll_timeout` sizes the wait for forwarded long polls.
    pub fn new(
        key: ClusterKey,
        metrics: Arc<Metrics>,
        poll_timeout: Duration,
        max_frame_size: usize,
        relay: Option<Arc<Relay>>,
    ) -> Self {
        let client = awc::Client::builder()
            .connector(awc::Connector::new().timeout(CONNECT_TIMEOUT))
            .timeout(REQUEST_TIMEOUT)
            .disable_redirects()
            .no_default_headers()
            .finish();
        Self {
            client,
            key,
            metrics,
            poll_timeout,
            max_frame_size,
            relay,
        }
    }

    fn path_and_query(req: &HttpRequest) -> &str {
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    }

    fn finish(
        &self,
        kind: RequestKind,
        plan: &ForwardPlan,
        tally: &Tally,
        outcome: ForwardOutcome,
    ) {
        self.metrics
            .forwarded(kind.label(), tally.mode, outcome, tally.attempts);
        log::info!(
            "forwarded {} request for connection {} (owner {}): {:?} after {} attempt(s), last via {}{}",
            kind.label(),
            plan.connection_id.for_log(),
            plan.owner,
            outcome,
            tally.attempts,
            tally.mode,
            tally
                .failure
                .as_deref()
                .map(|f| format!(" (last error: {f})"))
                .unwrap_or_default()
        );
    }

    /// The answer when no instance served the request.
    fn exhausted(&self, kind: RequestKind, plan: &ForwardPlan, tally: Tally) -> HttpResponse {
        if kind == RequestKind::Poll && plan.owner_alive && !tally.owner_said_gone {
            // The owner is alive (its heartbeat is recent) and never said the connection
            // is gone; only this poll failed to reach it. An empty 200 is what a poll that
            // timed out gets, and the client simply polls again (LongPollingTransport.ts
            // `_poll`: a 200 without content is "Poll timed out, reissuing"; only a 404
            // or 204 ends the connection). So one unlucky poll does not kill the
            // connection; the next one, sent at once, gets a fresh set of attempts.
            self.finish(kind, plan, &tally, ForwardOutcome::Retried);
            return HttpResponse::Ok()
                .insert_header((ATTEMPTS_HEADER, tally.attempts.to_string()))
                .finish();
        }
        let (outcome, status, text) = if tally.not_found || tally.failure.is_none() {
            (
                ForwardOutcome::NotFound,
                StatusCode::NOT_FOUND,
                "No Connection with that ID".to_owned(),
            )
        } else {
            let failure = tally.failure.clone().unwrap_or_default();
            (
                ForwardOutcome::Failed,
                StatusCode::BAD_GATEWAY,
                format!("The instance holding this connection could not be reached: {failure}"),
            )
        };
        self.finish(kind, plan, &tally, outcome);
        HttpResponse::build(status)
            .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
            .insert_header((ATTEMPTS_HEADER, tally.attempts.to_string()))
            .body(text)
    }

    /// Forwards an HTTP request (poll, event stream, send or delete) along `plan`.
    pub async fn forward(
        &self,
        req: &HttpRequest,
        body: Bytes,
        kind: RequestKind,
        plan: &ForwardPlan,
    ) -> HttpResponse {
        let timeout = match kind {
            RequestKind::Poll => self.poll_timeout + POLL_GRACE,
            _ => REQUEST_TIMEOUT,
        };
        let mut tally = Tally::default();
        for target in targets(plan) {
            let Target::Http(base, mode) = target else {
                tally.begin("bus", &self.metrics);
                match self.relay_http(req, body.clone(), plan, timeout).await {
                    Relayed::Answered(response) => {
                        self.finish(kind, plan, &tally, ForwardOutcome::Served);
                        return response;
                    }
                    Relayed::Gone => {
                        tally.not_found = true;
                        tally.owner_said_gone = true;
                        break;
                    }
                    Relayed::Silent(why) => {
                        // No owner answered: what ASP.NET answers for an unknown id, unless
                        // a later route (the balancer) finds it after all.
                        tally.not_found = true;
                        tally.owner_said_gone = true;
                        tally.failure = Some(why);
                        continue;
                    }
                    Relayed::Failed(why) => {
                        tally.failure = Some(why);
                        continue;
                    }
                }
            };
            tally.begin_http(mode, &self.metrics).await;
            let mut request = self
                .client
                .request(
                    req.method().clone(),
                    format!("{base}{}", Self::path_and_query(req)),
                )
                .timeout(timeout);
            for (name, value) in req
                .headers()
                .iter()
                .filter(|(name, _)| forwards_request_header(name))
            {
                request = request.append_header((name.clone(), value.clone()));
            }
            request = request.insert_header((PROBE_HEADER, self.key.probe_marker(now_secs())));
            match request.send_body(body.clone()).await {
                Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                    tally.not_found = true;
                    if mode == "direct" || answered_by(response.headers(), plan) {
                        tally.owner_said_gone = true;
                        break; // The owner itself says the connection is gone.
                    }
                    tally.missed_through_balancer(response.headers().get(INSTANCE_HEADER));
                }
                Ok(response) => {
                    self.finish(kind, plan, &tally, ForwardOutcome::Served);
                    return self.relay_response(response, kind, tally.attempts).await;
                }
                Err(error) => tally.failure = Some(error.to_string()),
            }
        }
        self.exhausted(kind, plan, tally)
    }

    async fn relay_response<S>(
        &self,
        mut response: awc::ClientResponse<S>,
        kind: RequestKind,
        attempts: u64,
    ) -> HttpResponse
    where
        S: futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin + 'static,
    {
        let mut out = HttpResponse::build(response.status());
        for (name, value) in response.headers().iter() {
            if !is_hop_by_hop(name) && name != CONTENT_LENGTH {
                out.append_header((name.clone(), value.clone()));
            }
        }
        out.insert_header((ATTEMPTS_HEADER, attempts.to_string()));
        if kind == RequestKind::EventStream && response.status().is_success() {
            return out.streaming(response);
        }
        match response.body().limit(MAX_RESPONSE_BODY).await {
            Ok(body) => out.body(body),
            Err(error) => HttpResponse::BadGateway()
                .body(format!("Reading the forwarded response failed: {error}")),
        }
    }

    /// Forwards a WebSocket upgrade along `plan` and relays its frames.
    pub async fn forward_websocket(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
        plan: &ForwardPlan,
    ) -> Result<HttpResponse, actix_web::Error> {
        let kind = RequestKind::WebSocket;
        let mut tally = Tally::default();
        for target in targets(plan) {
            let Target::Http(base, mode) = target else {
                tally.begin("bus", &self.metrics);
                let Some(exchange) = self.relay_open(req, Bytes::new(), plan, true).await else {
                    tally.not_found = true;
                    tally.failure = Some("the owner did not answer over the bus".into());
                    continue;
                };
                let Ok(mut exchange) = exchange else {
                    tally.not_found = true;
                    tally.owner_said_gone = true;
                    break;
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange.next()).await {
                    Ok(Some(Frame::Head { status: 101, .. })) => {
                        let (response, session, messages) = actix_ws::handle(req, payload)?;
                        actix_web::rt::spawn(relay_websocket(
                            session,
                            messages,
                            exchange,
                            self.max_frame_size,
                        ));
                        self.finish(kind, plan, &tally, ForwardOutcome::Served);
                        return Ok(response);
                    }
                    Ok(Some(Frame::Head { status: 404, .. })) => {
                        tally.not_found = true;
                        tally.owner_said_gone = true;
                        break;
                    }
                    Ok(Some(Frame::Head { status, .. })) => {
                        self.finish(kind, plan, &tally, ForwardOutcome::Served);
                        let status =
                            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                        return Ok(HttpResponse::build(status)
                            .insert_header((ATTEMPTS_HEADER, tally.attempts.to_string()))
                            .finish());
                    }
                    _ => {
                        tally.failure = Some("the relayed WebSocket did not open".into());
                        continue;
                    }
                }
            };
            tally.begin_http(mode, &self.metrics).await;
            let url = format!(
                "ws{}{}",
                base.trim_start_matches("http"),
                Self::path_and_query(req)
            );
            let mut request = self.client.ws(url).max_frame_size(self.max_frame_size);
            for (name, value) in req
                .headers()
                .iter()
                .filter(|(name, _)| forwards_request_header(name))
            {
                request = request.header(name.clone(), value.clone());
            }
            request = request.set_header(PROBE_HEADER, self.key.probe_marker(now_secs()));
            match request.connect().await {
                Ok((_, upstream)) => {
                    let (response, session, messages) = actix_ws::handle(req, payload)?;
                    actix_web::rt::spawn(relay(session, messages, upstream, self.max_frame_size));
                    self.finish(kind, plan, &tally, ForwardOutcome::Served);
                    return Ok(response);
                }
                Err(WsClientError::InvalidResponseStatus(StatusCode::NOT_FOUND)) => {
                    tally.not_found = true;
                    if mode == "direct" {
                        tally.owner_said_gone = true;
                        break;
                    }
                    // The refusal's headers are not kept: whose it was cannot be told.
                    tally.missed_through_balancer(None);
                }
                Err(WsClientError::InvalidResponseStatus(status)) => {
                    // The owner refused the upgrade (409, 400, …): that is its answer.
                    self.finish(kind, plan, &tally, ForwardOutcome::Served);
                    return Ok(HttpResponse::build(status)
                        .insert_header((ATTEMPTS_HEADER, tally.attempts.to_string()))
                        .finish());
                }
                Err(error) => tally.failure = Some(error.to_string()),
            }
        }
        Ok(self.exhausted(kind, plan, tally))
    }
}

/// How a relay over the bus ended.
enum Relayed {
    /// The owner answered (with anything but 404); this is the client's response.
    Answered(HttpResponse),
    /// The owner does not hold the connection.
    Gone,
    /// No owner answered the `Open`: it is gone, or cut off from the bus.
    Silent(String),
    /// The relay broke after the owner accepted it: try the next route.
    Failed(String),
}

/// Whether a response came from the owner of the connection in `plan`.
fn answered_by(headers: &actix_web::http::header::HeaderMap, plan: &ForwardPlan) -> bool {
    headers
        .get(INSTANCE_HEADER)
        .is_some_and(|v| v.as_bytes() == plan.owner.as_str().as_bytes())
}

impl Forwarder {
    /// Opens a relay to the owner: `None` when it did not answer, `Err(())` when it does
    /// not hold the connection.
    async fn relay_open(
        &self,
        req: &HttpRequest,
        body: Bytes,
        plan: &ForwardPlan,
        websocket: bool,
    ) -> Option<Result<Exchange, ()>> {
        let relay = self.relay.as_ref()?;
        let open = Open {
            reply_to: String::new(), // filled in by the relay
            method: req.method().as_str().to_owned(),
            path: Self::path_and_query(req).to_owned(),
            headers: relayed_headers(req),
            body,
            websocket,
        };
        match relay.open(&plan.owner, open).await {
            Opened::Accepted(exchange) => Some(Ok(exchange)),
            Opened::Miss => Some(Err(())),
            Opened::NoAnswer => None,
        }
    }

    /// Relays an HTTP request over the bus and turns the answer into the response.
    async fn relay_http(
        &self,
        req: &HttpRequest,
        body: Bytes,
        plan: &ForwardPlan,
        timeout: Duration,
    ) -> Relayed {
        let mut exchange = match self.relay_open(req, body, plan, false).await {
            None => return Relayed::Silent("the owner did not answer over the bus".into()),
            Some(Err(())) => return Relayed::Gone,
            Some(Ok(exchange)) => exchange,
        };
        // `Accepted` came at once; the head may take as long as a held long poll.
        let (status, headers) = match tokio::time::timeout(timeout, exchange.next()).await {
            Ok(Some(Frame::Head { status, headers })) => (status, headers),
            Ok(_) => return Relayed::Failed("the relay ended before its answer".into()),
            Err(_) => return Relayed::Failed("the owner's answer timed out".into()),
        };
        if status == 404 {
            return Relayed::Gone;
        }
        let mut out =
            HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY));
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                actix_web::http::header::HeaderValue::from_maybe_shared(value),
            ) {
                if relays_response_header(&name) {
                    out.append_header((name, value));
                }
            }
        }
        out.insert_header((ATTEMPTS_HEADER, "1"));
        // The body flows as the owner writes it (an event stream stays open); dropping
        // the stream (the client left) drops the exchange, which cancels the relay.
        let body = futures_util::stream::unfold(exchange, |mut exchange| async move {
            loop {
                match exchange.next().await {
                    Some(Frame::Data(chunk)) => {
                        return Some((Ok::<_, actix_web::Error>(chunk), exchange))
                    }
                    Some(Frame::End) | None => return None,
                    Some(_) => continue,
                }
            }
        });
        Relayed::Answered(out.streaming(body))
    }
}

/// What one message from the client's socket means for a relayed WebSocket.
enum FromClient {
    Relay(Frame),
    Ping(Bytes),
    Skip,
    /// The client closed (or broke) the socket: tell the owner, and close with this.
    Close(Frame, Option<CloseReason>),
}

fn from_client(item: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>) -> FromClient {
    match item {
        Some(Ok(AggregatedMessage::Text(text))) => {
            FromClient::Relay(Frame::WsText(text.into_bytes()))
        }
        Some(Ok(AggregatedMessage::Binary(bytes))) => FromClient::Relay(Frame::WsBinary(bytes)),
        Some(Ok(AggregatedMessage::Ping(bytes))) => FromClient::Ping(bytes),
        Some(Ok(AggregatedMessage::Pong(_))) => FromClient::Skip,
        Some(Ok(AggregatedMessage::Close(reason))) => {
            FromClient::Close(relay::close_frame(reason.clone()), reason)
        }
        Some(Err(error)) => FromClient::Close(
            Frame::WsClose {
                code: 1002,
                reason: String::new(),
            },
            Some(CloseReason {
                code: CloseCode::Protocol,
                description: Some(error.to_string()),
            }),
        ),
        None => FromClient::Close(relay::close_frame(None), None),
    }
}

/// A relayed client's frames, whole (continuations joined), none larger than the owner
/// would take itself.
fn client_frames(
    messages: actix_ws::MessageStream,
    max_frame_size: usize,
) -> actix_ws::AggregatedMessageStream {
    messages
        .max_frame_size(max_frame_size)
        .aggregate_continuations()
        .max_continuation_size(max_frame_size)
}

/// Carries a client's WebSocket to the owner over the bus, frames both ways, until either
/// side closes. Frames already waiting on one side travel together.
async fn relay_websocket(
    mut session: actix_ws::Session,
    messages: actix_ws::MessageStream,
    mut exchange: Exchange,
    max_frame_size: usize,
) {
    let mut messages = client_frames(messages, max_frame_size);
    loop {
        tokio::select! {
            first = messages.next() => {
                let mut batch = relay::Batch::default();
                let mut close = None;
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match from_client(item) {
                        FromClient::Relay(frame) => batch.push(frame),
                        FromClient::Ping(bytes) => {
                            let _ = session.pong(&bytes).await;
                        }
                        FromClient::Skip => {}
                        FromClient::Close(frame, reason) => {
                            batch.push(frame);
                            close = Some(reason);
                            break;
                        }
                    }
                    if !batch.full() {
                        next = messages.next().now_or_never();
                    }
                }
                exchange.send_frames(batch.frames).await;
                if let Some(reason) = close {
                    let _ = session.close(reason).await;
                    return;
                }
            }
            first = exchange.next() => {
                let mut next = first;
                loop {
                    let sent = match next {
                        Some(Frame::WsText(bytes)) => match ByteString::try_from(bytes) {
                            Ok(text) => session.text(text).await,
                            Err(_) => Ok(()),
                        },
                        Some(Frame::WsBinary(bytes)) => session.binary(bytes).await,
                        Some(Frame::WsClose { code, reason }) => {
                            let _ = session.close(relay::close_reason(code, reason)).await;
                            return;
                        }
                        Some(Frame::End) | None => {
                            let reason = CloseReason { code: CloseCode::Error, description: None };
                            let _ = session.close(Some(reason)).await;
                            return;
                        }
                        Some(_) => Ok(()),
                    };
                    if sent.is_err() {
                        exchange.send(relay::close_frame(None)).await;
                        return;
                    }
                    match exchange.try_next() {
                        Some(frame) => next = Some(frame),
                        None => break,
                    }
                }
            }
        }
    }
}

/// Relays frames between the client's socket and the owner's until either side ends.
async fn relay(
    mut session: actix_ws::Session,
    messages: actix_ws::MessageStream,
    mut upstream: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
    max_frame_size: usize,
) {
    let mut messages = client_frames(messages, max_frame_size);
    loop {
        tokio::select! {
            from_client = messages.next() => {
                let message = match from_client {
                    Some(Ok(AggregatedMessage::Text(text))) => Message::Text(text),
                    Some(Ok(AggregatedMessage::Binary(bytes))) => Message::Binary(bytes),
                    Some(Ok(AggregatedMessage::Ping(bytes))) => Message::Ping(bytes),
                    Some(Ok(AggregatedMessage::Pong(bytes))) => Message::Pong(bytes),
                    Some(Ok(AggregatedMessage::Close(reason))) => {
                        let _ = upstream.send(Message::Close(reason.clone())).await;
                        let _ = session.close(reason).await;
                        return;
                    }
                    Some(Err(error)) => {
                        // As on a socket served directly (transport::websocket): a frame
                        // this side cannot take is 1009, not a bare protocol error.
                        let reason = CloseReason { code: CloseCode::Size, description: Some(error.to_string()) };
                        let _ = upstream.send(Message::Close(Some(reason.clone()))).await;
                        let _ = session.close(Some(reason)).await;
                        return;
                    }
                    None => {
                        let _ = upstream.send(Message::Close(None)).await;
                        return;
                    }
                };
                if upstream.send(message).await.is_err() {
                    let _ = session.close(Some(CloseReason { code: CloseCode::Error, description: None })).await;
                    return;
                }
            }
            from_upstream = upstream.next() => {
                let sent = match from_upstream {
                    Some(Ok(WsFrame::Text(bytes))) => match ByteString::try_from(bytes) {
                        Ok(text) => session.text(text).await,
                        Err(_) => Ok(()),
                    },
                    Some(Ok(WsFrame::Binary(bytes))) => session.binary(bytes).await,
                    Some(Ok(WsFrame::Ping(bytes))) => session.ping(&bytes).await,
                    Some(Ok(WsFrame::Pong(bytes))) => session.pong(&bytes).await,
                    Some(Ok(WsFrame::Close(reason))) => {
                        let _ = session.close(reason.clone()).await;
                        let _ = upstream.send(Message::Close(reason)).await;
                        return;
                    }
                    // Instances never fragment their frames; anything else ends the relay.
                    Some(Ok(WsFrame::Continuation(_))) | Some(Err(_)) | None => {
                        let _ = session.close(Some(CloseReason { code: CloseCode::Error, description: None })).await;
                        return;
                    }
                };
                if sent.is_err() {
                    let _ = upstream.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancer_retries_wait_a_random_moment_in_a_window_that_widens_to_a_cap() {
        assert_eq!(retry_pause(0), Duration::ZERO, "no repeated miss, no pause");
        for repeats in 1..200u32 {
            let widest = (RETRY_PAUSE_STEP * (repeats + 1)).min(RETRY_PAUSE_MAX);
            let pauses: Vec<Duration> = (0..400).map(|_| retry_pause(repeats)).collect();
            assert!(pauses.iter().all(|p| *p <= widest), "{repeats}: {pauses:?}");
            // Spread over the whole window, finer than the timer's millisecond: a fixed
            // pause, or one rounded to the tick, would keep two forwarders in step. (A pause
            // may round to the window's very end: that one counts in the last tenth.)
            let tenths: std::collections::BTreeSet<u128> = pauses
                .iter()
                .map(|p| (p.as_micros() * 10 / widest.as_micros()).min(9))
                .collect();
            assert_eq!(
                tenths,
                (0..10).collect(),
                "after {repeats} repeats: {pauses:?}"
            );
        }
    }

    #[test]
    fn only_a_miss_from_an_instance_that_already_missed_counts_as_repeated() {
        let (b, c) = (HeaderValue::from_static("b"), HeaderValue::from_static("c"));
        let mut tally = Tally::default();
        tally.missed_through_balancer(Some(&b));
        tally.missed_through_balancer(Some(&c));
        assert_eq!(tally.repeated_misses, 0, "a walk round the instances");
        tally.missed_through_balancer(Some(&b));
        assert_eq!(tally.repeated_misses, 1);
        tally.missed_through_balancer(None);
        assert_eq!(
            tally.repeated_misses, 2,
            "an unknown instance counts as a repeat"
        );
        assert_eq!(tally.missed_by, ["b", "c"]);
    }

    #[actix_web::test]
    async fn a_pause_lasts_at_least_as_long_as_asked() {
        for asked in [300u64, 1_700, 2_050] {
            let asked = Duration::from_micros(asked);
            let started = std::time::Instant::now();
            pause_precisely(asked).await;
            let took = started.elapsed();
            assert!(took >= asked, "asked {asked:?}, took {took:?}");
        }
    }

    #[test]
    fn direct_then_the_bus_are_tried_once_before_the_load_balancer() {
        let mut plan = ForwardPlan {
            owner: crate::protocol::token::InstanceId::parse("a").unwrap(),
            connection_id: crate::protocol::token::ConnectionId::random(),
            direct: Some("http://a".into()),
            bus: true,
            load_balancer: Some(("http://lb".into(), 2)),
            owner_alive: true,
        };
        assert_eq!(
            targets(&plan),
            vec![
                Target::Http("http://a", "direct"),
                Target::Bus,
                Target::Http("http://lb", "load_balancer"),
                Target::Http("http://lb", "load_balancer")
            ]
        );
        plan.direct = None;
        plan.load_balancer = None;
        assert_eq!(targets(&plan), vec![Target::Bus]);
    }

    #[test]
    fn hop_by_hop_and_probe_headers_are_not_copied() {
        for name in [
            "connection",
            "upgrade",
            "transfer-encoding",
            "host",
            "content-length",
            PROBE_HEADER,
            "sec-websocket-key",
        ] {
            assert!(
                !forwards_request_header(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        for name in [
            "authorization",
            "cookie",
            "accept",
            "x-requested-with",
            "content-type",
        ] {
            assert!(
                forwards_request_header(&HeaderName::from_static(name)),
                "{name}"
            );
        }
    }
}
