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
//!
//! A connection with stateful reconnect also numbers and keeps what it pushes
//! ([`ReplayBuffer`], in the same lock as the push, so the numbers follow the queue's
//! order). While its WebSocket is down it is *detached*: records only go to the replay
//! buffer, and [`Outbox::resume`] hands the next socket the `Sequence` record and the
//! replay (HubProtocol.md, "Stateful Reconnect").

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::queue;

use crate::metrics::Metrics;
use crate::protocol::hub_protocol::{HubProtocol, TransferFormat};
use crate::protocol::message::HubMessage;
use crate::protocol::stateful::ReplayBuffer;
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
    /// Why it closes, once it does (the first reason given wins).
    closing: Mutex<Option<Closing>>,
    /// `closing` is set: read on every push without taking the lock.
    is_closing: AtomicBool,
    /// Wakes whoever waits in [`Outbox::closed`]. A `Notify` rather than a `watch`
    /// channel: a watch keeps eight of them, and every connection has one of these.
    closed: Notify,
    last_queued_ms: AtomicU64,
    protocol: OnceLock<HubProtocol>,
    stateful: Mutex<Option<Stateful>>,
}

/// Which hub message a delivered record carries: the same on every instance that delivers
/// it (the sending instance picks it, and the bus carries it along), so that a moving
/// session's two copies can tell the records both instances delivered apart from equal
/// records that are different messages ([`Outbox::complete_move`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId(pub u64);

impl MessageId {
    /// A new random id (64 random bits: two messages of one move's overlap sharing one
    /// is a chance of about one in 10¹⁹).
    pub fn random() -> Self {
        Self(rand::random())
    }
}

/// The replay side of a stateful-reconnect connection.
#[derive(Debug)]
struct Stateful {
    buffer: ReplayBuffer,
    /// The message ids of the buffered records that carry one, by sequence number, oldest
    /// first (trimmed with the buffer's acknowledgements).
    ids: VecDeque<(u64, MessageId)>,
    /// No socket: records go to the buffer only, to be replayed on the next socket.
    detached: bool,
    /// A session moving here: records delivered here before its state arrived, in order,
    /// with their message ids, to follow the moved replay buffer ([`Outbox::stage`]).
    staged: Option<Vec<(Option<MessageId>, Bytes)>>,
}

impl Stateful {
    fn new(buffer: ReplayBuffer, ids: VecDeque<(u64, MessageId)>, detached: bool) -> Self {
        Self {
            buffer,
            ids,
            detached,
            staged: None,
        }
    }
}

/// What a stateful connection's session carries when it moves to another instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayState {
    /// The number the next record gets.
    pub next: u64,
    /// The records not acknowledged, oldest first.
    pub records: Vec<(u64, Bytes)>,
    /// The message ids of those records that carry one, by sequence number.
    pub ids: Vec<(u64, MessageId)>,
    /// The buffer's limit in bytes.
    pub limit: usize,
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
        let shared = Shared {
            id,
            metrics,
            tx,
            closing: Mutex::new(None),
            is_closing: AtomicBool::new(false),
            closed: Notify::new(),
            last_queued_ms: AtomicU64::new(now_millis()),
            protocol: OnceLock::new(),
            stateful: Mutex::new(None),
        };
        (Self(Arc::new(shared)), rx)
    }

    fn lock_stateful(&self) -> MutexGuard<'_, Option<Stateful>> {
        // Every update leaves the buffer consistent; a poisoned lock still holds it.
        self.0.stateful.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one whole record of types 1-5 (the hub's messages: invocations,
    /// completions, stream items) without waiting, and counts it (sent, or a slow consumer
    /// closed). On a stateful connection it is numbered and kept for replay first; a record
    /// that does not fit the replay buffer closes the connection with a Close message.
    pub fn push(&self, record: Bytes) -> Pushed {
        self.push_delivery(record, None)
    }

    /// [`Outbox::push`] for a record of hub message `id`, delivered to this connection as
    /// one of an audience (a stateful connection keeps the id with the record).
    pub fn push_delivery(&self, record: Bytes, id: Option<MessageId>) -> Pushed {
        if self.is_closing() {
            return Pushed::Closed;
        }
        let mut stateful = self.lock_stateful();
        if let Some(staged) = stateful.as_mut().and_then(|state| state.staged.as_mut()) {
            staged.push((id, record));
            return Pushed::Queued;
        }
        if let Some(state) = stateful.as_mut() {
            let pushed = state.buffer.push(record.clone());
            if let (Ok(number), Some(id)) = (&pushed, id) {
                state.ids.push_back((*number, id));
            }
            if let Err(full) = pushed {
                drop(stateful);
                log::warn!("connection {} closed: {full}", self.0.id.for_log());
                self.0.metrics.slow_consumer();
                self.close(Closing::with_message(
                    Some(format!(
                        "Connection closed: {full}; the client did not acknowledge messages fast enough."
                    )),
                    true,
                ));
                return Pushed::Overflowed;
            }
            if state.detached {
                self.0.last_queued_ms.store(now_millis(), Ordering::Relaxed);
                self.0.metrics.message_sent();
                return Pushed::Queued;
            }
        }
        // Still under the lock: the queue's order is the numbers' order.
        self.try_queue(record)
    }

    /// Queues a record that takes no sequence number (Ping, Ack, Sequence, handshake
    /// reply); dropped while a stateful connection has no socket.
    pub fn push_unsequenced(&self, record: Bytes) -> Pushed {
        if self.is_closing() {
            return Pushed::Closed;
        }
        if self.lock_stateful().as_ref().is_some_and(|s| s.detached) {
            return Pushed::Queued;
        }
        self.try_queue(record)
    }

    fn try_queue(&self, record: Bytes) -> Pushed {
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

    /// Turns stateful reconnect on (after a version-2 handshake on a WebSocket), keeping at
    /// most `limit` unacknowledged bytes; or continues a moved session's `replay`.
    pub fn enable_stateful(&self, limit: usize, replay: Option<ReplayState>) {
        let state = match replay {
            Some(state) => Stateful::new(
                ReplayBuffer::resume(state.limit, state.next, state.records),
                state.ids.into(),
                false,
            ),
            None => Stateful::new(ReplayBuffer::new(limit), VecDeque::new(), false),
        };
        *self.lock_stateful() = Some(state);
    }

    /// Starts receiving for a session that is moving here, before its state arrives:
    /// records are kept aside, in order, until [`Outbox::complete_move`].
    pub fn stage(&self) {
        let mut state = Stateful::new(ReplayBuffer::new(0), VecDeque::new(), true);
        state.staged = Some(Vec::new());
        *self.lock_stateful() = Some(state);
    }

    /// The moved session's replay buffer arrived: it continues here, followed by the
    /// records delivered here meanwhile. Both instances delivered the messages published
    /// between this instance's staging and the old owner's freeze: each is kept once, the
    /// old buffer's copy. They are told by message id: a staged record whose message the
    /// old buffer holds is dropped, whatever its bytes, and two equal records of different
    /// messages both stay. (Only if a staged record has no id — a message from an instance
    /// that sends none — are they told by bytes instead: the longest overlap of the old
    /// buffer's tail and the staged head.) The connection stays detached until its socket
    /// resumes. False if a staged record does not fit.
    pub fn complete_move(&self, replay: ReplayState) -> bool {
        let mut stateful = self.lock_stateful();
        let staged = stateful
            .as_mut()
            .and_then(|state| state.staged.take())
            .unwrap_or_default();
        let fresh: Vec<(Option<MessageId>, Bytes)> = if staged.iter().all(|(id, _)| id.is_some()) {
            let held: HashSet<MessageId> = replay.ids.iter().map(|(_, id)| *id).collect();
            staged
                .into_iter()
                .filter(|(id, _)| id.is_some_and(|id| !held.contains(&id)))
                .collect()
        } else {
            let held: Vec<&Bytes> = replay.records.iter().map(|(_, r)| r).collect();
            let bytes: Vec<Bytes> = staged.iter().map(|(_, r)| r.clone()).collect();
            let overlap = seam(&held, &bytes);
            staged.into_iter().skip(overlap).collect()
        };
        let mut state = Stateful::new(
            ReplayBuffer::resume(replay.limit, replay.next, replay.records),
            replay.ids.into(),
            true,
        );
        let mut fits = true;
        for (id, record) in fresh {
            match state.buffer.push(record) {
                Ok(number) => state.ids.extend(id.map(|id| (number, id))),
                Err(_) => {
                    fits = false;
                    break;
                }
            }
        }
        *stateful = Some(state);
        fits
    }

    /// Whether stateful reconnect is on.
    pub fn is_stateful(&self) -> bool {
        self.lock_stateful().is_some()
    }

    /// The client acknowledged records up to `sequence_id`.
    pub fn ack(&self, sequence_id: u64) {
        if let Some(state) = self.lock_stateful().as_mut() {
            state.buffer.ack(sequence_id);
            let first = state.buffer.first_unacknowledged();
            while state.ids.front().is_some_and(|(number, _)| *number < first) {
                state.ids.pop_front();
            }
        }
    }

    /// The stateful connection's socket is gone without a close frame: keep numbering and
    /// keeping records for the next socket. False (nothing changes) for any other
    /// connection, which the caller closes.
    pub fn detach(&self) -> bool {
        if self.is_closing() {
            return false;
        }
        match self.lock_stateful().as_mut() {
            Some(state) => {
                state.detached = true;
                true
            }
            None => false,
        }
    }

    /// A new socket took over a stateful connection: empties `queue` (whatever it holds is
    /// in the replay buffer, or is a Ping) and returns what the socket sends first: the
    /// `Sequence` record, then every unacknowledged record in order. Empty for a connection
    /// without stateful reconnect.
    pub fn resume(&self, queue: &mut queue::Receiver<Bytes>) -> Vec<Bytes> {
        let mut stateful = self.lock_stateful();
        let Some(state) = stateful.as_mut() else {
            return Vec::new();
        };
        while queue.try_recv().is_ok() {}
        state.detached = false;
        let sequence = HubMessage::Sequence {
            sequence_id: state.buffer.first_unacknowledged(),
        };
        std::iter::once(self.protocol().encode(&sequence))
            .chain(state.buffer.unacknowledged().map(|(_, r)| r.clone()))
            .collect()
    }

    /// Detaches the stateful side and returns it, for a session that moves to another
    /// instance; nothing is pushed to this outbox afterwards.
    pub fn export_replay(&self) -> Option<ReplayState> {
        let mut stateful = self.lock_stateful();
        let state = stateful.as_mut()?;
        state.detached = true;
        let first = state.buffer.first_unacknowledged();
        Some(ReplayState {
            next: state.buffer.next_number(),
            records: state.buffer.unacknowledged().cloned().collect(),
            ids: state
                .ids
                .iter()
                .filter(|(number, _)| *number >= first)
                .copied()
                .collect(),
            limit: state.buffer.limit(),
        })
    }

    /// Asks the connection to close. The first reason given wins.
    pub fn close(&self, closing: Closing) {
        {
            let mut current = self.0.closing.lock().unwrap_or_else(|e| e.into_inner());
            if current.is_some() {
                return;
            }
            *current = Some(closing);
            self.0.is_closing.store(true, Ordering::Release);
        }
        self.0.closed.notify_waiters();
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.0.is_closing.load(Ordering::Acquire)
    }

    /// Why the connection closes, once a close was asked for.
    pub fn closing(&self) -> Option<Closing> {
        self.0
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a close is asked for and returns its reason.
    pub async fn closed(&self) -> Closing {
        loop {
            // Registered before the check, so a close right after it still wakes us.
            let notified = self.0.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.closing() {
                return reason;
            }
            notified.await;
        }
    }

    /// When a record was last queued, in [`now_millis`] time.
    pub fn last_queued_ms(&self) -> u64 {
        self.0.last_queued_ms.load(Ordering::Relaxed)
    }
}

/// How many records at the head of `staged` repeat the tail of `held`: the longest such
/// overlap.
fn seam(held: &[&Bytes], staged: &[Bytes]) -> usize {
    let longest = held.len().min(staged.len());
    (1..=longest)
        .rev()
        .find(|&n| {
            held[held.len() - n..]
                .iter()
                .zip(&staged[..n])
                .all(|(a, b)| *a == b)
        })
        .unwrap_or(0)
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
        let reason = outbox.closing().unwrap();
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
    fn a_detached_stateful_outbox_keeps_records_for_the_next_socket_in_order() {
        let (outbox, mut rx) = outbox(8);
        outbox.enable_stateful(1000, None);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"2")), Pushed::Queued);
        outbox.ack(1);
        assert!(outbox.detach());
        assert_eq!(outbox.push(Bytes::from_static(b"3")), Pushed::Queued);
        assert_eq!(
            outbox.push_unsequenced(Bytes::from_static(b"ping")),
            Pushed::Queued
        );
        let resumed = outbox.resume(&mut rx);
        assert_eq!(
            resumed,
            vec![
                Bytes::from_static(b"{\"sequenceId\":2,\"type\":9}\x1e"),
                Bytes::from_static(b"2"),
                Bytes::from_static(b"3"),
            ]
        );
        assert!(rx.try_recv().is_err(), "the queue's copies were dropped");
        assert_eq!(outbox.push(Bytes::from_static(b"4")), Pushed::Queued);
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"4"));
    }

    #[test]
    fn a_stateful_outbox_that_overflows_its_replay_buffer_closes_with_a_reason() {
        let (outbox, _rx) = outbox(8);
        outbox.enable_stateful(3, None);
        assert_eq!(outbox.push(Bytes::from_static(b"ab")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"cd")), Pushed::Overflowed);
        let reason = outbox.closing().unwrap();
        let Some(HubMessage::Close {
            error: Some(error),
            allow_reconnect: true,
        }) = reason.message
        else {
            panic!("no Close message: {reason:?}");
        };
        assert!(error.contains("stateful reconnect buffer"), "{error}");
    }

    #[test]
    fn a_moved_session_keeps_each_message_both_instances_delivered_once_by_its_id() {
        let (outbox, mut rx) = outbox(8);
        outbox.stage();
        // Staged here: c and d (the old owner has them too), then two more messages whose
        // records equal the old buffer's last one ("t", a message sent again).
        for (id, record) in [(3, "c"), (4, "d"), (6, "t"), (7, "t")] {
            outbox.push_delivery(Bytes::from(record), Some(MessageId(id)));
        }
        let records = [(5, "a"), (6, "b"), (7, "c"), (8, "d"), (9, "t")]
            .map(|(n, r)| (n, Bytes::from(r)))
            .to_vec();
        let ids = [(5, 1), (6, 2), (7, 3), (8, 4), (9, 5)]
            .map(|(n, id)| (n, MessageId(id)))
            .to_vec();
        assert!(outbox.complete_move(ReplayState {
            next: 10,
            records,
            ids,
            limit: 1000
        }));
        let resumed = outbox.resume(&mut rx);
        assert_eq!(
            resumed,
            [
                "{\"sequenceId\":5,\"type\":9}\x1e",
                "a",
                "b",
                "c",
                "d",
                "t",
                "t",
                "t"
            ]
            .map(Bytes::from),
            "every message once, equal records of different messages included"
        );
        // The ids stay with the records: the next move tells them apart the same way.
        let exported = outbox.export_replay().expect("stateful");
        assert_eq!(
            exported
                .ids
                .iter()
                .map(|(n, id)| (*n, id.0))
                .collect::<Vec<_>>(),
            [(5, 1), (6, 2), (7, 3), (8, 4), (9, 5), (10, 6), (11, 7)]
        );
        outbox.ack(8);
        let exported = outbox.export_replay().expect("stateful");
        assert_eq!(
            exported.ids.first().map(|(n, _)| *n),
            Some(9),
            "trimmed by acks"
        );
    }

    #[test]
    fn records_without_message_ids_are_told_apart_by_bytes() {
        let (outbox, mut rx) = outbox(8);
        outbox.stage();
        for record in [&b"c"[..], b"d", b"e"] {
            outbox.push(Bytes::copy_from_slice(record));
        }
        // The old owner delivered a..d before it froze: c and d came to both.
        let records = [(5, "a"), (6, "b"), (7, "c"), (8, "d")]
            .map(|(n, r)| (n, Bytes::from(r)))
            .to_vec();
        assert!(outbox.complete_move(ReplayState {
            next: 9,
            records,
            ids: Vec::new(),
            limit: 1000
        }));
        let resumed = outbox.resume(&mut rx);
        assert_eq!(
            resumed,
            ["{\"sequenceId\":5,\"type\":9}\x1e", "a", "b", "c", "d", "e"].map(Bytes::from)
        );
    }

    #[test]
    fn the_seam_is_the_longest_overlap_and_may_be_empty() {
        let b = |s: &'static str| Bytes::from(s);
        let (x, y, z) = (b("x"), b("y"), b("z"));
        assert_eq!(seam(&[&x, &y], &[y.clone(), z.clone()]), 1);
        assert_eq!(seam(&[&x, &y], &[x.clone(), y.clone(), z.clone()]), 2);
        assert_eq!(seam(&[&x], std::slice::from_ref(&z)), 0);
        assert_eq!(seam(&[], &[z]), 0);
    }

    #[test]
    fn the_first_close_reason_wins() {
        let (outbox, _rx) = outbox(1);
        outbox.close(Closing::silent());
        outbox.close(Closing::with_message(Some("x".into()), false));
        assert_eq!(outbox.closing(), Some(Closing::silent()));
    }
}
