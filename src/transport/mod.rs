//! Transports move whole records between a client and its connection, and nothing else:
//! they know nothing of hubs, routing or Redis (DESIGN.md, "Layers").
//!
//! Every transport drains the connection's outbound queue the same way: records as they
//! come, and when the connection closes, whatever is still queued followed by the Close
//! record, so that the client learns why (TransportProtocols.md). Records are bytes in
//! the connection's protocol; a transport only chooses text or binary framing from the
//! connection's transfer format, and never converts bodies to UTF-8.

pub mod long_polling;
pub mod sse;
pub mod websocket;

use bytes::{Bytes, BytesMut};

use crate::connection::{Connection, ConnectionError};
use crate::protocol::negotiate::TransportKind;
use crate::queue;

/// Largest batch of records put into one poll response or SSE event; one record is never
/// split, so a batch can exceed this by one record.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Handles `POST {hub}?id=…`: the body holds one or more whole records for the session
/// (SSE and long polling only; TransportProtocols.md, "Sending data").
pub async fn receive_post(connection: &Connection, body: Bytes) -> Result<(), ConnectionError> {
    if connection.transport() == Some(TransportKind::WebSockets) {
        return Err(ConnectionError::PostToWebSocket);
    }
    connection.receive(body).await
}

/// Appends `first` and then every record already queued to a batch, up to the limit.
pub fn batch(first: Bytes, queue: &mut queue::Receiver<Bytes>) -> Bytes {
    let mut out = BytesMut::from(&first[..]);
    while out.len() < MAX_BATCH_BYTES {
        match queue.try_recv() {
            Ok(record) => out.extend_from_slice(&record),
            Err(_) => break,
        }
    }
    out.freeze()
}

/// What is left to send when a connection closes: the queued records, then the Close
/// record if there is one (already encoded in the connection's protocol).
pub fn final_batch(queue: &mut queue::Receiver<Bytes>, close_record: Option<&Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    while let Ok(record) = queue.try_recv() {
        out.extend_from_slice(&record);
    }
    if let Some(record) = close_record {
        out.extend_from_slice(record);
    }
    out.freeze()
}
