//! A Long Polling client (signalr-protocol.md, "Long Polling"): polls down, POSTs up.

use std::time::Duration;

use awc::http::StatusCode;
use bytes::Bytes;
use futures_util::future::{select, Either, LocalBoxFuture};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::http::{Api, Reply};
use super::hub_client::{HubClient, Inbox};
use super::{within, RECV_TIMEOUT};

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
        self.handshake().await;
    }

    /// Starts a poll in the background.
    pub fn spawn_poll(&self) -> JoinHandle<Reply> {
        let (api, token, wait) = (self.api.clone(), self.token.clone(), self.poll_wait);
        let headers = self.headers.clone();
        actix_web::rt::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            api.poll_with(&token, &headers, wait).await
        })
    }

    /// A poll the server is known to hold: starts two at once and waits until the server
    /// ends one with 204 (an overlapping poll ends the older one); the other is then held.
    /// No sleep decides the order.
    pub async fn held_poll(&self) -> JoinHandle<Reply> {
        let both = select(self.spawn_poll(), self.spawn_poll());
        let (ended, held) =
            match within(RECV_TIMEOUT, "one of two overlapping polls to end", both).await {
                Either::Left((ended, held)) | Either::Right((ended, held)) => (ended, held),
            };
        let ended = ended.expect("poll task");
        assert_eq!(
            ended.status,
            StatusCode::NO_CONTENT,
            "the older poll: {}",
            ended.text()
        );
        held
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
