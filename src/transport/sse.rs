//! Server-Sent Events (TransportProtocols.md, "Server-Sent Events"; ASP.NET
//! `ServerSentEventsServerTransport.cs`).
//!
//! The response streams, unbuffered and uncompressed: the `:` preamble at once (the
//! client's `start()` waits for EventSource's `open`), then one event per batch of
//! records. The client sends by POST. When the client goes away the body stream is
//! dropped, which ends the connection.

use std::sync::Arc;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, PRAGMA};
use actix_web::HttpResponse;
use bytes::Bytes;
use tokio::sync::OwnedMutexGuard;

use super::{batch, final_batch};
use crate::connection::{Activation, Connection};
use crate::outbox::Closing;

use crate::protocol::sse;
use crate::queue;

/// Ends the connection when the response body is dropped, whatever the reason.
struct EndOnDrop {
    connection: Arc<Connection>,
    _activation: Activation,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.connection.outbox().close(Closing::silent());
    }
}

enum Phase {
    Preamble,
    Open,
    Done,
}

struct Stream {
    phase: Phase,
    queue: Option<OwnedMutexGuard<queue::Receiver<Bytes>>>,
    guard: EndOnDrop,
}

impl Stream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Preamble => {
                self.phase = Phase::Open;
                return Some(Bytes::from_static(sse::PREAMBLE));
            }
            Phase::Done => return None,
            Phase::Open => {}
        }
        if self.queue.is_none() {
            self.queue = Some(self.guard.connection.outbound().await);
        }
        let queue = self.queue.as_mut()?;
        let outbox = self.guard.connection.outbox();
        tokio::select! {
            biased;
            reason = outbox.closed() => {
                self.phase = Phase::Done;
                let close = outbox.close_record(&reason);
                let rest = final_batch(queue, close.as_ref());
                (!rest.is_empty()).then(|| sse::event(&rest))
            }
            record = queue.recv() => record.map(|first| sse::event(&batch(first, queue))),
        }
    }
}

/// Starts the event stream of a connection.
pub fn stream(connection: Arc<Connection>, activation: Activation) -> HttpResponse {
    let state = Stream {
        phase: Phase::Preamble,
        queue: None,
        guard: EndOnDrop {
            connection,
            _activation: activation,
        },
    };
    let body = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), state))
    });
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache,no-store"))
        .insert_header((PRAGMA, "no-cache"))
        .insert_header((CONTENT_ENCODING, "identity"))
        // Tells nginx not to buffer this response, whatever its configuration says.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
