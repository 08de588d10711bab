//! What the three hand-written clients share, seen from a test: an inbox of records,
//! the handshake, invocations and waits for records.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use serde_json::{json, Value};

use super::records::{frame, is_call, is_completion, is_handshake_reply, HANDSHAKE};
use super::RECV_TIMEOUT;

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

    /// Sends the handshake and expects its empty reply `{}` (the one place it is written).
    fn handshake(&mut self) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            self.send_text(HANDSHAKE.to_owned()).await;
            let reply = self.recv("the handshake reply", &is_handshake_reply).await;
            assert_eq!(reply, json!({}));
        })
    }

    /// Reads until the server ends the connection (a Close frame, the end of the event
    /// stream, 204/404 to a poll); records read meanwhile stay in the inbox.
    fn wait_ended(&mut self) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            let deadline = Instant::now() + RECV_TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "the server did not end the connection");
                if !self.fetch(left).await {
                    return;
                }
            }
        })
    }

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
