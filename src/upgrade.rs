//! Serving a WebSocket upgrade without actix-http's HTTP/1 dispatcher, to keep an idle
//! WebSocket small.
//!
//! Why: actix-http's dispatcher holds an 8 KiB read buffer and an 8 KiB write buffer (fixed
//! sizes, no setting) for the whole life of its connection, and an upgraded WebSocket's
//! frames keep flowing through it: that was most of an idle WebSocket's memory (README,
//! "Where the memory of an idle WebSocket goes"). actix-http hands over a request that
//! asks for an upgrade (`Upgrade: websocket`) to an upgrade service, with the socket; this
//! module is that service. It gives the request a payload that reads the socket itself,
//! calls the same actix-web `App` as every other request (routing, forwarding, the checks
//! in `crate::http` and the access log stay where they are), writes the response head with
//! actix-http's own HTTP/1 codec, then the response body as it comes. Buffers exist only
//! while there are bytes in flight: a read goes to the stack and hands on an exact copy, a
//! write batch is let go once written. A response other than `101 Switching Protocols`
//! closes the connection after it is written.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use actix_codec::{Encoder, Framed};
use actix_http::body::{BodySize, MessageBody};
use actix_http::error::PayloadError;
use actix_http::h1::{Codec, Message};
use actix_http::{ConnectionType, Payload, Request, Response, StatusCode};
use actix_service::{fn_factory, fn_service, Service, ServiceFactory};
use actix_web::dev::{AppConfig, ServiceResponse};
use actix_web::rt::net::TcpStream;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream};

/// What one read of the socket may take; a larger client frame arrives in several reads
/// (the WebSocket decoder joins them).
const READ_CHUNK: usize = 4 * 1024;

/// Body chunks that are ready together go out in one write, up to about this size.
const WRITE_BATCH: usize = 64 * 1024;

/// The upgrade service for `HttpService::build().upgrade(…)`: one instance of `app` (the
/// application factory's `App`) per worker, called for every upgrade request.
pub(crate) fn service<S, B>(
    app: S,
) -> impl ServiceFactory<
    (Request, Framed<TcpStream, Codec>),
    Config = (),
    Response = (),
    Error = Infallible,
    InitError = (),
>
where
    S: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        > + 'static,
    S::Service: 'static,
    S::InitError: std::fmt::Debug,
    B: MessageBody + 'static,
{
    let app = Rc::new(app);
    fn_factory(move || {
        let init = app.new_service(AppConfig::default());
        async move {
            let app = Rc::new(init.await.map_err(|error| {
                log::error!("cannot start the upgrade service: {error:?}");
            })?);
            Ok(fn_service(
                move |(req, framed): (Request, Framed<TcpStream, Codec>)| {
                    // Not boxed: the dispatcher's state holds it in place of its own
                    // (larger) request state, in the connection's task.
                    serve(app.clone(), req, framed).map(Ok::<(), Infallible>)
                },
            ))
        }
    })
}

/// Serves one upgrade request to its end. Failures are the peer's going away: logged at
/// debug, never returned (actix-http would log them as errors).
async fn serve<S, B>(app: Rc<S>, mut req: Request, framed: Framed<TcpStream, Codec>)
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    let parts = framed.into_parts();
    // The dispatcher's buffers go here; what the client sent right behind its request
    // (already read) comes first in the payload.
    let io = Rc::new(parts.io);
    let mut codec = parts.codec;
    // A copy, for the same reason as in `SocketPayload`: the read buffer is 8 KiB.
    let early = (!parts.read_buf.is_empty()).then(|| Bytes::copy_from_slice(&parts.read_buf));
    drop(parts.read_buf);
    drop(parts.write_buf);
    *req.payload() = Payload::Stream {
        payload: Box::pin(SocketPayload {
            io: io.clone(),
            early,
        }),
    };
    // Boxed, and so let go once answered: held in place it would size this whole future,
    // which lives as long as the connection.
    let response: Response<actix_http::body::BoxBody> = match Box::pin(app.call(req)).await {
        Ok(response) => response.map_into_boxed_body().into(),
        Err(error) => error.error_response().into(),
    };
    if let Err(error) = respond(&io, &mut codec, response).await {
        log::debug!("upgrade request: {error}");
    }
}

/// Writes the response: its head, then its body as it comes, everything that is ready
/// at once in one write.
async fn respond(
    io: &TcpStream,
    codec: &mut Codec,
    response: Response<actix_http::body::BoxBody>,
) -> io::Result<()> {
    let (mut head, body) = response.into_parts();
    if head.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Not upgraded: the connection still carries a WebSocket request's unbounded
        // payload, so it cannot serve another request.
        head.head_mut().set_connection_type(ConnectionType::Close);
    }
    let size = body.size();
    let mut out = BytesMut::new();
    codec.encode(Message::Item((head, size)), &mut out)?;
    let mut body = pin!(body);
    let mut next = |cx: &mut Context<'_>| body.as_mut().poll_next(cx);
    let mut ended = matches!(size, BodySize::None | BodySize::Sized(0));
    while !ended {
        // Everything the body has ready now, then one write.
        while out.len() < WRITE_BATCH {
            let Some(chunk) = poll_fn(&mut next).now_or_never() else {
                break;
            };
            ended = encode(codec, chunk, &mut out)?;
            if ended {
                break;
            }
        }
        if !out.is_empty() {
            write_all(io, &out).await?;
            out = BytesMut::new();
        }
        if !ended {
            let chunk = poll_fn(&mut next).await;
            ended = encode(codec, chunk, &mut out)?;
        }
    }
    if !out.is_empty() {
        write_all(io, &out).await?;
    }
    Ok(())
}

/// Adds a body chunk to `out`; true once the body has ended.
fn encode(
    codec: &mut Codec,
    chunk: Option<Result<Bytes, Box<dyn std::error::Error>>>,
    out: &mut BytesMut,
) -> io::Result<bool> {
    match chunk {
        Some(Ok(bytes)) => {
            codec.encode(Message::Chunk(Some(bytes)), out)?;
            Ok(false)
        }
        Some(Err(error)) => Err(io::Error::other(error.to_string())),
        None => {
            codec.encode(Message::Chunk(None), out)?;
            Ok(true)
        }
    }
}

async fn write_all(io: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        io.writable().await?;
        match io.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The request payload of an upgraded connection: reads the socket when polled, so a
/// client that sends nothing costs no buffer, and a slow reader of the payload slows the
/// client down (TCP flow control) instead of buffering.
struct SocketPayload {
    io: Rc<TcpStream>,
    early: Option<Bytes>,
}

impl Stream for SocketPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(early) = this.early.take() {
            return Poll::Ready(Some(Ok(early)));
        }
        loop {
            if let Err(error) = ready!(this.io.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(PayloadError::Io(error))));
            }
            // Read on the stack and hand on an exact copy: the WebSocket decoder keeps
            // the allocation of the bytes it gets, so a larger buffer would stay with the
            // connection for its life.
            let mut buf = [0u8; READ_CHUNK];
            match this.io.try_read(&mut buf) {
                Ok(0) => return Poll::Ready(None),
                Ok(read) => return Poll::Ready(Some(Ok(Bytes::copy_from_slice(&buf[..read])))),
                // Readiness was stale; polling again registers for the next.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Some(Err(PayloadError::Io(error)))),
            }
        }
    }
}
