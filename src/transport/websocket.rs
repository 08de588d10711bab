//! WebSockets (TransportProtocols.md, "WebSockets"; ASP.NET
//! `WebSocketsServerTransport.cs`).
//!
//! One `select!` loop over client frames, outbound records and the close signal. Records
//! go out one whole record per frame, as Text frames for JSON (a Binary frame would reach
//! a browser's JSON client as a Blob and fail) and Binary frames once the handshake agreed
//! on MessagePack (the `{}` reply included: ASP.NET switches before writing it). Both
//! frame types are taken from the client: its handshake comes as text, MessagePack
//! records as binary. The server closes
//! with 1000 after a Close message or a normal end, 1011 on an unexplained error, and
//! 1009 when a client frame is too large.

use std::sync::Arc;

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, MessageStream, Session};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::StreamExt;

use crate::connection::{Activation, Connection};
use crate::outbox::{closed, Closing};
use crate::protocol::hub_protocol::TransferFormat;

async fn send(session: &mut Session, record: Bytes, format: TransferFormat) -> Result<(), ()> {
    match format {
        TransferFormat::Binary => session.binary(record).await.map_err(|_| ()),
        TransferFormat::Text => {
            // JSON records are valid UTF-8; the check is cheap and keeps us honest.
            let text = ByteString::try_from(record).map_err(|_| ())?;
            session.text(text).await.map_err(|_| ())
        }
    }
}

/// Serves an upgraded WebSocket until either side ends it.
pub async fn serve(
    connection: Arc<Connection>,
    activation: Activation,
    mut session: Session,
    messages: MessageStream,
    max_frame_size: usize,
) {
    let mut messages = messages
        .max_frame_size(max_frame_size)
        .aggregate_continuations()
        .max_continuation_size(max_frame_size);
    let mut queue = connection.outbound().await;
    let mut closing = connection.outbox().closing();
    let outbox = connection.outbox();
    let close: Option<CloseReason> = loop {
        tokio::select! {
            reason = closed(&mut closing) => {
                let format = outbox.transfer_format();
                let rest = super::final_batch(&mut queue, None);
                let mut ok = rest.is_empty() || send(&mut session, rest, format).await.is_ok();
                let close_record = outbox.close_record(&reason);
                if let (true, Some(record)) = (ok, close_record.clone()) {
                    ok = send(&mut session, record, format).await.is_ok();
                }
                let code = if reason.is_error && close_record.is_none() { CloseCode::Error } else { CloseCode::Normal };
                break ok.then_some(CloseReason { code, description: None });
            }
            record = queue.recv() => match record {
                Some(record) => {
                    if send(&mut session, record, outbox.transfer_format()).await.is_err() {
                        break None;
                    }
                }
                None => break None,
            },
            message = messages.next() => match message {
                Some(Ok(AggregatedMessage::Text(text))) => {
                    if connection.receive(text.into_bytes()).await.is_err() {
                        continue; // Closing: the close branch finishes the socket.
                    }
                }
                Some(Ok(AggregatedMessage::Binary(bytes))) => {
                    // The session rejects whatever is not a record of its protocol.
                    if connection.receive(bytes).await.is_err() {
                        continue;
                    }
                }
                Some(Ok(AggregatedMessage::Ping(bytes))) => {
                    if session.pong(&bytes).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(AggregatedMessage::Pong(_))) => {}
                Some(Ok(AggregatedMessage::Close(reason))) => {
                    // Answer the client's close with its own code, completing the handshake.
                    break Some(reason.unwrap_or(CloseReason { code: CloseCode::Normal, description: None }));
                }
                Some(Err(error)) => {
                    log::debug!("connection {}: WebSocket protocol error: {error}", connection.id.for_log());
                    break Some(CloseReason {
                        code: CloseCode::Size,
                        description: Some(format!("{error}")),
                    });
                }
                None => break None,
            },
        }
    };
    connection.outbox().close(Closing::silent());
    if let Some(reason) = close {
        let _ = session.close(Some(reason)).await;
    }
    drop(activation);
}
