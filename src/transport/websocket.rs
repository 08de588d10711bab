//! WebSockets (TransportProtocols.md, "WebSockets"; ASP.NET
//! `WebSocketsServerTransport.cs`).
//!
//! The socket is the upgrade response's body ([`Socket`]): polling the body runs the
//! transport's loop, which writes frames into the body's buffer and reads client frames from
//! the request's payload. So a WebSocket is served inside the task that serves its HTTP
//! connection, with no task, channel or buffer of its own while it is idle: an idle
//! WebSocket's memory is what the server pays per connected client (README, "Where the
//! memory of an idle WebSocket goes"). Frames are encoded and decoded with actix-http's
//! WebSocket codec (RFC 6455), continuations joined here up to the frame limit.
//!
//! One `select!` loop over client frames, outbound records and the close signal. Records
//! go out one whole record per frame, as Text frames for JSON (a Binary frame would reach
//! a browser's JSON client as a Blob and fail) and Binary frames once the handshake agreed
//! on MessagePack (the `{}` reply included: ASP.NET switches before writing it). Both
//! frame types are taken from the client: its handshake comes as text, MessagePack
//! records as binary. The server closes with 1000 after a Close message or a normal end,
//! 1011 on an unexplained error, 1009 when a client message is too large, 1007 for a text
//! frame that is not UTF-8 and 1002 for any other broken frame (RFC 6455, 7.4.1).

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use actix_codec::{Decoder, Encoder};
use actix_http::body::{BodySize, MessageBody};
use actix_http::ws::{self, CloseCode, CloseReason, Frame, HandshakeError, Item, Message};
use actix_web::dev::Payload;
use actix_web::{HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::sync::OwnedMutexGuard;

use crate::connection::{Activation, Connection};
use crate::outbox::Closing;
use crate::protocol::hub_protocol::TransferFormat;
use crate::queue;

/// Encoded frames waiting in the body past this many bytes make the loop wait until the
/// body's reader has taken them (the socket's backpressure reaches the outbound queue).
const HIGH_WATER: usize = 64 * 1024;

/// Checks the upgrade request (RFC 6455, 4.2.1) and returns the start of its `101`
/// response; checked before the connection is touched, so a bad upgrade binds nothing.
pub fn handshake(req: &HttpRequest) -> Result<actix_http::ResponseBuilder, HandshakeError> {
    ws::handshake(req.head())
}

/// The `101` response whose body serves `connection` until either side ends it.
pub fn respond(
    mut handshake: actix_http::ResponseBuilder,
    payload: Payload,
    connection: Arc<Connection>,
    activation: Activation,
    max_frame_size: usize,
) -> HttpResponse {
    let frames = Rc::new(RefCell::new(BytesMut::new()));
    let writer = Writer {
        frames: frames.clone(),
        codec: ws::Codec::new(),
    };
    let reader = Reader::new(payload, max_frame_size);
    let run = Box::pin(serve(connection, activation, reader, writer));
    let body = Socket {
        run: Some(run),
        frames,
    };
    match handshake.message_body(body) {
        Ok(response) => HttpResponse::from(response.map_into_boxed_body()),
        // Only a header the builder could not take fails here; it built none of ours.
        Err(error) => HttpResponse::from_error(error),
    }
}

/// The upgrade response's body: each poll runs the transport's loop, then hands on every
/// frame it encoded; it ends when the loop has ended and its last frame is taken.
struct Socket {
    run: Option<Pin<Box<dyn Future<Output = ()>>>>,
    frames: Rc<RefCell<BytesMut>>,
}

impl MessageBody for Socket {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if let Some(run) = this.run.as_mut() {
            if run.as_mut().poll(cx).is_ready() {
                this.run = None;
            }
        }
        // Taken whole, so an idle socket keeps no buffer: the next frame allocates anew.
        let frames = std::mem::take(&mut *this.frames.borrow_mut());
        if !frames.is_empty() {
            // The loop may wait for this (`Writer::drained`): the body's reader polls
            // again once it has written these bytes, and that poll runs the loop.
            return Poll::Ready(Some(Ok(frames.freeze())));
        }
        match this.run {
            Some(_) => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

/// The loop's end of the body: encodes frames into it.
struct Writer {
    frames: Rc<RefCell<BytesMut>>,
    codec: ws::Codec,
}

impl Writer {
    /// Queues one record as one frame in the connection's framing.
    fn record(&mut self, record: Bytes, format: TransferFormat) {
        let message = match format {
            TransferFormat::Binary => Message::Binary(record),
            // JSON records are valid UTF-8; the check is cheap and keeps us honest.
            TransferFormat::Text => match ByteString::try_from(record) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    log::error!("a JSON record is not UTF-8; not sent");
                    return;
                }
            },
        };
        self.frame(message);
    }

    fn frame(&mut self, message: Message) {
        // Encoding a whole, non-continuation message into memory cannot fail.
        let _ = self.codec.encode(message, &mut self.frames.borrow_mut());
    }

    /// Waits until the body's reader has taken what is queued, if that is a lot.
    async fn drained(&self) {
        poll_fn(|_| {
            // No waker to register: only the body polls the loop, and it polls again
            // right after its reader took the frames.
            if self.frames.borrow().len() < HIGH_WATER {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// What the client sent: whole messages (continuations joined) and control frames.
enum Incoming {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Close(Option<CloseReason>),
}

/// Why reading the client's frames stopped.
enum ReadError {
    /// The connection broke (no close frame).
    Broken(String),
    /// The client broke the protocol: close with this code.
    Protocol(CloseCode, String),
}

/// The loop's end of the request payload: decodes client frames, joining continuations.
struct Reader {
    payload: Payload,
    /// Bytes read but not yet decoded; let go once empty, so an idle socket holds none.
    buffer: BytesMut,
    codec: ws::Codec,
    /// A message arriving in continuation frames: whether it is text, and its parts.
    partial: Option<(bool, BytesMut)>,
    max_size: usize,
}

impl Reader {
    fn new(payload: Payload, max_size: usize) -> Self {
        Self {
            payload,
            buffer: BytesMut::new(),
            codec: ws::Codec::new().max_size(max_size),
            partial: None,
            max_size,
        }
    }

    /// The next message; `None` once the client's side has ended.
    async fn next(&mut self) -> Option<Result<Incoming, ReadError>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, ReadError>>> {
        loop {
            let decoded = self.codec.decode(&mut self.buffer);
            if self.buffer.is_empty() {
                self.buffer = BytesMut::new();
            }
            match decoded {
                Ok(Some(frame)) => {
                    if let Some(message) = self.take(frame).transpose() {
                        return Poll::Ready(Some(message));
                    }
                }
                Ok(None) => match ready!(Pin::new(&mut self.payload).poll_next(cx)) {
                    Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                    Some(Err(error)) => {
                        return Poll::Ready(Some(Err(ReadError::Broken(error.to_string()))))
                    }
                    None => return Poll::Ready(None),
                },
                Err(ws::ProtocolError::Overflow) => {
                    return Poll::Ready(Some(Err(too_large(self.max_size))))
                }
                Err(error) => {
                    return Poll::Ready(Some(Err(ReadError::Protocol(
                        CloseCode::Protocol,
                        error.to_string(),
                    ))))
                }
            }
        }
    }

    /// What a decoded frame adds up to: a message, or nothing yet.
    fn take(&mut self, frame: Frame) -> Result<Option<Incoming>, ReadError> {
        Ok(Some(match frame {
            Frame::Text(bytes) => text(bytes)?,
            Frame::Binary(bytes) => Incoming::Binary(bytes),
            Frame::Continuation(item) => {
                let (bytes, last) = match item {
                    Item::FirstText(bytes) => {
                        self.partial = Some((true, BytesMut::new()));
                        (bytes, false)
                    }
                    Item::FirstBinary(bytes) => {
                        self.partial = Some((false, BytesMut::new()));
                        (bytes, false)
                    }
                    Item::Continue(bytes) => (bytes, false),
                    Item::Last(bytes) => (bytes, true),
                };
                // The codec refuses a continuation that nothing started.
                let Some((_, parts)) = self.partial.as_mut() else {
                    return Ok(None);
                };
                if parts.len() + bytes.len() > self.max_size {
                    self.partial = None;
                    return Err(too_large(self.max_size));
                }
                parts.extend_from_slice(&bytes);
                if !last {
                    return Ok(None);
                }
                match self.partial.take() {
                    Some((true, parts)) => text(parts.freeze())?,
                    Some((false, parts)) => Incoming::Binary(parts.freeze()),
                    None => return Ok(None),
                }
            }
            Frame::Ping(bytes) => Incoming::Ping(bytes),
            Frame::Pong(_) => return Ok(None),
            Frame::Close(reason) => Incoming::Close(reason),
        }))
    }
}

/// A text message: its bytes, once they are known to be UTF-8 (RFC 6455, 8.1).
fn text(bytes: Bytes) -> Result<Incoming, ReadError> {
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok(Incoming::Text(bytes)),
        Err(_) => Err(ReadError::Protocol(
            CloseCode::Invalid,
            "a text frame that is not UTF-8".into(),
        )),
    }
}

fn too_large(max_size: usize) -> ReadError {
    ReadError::Protocol(
        CloseCode::Size,
        format!("a message larger than the limit of {max_size} bytes"),
    )
}

/// What the loop holds of a connection while it serves it. Dropped when the loop ends,
/// and also when the socket ends under it (the body is dropped when its connection
/// breaks): either way the connection learns that this socket is gone.
struct Attached {
    connection: Arc<Connection>,
    queue: Option<OwnedMutexGuard<queue::Receiver<Bytes>>>,
    activation: Option<Activation>,
    /// The loop closes the WebSocket with a close frame; otherwise it broke.
    closing: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        // A stateful connection whose socket broke (no close frame) stays alive for the
        // next socket, until the disconnect timeout; anything else ends here. Detaching
        // happens before the queue is let go, so a newer socket resumes after it.
        let outbox = self.connection.outbox();
        if self.closing || !outbox.detach() {
            outbox.close(Closing::silent());
        }
        self.queue.take();
        self.activation.take();
    }
}

/// Serves an upgraded WebSocket until either side ends it.
async fn serve(
    connection: Arc<Connection>,
    activation: Activation,
    mut reader: Reader,
    mut writer: Writer,
) {
    let mut generation = connection.socket_generation();
    generation.borrow_and_update();
    let first = activation.first;
    // An older socket of a stateful connection lets go of the queue once it sees the
    // generation change.
    let queue = connection.outbound().await;
    let mut attached = Attached {
        connection: connection.clone(),
        queue: Some(queue),
        activation: Some(activation),
        closing: false,
    };
    let queue = attached.queue.as_mut().expect("just set");
    let outbox = connection.outbox();
    // A stateful client coming back: the server's Sequence, then every record the client
    // has not acknowledged, before anything else (HubProtocol.md, "Stateful Reconnect").
    if !first {
        let format = outbox.transfer_format();
        for record in outbox.resume(queue) {
            writer.record(record, format);
        }
    }
    let close: Option<CloseReason> = loop {
        writer.drained().await;
        let from_client = tokio::select! {
            _ = generation.changed() => break None,
            reason = outbox.closed() => {
                let format = outbox.transfer_format();
                let rest = super::final_batch(queue, None);
                if !rest.is_empty() {
                    writer.record(rest, format);
                }
                let close_record = outbox.close_record(&reason);
                if let Some(record) = close_record.clone() {
                    writer.record(record, format);
                }
                let code = if reason.is_error && close_record.is_none() { CloseCode::Error } else { CloseCode::Normal };
                break Some(CloseReason { code, description: None });
            }
            record = queue.recv() => match record {
                Some(record) => {
                    writer.record(record, outbox.transfer_format());
                    continue;
                }
                None => break None,
            },
            message = reader.next() => match message {
                // The session rejects whatever is not a record of its protocol.
                Some(Ok(Incoming::Text(bytes) | Incoming::Binary(bytes))) => bytes,
                Some(Ok(Incoming::Ping(bytes))) => {
                    writer.frame(Message::Pong(bytes));
                    continue;
                }
                Some(Ok(Incoming::Close(reason))) => {
                    // Answer the client's close with its own code, completing the handshake.
                    break Some(reason.unwrap_or(CloseReason { code: CloseCode::Normal, description: None }));
                }
                Some(Err(ReadError::Broken(error))) => {
                    // The connection broke without a close frame: a stateful client comes back.
                    log::debug!("connection {}: WebSocket broken: {error}", connection.id.for_log());
                    break None;
                }
                Some(Err(ReadError::Protocol(code, error))) => {
                    log::debug!("connection {}: WebSocket protocol error: {error}", connection.id.for_log());
                    break Some(CloseReason { code, description: Some(error) });
                }
                None => break None,
            },
        };
        // Outside the select, whose futures are gone by now: the socket's future is as
        // large as the larger of the two, not their sum. An error means closing: the next
        // round's close branch finishes the socket.
        let _ = connection.receive(from_client).await;
    };
    attached.closing = close.is_some();
    drop(attached);
    if let Some(reason) = close {
        writer.frame(Message::Close(Some(reason)));
    }
}
