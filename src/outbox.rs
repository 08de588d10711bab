//! A connection's outbound side: a bounded queue of whole records and a close signal.
//!
//! This is the only handle that lower layers (hub clients, backplanes) keep of a
//! connection: they push records and may ask it to close; the transport that currently
//! serves the connection drains the queue. The queue is bounded so that a client that does
//! not read cannot make the server grow memory: when it is full, the connection is closed
//! with a Close message saying why (DESIGN.md, "Scale-out": bounded everything).
//!
//! [`Outbox::push`] is the one push path of the server: hub clients' fan-out, session
//! replies, completions and stream items all go through it, and it alone counts records
//! sent and slow-consumer closes.
//!
//! The outbox also knows the hub protocol its connection agreed on in the handshake
//! (JSON until then), so that messages made without knowing the recipient's protocol —
//! a Close at shutdown, a slow-consumer Close — are encoded in the right one, and so that
//! transports know whether to send text or binary (`HubProtocol.md`, "Overview").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use crate::queue;

use crate::metrics::Metrics;
use crate::protocol::hub_protocol::{HubProtocol, TransferFormat};
use crate::protocol::message::HubMessage;
use crate::protocol::token::ConnectionId;

/// Why and how a connection is closing.
#[derive(Debug, Clone, PartialEq)]
pub struct Closing {
    /// The Close message to send before the transport ends, if any, encoded in the
    /// connection's protocol by [`Outbox::close_record`]. A transport that cannot send it
    /// (the client is already gone) drops it.
    pub message: Option<HubMessage>,
    /// Whether the close is an error (WebSockets close with 1011 instead of 1000 when no
    /// Close message explains it).
    pub is_error: bool,
}

impl Closing {
    /// A close that sends a Close message (`{"type":7,…}` in JSON) with this error and
    /// reconnect hint, in whatever protocol the connection speaks.
    pub fn with_message(error: Option<String>, allow_reconnect: bool) -> Self {
        let is_error = error.is_some();
        Self {
            message: Some(HubMessage::Close {
                error,
                allow_reconnect,
            }),
            is_error,
        }
    }

    /// A close with nothing to say: the client left, or its transport broke.
    pub fn silent() -> Self {
        Self {
            message: None,
            is_error: false,
        }
    }
}

/// Milliseconds since this process's first use of the clock, for cheap atomic stamps.
pub fn now_millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[derive(Debug)]
struct Shared {
    id: ConnectionId,
    metrics: Arc<Metrics>,
    tx: queue::Sender<Bytes>,
    closing: watch::Sender<Option<Closing>>,
    last_queued_ms: AtomicU64,
    protocol: OnceLock<HubProtocol>,
}

/// A cloneable handle to push records to one connection.
#[derive(Debug, Clone)]
pub struct Outbox(Arc<Shared>);

/// What became of a pushed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the transport.
    Queued,
    /// The connection is closing or closed; the record was dropped.
    Closed,
    /// The queue was full: the record was dropped and the connection is being closed.
    Overflowed,
}

impl Outbox {
    /// A new outbox of connection `id` holding at most `capacity` records, and the
    /// receiver the transports drain.
    pub fn new(
        id: ConnectionId,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, queue::Receiver<Bytes>) {
        let (tx, rx) = queue::channel(capacity);
        let (closing, _) = watch::channel(None);
        let shared = Shared {
            id,
            metrics,
            tx,
            closing,
            last_queued_ms: AtomicU64::new(now_millis()),
            protocol: OnceLock::new(),
        };
        (Self(Arc::new(shared)), rx)
    }

    /// Queues one whole record without waiting, and counts it (sent, or a slow consumer
    /// closed).
    pub fn push(&self, record: Bytes) -> Pushed {
        if self.is_closing() {
            return Pushed::Closed;
        }
        match self.0.tx.try_send(record) {
            Ok(()) => {
                self.0.last_queued_ms.store(now_millis(), Ordering::Relaxed);
                self.0.metrics.message_sent();
                Pushed::Queued
            }
            Err(queue::TrySendError::Closed(_)) => Pushed::Closed,
            Err(queue::TrySendError::Full(_)) => {
                log::warn!(
                    "connection {} closed: its outbound queue is full",
                    self.0.id.for_log()
                );
                self.0.metrics.slow_consumer();
                self.close(Closing::with_message(
                    Some(
                        "Connection closed: the client did not read its messages fast enough."
                            .into(),
                    ),
                    true,
                ));
                Pushed::Overflowed
            }
        }
    }

    /// Records the protocol the handshake agreed on; set once, before the handshake reply
    /// is queued (ASP.NET switches the transfer format before writing the reply, so a
    /// MessagePack client receives `{}` in a binary frame).
    pub fn set_protocol(&self, protocol: HubProtocol) {
        let _ = self.0.protocol.set(protocol);
    }

    /// The connection's hub protocol: JSON until a handshake agreed on another.
    pub fn protocol(&self) -> HubProtocol {
        self.0.protocol.get().copied().unwrap_or(HubProtocol::Json)
    }

    /// Whether transports must send this connection's records as text or binary.
    pub fn transfer_format(&self) -> TransferFormat {
        self.protocol().transfer_format()
    }

    /// Encodes a message in the connection's protocol and queues it, as [`Outbox::push`].
    pub fn push_message(&self, message: &HubMessage) -> Pushed {
        self.push(self.protocol().encode(message))
    }

    /// The framed Close record of a close reason, in the connection's protocol.
    pub fn close_record(&self, closing: &Closing) -> Option<Bytes> {
        closing
            .message
            .as_ref()
            .map(|message| self.protocol().encode(message))
    }

    /// Asks the connection to close. The first reason given wins.
    pub fn close(&self, closing: Closing) {
        self.0.closing.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(closing);
            true
        });
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.0.closing.borrow().is_some()
    }

    /// A receiver that sees the close reason once one is set.
    pub fn closing(&self) -> watch::Receiver<Option<Closing>> {
        self.0.closing.subscribe()
    }

    /// When a record was last queued, in [`now_millis`] time.
    pub fn last_queued_ms(&self) -> u64 {
        self.0.last_queued_ms.load(Ordering::Relaxed)
    }
}

/// Waits until `closing` holds a reason and returns it.
pub async fn closed(closing: &mut watch::Receiver<Option<Closing>>) -> Closing {
    match closing.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or_else(Closing::silent),
        // The outbox itself is gone, which only happens once the connection is over.
        Err(_) => Closing::silent(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An outbox for a test, and its receiver.
    pub(crate) fn outbox(capacity: usize) -> (Outbox, queue::Receiver<Bytes>) {
        Outbox::new(ConnectionId::random(), capacity, Arc::default())
    }

    #[test]
    fn a_full_queue_closes_the_connection_with_a_reason() {
        let (outbox, _rx) = outbox(1);
        assert_eq!(outbox.push(Bytes::from_static(b"a")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"b")), Pushed::Overflowed);
        assert!(outbox.is_closing());
        let reason = outbox.closing().borrow().clone().unwrap();
        assert!(reason.is_error);
        assert_eq!(outbox.push(Bytes::from_static(b"c")), Pushed::Closed);
        let metrics = outbox.0.metrics.render(true, 1);
        assert!(
            metrics.contains("stickless_messages_sent_total 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("stickless_slow_consumer_closes_total 1\n"),
            "{metrics}"
        );
    }

    #[test]
    fn the_first_close_reason_wins() {
        let (outbox, _rx) = outbox(1);
        outbox.close(Closing::silent());
        outbox.close(Closing::with_message(Some("x".into()), false));
        assert_eq!(*outbox.closing().borrow(), Some(Closing::silent()));
    }
}
