//! A Server-Sent Events client (signalr-protocol.md, "Server-Sent Events"): one streamed
//! GET down, POSTs up.

use std::pin::Pin;
use std::time::Duration;

use awc::error::PayloadError;
use awc::http::header::HeaderMap;
use awc::http::StatusCode;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{Stream, StreamExt};

use super::http::{Api, Reply};
use super::hub_client::{HubClient, Inbox};
use super::records::{parse_records, HUB};
use super::{within, REQUEST_TIMEOUT};

impl Api {
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
            let chunk = within(REQUEST_TIMEOUT, "SSE preamble", client.stream.next())
                .await
                .expect("the event stream ended before its preamble")
                .expect("the event stream failed");
            client.push_chunk(&chunk);
        }
        Ok(client)
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
