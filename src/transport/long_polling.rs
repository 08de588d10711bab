//! Long Polling (TransportProtocols.md, "Long Polling"; ASP.NET
//! `LongPollingServerTransport.cs`).
//!
//! - The first poll is answered at once with an empty 200: the client sends its handshake
//!   only after it, so holding it would deadlock `start()`.
//! - Later polls wait for records and return everything queued, or an empty 200 after
//!   `POLL_TIMEOUT` (under the client's 100 s limit), so the client polls again.
//! - 204 means "the connection is over": it answers a poll when the connection closed with
//!   nothing left to send (after which the connection is finished and every later poll
//!   gets 404, as ASP.NET's `HttpConnectionDispatcher` disposes it), and the older of two
//!   overlapping polls.
//! - Bodies are the records as they are, `application/octet-stream`, text or MessagePack.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE, EXPIRES, PRAGMA};
use actix_web::HttpResponse;
use bytes::Bytes;

use super::{batch, final_batch};
use crate::connection::{Activation, Connection};

fn respond(mut response: actix_web::HttpResponseBuilder, body: Bytes) -> HttpResponse {
    response
        .insert_header((CONTENT_TYPE, "application/octet-stream"))
        .insert_header((CACHE_CONTROL, "no-cache, no-store"))
        .insert_header((PRAGMA, "no-cache"))
        .insert_header((EXPIRES, "Thu, 01 Jan 1970 00:00:00 GMT"))
        .body(body)
}

/// Serves one poll.
pub async fn poll(
    connection: Arc<Connection>,
    activation: Activation,
    poll_timeout: Duration,
) -> HttpResponse {
    if activation.first {
        return respond(HttpResponse::Ok(), Bytes::new());
    }
    let (number, mut polls) = connection.begin_poll();
    let mut superseded = polls.clone();
    let newer_poll = |polls: &mut tokio::sync::watch::Receiver<u64>| {
        let mut polls = polls.clone();
        async move {
            let _ = polls.wait_for(|latest| *latest != number).await;
        }
    };
    let mut queue = tokio::select! {
        queue = connection.outbound() => queue,
        _ = newer_poll(&mut polls) => return respond(HttpResponse::NoContent(), Bytes::new()),
    };
    let response = tokio::select! {
        biased;
        reason = connection.outbox().closed() => {
            let close = connection
                .outbox()
                .close_record(&reason)
                .filter(|_| connection.claim_close_record());
            let rest = final_batch(&mut queue, close.as_ref());
            if rest.is_empty() {
                // The final poll: the connection is over, and later polls get 404 as in
                // ASP.NET, which disposes the connection once it answered 204.
                connection.finish();
                respond(HttpResponse::NoContent(), rest)
            } else {
                respond(HttpResponse::Ok(), rest)
            }
        }
        record = queue.recv() => match record {
            Some(first) => respond(HttpResponse::Ok(), batch(first, &mut queue)),
            None => {
                connection.finish();
                respond(HttpResponse::NoContent(), Bytes::new())
            }
        },
        _ = newer_poll(&mut superseded) => respond(HttpResponse::NoContent(), Bytes::new()),
        _ = tokio::time::sleep(poll_timeout) => respond(HttpResponse::Ok(), Bytes::new()),
    };
    drop(activation);
    response
}
