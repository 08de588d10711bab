//! Forwarding: moves a request to another instance and its answer back, over awc
//! (DESIGN.md, "Layers"; modelled on actix/examples `http-proxy`).
//!
//! [`crate::routing`] decides *where*; this module only carries bytes, trying the owner's
//! direct URL once and then the load balancer up to the attempt budget, until an instance
//! answers with something other than 404. Every request it sends carries the signed probe
//! marker, so the receiving instance serves or 404s it but never forwards it again.
//!
//! - HTTP bodies are already buffered (within the body limit) so they can be replayed;
//!   responses are buffered too, except event streams, which are relayed as they come.
//! - Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions.
//! - WebSockets: the upstream socket is opened first, so a 404 upstream becomes a 404 to
//!   the client instead of an accepted-then-closed socket; then frames flow both ways,
//!   close codes and reasons pass through, and either side closing closes both.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use awc::error::WsClientError;
use awc::ws::{Frame, Message};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{SinkExt, StreamExt};

use crate::metrics::{ForwardOutcome, Metrics};
use crate::protocol::token::ClusterKey;
use crate::routing::{ForwardPlan, RequestKind, PROBE_HEADER};

/// Time to open a TCP connection to an instance or the load balancer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for an answer to a send, a delete or the start of an event stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time a forwarded long poll gets beyond the poll timeout.
const POLL_GRACE: Duration = Duration::from_secs(15);
/// Largest forwarded response read into memory (a poll batch is far smaller).
const MAX_RESPONSE_BODY: usize = 8 * 1024 * 1024;
/// Tells how many attempts a forwarded response took.
pub const ATTEMPTS_HEADER: &str = "x-stickless-forward-attempts";

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

/// Carries misrouted requests to their owner. One per worker thread: awc's client is
/// not `Send`.
pub struct Forwarder {
    client: awc::Client,
    key: ClusterKey,
    metrics: Arc<Metrics>,
    poll_timeout: Duration,
    max_frame_size: usize,
}

/// The (base URL, mode label) pairs to try, in order.
fn targets(plan: &ForwardPlan) -> Vec<(&str, &'static str)> {
    let direct = plan.direct.iter().map(|url| (url.as_str(), "direct"));
    let balanced = plan.load_balancer.iter().flat_map(|(url, attempts)| {
        std::iter::repeat_n((url.as_str(), "load_balancer"), *attempts as usize)
    });
    direct.chain(balanced).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a forward ended, before it is counted and answered.
#[derive(Default)]
struct Tally {
    attempts: u64,
    mode: &'static str,
    not_found: bool,
    failure: Option<String>,
}

impl Tally {
    /// Counts the start of one more attempt.
    fn begin(&mut self, mode: &'static str, metrics: &Metrics) {
        self.attempts += 1;
        self.mode = mode;
        metrics.forward_request_sent();
    }
}

impl Forwarder {
    /// A forwarder; `poll_timeout` sizes the wait for forwarded long polls.
    pub fn new(
        key: ClusterKey,
        metrics: Arc<Metrics>,
        poll_timeout: Duration,
        max_frame_size: usize,
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
            plan.connection_id,
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
        for (base, mode) in targets(plan) {
            tally.begin(mode, &self.metrics);
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
                    if mode == "direct" {
                        break; // The owner itself says the connection is gone.
                    }
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
        for (base, mode) in targets(plan) {
            tally.begin(mode, &self.metrics);
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
                        break;
                    }
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

/// Relays frames between the client's socket and the owner's until either side ends.
async fn relay(
    mut session: actix_ws::Session,
    messages: actix_ws::MessageStream,
    mut upstream: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
    max_frame_size: usize,
) {
    let mut messages = messages
        .max_frame_size(max_frame_size)
        .aggregate_continuations()
        .max_continuation_size(max_frame_size);
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
                    Some(Ok(Frame::Text(bytes))) => match ByteString::try_from(bytes) {
                        Ok(text) => session.text(text).await,
                        Err(_) => Ok(()),
                    },
                    Some(Ok(Frame::Binary(bytes))) => session.binary(bytes).await,
                    Some(Ok(Frame::Ping(bytes))) => session.ping(&bytes).await,
                    Some(Ok(Frame::Pong(bytes))) => session.pong(&bytes).await,
                    Some(Ok(Frame::Close(reason))) => {
                        let _ = session.close(reason.clone()).await;
                        let _ = upstream.send(Message::Close(reason)).await;
                        return;
                    }
                    // Instances never fragment their frames; anything else ends the relay.
                    Some(Ok(Frame::Continuation(_))) | Some(Err(_)) | None => {
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
    fn direct_is_tried_once_before_the_load_balancer() {
        let plan = ForwardPlan {
            owner: crate::protocol::token::InstanceId::parse("a").unwrap(),
            connection_id: crate::protocol::token::ConnectionId::random(),
            direct: Some("http://a".into()),
            load_balancer: Some(("http://lb".into(), 2)),
        };
        assert_eq!(
            targets(&plan),
            vec![
                ("http://a", "direct"),
                ("http://lb", "load_balancer"),
                ("http://lb", "load_balancer")
            ]
        );
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
