//! A WebSocket client (signalr-protocol.md, "WebSockets"): whole records in text frames.

use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::error::WsClientError;
use awc::http::StatusCode;
use awc::ws;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

use super::http::{Api, MAX_BODY};
use super::hub_client::{HubClient, Inbox};
use super::records::{parse_records, HUB};
use super::{eventually, within, REQUEST_TIMEOUT, SETTLE_TIMEOUT};

impl Api {
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
}

/// Asserts that a WebSocket upgrade was refused with `status` before the upgrade.
pub fn assert_refused(result: Result<WsClient, WsClientError>, status: StatusCode) {
    assert_eq!(
        ws_status(result).err(),
        Some(status),
        "the upgrade's answer"
    );
}

/// Waits until a WebSocket for `token` on `api` is refused with `status`, failing at once
/// if one is accepted. For a connection that just ended: the instance that served it
/// forgets it at once and turns its cluster-wide claim into the closed marker a Redis
/// round trip later, so for that moment another instance still sees the claim held (409).
pub async fn wait_refused(api: &Api, token: &str, status: StatusCode) {
    let what = format!("a WebSocket for the token refused with {status}");
    eventually(SETTLE_TIMEOUT, &what, || async {
        match ws_status(api.ws_raw(&format!("id={token}"), &[]).await) {
            Ok(()) => panic!("a WebSocket for the token was accepted"),
            Err(got) => (got == status).then_some(()),
        }
    })
    .await;
}

/// The status of a refused WebSocket upgrade (`Ok` if it was accepted).
pub fn ws_status(result: Result<WsClient, WsClientError>) -> Result<(), StatusCode> {
    match result {
        Ok(_) => Ok(()),
        Err(WsClientError::InvalidResponseStatus(status)) => Err(status),
        Err(other) => panic!("the WebSocket failed without a status: {other:?}"),
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
