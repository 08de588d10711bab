//! Connections: one client's state, from negotiate to the end.
//!
//! A [`Connection`] holds the client's bounded outbound queue ([`Outbox`]), its inbound
//! byte channel, the transport it is bound to, and whether a transport request is active.
//! [`Connections`] is the instance's registry (by token), starts each connection's
//! protocol session ([`session`]) when its transport starts, and drops connections that
//! have had no active transport request for `DISCONNECT_TIMEOUT` (ASP.NET's 1 s scan with
//! its 15 s default, `HttpConnectionManager.Scan`), which also covers negotiated
//! connections that never start and long-polling clients that stopped polling.

pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, OwnedMutexGuard};

use crate::bus::claims::{CLAIM_REFRESH, CLAIM_TTL};
use crate::hub::host::{Caller, HubHost};
use crate::hub::RequestHead;
use crate::metrics::Metrics;
use crate::outbox::ReplayState;
use crate::outbox::{Closing, Outbox};
use crate::protocol::hub_protocol::HubProtocol;
use crate::protocol::negotiate::TransportKind;
use crate::protocol::stateful::InboundSequence;
use crate::protocol::token::{ConnectionId, ConnectionToken};
use crate::queue;

pub use session::SessionConfig;

/// Byte chunks (POST bodies, WebSocket frames) waiting for the session.
const INBOUND_CHUNKS: usize = 64;
/// How long a stateful session that is handed over may finish the invocations it already
/// took, so that their Completions travel in its replay buffer rather than being lost.
/// Below the asking instance's own wait for the answer (`handover::ASK_TIMEOUT`, 3 s).
const HANDOVER_FINISH: Duration = Duration::from_millis(1500);

/// A transport request that the connection's state does not allow. The texts are
/// ASP.NET's, and the HTTP layer maps each to the status the SignalR client expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The connection started on another transport (400).
    #[error("Cannot change transports mid-connection")]
    WrongTransport,
    /// A WebSocket or SSE stream is already open for it (409).
    #[error("Another request is already active for this connection")]
    AlreadyActive,
    /// It is closed or closing (404).
    #[error("No Connection with that ID")]
    Gone,
    /// POST on a WebSocket connection (405).
    #[error("POST requests are not allowed for WebSocket connections.")]
    PostToWebSocket,
    /// DELETE on a connection that is not long polling (400).
    #[error("Cannot terminate this connection using the DELETE endpoint.")]
    DeleteNotLongPolling,
}

#[derive(Debug)]
struct State {
    transport: Option<TransportKind>,
    active: usize,
    idle_since: Instant,
}

/// The queues and signals of a connection, made when something first needs them
/// (usually its first transport request), so that a negotiated connection that never
/// starts costs only its ids and a registry entry.
#[derive(Debug)]
struct Queues {
    outbox: Outbox,
    outbound: Arc<tokio::sync::Mutex<queue::Receiver<Bytes>>>,
    inbound_tx: queue::Sender<Bytes>,
    inbound_rx: Mutex<Option<queue::Receiver<Bytes>>>,
    polls: watch::Sender<u64>,
    /// The WebSocket generation of a stateful connection (see [`Connection::drop_socket`]).
    socket: watch::Sender<u64>,
}

/// One client's connection.
#[derive(Debug)]
pub struct Connection {
    /// The public id.
    pub id: ConnectionId,
    /// The token the client presents as `?id=`.
    pub token: ConnectionToken,
    queues: OnceLock<Queues>,
    queue_length: usize,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// The client's messages as counted for stateful reconnect (`None` without it); here,
    /// not in the session, so that a session that moves takes it along.
    sequence: Mutex<Option<InboundSequence>>,
    /// The session moved to another instance: it ends here without the disconnect hook.
    moved: AtomicBool,
    /// Invocations the session took and has not answered yet (running or queued).
    busy: AtomicUsize,
    /// The user found when the transport started, which a moving session takes along.
    user: Mutex<Option<String>>,
    close_sent: AtomicBool,
    finished: AtomicBool,
    /// Negotiated, and no transport started yet (counted in the metrics' pending gauge).
    pending: AtomicBool,
    /// Closed before its queues were made: they never will be needed.
    closed_early: AtomicBool,
    /// The id under which this instance holds the connection's cluster-wide claim
    /// ([`crate::bus::claims`]), if it does: the token's connection id, which for a
    /// negotiate-version-0 connection is not its public id (that is the token itself,
    /// which must not become a Redis key).
    claim: Mutex<Option<ConnectionId>>,
}

/// A transport request holding a connection; dropping it marks the connection idle.
#[derive(Debug)]
pub struct Activation {
    connection: Arc<Connection>,
    /// True for the request that bound the connection to its transport.
    pub first: bool,
}

impl Drop for Activation {
    fn drop(&mut self) {
        let mut state = self.connection.lock_state();
        state.active = state.active.saturating_sub(1);
        state.idle_since = Instant::now();
    }
}

impl Connection {
    fn new(
        id: ConnectionId,
        token: ConnectionToken,
        queue_length: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            id,
            token,
            queues: OnceLock::new(),
            queue_length,
            metrics,
            state: Mutex::new(State {
                transport: None,
                active: 0,
                idle_since: Instant::now(),
            }),
            sequence: Mutex::new(None),
            moved: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            user: Mutex::new(None),
            close_sent: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            pending: AtomicBool::new(true),
            closed_early: AtomicBool::new(false),
            claim: Mutex::new(None),
        }
    }

    /// This instance now holds the connection's cluster-wide claim, under `id`.
    pub fn set_claim(&self, id: ConnectionId) {
        *self.claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }

    /// Forgets the claim (returning its id) so that it is neither refreshed nor closed.
    fn take_claim(&self) -> Option<ConnectionId> {
        self.claim.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn claim_id(&self) -> Option<ConnectionId> {
        self.claim.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // State updates are single assignments; a poisoned lock still holds a usable value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the connection to close, without making queues for one that never had them
    /// (a negotiation that expired costs nothing more to drop).
    fn close(&self, closing: Closing) {
        if self.queues.get().is_none() {
            self.closed_early.store(true, Ordering::Release);
        }
        // Queues made meanwhile are closed here; later ones are made closed.
        if let Some(queues) = self.queues.get() {
            queues.outbox.close(closing);
        }
    }

    fn queues(&self) -> &Queues {
        self.queues.get_or_init(|| {
            let (outbox, outbound) =
                Outbox::new(self.id.clone(), self.queue_length, self.metrics.clone());
            let (inbound_tx, inbound_rx) = queue::channel(INBOUND_CHUNKS);
            let queues = Queues {
                outbox,
                outbound: Arc::new(tokio::sync::Mutex::new(outbound)),
                inbound_tx,
                inbound_rx: Mutex::new(Some(inbound_rx)),
                polls: watch::channel(0).0,
                socket: watch::channel(0).0,
            };
            if self.closed_early.load(Ordering::Acquire) {
                queues.outbox.close(Closing::silent());
            }
            queues
        })
    }

    /// The receiving end of the client's records, for the one session that reads them.
    fn take_inbound(&self) -> Option<queue::Receiver<Bytes>> {
        self.queues()
            .inbound_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The outbound queue and close signal.
    pub fn outbox(&self) -> &Outbox {
        &self.queues().outbox
    }

    /// The transport the connection is bound to, once one started.
    pub fn transport(&self) -> Option<TransportKind> {
        self.lock_state().transport
    }

    /// Claims the connection for one request of transport `kind`.
    ///
    /// The first request binds the transport. A connection never changes transport
    /// (400), a WebSocket or SSE connection has exactly one stream (409), and long polling
    /// may come back as often as it likes.
    pub fn activate(self: &Arc<Self>, kind: TransportKind) -> Result<Activation, ConnectionError> {
        let mut state = self.lock_state();
        // A closing long-polling connection still answers polls, so that the client
        // collects what is left, the Close message last (ASP.NET hands over the remaining
        // data, then answers 204).
        let draining = kind == TransportKind::LongPolling
            && state.transport == Some(kind)
            && !self.finished.load(Ordering::Acquire);
        if self.outbox().is_closing() && !draining {
            return Err(ConnectionError::Gone);
        }
        let first = match state.transport {
            None => {
                state.transport = Some(kind);
                true
            }
            Some(bound) if bound != kind => return Err(ConnectionError::WrongTransport),
            Some(TransportKind::LongPolling) => false,
            // A stateful-reconnect client comes back on a new WebSocket with the same token
            // (signalr-protocol.md trap 19); the new socket takes over from any old one
            // that has not noticed it is dead yet.
            Some(TransportKind::WebSockets) if self.outbox().is_stateful() => {
                self.drop_socket();
                false
            }
            Some(_) => return Err(ConnectionError::AlreadyActive),
        };
        state.active += 1;
        drop(state);
        Ok(Activation {
            connection: self.clone(),
            first,
        })
    }

    /// Whether the connection speaks stateful reconnect (never true before its queues
    /// exist: a connection turns stateful when its WebSocket handshake asks for it).
    pub fn is_stateful(&self) -> bool {
        self.queues
            .get()
            .is_some_and(|queues| queues.outbox.is_stateful())
    }

    /// The inbound sequence of a stateful connection, for the session to update.
    pub fn sequence(&self) -> std::sync::MutexGuard<'_, Option<InboundSequence>> {
        self.sequence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session tells how many invocations it holds unanswered.
    pub(super) fn set_busy(&self, invocations: usize) {
        self.busy.store(invocations, Ordering::Release);
    }

    /// Waits, at most `limit`, until the session answered every invocation it took.
    async fn finish_invocations(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.busy.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the session moved to another instance.
    pub fn has_moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    /// A receiver of the WebSocket generation: it changes when a newer socket takes over
    /// or [`Connection::drop_socket`] is called, which ends the current socket without a
    /// close frame.
    pub fn socket_generation(&self) -> watch::Receiver<u64> {
        self.queues().socket.subscribe()
    }

    /// Ends a stateful connection's WebSocket without a close frame, so that its client
    /// resumes with the same token, on whichever instance the load balancer picks.
    pub fn drop_socket(&self) {
        self.queues()
            .socket
            .send_modify(|generation| *generation += 1);
    }

    /// Hands bytes from the client to the session, waiting while its inbound queue is full.
    pub async fn receive(&self, bytes: Bytes) -> Result<(), ConnectionError> {
        tokio::select! {
            sent = self.queues().inbound_tx.send(bytes) => sent.map_err(|_| ConnectionError::Gone),
            _ = self.outbox().closed() => Err(ConnectionError::Gone),
        }
    }

    /// The outbound queue's receiving end, for the one transport request that drains it.
    pub async fn outbound(&self) -> OwnedMutexGuard<queue::Receiver<Bytes>> {
        self.queues().outbound.clone().lock_owned().await
    }

    /// Starts a new long poll: returns its number and a receiver that changes when a newer
    /// poll starts, which ends this one (ASP.NET `HttpConnectionContext.CancelPreviousPoll`).
    pub fn begin_poll(&self) -> (u64, watch::Receiver<u64>) {
        let mut number = 0;
        let polls = &self.queues().polls;
        polls.send_modify(|current| {
            *current += 1;
            number = *current;
        });
        (number, polls.subscribe())
    }

    /// True the first time it is called: the Close record is sent once, even when a
    /// closing long-polling connection is polled again.
    pub fn claim_close_record(&self) -> bool {
        !self.close_sent.swap(true, Ordering::AcqRel)
    }

    /// Marks a closed long-polling connection whose final poll was answered (204): from
    /// now on it is gone (404), even before the sweeper forgets it.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Ends the connection's pending state once: its transport started, or it is gone.
    fn settle(&self, metrics: &Metrics) {
        if self.pending.swap(false, Ordering::AcqRel) {
            metrics.pending_negotiation(-1);
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        let state = self.lock_state();
        (state.active == 0).then(|| state.idle_since.elapsed())
    }
}

/// What a stateful session carries from one instance to another (README, "Stateful
/// reconnect"): everything the client would notice if it were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Its user.
    pub user: Option<String>,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// Its hub protocol.
    pub protocol: HubProtocol,
    /// Its unacknowledged outbound records and numbering.
    pub replay: ReplayState,
    /// The client's messages processed so far.
    pub processed: u64,
    /// The highest of those acknowledged.
    pub acked: u64,
    /// The connection was negotiated but never started: the puller starts it afresh.
    pub fresh: bool,
}

impl Moved {
    /// A connection negotiated elsewhere whose first WebSocket reached another instance.
    pub fn fresh() -> Self {
        Self {
            user: None,
            groups: Vec::new(),
            protocol: HubProtocol::Json,
            replay: ReplayState {
                next: 1,
                records: Vec::new(),
                ids: Vec::new(),
                limit: 0,
            },
            processed: 0,
            acked: 0,
            fresh: true,
        }
    }
}

/// This instance's connections, and what their sessions need.
pub struct Connections {
    by_token: RwLock<HashMap<String, Arc<Connection>>>,
    host: Arc<HubHost>,
    metrics: Arc<Metrics>,
    config: SessionConfig,
}

impl Connections {
    /// An empty registry whose sessions run `host`'s hub.
    pub fn new(host: Arc<HubHost>, metrics: Arc<Metrics>, config: SessionConfig) -> Self {
        Self {
            by_token: RwLock::new(HashMap::new()),
            host,
            metrics,
            config,
        }
    }

    /// The host of the hub these connections talk to.
    pub fn host(&self) -> &Arc<HubHost> {
        &self.host
    }

    /// Registers a new connection.
    pub fn create(&self, id: ConnectionId, token: ConnectionToken) -> Arc<Connection> {
        let connection = Arc::new(Connection::new(
            id,
            token,
            self.config.outbound_queue_length,
            self.metrics.clone(),
        ));
        self.metrics.pending_negotiation(1);
        self.by_token
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(connection.token.as_str().to_owned(), connection.clone());
        connection
    }

    /// The connection with this token, if it is here.
    pub fn get(&self, token: &str) -> Option<Arc<Connection>> {
        self.by_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    /// Closes a connection and forgets it at once. If this instance held its claim, the
    /// claim becomes the closed marker: the token is spent on every instance.
    pub fn dispose(&self, connection: &Connection) {
        self.end_claim(connection, Some(self.closed_marker_ttl()));
        connection.close(Closing::silent());
        connection.settle(&self.metrics);
        self.by_token
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(connection.token.as_str());
    }

    /// A transport could not start after all: the claim taken for it is released, so the
    /// client may try again anywhere.
    pub fn release_claim(&self, connection: &Connection) {
        self.end_claim(connection, None);
    }

    /// Ends the claim this instance holds of `connection`, if any (in the background:
    /// nothing waits for Redis).
    fn end_claim(&self, connection: &Connection, closed_for: Option<Duration>) {
        let Some(id) = connection.take_claim() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bus = self.host.bus().clone();
        runtime.spawn(async move { bus.end_claim(&id, closed_for).await });
    }

    /// How long a closed marker lives: as long as the token could still be adopted by
    /// another instance (the adoption window is the disconnect timeout, counted from
    /// negotiation, which is before the close), plus a claim's lifetime as margin for
    /// clocks. After that the owner's own answer (404) is the truth again.
    fn closed_marker_ttl(&self) -> Duration {
        self.config.disconnect_timeout + CLAIM_TTL
    }

    /// Refreshes the claims of the connections held here every [`CLAIM_REFRESH`], all in
    /// one burst, forever (only with a bus that keeps claims).
    pub async fn run_claim_refresher(self: Arc<Self>) {
        if !self.host.bus().is_shared() {
            return;
        }
        let mut tick = tokio::time::interval(CLAIM_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held: Vec<ConnectionId> = self
                .by_token
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter_map(|connection| connection.claim_id())
                .collect();
            if !held.is_empty() {
                self.host.bus().refresh_claims(held).await;
            }
        }
    }

    /// Connections registered (negotiated or running).
    pub fn len(&self) -> usize {
        self.by_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Starts draining: every connection without stateful reconnect closes with
    /// `closing`; every stateful one loses its socket without a close frame, so that its
    /// client resumes with the same token wherever the load balancer sends it and the
    /// session moves there. Returns how many stateful sessions are still here (call again
    /// for those whose client came back to this instance).
    pub fn drain(&self, closing: &Closing) -> usize {
        let all: Vec<Arc<Connection>> = self
            .by_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut stateful = 0;
        for connection in all {
            if connection.is_stateful() {
                stateful += 1;
                connection.drop_socket();
            } else {
                connection.close(closing.clone());
            }
        }
        stateful
    }

    /// Starts the protocol session of a connection whose transport just started.
    pub fn start(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        transport: TransportKind,
        user: Option<String>,
        request: RequestHead,
    ) {
        connection.settle(&self.metrics);
        let Some(inbound) = connection.take_inbound() else {
            return; // Already started: `activate` makes this unreachable, but stay safe.
        };
        user.clone_into(&mut connection.user.lock().unwrap_or_else(|e| e.into_inner()));
        let caller = Caller {
            connection_id: connection.id.clone(),
            user,
            transport,
            request: Arc::new(request),
        };
        tokio::spawn(session::run(
            self.clone(),
            connection.clone(),
            caller,
            inbound,
        ));
    }

    /// The groups of a stateful session that another instance is about to pull (so that it
    /// can receive for them before this one fences and lets go, [`Connections::hand_over`]);
    /// no groups for a connection negotiated here and never started. `None` if it is not
    /// here or not a stateful session. Nothing changes here.
    pub fn groups_before_handover(&self, token: &str) -> Option<Vec<String>> {
        let connection = self.get(token)?;
        if connection.moved.load(Ordering::Acquire) {
            return None;
        }
        if connection.transport().is_none() {
            return Some(Vec::new());
        }
        connection
            .outbox()
            .is_stateful()
            .then(|| self.host.groups_of(&connection.id))
    }

    /// Hands a stateful session over to another instance: it stops receiving here (no
    /// delivery reaches it once this returns), its state is taken out, its socket is
    /// dropped and its session ends without the disconnect hook. `None` if it is not here
    /// or not a stateful session.
    pub async fn hand_over(&self, token: &str) -> Option<Moved> {
        let connection = self.get(token)?;
        let unstarted = connection.transport().is_none();
        if !(unstarted || connection.outbox().is_stateful())
            || connection.moved.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        if unstarted {
            // Its first WebSocket reached another instance, which starts it there.
            self.dispose(&connection);
            return Some(Moved::fresh());
        }
        self.by_token
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
        // The instance it moves to receives for it already: what was published before
        // that is delivered here first, so it leaves in the replay buffer.
        self.host.fence(&connection.id).await;
        let groups = self.host.detach(&connection.id).await;
        // Completions of invocations still running go into the replay buffer that moves
        // (a client's `invoke` would otherwise never complete). Server-to-client streams
        // are not waited for: they end with the session here.
        connection.finish_invocations(HANDOVER_FINISH).await;
        let replay = connection.outbox().export_replay()?;
        let sequence = connection.sequence().unwrap_or_default();
        connection.drop_socket();
        connection.outbox().close(Closing::silent());
        self.metrics.session_moved_out();
        let user = connection
            .user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(Moved {
            user,
            groups,
            protocol: connection.outbox().protocol(),
            replay,
            processed: sequence.processed(),
            acked: sequence.acked(),
            fresh: false,
        })
    }

    /// Starts receiving for a stateful session that is moving here, before its state is
    /// asked for, so that nothing published meanwhile is missed (see
    /// [`Outbox::complete_move`]).
    pub async fn begin_move(
        &self,
        id: ConnectionId,
        token: ConnectionToken,
        user: Option<String>,
        request: Arc<RequestHead>,
    ) -> Arc<Connection> {
        let connection = self.create(id, token);
        connection.outbox().stage();
        *connection.user.lock().unwrap_or_else(|e| e.into_inner()) = user.clone();
        let caller = Caller {
            connection_id: connection.id.clone(),
            user,
            transport: TransportKind::WebSockets,
            request,
        };
        self.host.attach(&caller, connection.outbox().clone()).await;
        connection
    }

    /// A session moving here is in `groups` where it is now: receive for them too before
    /// it is asked for, so that nothing published to them meanwhile is missed.
    pub async fn receive_for_groups(&self, connection: &Connection, groups: &[String]) {
        self.host.set_groups(&connection.id, groups).await;
    }

    /// The moved session's state arrived: it continues here, its session runs, and its
    /// next WebSocket resumes it. False if its replay does not fit (the move is abandoned).
    pub async fn complete_move(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        moved: Moved,
        request: Arc<RequestHead>,
    ) -> bool {
        connection.outbox().set_protocol(moved.protocol);
        if !connection.outbox().complete_move(moved.replay) {
            return false;
        }
        *connection.sequence() = Some(InboundSequence::resume(moved.processed, moved.acked));
        // Its groups as they were when it left (server code may have changed them since
        // this instance began receiving for them).
        self.host.set_groups(&connection.id, &moved.groups).await;
        connection.lock_state().transport = Some(TransportKind::WebSockets);
        let Some(inbound) = connection.take_inbound() else {
            return false;
        };
        let caller = Caller {
            connection_id: connection.id.clone(),
            user: moved.user,
            transport: TransportKind::WebSockets,
            request,
        };
        self.metrics.session_moved_in();
        tokio::spawn(session::run_moved(
            self.clone(),
            connection.clone(),
            caller,
            inbound,
        ));
        true
    }

    /// A move that failed: forget the staged connection.
    pub async fn abort_move(&self, connection: &Connection) {
        self.host.detach(&connection.id).await;
        self.dispose(connection);
    }

    /// Drops connections idle for longer than the disconnect timeout; returns how many.
    pub fn sweep(&self) -> usize {
        let stale: Vec<Arc<Connection>> = self
            .by_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| {
                c.idle_for()
                    .is_some_and(|idle| idle > self.config.disconnect_timeout)
            })
            .cloned()
            .collect();
        for connection in &stale {
            log::debug!(
                "connection {} dropped after {:?} without a transport request",
                connection.id.for_log(),
                self.config.disconnect_timeout
            );
            self.dispose(connection);
        }
        stale.len()
    }

    /// Sweeps once a second, forever.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcess;
    use crate::config::Settings;
    use crate::hub::Hub;
    use crate::protocol::token::InstanceId;

    fn connections(disconnect_timeout: Duration) -> Arc<Connections> {
        let metrics = Arc::new(Metrics::default());
        let host = HubHost::new(
            Hub::builder("t").build().unwrap(),
            Arc::new(InProcess),
            InstanceId::parse("i").unwrap(),
        );
        let mut config = SessionConfig::from_settings(&Settings::default());
        config.disconnect_timeout = disconnect_timeout;
        Arc::new(Connections::new(Arc::new(host), metrics, config))
    }

    fn connection(registry: &Connections) -> Arc<Connection> {
        registry.create(
            ConnectionId::random(),
            ConnectionToken::from_trusted(ConnectionId::random().to_string()),
        )
    }

    #[tokio::test]
    async fn a_session_handed_over_takes_the_answers_of_the_invocations_it_was_running() {
        let registry = connections(Duration::from_secs(15));
        let c = connection(&registry);
        let _socket = c.activate(TransportKind::WebSockets).unwrap();
        c.outbox().enable_stateful(100_000, None);
        *c.sequence() = Some(InboundSequence::default());
        // An invocation is running; its Completion comes a moment after the handover asks.
        c.set_busy(1);
        let session = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            session.outbox().push(Bytes::from_static(
                b"{\"type\":3,\"invocationId\":\"1\"}\x1e",
            ));
            session.set_busy(0);
        });
        let moved = registry
            .hand_over(c.token.as_str())
            .await
            .expect("the session is handed over");
        assert_eq!(moved.replay.records.len(), 1, "{:?}", moved.replay.records);
    }

    #[test]
    fn a_connection_never_changes_transport() {
        let registry = connections(Duration::from_secs(15));
        let c = connection(&registry);
        let first = c.activate(TransportKind::LongPolling).unwrap();
        assert!(first.first);
        assert!(!c.activate(TransportKind::LongPolling).unwrap().first);
        assert_eq!(
            c.activate(TransportKind::WebSockets).unwrap_err(),
            ConnectionError::WrongTransport
        );
    }

    #[test]
    fn pending_negotiations_are_counted_until_started_or_dropped() {
        let registry = connections(Duration::from_secs(15));
        let started = connection(&registry);
        let dropped = connection(&registry);
        let _waiting = connection(&registry);
        assert_eq!(registry.metrics.pending_negotiations(), 3);
        started.settle(&registry.metrics);
        registry.dispose(&dropped);
        registry.dispose(&dropped);
        assert_eq!(registry.metrics.pending_negotiations(), 1);
        assert!(dropped.queues.get().is_none(), "dropping made queues");
        assert_eq!(
            dropped.activate(TransportKind::WebSockets).unwrap_err(),
            ConnectionError::Gone
        );
    }

    #[test]
    fn a_second_stream_is_a_conflict() {
        let registry = connections(Duration::from_secs(15));
        let c = connection(&registry);
        let _sse = c.activate(TransportKind::ServerSentEvents).unwrap();
        assert_eq!(
            c.activate(TransportKind::ServerSentEvents).unwrap_err(),
            ConnectionError::AlreadyActive
        );
    }

    #[test]
    fn idle_connections_are_swept_but_active_ones_stay() {
        let registry = connections(Duration::ZERO);
        let idle = connection(&registry);
        let busy = connection(&registry);
        let _active = busy.activate(TransportKind::LongPolling).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(registry.sweep(), 1);
        assert!(registry.get(idle.token.as_str()).is_none());
        assert!(registry.get(busy.token.as_str()).is_some());
        assert_eq!(
            idle.activate(TransportKind::LongPolling).unwrap_err(),
            ConnectionError::Gone
        );
    }
}
