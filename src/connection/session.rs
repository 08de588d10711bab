//! A connection's protocol session: the task that moves messages between a client's
//! transport and its hub host (which owns dispatch: [`crate::hub::host`]).
//!
//! One task per connection (DESIGN.md example 8): a `select!` loop over inbound bytes,
//! the method currently running, a one-second tick, and the close signal. It
//!
//! - waits for the handshake (`HANDSHAKE_TIMEOUT`) and answers it;
//! - runs invocations **one at a time, in order**, as ASP.NET does by default
//!   (`MaximumParallelInvocationsPerClient = 1`), so one sender's messages keep their
//!   order; streams run in their own tasks so that they do not block the connection, and
//!   so do invocations that take client streams (their items come after them);
//! - feeds client streams (`streamIds`) with their StreamItems and Completions, each
//!   through a bounded buffer: while one is full the session stops reading, so the
//!   client's transport feels the backpressure ([`crate::hub::stream`]);
//! - hands the other Completions to the host: they answer client-result invocations;
//! - answers each invocation that has an id with exactly one Completion, and never
//!   answers one without (HubProtocol.md, "Invocations");
//! - sends a Ping when nothing was queued for `KEEP_ALIVE_INTERVAL`, and closes a client
//!   silent for `CLIENT_TIMEOUT` once it has sent its first Ping (ASP.NET starts that
//!   check only then); neither applies to long polling, which keeps itself alive;
//! - closes the connection with a Close message on malformed or oversized input;
//! - speaks the hub protocol the handshake chose (JSON or MessagePack, versions 0-2,
//!   names in any case), reading and writing through the [`crate::protocol::hub_protocol`]
//!   facade, so nothing below branches on the protocol;
//! - refuses a stream whose invocation id is in use, and answers a canceled stream with
//!   a Completion, as ASP.NET's `DefaultHubDispatcher` does.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Connection, Connections};
use crate::config::Settings;
use crate::hub::host::{Caller, Invoked};
use crate::hub::stream::{Fed, Feed, Feeding, Uploads};
use crate::hub::HubContext;
use crate::metrics::Metrics;
use crate::outbox::{now_millis, Closing, Outbox, Pushed};
use crate::protocol::framing::RecordBuffer;
use crate::protocol::handshake::{self, Agreed, HandshakeError};
use crate::protocol::hub_protocol::{HubProtocol, MessageReader};
use crate::protocol::message::{HubMessage, Outcome};
use crate::protocol::negotiate::TransportKind;
use crate::protocol::stateful::{is_sequenced, InboundSequence};
use crate::protocol::token::is_stateful;
use crate::queue;

/// Invocations read ahead of the one running; past this the session stops reading, and
/// the transport's backpressure reaches the client.
const MAX_PENDING_INVOCATIONS: usize = 256;

/// Timing and size limits of sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Ping after this long without sending.
    pub keep_alive_interval: Duration,
    /// Close a client silent this long (after its first Ping).
    pub client_timeout: Duration,
    /// Drop connections without an active transport request after this long.
    pub disconnect_timeout: Duration,
    /// Largest record accepted from a client.
    pub max_message_size: usize,
    /// Records queued for a client before it counts as too slow.
    pub outbound_queue_length: usize,
    /// Whether stateful reconnect is offered.
    pub allow_stateful_reconnect: bool,
    /// Bytes of unacknowledged records kept per stateful connection.
    pub stateful_buffer_size: usize,
    /// Items buffered per client stream before the session stops reading
    /// (`STREAM_BUFFER_CAPACITY`, ASP.NET's `StreamBufferCapacity`).
    pub stream_buffer_capacity: usize,
    /// Client streams open at once on one connection (`MAX_CLIENT_STREAMS`).
    pub max_client_streams: usize,
}

impl SessionConfig {
    /// The session settings of an instance.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            handshake_timeout: settings.handshake_timeout,
            keep_alive_interval: settings.keep_alive_interval,
            client_timeout: settings.client_timeout,
            disconnect_timeout: settings.disconnect_timeout,
            max_message_size: settings.max_message_size as usize,
            outbound_queue_length: settings.outbound_queue_length as usize,
            allow_stateful_reconnect: settings.allow_stateful_reconnect,
            stateful_buffer_size: settings.stateful_reconnect_buffer_size as usize,
            stream_buffer_capacity: settings.stream_buffer_capacity as usize,
            max_client_streams: settings.max_client_streams as usize,
        }
    }
}

/// Runs a connection's session until it closes, then forgets the connection.
pub(super) async fn run(
    connections: Arc<Connections>,
    connection: Arc<Connection>,
    caller: Caller,
    mut inbound: queue::Receiver<Bytes>,
) {
    let config = &connections.config;
    let metrics = &connections.metrics;
    let detailed = connections.host.detailed_errors();
    let outbox = connection.outbox().clone();
    let mut records = RecordBuffer::new(config.max_message_size);
    metrics.connection_opened(caller.transport);
    log::debug!(
        "connection {} started on {}",
        caller.connection_id.for_log(),
        caller.transport.name()
    );

    let handshake = tokio::select! {
        result = read_handshake(&mut inbound, &mut records, caller.transport) => result,
        _ = tokio::time::sleep(config.handshake_timeout) => Some(Err(HandshakeError::TimedOut)),
        _ = outbox.closed() => None,
    };
    match handshake {
        Some(Ok(agreed)) => {
            // The transfer format first, then the reply: a MessagePack client gets `{}` in
            // a binary frame, as from ASP.NET (`HubConnectionContext.HandshakeAsync`).
            outbox.set_protocol(agreed.protocol);
            outbox.push(handshake::success_reply());
            // Stateful reconnect needs all three (HubProtocol.md, "Stateful Reconnect";
            // ASP.NET's `HubConnectionContext.HandshakeAsync` turns it off below version 2):
            // it was negotiated (the token says so), the handshake is version 2, and the
            // transport is WebSockets, the only one the clients resume.
            let stateful = config.allow_stateful_reconnect
                && agreed.version >= 2
                && caller.transport == TransportKind::WebSockets
                && is_stateful(connection.token.as_str());
            if stateful {
                outbox.enable_stateful(config.stateful_buffer_size, None);
                *connection.sequence() = Some(InboundSequence::default());
            }
            // Boxed: see the end of `converse`.
            Box::pin(connections.host.connect(&caller, outbox.clone())).await;
            let reader = MessageReader::after_handshake(agreed.protocol, records);
            converse(&connections, &connection, &caller, inbound, reader).await;
        }
        Some(Err(error)) => {
            log::debug!(
                "connection {}: handshake refused: {error}",
                caller.connection_id.for_log()
            );
            outbox.push(handshake::error_reply_detailed(&error, detailed));
            outbox.close(Closing::silent());
        }
        None => {}
    }
    finish(&connections, &connection, &caller);
}

/// Runs the session of a stateful connection that moved here from another instance: the
/// handshake happened there, and its client resumes with a new WebSocket.
pub(super) async fn run_moved(
    connections: Arc<Connections>,
    connection: Arc<Connection>,
    caller: Caller,
    inbound: queue::Receiver<Bytes>,
) {
    let outbox = connection.outbox().clone();
    connections.metrics.connection_opened(caller.transport);
    let records = RecordBuffer::new(connections.config.max_message_size);
    let reader = MessageReader::after_handshake(outbox.protocol(), records);
    converse(&connections, &connection, &caller, inbound, reader).await;
    finish(&connections, &connection, &caller);
}

/// The conversation after the handshake, until the connection closes; then the hub
/// forgets the connection (without its disconnect hook if the session moved away).
async fn converse(
    connections: &Connections,
    connection: &Connection,
    caller: &Caller,
    mut inbound: queue::Receiver<Bytes>,
    mut reader: MessageReader,
) {
    let outbox = connection.outbox();
    let config = &connections.config;
    let mut session = Session {
        connections,
        connection,
        outbox,
        metrics: &connections.metrics,
        context: connections.host.context(caller),
        streams: HashMap::new(),
        uploading: Vec::new(),
        uploads: Uploads::new(config.stream_buffer_capacity, config.max_client_streams),
        pending: VecDeque::new(),
        pinged: false,
        last_received: Instant::now(),
        ping: outbox.protocol().ping_record(),
        detailed: connections.host.detailed_errors(),
    };
    session.run(&mut inbound, &mut reader).await;
    for (_, stream) in session.streams.drain() {
        stream.task.abort();
    }
    for task in session.uploading.drain(..) {
        task.abort();
    }
    drop(session);
    // Boxed, like the connect hook's future: awaited once, they would otherwise size the
    // session's task, which lives as long as the connection.
    if connection.has_moved() {
        Box::pin(connections.host.detach(&caller.connection_id)).await;
    } else {
        Box::pin(connections.host.disconnect(caller)).await;
    }
}

fn finish(connections: &Connections, connection: &Arc<Connection>, caller: &Caller) {
    let outbox = connection.outbox();
    if caller.transport == TransportKind::LongPolling {
        // The client is usually between polls: its next poll collects what is left (see
        // `Connection::activate`); the sweeper forgets the connection after that.
        outbox.close(Closing::silent());
    } else if !connection.has_moved() {
        connections.dispose(connection);
    }
    connections.metrics.connection_closed(caller.transport);
    log::debug!("connection {} ended", caller.connection_id.for_log());
}

/// Reads until the first record and checks it against the protocols this server speaks
/// on `transport`; `None` if the transport went away first.
async fn read_handshake(
    inbound: &mut queue::Receiver<Bytes>,
    records: &mut RecordBuffer,
    transport: TransportKind,
) -> Option<Result<Agreed, HandshakeError>> {
    loop {
        match records.next_record() {
            Ok(Some(record)) => {
                return Some(handshake::accept(&record, &HubProtocol::ALL, transport))
            }
            Ok(None) => records.extend(&inbound.recv().await?),
            Err(error) => return Some(Err(HandshakeError::from(error))),
        }
    }
}

/// A server-to-client stream running in its own task, and the way to cancel it.
struct RunningStream {
    task: JoinHandle<()>,
    cancel: Option<oneshot::Sender<()>>,
}

struct Session<'a> {
    connections: &'a Connections,
    connection: &'a Connection,
    outbox: &'a Outbox,
    metrics: &'a Metrics,
    context: HubContext,
    streams: HashMap<String, RunningStream>,
    /// Non-streaming invocations that take client streams, running in their own tasks.
    uploading: Vec<JoinHandle<()>>,
    uploads: Uploads,
    pending: VecDeque<HubMessage>,
    pinged: bool,
    last_received: Instant,
    ping: Bytes,
    detailed: bool,
}

/// What handling a record asks of the loop.
enum Next {
    Continue,
    Stop,
}

impl Session<'_> {
    async fn run(&mut self, inbound: &mut queue::Receiver<Bytes>, reader: &mut MessageReader) {
        let config = &self.connections.config;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut running: Option<BoxFuture<'static, ()>> = None;
        // Records that came in the same chunk as the handshake.
        if let Next::Stop = self.take_messages(reader) {
            return;
        }
        loop {
            if running.is_none() {
                running = self
                    .pending
                    .pop_front()
                    .and_then(|message| self.start(message));
            }
            // A handover waits for these to be answered (`Connections::hand_over`).
            self.connection
                .set_busy(self.pending.len() + usize::from(running.is_some()));
            let blocked = self.uploads.is_blocked();
            let reading = self.pending.len() < MAX_PENDING_INVOCATIONS && !blocked;
            tokio::select! {
                _ = async { running.as_mut().expect("guarded by is_some").await }, if running.is_some() => {
                    running = None;
                }
                _ = self.uploads.flush(), if blocked => {
                    // Room again: the rest of what was read goes on.
                    if let Next::Stop = self.take_messages(reader) {
                        return;
                    }
                }
                chunk = inbound.recv(), if reading => {
                    let Some(chunk) = chunk else { return };
                    self.last_received = Instant::now();
                    reader.extend(&chunk);
                    if let Next::Stop = self.take_messages(reader) {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if let Next::Stop = self.keep_alive(config.keep_alive_interval, config.client_timeout) {
                        return;
                    }
                }
                _ = self.outbox.closed() => return,
            }
        }
    }

    /// Queues a message for the client in its protocol (the outbox counts it).
    fn send(&self, message: &HubMessage) {
        self.outbox.push_message(message);
    }

    /// Closes the connection with a Close message. Its error is ASP.NET's "Connection
    /// closed with an error." (`HubConnectionHandler.SendCloseAsync`), with the detail only
    /// when detailed errors are on.
    fn fail(&self, detail: String) -> Next {
        log::debug!(
            "connection {}: closing: {detail}",
            self.context.connection_id.for_log()
        );
        let error = if self.detailed {
            format!("Connection closed with an error. {detail}")
        } else {
            "Connection closed with an error.".to_owned()
        };
        self.outbox.close(Closing::with_message(Some(error), false));
        Next::Stop
    }

    fn take_messages(&mut self, reader: &mut MessageReader) -> Next {
        loop {
            if self.uploads.is_blocked() {
                return Next::Continue; // The rest waits for room in a client stream.
            }
            let message = match reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => return Next::Continue,
                Err(error) => return self.fail(format!("InvalidDataException: {error}")),
            };
            self.metrics.message_received();
            if let Some(sequence) = self.connection.sequence().as_mut() {
                // After a reconnect the client resends what it had no Ack for; what was
                // processed before is dropped (HubProtocol.md, "Stateful Reconnect").
                if is_sequenced(&message) && !sequence.accept() {
                    continue;
                }
            }
            if let Some((stream_ids, invocation_id, target)) = takes_streams(&message) {
                // Its streams open now, before their items arrive.
                match self.uploads.open(stream_ids) {
                    Ok(feeds) => self.start_uploading(message, feeds),
                    Err(error) => {
                        log::debug!(
                            "connection {}: {target} refused: {error}",
                            self.context.connection_id.for_log()
                        );
                        if let Some(id) = invocation_id {
                            self.send(&HubMessage::Completion {
                                invocation_id: id.to_owned(),
                                outcome: Outcome::Error(format!(
                                    "Failed to invoke '{target}': {error}."
                                )),
                            });
                        }
                    }
                }
                continue;
            }
            match message {
                HubMessage::Invocation { .. } | HubMessage::StreamInvocation { .. } => {
                    self.pending.push_back(message)
                }
                HubMessage::CancelInvocation { invocation_id } => {
                    // The stream task answers with a Completion without result, as ASP.NET
                    // does for a canceled stream; an unknown id is ignored.
                    if let Some(mut stream) = self.streams.remove(&invocation_id) {
                        if let Some(cancel) = stream.cancel.take() {
                            let _ = cancel.send(());
                        }
                    }
                }
                HubMessage::Ping => self.pinged = true,
                HubMessage::Close { .. } => {
                    // The client is leaving (it sends a bare Close in `stop()`).
                    self.outbox.close(Closing::silent());
                    return Next::Stop;
                }
                HubMessage::Ack { sequence_id } => self.outbox.ack(sequence_id),
                HubMessage::Sequence { sequence_id } => {
                    let restarted = match self.connection.sequence().as_mut() {
                        Some(sequence) => sequence.restart_at(sequence_id),
                        // Without stateful reconnect there is nothing to restart.
                        None => Ok(()),
                    };
                    if let Err(error) = restarted {
                        return self.fail(format!("InvalidOperationException: {error}"));
                    }
                }
                HubMessage::StreamItem {
                    invocation_id,
                    item,
                } => {
                    if let Feeding::Blocked = self.uploads.feed(&invocation_id, Fed::Item(item)) {
                        return Next::Continue;
                    }
                }
                HubMessage::Completion {
                    invocation_id,
                    outcome,
                } if self.uploads.is_open(&invocation_id) => {
                    let error = match outcome {
                        Outcome::Error(error) => Some(error),
                        Outcome::Void | Outcome::Result(_) => None,
                    };
                    if let Feeding::Blocked = self.uploads.feed(&invocation_id, Fed::End(error)) {
                        return Next::Continue;
                    }
                }
                HubMessage::Completion {
                    invocation_id,
                    outcome,
                } => self.connections.host.client_completed(
                    &self.context.connection_id,
                    &invocation_id,
                    outcome,
                ),
            }
        }
    }

    fn keep_alive(&mut self, interval: Duration, client_timeout: Duration) -> Next {
        self.streams.retain(|_, stream| !stream.task.is_finished());
        // Acks go out on this one-second tick, as from ASP.NET's timer.
        let ack_due = self
            .connection
            .sequence()
            .as_mut()
            .and_then(InboundSequence::ack_due);
        if let Some(sequence_id) = ack_due {
            let ack = self
                .outbox
                .protocol()
                .encode(&HubMessage::Ack { sequence_id });
            self.outbox.push_unsequenced(ack);
        }
        self.uploading.retain(|task| !task.is_finished());
        if self.context.transport.has_inherent_keep_alive() {
            return Next::Continue;
        }
        if self.pinged && self.last_received.elapsed() > client_timeout {
            return self.fail(format!(
                "TimeoutException: The client sent nothing for {}s (client timeout).",
                client_timeout.as_secs()
            ));
        }
        if now_millis().saturating_sub(self.outbox.last_queued_ms()) >= interval.as_millis() as u64
        {
            self.outbox.push_unsequenced(self.ping.clone());
        }
        Next::Continue
    }

    /// Starts one invocation: the host dispatches it; a unary method's future is
    /// returned to be driven in order, a stream runs in its own task.
    fn start(&mut self, message: HubMessage) -> Option<BoxFuture<'static, ()>> {
        self.dispatch(message, Vec::new())
    }

    /// Starts an invocation that takes client streams in a task of its own: it runs
    /// while its items arrive, never blocking the invocations queued behind it.
    fn start_uploading(&mut self, message: HubMessage, feeds: Vec<Feed>) {
        if let Some(running) = self.dispatch(message, feeds) {
            self.uploading.push(tokio::spawn(running));
        }
    }

    fn dispatch(
        &mut self,
        message: HubMessage,
        feeds: Vec<Feed>,
    ) -> Option<BoxFuture<'static, ()>> {
        if let HubMessage::StreamInvocation { invocation_id, .. } = &message {
            // ASP.NET refuses a second stream under the id of one still running
            // (`DefaultHubDispatcher`, `ActiveRequestCancellationSources.TryAdd`).
            if self
                .streams
                .get(invocation_id)
                .is_some_and(|stream| !stream.task.is_finished())
            {
                self.send(&HubMessage::Completion {
                    invocation_id: invocation_id.clone(),
                    outcome: Outcome::Error(format!(
                        "Invocation ID '{invocation_id}' is already in use."
                    )),
                });
                return None;
            }
        }
        match self.connections.host.invoke(&self.context, message, feeds) {
            Invoked::Done(reply) => {
                if let Some(reply) = reply {
                    self.send(&reply);
                }
                None
            }
            Invoked::Unary(running) => {
                let outbox = self.outbox.clone();
                Some(
                    async move {
                        if let Some(completion) = running.await {
                            outbox.push_message(&completion);
                        }
                    }
                    .boxed(),
                )
            }
            Invoked::Stream {
                invocation_id,
                messages,
            } => {
                let (cancel, canceled) = oneshot::channel();
                let task = tokio::spawn(send_all(
                    messages,
                    self.outbox.clone(),
                    invocation_id.clone(),
                    canceled,
                ));
                let stream = RunningStream {
                    task,
                    cancel: Some(cancel),
                };
                self.streams.insert(invocation_id, stream);
                None
            }
        }
    }
}

/// The stream ids, invocation id and target of an invocation that takes client streams.
fn takes_streams(message: &HubMessage) -> Option<(&[String], Option<&str>, &str)> {
    let (stream_ids, invocation_id, target) = match message {
        HubMessage::Invocation {
            stream_ids,
            invocation_id,
            target,
            ..
        } => (stream_ids, invocation_id.as_deref(), target),
        HubMessage::StreamInvocation {
            stream_ids,
            invocation_id,
            target,
            ..
        } => (stream_ids, Some(invocation_id.as_str()), target),
        _ => return None,
    };
    (!stream_ids.is_empty()).then_some((stream_ids.as_slice(), invocation_id, target.as_str()))
}

/// Sends a stream's messages until it ends (its Completion is the last), the connection
/// stops taking them, or the client cancels it, which is answered with a Completion
/// without result (ASP.NET `DefaultHubDispatcher.StreamResultsAsync` always ends a stream
/// with a Completion, and a canceled one carries no error).
async fn send_all(
    mut messages: BoxStream<'static, HubMessage>,
    outbox: Outbox,
    invocation_id: String,
    mut canceled: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            biased;
            signal = &mut canceled => {
                if signal.is_ok() {
                    outbox.push_message(&HubMessage::Completion {
                        invocation_id,
                        outcome: Outcome::Void,
                    });
                }
                return;
            }
            message = messages.next() => {
                let Some(message) = message else { return };
                let last = matches!(message, HubMessage::Completion { .. });
                if outbox.push_message(&message) != Pushed::Queued || last {
                    return;
                }
            }
        }
    }
}
