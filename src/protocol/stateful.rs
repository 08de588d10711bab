//! Stateful reconnect's bookkeeping (HubProtocol.md, "Stateful Reconnect"; signalr-protocol.md
//! §4), pure: no I/O, no clock.
//!
//! - [`ReplayBuffer`]: the server's outbound side. Every message of types 1–5 gets the next
//!   sequence number (from 1, never reset during the connection) and is kept until the
//!   client acknowledges it (`Ack`, type 8); after a reconnect the server sends `Sequence`
//!   (type 9) with the oldest number it still holds and replays what it holds. It is bounded
//!   in bytes: a record that does not fit is refused, and the connection is closed with a
//!   Close message (this server's choice: ASP.NET's `MessageBuffer` instead makes the sender
//!   wait for an Ack, which would let one client that stopped acknowledging stall the hub's
//!   fan-out for every other client).
//! - [`InboundSequence`]: the inbound side. It counts the client's messages of types 1–5,
//!   moves its count back on the client's `Sequence`, and says which messages are
//!   duplicates of ones already processed; [`InboundSequence::ack_due`] says when an Ack
//!   is owed (the session sends it on its one-second tick, as ASP.NET's timer does).

use std::collections::VecDeque;

use bytes::Bytes;

use super::message::HubMessage;

/// ASP.NET's default `StatefulReconnectBufferSize`, and the JS client's
/// `DEFAULT_STATEFUL_RECONNECT_BUFFER_SIZE`: 100,000 bytes.
pub const DEFAULT_BUFFER_SIZE: usize = 100_000;

/// Whether a message takes a sequence number: only types 1–5 do (Invocation, StreamItem,
/// Completion, StreamInvocation, CancelInvocation); Ping, Close, Ack and Sequence do not.
pub fn is_sequenced(message: &HubMessage) -> bool {
    matches!(
        message,
        HubMessage::Invocation { .. }
            | HubMessage::StreamItem { .. }
            | HubMessage::Completion { .. }
            | HubMessage::StreamInvocation { .. }
            | HubMessage::CancelInvocation { .. }
    )
}

/// A bad stateful-reconnect message from the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// The client's `Sequence` starts past the next message the server expects: messages
    /// in between would be lost (ASP.NET throws the same way).
    #[error("Sequence ID {got} is greater than the next expected ID {expected}.")]
    Gap {
        /// The `sequenceId` received.
        got: u64,
        /// The next number the server expected.
        expected: u64,
    },
}

/// A record did not fit the replay buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stateful reconnect buffer of {limit} bytes is full ({held} bytes not acknowledged, {record} more)")]
pub struct BufferFull {
    /// The limit in bytes.
    pub limit: usize,
    /// Bytes held when the record came.
    pub held: usize,
    /// The size of the refused record.
    pub record: usize,
}

/// The server's unacknowledged outbound records, numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayBuffer {
    limit: usize,
    next: u64,
    held_bytes: usize,
    records: VecDeque<(u64, Bytes)>,
}

impl ReplayBuffer {
    /// An empty buffer holding at most `limit` bytes; numbering starts at 1.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            next: 1,
            held_bytes: 0,
            records: VecDeque::new(),
        }
    }

    /// A buffer continuing where another instance's left off: `next` is the number the next
    /// record gets, `records` the unacknowledged ones in order (a session that moved).
    pub fn resume(limit: usize, next: u64, records: Vec<(u64, Bytes)>) -> Self {
        let held_bytes = records.iter().map(|(_, r)| r.len()).sum();
        Self {
            limit,
            next,
            held_bytes,
            records: records.into(),
        }
    }

    /// Numbers and keeps a sequenced record; returns its number. A record is refused only
    /// when it does not fit beside what is held (one record bigger than the whole limit is
    /// still taken into an empty buffer, so that a limit below the message size cannot
    /// wedge a connection).
    pub fn push(&mut self, record: Bytes) -> Result<u64, BufferFull> {
        if !self.records.is_empty() && self.held_bytes + record.len() > self.limit {
            return Err(BufferFull {
                limit: self.limit,
                held: self.held_bytes,
                record: record.len(),
            });
        }
        let number = self.next;
        self.next += 1;
        self.held_bytes += record.len();
        self.records.push_back((number, record));
        Ok(number)
    }

    /// The client received everything up to `sequence_id`: forget it. An Ack for numbers
    /// not yet sent only forgets what is held.
    pub fn ack(&mut self, sequence_id: u64) {
        while let Some((number, record)) = self.records.front() {
            if *number > sequence_id {
                break;
            }
            self.held_bytes -= record.len();
            self.records.pop_front();
        }
    }

    /// The `sequenceId` of the server's `Sequence` after a reconnect: the oldest number
    /// held, or the next one when nothing is.
    pub fn first_unacknowledged(&self) -> u64 {
        self.records
            .front()
            .map_or(self.next, |(number, _)| *number)
    }

    /// The number the next record gets.
    pub fn next_number(&self) -> u64 {
        self.next
    }

    /// The records to replay after a reconnect, oldest first.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &(u64, Bytes)> {
        self.records.iter()
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

/// The client's messages as the server counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboundSequence {
    /// The number of the last sequenced message seen (processed or dropped).
    current: u64,
    /// The highest number processed.
    processed: u64,
    /// The highest number acknowledged to the client.
    acked: u64,
}

impl InboundSequence {
    /// Where another instance left off: `processed` messages were processed and acknowledged
    /// up to `acked`.
    pub fn resume(processed: u64, acked: u64) -> Self {
        Self {
            current: processed,
            processed,
            acked,
        }
    }

    /// Counts one sequenced message; `true` if it is new and must be processed, `false` if
    /// it repeats one processed before the reconnect (HubProtocol.md: "messages with IDs at
    /// or below the highest already processed are dropped").
    pub fn accept(&mut self) -> bool {
        self.current += 1;
        if self.current <= self.processed {
            return false;
        }
        self.processed = self.current;
        true
    }

    /// The client's `Sequence`: its next message is numbered `sequence_id`.
    pub fn restart_at(&mut self, sequence_id: u64) -> Result<(), SequenceError> {
        let expected = self.processed + 1;
        if sequence_id > expected || sequence_id == 0 {
            return Err(SequenceError::Gap {
                got: sequence_id,
                expected,
            });
        }
        self.current = sequence_id - 1;
        // The client resends what it had no Ack for; an Ack sent while its socket was down
        // may be lost, so the next tick acknowledges again.
        self.acked = self.acked.min(self.current);
        Ok(())
    }

    /// The `sequenceId` of an Ack to send now, if anything arrived since the last one.
    pub fn ack_due(&mut self) -> Option<u64> {
        (self.processed > self.acked).then(|| {
            self.acked = self.processed;
            self.processed
        })
    }

    /// The highest number processed.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    /// The highest number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn records_are_numbered_from_one_and_forgotten_when_acknowledged() {
        let mut buffer = ReplayBuffer::new(1000);
        assert_eq!(buffer.first_unacknowledged(), 1);
        assert_eq!(buffer.push(record(10)), Ok(1));
        assert_eq!(buffer.push(record(20)), Ok(2));
        assert_eq!(buffer.push(record(30)), Ok(3));
        assert_eq!(buffer.held_bytes(), 60);
        buffer.ack(2);
        assert_eq!(buffer.first_unacknowledged(), 3);
        assert_eq!(buffer.held_bytes(), 30);
        let left: Vec<u64> = buffer.unacknowledged().map(|(n, _)| *n).collect();
        assert_eq!(left, vec![3]);
        buffer.ack(3);
        assert_eq!(buffer.first_unacknowledged(), 4);
        assert_eq!(buffer.push(record(1)), Ok(4));
    }

    #[test]
    fn acks_are_idempotent_and_may_run_ahead() {
        let mut buffer = ReplayBuffer::new(1000);
        buffer.push(record(5)).unwrap();
        buffer.ack(1);
        buffer.ack(1);
        buffer.ack(0);
        assert_eq!(buffer.held_bytes(), 0);
        buffer.ack(99);
        assert_eq!(buffer.first_unacknowledged(), 2);
    }

    #[test]
    fn a_full_buffer_refuses_the_record_and_keeps_its_number_free() {
        let mut buffer = ReplayBuffer::new(100);
        buffer.push(record(60)).unwrap();
        let full = buffer.push(record(50)).unwrap_err();
        assert_eq!(
            full,
            BufferFull {
                limit: 100,
                held: 60,
                record: 50
            }
        );
        assert_eq!(buffer.next_number(), 2);
        buffer.ack(1);
        assert_eq!(buffer.push(record(50)), Ok(2));
    }

    #[test]
    fn one_record_above_the_limit_fits_an_empty_buffer() {
        let mut buffer = ReplayBuffer::new(10);
        assert_eq!(buffer.push(record(11)), Ok(1));
        assert!(buffer.push(record(1)).is_err());
    }

    #[test]
    fn a_resumed_buffer_continues_the_numbering() {
        let buffer = ReplayBuffer::resume(100, 8, vec![(6, record(3)), (7, record(4))]);
        assert_eq!(buffer.first_unacknowledged(), 6);
        assert_eq!(buffer.held_bytes(), 7);
        assert_eq!(buffer.next_number(), 8);
    }

    #[test]
    fn resent_messages_are_dropped_after_the_clients_sequence() {
        let mut inbound = InboundSequence::default();
        assert!(inbound.accept()); // 1
        assert!(inbound.accept()); // 2
        assert!(inbound.accept()); // 3
        assert_eq!(inbound.ack_due(), Some(3));
        assert_eq!(inbound.ack_due(), None);
        // The client had seen an Ack for 1 only: it resends 2, 3 and then a new 4.
        inbound.restart_at(2).unwrap();
        assert!(!inbound.accept()); // 2 again
        assert!(!inbound.accept()); // 3 again
        assert!(inbound.accept()); // 4
        assert_eq!(inbound.processed(), 4);
        assert_eq!(inbound.ack_due(), Some(4));
    }

    #[test]
    fn a_sequence_past_the_next_expected_message_is_an_error() {
        let mut inbound = InboundSequence::default();
        assert!(inbound.accept());
        assert_eq!(inbound.restart_at(2), Ok(()));
        assert_eq!(
            inbound.restart_at(4),
            Err(SequenceError::Gap {
                got: 4,
                expected: 2
            })
        );
        assert!(inbound.restart_at(0).is_err());
    }

    #[test]
    fn only_types_one_to_five_are_sequenced() {
        assert!(is_sequenced(&HubMessage::CancelInvocation {
            invocation_id: "1".into()
        }));
        assert!(!is_sequenced(&HubMessage::Ping));
        assert!(!is_sequenced(&HubMessage::Ack { sequence_id: 1 }));
        assert!(!is_sequenced(&HubMessage::Sequence { sequence_id: 1 }));
    }
}
