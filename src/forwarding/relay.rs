//! The bus route: a request whose owner cannot be reached directly travels to it over the
//! bus, and the answer back (DESIGN.md, "Routing"; the way Phoenix's long-poll transport
//! and Centrifugo's emulation endpoint reach the node holding a session).
//!
//! Every instance listens on its own instance topic of the first hub's bus. The
//! *receiver* of a misrouted request publishes [`Frame::Open`] to the owner. The owner
//! answers at once — [`Frame::Miss`] when it does not hold the connection (the client gets
//! ASP.NET's 404), else [`Frame::Accepted`] — and then serves the request *against itself*
//! over loopback, marked as an internal probe, exactly as a direct forward would arrive:
//! every transport keeps its own code path. It streams back [`Frame::Head`], body
//! [`Frame::Data`] chunks as they are written (event streams flow live) and [`Frame::End`].
//! `Accepted` comes before `Head`, so a long poll held for `POLL_TIMEOUT` is not taken for
//! a dead owner; an owner that does not answer within [`ACCEPT_TIMEOUT`] is. Either side
//! ending ends both: a receiver whose client left sends [`Frame::Cancel`], which drops the
//! owner's loopback request. WebSockets carry text, binary and close frames both ways.
//!
//! Bounds: body chunks of at most [`frame::MAX_CHUNK`]; request bodies within the body
//! limit (the caller read them); [`MAILBOX`] frames waiting per relay, past which the
//! relay is ended rather than grown. Order: the bus keeps one sender's order to one
//! instance, and each relay's frames go through one mailbox. WebSocket frames already
//! waiting travel together in one bus message (at most [`BATCH`] frames or about
//! [`frame::MAX_CHUNK`] bytes), so a busy socket costs far fewer broker messages than
//! frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use actix_web::http::Method;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::frame::{self, CorrelationId, Frame, Open, Packet};
use crate::bus::{Bus, Envelope, InstanceHandler};
use crate::protocol::token::{ClusterKey, InstanceId};
use crate::routing::PROBE_HEADER;
use awc::ws::{CloseCode, CloseReason, Frame as WsFrame, Message};

/// How long a receiver waits for the owner's `Accepted` or `Miss`; past it the owner is
/// taken as gone (or cut off from the bus) and the next route is tried.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames waiting to be consumed in one relay before it is ended.
pub const MAILBOX: usize = 4096;
/// Most WebSocket frames carried in one bus message.
pub const BATCH: usize = 64;
/// Time for the owner's loopback request to connect.
const LOOPBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides whether a request (its path and query) is for a connection held here.
pub type HoldsConnection = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Mailbox {
    peer: InstanceId,
    tx: mpsc::Sender<Frame>,
}

/// A request the owner serves over loopback.
struct Job {
    id: CorrelationId,
    peer: InstanceId,
    open: Open,
    rx: mpsc::Receiver<Frame>,
}

/// One instance's end of the bus route, for both roles.
pub struct Relay {
    instance: InstanceId,
    bus: Arc<dyn Bus>,
    mailboxes: Mutex<HashMap<CorrelationId, Mailbox>>,
    holds: OnceLock<HoldsConnection>,
    loopback: OnceLock<String>,
    jobs: mpsc::UnboundedSender<Job>,
}

/// What the owner said to an `Open`.
pub enum Opened {
    /// It serves the request: the answer follows on the exchange.
    Accepted(Exchange),
    /// It does not hold the connection.
    Miss,
    /// Nobody answered within [`ACCEPT_TIMEOUT`].
    NoAnswer,
}

/// The receiver's side of one accepted relay. Dropping it before the owner ended the
/// relay cancels it.
pub struct Exchange {
    relay: Arc<Relay>,
    id: CorrelationId,
    peer: InstanceId,
    rx: mpsc::Receiver<Frame>,
    ended: bool,
}

impl Relay {
    /// The relay of `instance` over `bus`, and the handler the bus's drain hands this
    /// instance's frames to. The owner's loopback requests run on a thread of their own
    /// (awc's client is not `Send`), which ends when the relay is dropped; they carry a
    /// probe marker signed with `key` and wait `poll_wait` for a long poll's answer.
    pub fn start(
        instance: InstanceId,
        bus: Arc<dyn Bus>,
        key: ClusterKey,
        poll_wait: Duration,
        max_frame_size: usize,
    ) -> (Arc<Self>, InstanceHandler) {
        let (jobs, queue) = mpsc::unbounded_channel();
        let relay = Arc::new(Self {
            instance,
            bus,
            mailboxes: Mutex::new(HashMap::new()),
            holds: OnceLock::new(),
            loopback: OnceLock::new(),
            jobs,
        });
        let weak = Arc::downgrade(&relay);
        let owner = move || owner_loop(weak, queue, key, poll_wait, max_frame_size);
        if let Some(system) = actix_web::rt::System::try_current() {
            // On the thread that runs the bus's tasks (the application is built there): a
            // frame from the bus reaches its relay, and a frame for the bus its publisher,
            // without waking another thread.
            system.arbiter().spawn_fn(move || {
                actix_web::rt::spawn(owner());
            });
        } else {
            let spawned = std::thread::Builder::new()
                .name("stickless-relay".into())
                .spawn(move || actix_web::rt::System::new().block_on(owner()));
            if let Err(error) = spawned {
                log::error!("cannot start the relay thread: {error}; the bus route answers Miss");
            }
        }
        let weak = Arc::downgrade(&relay);
        let handler: InstanceHandler = Arc::new(move |payload: Bytes| -> BoxFuture<'static, ()> {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(relay) = weak.upgrade() {
                    relay.receive(payload).await;
                }
            })
        });
        (relay, handler)
    }

    /// The bus it relays over.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Tells the relay how to find connections held here; set once the hubs exist.
    pub fn set_holds(&self, holds: HoldsConnection) {
        let _ = self.holds.set(holds);
    }

    /// Tells the relay where this instance listens (`http://127.0.0.1:port`).
    pub fn set_loopback(&self, base: String) {
        let _ = self.loopback.set(base);
    }

    async fn send(&self, to: &InstanceId, id: CorrelationId, frame: Frame) {
        self.send_frames(to, id, vec![frame]).await;
    }

    async fn send_frames(&self, to: &InstanceId, id: CorrelationId, frames: Vec<Frame>) {
        if frames.is_empty() {
            return;
        }
        let packets: Vec<Packet> = frames
            .into_iter()
            .map(|frame| Packet { id, frame })
            .collect();
        let payload = frame::encode_batch(&packets);
        self.bus
            .publish(Envelope::ToInstance {
                to: to.clone(),
                payload,
            })
            .await;
    }

    fn register(&self, id: CorrelationId, peer: InstanceId) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel(MAILBOX);
        if let Ok(mut mailboxes) = self.mailboxes.lock() {
            mailboxes.insert(id, Mailbox { peer, tx });
        }
        rx
    }

    fn unregister(&self, id: &CorrelationId) {
        if let Ok(mut mailboxes) = self.mailboxes.lock() {
            mailboxes.remove(id);
        }
    }

    /// Frames for this instance arrived over the bus.
    async fn receive(&self, payload: Bytes) {
        match frame::decode_batch(payload) {
            Ok(packets) => {
                for packet in packets {
                    self.dispatch(packet).await;
                }
            }
            Err(error) => log::warn!("relay: ignoring a malformed bus message: {error}"),
        }
    }

    /// Hands one frame to its relay (or starts serving an `Open`).
    async fn dispatch(&self, packet: Packet) {
        let Packet { id, frame } = packet;
        if let Frame::Open(open) = frame {
            return self.accept(id, open).await;
        }
        let overflow = {
            let Ok(mut mailboxes) = self.mailboxes.lock() else {
                return;
            };
            // Frames of a relay that ended (or never existed here) are dropped.
            let Some(mailbox) = mailboxes.get(&id) else {
                return;
            };
            match mailbox.tx.try_send(frame) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    mailboxes.remove(&id);
                    None
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    mailboxes.remove(&id).map(|mailbox| mailbox.peer)
                }
            }
        };
        if let Some(peer) = overflow {
            // Dropping the sender ends the local side; the peer is told to stop too.
            log::warn!("relay {id}: more than {MAILBOX} frames waiting; ending it");
            self.send(&peer, id, Frame::Cancel).await;
            self.send(&peer, id, Frame::End).await;
        }
    }

    /// The owner's side of an `Open`: `Miss` at once, or `Accepted` and a loopback job.
    async fn accept(&self, id: CorrelationId, open: Open) {
        let Ok(peer) = InstanceId::parse(&open.reply_to) else {
            log::warn!("relay {id}: ignoring an Open with a bad reply-to instance");
            return;
        };
        let held = self.holds.get().is_some_and(|holds| holds(&open.path));
        if !held || self.loopback.get().is_none() {
            return self.send(&peer, id, Frame::Miss).await;
        }
        let rx = self.register(id, peer.clone());
        self.send(&peer, id, Frame::Accepted).await;
        let job = Job {
            id,
            peer: peer.clone(),
            open,
            rx,
        };
        if self.jobs.send(job).is_err() {
            self.unregister(&id);
            self.send(&peer, id, Frame::End).await;
        }
    }

    /// The receiver's side: asks `owner` to serve `open` and waits for its first answer.
    pub async fn open(self: &Arc<Self>, owner: &InstanceId, mut open: Open) -> Opened {
        open.reply_to = self.instance.to_string();
        let id = CorrelationId::random();
        let rx = self.register(id, owner.clone());
        let mut exchange = Exchange {
            relay: self.clone(),
            id,
            peer: owner.clone(),
            rx,
            ended: false,
        };
        self.send(owner, id, Frame::Open(open)).await;
        match tokio::time::timeout(ACCEPT_TIMEOUT, exchange.rx.recv()).await {
            Ok(Some(Frame::Accepted)) => Opened::Accepted(exchange),
            Ok(Some(Frame::Miss)) => {
                exchange.ended = true;
                Opened::Miss
            }
            // Silence, or a frame out of order: cancel, in case the owner is only slow.
            _ => Opened::NoAnswer,
        }
    }
}

impl Exchange {
    /// The owner's next frame; `None` once the relay is over.
    pub async fn next(&mut self) -> Option<Frame> {
        if self.ended {
            return None;
        }
        let frame = self.rx.recv().await;
        if matches!(frame, None | Some(Frame::End)) {
            self.ended = true;
        }
        frame
    }

    /// A frame the owner already sent, without waiting.
    pub fn try_next(&mut self) -> Option<Frame> {
        if self.ended {
            return None;
        }
        let frame = self.rx.try_recv().ok()?;
        if matches!(frame, Frame::End) {
            self.ended = true;
        }
        Some(frame)
    }

    /// Sends a frame to the owner (WebSocket frames).
    pub async fn send(&self, frame: Frame) {
        self.relay.send(&self.peer, self.id, frame).await;
    }

    /// Sends frames to the owner in one bus message.
    pub async fn send_frames(&self, frames: Vec<Frame>) {
        self.relay.send_frames(&self.peer, self.id, frames).await;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.relay.unregister(&self.id);
        if self.ended {
            return;
        }
        // The client went away first: the owner stops serving (and drops its poll or
        // event stream, which ends the connection the way a closed request would).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let relay = self.relay.clone();
            let (peer, id) = (self.peer.clone(), self.id);
            runtime.spawn(async move { relay.send(&peer, id, Frame::Cancel).await });
        }
    }
}

/// Runs the owner's loopback requests, one local task each, until the relay is dropped.
async fn owner_loop(
    relay: Weak<Relay>,
    mut queue: mpsc::UnboundedReceiver<Job>,
    key: ClusterKey,
    poll_wait: Duration,
    max_frame_size: usize,
) {
    let client = awc::Client::builder()
        .connector(awc::Connector::new().timeout(LOOPBACK_CONNECT_TIMEOUT))
        .timeout(poll_wait)
        .disable_redirects()
        .no_default_headers()
        .finish();
    while let Some(job) = queue.recv().await {
        let Some(relay) = relay.upgrade() else {
            return;
        };
        let Some(base) = relay.loopback.get().cloned() else {
            continue;
        };
        let client = client.clone();
        let marker = key.probe_marker(super::now_secs());
        actix_web::rt::spawn(async move {
            let (id, peer) = (job.id, job.peer.clone());
            if job.open.websocket {
                serve_websocket(&relay, &client, &base, &marker, job, max_frame_size).await;
            } else {
                serve_http(&relay, &client, &base, &marker, job).await;
            }
            relay.unregister(&id);
            log::debug!("relay {id} for {peer} ended");
        });
    }
}

fn headers_of(response: &actix_web::http::header::HeaderMap) -> Vec<(String, Bytes)> {
    response
        .iter()
        .filter(|(name, _)| super::relays_response_header(name))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// Serves a relayed HTTP request against this instance and streams the answer back.
async fn serve_http(relay: &Relay, client: &awc::Client, base: &str, marker: &str, job: Job) {
    let Job {
        id,
        peer,
        open,
        mut rx,
    } = job;
    let method = Method::from_bytes(open.method.as_bytes()).unwrap_or(Method::GET);
    let mut request = client.request(method, format!("{base}{}", open.path));
    for (name, value) in &open.headers {
        request = request.append_header((name.as_str(), value.as_ref()));
    }
    request = request.insert_header((PROBE_HEADER, marker));
    let send = request.send_body(open.body);
    let response = tokio::select! {
        response = send => response,
        _ = wait_cancel(&mut rx) => return,
    };
    let mut response = match response {
        Ok(response) => response,
        Err(error) => {
            log::warn!("relay {id}: loopback request failed: {error}");
            relay
                .send(
                    &peer,
                    id,
                    Frame::Head {
                        status: 502,
                        headers: vec![],
                    },
                )
                .await;
            return relay.send(&peer, id, Frame::End).await;
        }
    };
    let head = Frame::Head {
        status: response.status().as_u16(),
        headers: headers_of(response.headers()),
    };
    relay.send(&peer, id, head).await;
    loop {
        tokio::select! {
            chunk = response.next() => match chunk {
                Some(Ok(chunk)) => {
                    for piece in chunk.chunks(frame::MAX_CHUNK) {
                        relay.send(&peer, id, Frame::Data(chunk.slice_ref(piece))).await;
                    }
                }
                Some(Err(_)) | None => break,
            },
            // The receiver's client left: dropping the response drops the request.
            _ = wait_cancel(&mut rx) => return,
        }
    }
    relay.send(&peer, id, Frame::End).await;
}

/// Resolves when the receiver cancels (or the relay is gone).
async fn wait_cancel(rx: &mut mpsc::Receiver<Frame>) {
    while let Some(frame) = rx.recv().await {
        if matches!(frame, Frame::Cancel | Frame::End) {
            return;
        }
    }
}

/// Opens a relayed WebSocket against this instance and carries frames both ways.
async fn serve_websocket(
    relay: &Relay,
    client: &awc::Client,
    base: &str,
    marker: &str,
    job: Job,
    max_frame_size: usize,
) {
    let Job {
        id,
        peer,
        open,
        mut rx,
    } = job;
    let url = format!("ws{}{}", base.trim_start_matches("http"), open.path);
    let mut request = client.ws(url).max_frame_size(max_frame_size);
    for (name, value) in &open.headers {
        if let Ok(value) = actix_web::http::header::HeaderValue::from_bytes(value) {
            request = request.header(name.as_str(), value);
        }
    }
    request = request.set_header(PROBE_HEADER, marker);
    let status = match request.connect().await {
        Ok((_, upstream)) => {
            relay
                .send(
                    &peer,
                    id,
                    Frame::Head {
                        status: 101,
                        headers: vec![],
                    },
                )
                .await;
            Ok(upstream)
        }
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => Err(status.as_u16()),
        Err(error) => {
            log::warn!("relay {id}: loopback WebSocket failed: {error}");
            Err(502)
        }
    };
    let mut upstream = match status {
        Ok(upstream) => upstream,
        Err(status) => {
            relay
                .send(
                    &peer,
                    id,
                    Frame::Head {
                        status,
                        headers: vec![],
                    },
                )
                .await;
            return relay.send(&peer, id, Frame::End).await;
        }
    };
    loop {
        tokio::select! {
            first = upstream.next() => {
                // This frame and those already waiting go in one bus message.
                let mut batch = Batch::default();
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match from_server(item) {
                        FromServer::Relay(frame) => batch.push(frame),
                        FromServer::Ping(bytes) => {
                            let _ = upstream.send(Message::Pong(bytes)).await;
                        }
                        FromServer::Skip => {}
                        FromServer::Close(frame) => {
                            batch.push(frame);
                            batch.closed = true;
                            break;
                        }
                    }
                    if !batch.full() {
                        next = upstream.next().now_or_never();
                    }
                }
                relay.send_frames(&peer, id, batch.frames).await;
                if batch.closed {
                    break;
                }
            }
            first = rx.recv() => {
                // Feed this frame and those already waiting, then flush once.
                let mut next = first;
                let mut ended = false;
                loop {
                    let message = match next {
                        Some(Frame::WsText(bytes)) => match ByteString::try_from(bytes) {
                            Ok(text) => Some(Message::Text(text)),
                            Err(_) => None,
                        },
                        Some(Frame::WsBinary(bytes)) => Some(Message::Binary(bytes)),
                        Some(Frame::WsClose { code, reason }) => {
                            ended = true;
                            Some(Message::Close(close_reason(code, reason)))
                        }
                        Some(_) | None => {
                            ended = true;
                            Some(Message::Close(None))
                        }
                    };
                    if let Some(message) = message {
                        if upstream.feed(message).await.is_err() {
                            relay.send(&peer, id, Frame::WsClose { code: 1011, reason: String::new() }).await;
                            ended = true;
                        }
                    }
                    if ended {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(frame) => next = Some(frame),
                        Err(_) => break,
                    }
                }
                let _ = upstream.flush().await;
                if ended {
                    break;
                }
            }
        }
    }
    relay.send(&peer, id, Frame::End).await;
}

/// WebSocket frames gathered for one bus message.
#[derive(Default)]
pub(crate) struct Batch {
    /// The frames, in order.
    pub(crate) frames: Vec<Frame>,
    bytes: usize,
    /// A close frame ended the batch (and the socket).
    pub(crate) closed: bool,
}

impl Batch {
    /// Adds a frame.
    pub(crate) fn push(&mut self, frame: Frame) {
        self.bytes += match &frame {
            Frame::WsText(bytes) | Frame::WsBinary(bytes) | Frame::Data(bytes) => bytes.len(),
            _ => 0,
        };
        self.frames.push(frame);
    }

    /// Whether it holds enough for one bus message.
    pub(crate) fn full(&self) -> bool {
        self.frames.len() >= BATCH || self.bytes >= frame::MAX_CHUNK
    }
}

/// The close reason a relayed close frame stands for (code 0: none).
pub(crate) fn close_reason(code: u16, reason: String) -> Option<CloseReason> {
    (code != 0).then(|| CloseReason {
        code: CloseCode::from(code),
        description: (!reason.is_empty()).then_some(reason),
    })
}

/// The relay frame a close from the socket stands for.
pub(crate) fn close_frame(reason: Option<CloseReason>) -> Frame {
    Frame::WsClose {
        code: reason.as_ref().map_or(0, |r| u16::from(r.code)),
        reason: reason.and_then(|r| r.description).unwrap_or_default(),
    }
}

/// What one item read from the owner's loopback socket means for the relay.
enum FromServer {
    Relay(Frame),
    Ping(Bytes),
    Skip,
    Close(Frame),
}

fn from_server(item: Option<Result<WsFrame, awc::error::WsProtocolError>>) -> FromServer {
    match item {
        Some(Ok(WsFrame::Text(bytes))) => FromServer::Relay(Frame::WsText(bytes)),
        Some(Ok(WsFrame::Binary(bytes))) => FromServer::Relay(Frame::WsBinary(bytes)),
        Some(Ok(WsFrame::Ping(bytes))) => FromServer::Ping(bytes),
        Some(Ok(WsFrame::Pong(_))) => FromServer::Skip,
        Some(Ok(WsFrame::Close(reason))) => FromServer::Close(close_frame(reason)),
        // Instances never fragment their frames; anything else ends the relay.
        Some(Ok(WsFrame::Continuation(_))) | Some(Err(_)) | None => {
            FromServer::Close(Frame::WsClose {
                code: 1011,
                reason: String::new(),
            })
        }
    }
}
