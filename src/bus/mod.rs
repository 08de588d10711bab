//! The bus — the user-facing "backplane" — carries messages between the instances of a
//! cluster.
//!
//! It sits at the bottom of the layers (DESIGN.md, "Layers") and imports nothing above
//! it: it owns its addressing types ([`Audience`], [`Topic`], [`GroupCommand`]), offers
//! [`Bus::publish`] and hands what other instances published to a stream of [`Event`]s,
//! which the hub host drains. It knows nothing of connections or hubs; which topics an
//! instance needs is told to it ([`Bus::subscribe`]), and it remembers them to subscribe
//! again after a reconnect.
//!
//! One bus is opened per hub, with the hub's channel namespace ([`open`]). The
//! implementations:
//!
//! - [`InProcess`]: one instance, nothing to carry (the default);
//! - [`redis::RedisBus`]: Redis pub/sub (`REDIS_URL`), channels documented there and in
//!   the README.
//! - [`redis_cluster::RedisClusterBus`]: Redis Cluster sharded pub/sub
//!   (`REDIS_CLUSTER_URLS`), hash-tagged channels documented there and in the README.
//!
//! Peer discovery (which instance has which direct URL) is not a bus method: it is its
//! own component, [`peers::Peers`], that uses a bus as its carrier. Connection claims
//! ([`claims`]) are bus methods: they live in the broker the bus owns the connections to.

pub mod claims;
pub mod peers;
pub mod redis;
pub mod redis_cluster;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::config::Settings;
use crate::metrics::Metrics;
pub use crate::outbox::MessageId;
use crate::protocol::message::Outcome;
use crate::protocol::token::{ConnectionId, InstanceId};
pub use claims::Claim;

/// The recipients of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every connection, except some.
    All {
        /// Connections left out (`Others` leaves out the caller).
        except: Vec<ConnectionId>,
    },
    /// One connection.
    Connection(ConnectionId),
    /// A group's members, except some.
    Group {
        /// The group's name.
        name: String,
        /// Members left out.
        except: Vec<ConnectionId>,
    },
    /// Every connection of one user.
    User(String),
}

/// Something an instance subscribes to so that messages for it reach it: it has a local
/// connection with that id, a local member of that group, or a local connection of that
/// user. (`All` needs no topic: every instance receives it.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A connection id.
    Connection(ConnectionId),
    /// A group name.
    Group(String),
    /// A user id.
    User(String),
    /// One instance's own topic: frames addressed to it alone ([`Envelope::ToInstance`]),
    /// e.g. requests relayed to the owner of a connection and their answers.
    Instance(InstanceId),
}

/// A group membership change for a connection that may live on another instance; the
/// instance holding the connection applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCommand {
    /// The connection.
    pub connection: ConnectionId,
    /// The group.
    pub group: String,
    /// Join (`true`) or leave.
    pub join: bool,
}

/// An instance telling the others it is alive, and its direct URL if it has one (see
/// [`peers`]): the heartbeat that gives every instance the cluster's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The announcing instance.
    pub instance: InstanceId,
    /// Its direct URL (`ADVERTISE_URL`), if it advertises one.
    pub url: Option<String>,
    /// False on a first announcement, which asks every other instance to announce itself
    /// back.
    pub reply: bool,
    /// A goodbye: the instance is stopping, so the others forget it at once instead of
    /// trusting its last heartbeat for the peer TTL.
    pub leaving: bool,
}

/// A hub method on one instance asks a client held by another for a result (client
/// results): carried on the connection's topic, so it reaches the instance that holds it,
/// as ASP.NET's Redis backplane sends it on the connection's channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInvocation {
    /// The client asked.
    pub connection: ConnectionId,
    /// The id the client answers with, unique in the cluster.
    pub invocation_id: String,
    /// The instance waiting for the answer.
    pub reply_to: InstanceId,
    /// The client method.
    pub target: String,
    /// Its arguments.
    pub arguments: Vec<serde_json::Value>,
}

/// A client's answer to a [`ClientInvocation`], for the instance that asked: carried on
/// that instance's return topic (ASP.NET's `internal:return:{server}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientReply {
    /// The instance that asked.
    pub to: InstanceId,
    /// The invocation answered.
    pub invocation_id: String,
    /// The client's Completion (or the owner's error when the client went away).
    pub outcome: Outcome,
}

/// A [`ClientInvocation`] as the Redis buses carry it (the connection and the sender are
/// carried around it).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireCall {
    pub invocation_id: String,
    pub target: String,
    pub arguments: Vec<serde_json::Value>,
}

impl WireCall {
    pub fn of(invocation: &ClientInvocation) -> Self {
        Self {
            invocation_id: invocation.invocation_id.clone(),
            target: invocation.target.clone(),
            arguments: invocation.arguments.clone(),
        }
    }

    pub fn into_invocation(
        self,
        connection: ConnectionId,
        reply_to: InstanceId,
    ) -> ClientInvocation {
        ClientInvocation {
            connection,
            invocation_id: self.invocation_id,
            reply_to,
            target: self.target,
            arguments: self.arguments,
        }
    }
}

/// A [`ClientReply`] as the Redis buses carry it (its addressee is its channel's).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireReply {
    pub invocation_id: String,
    pub outcome: WireOutcome,
}

impl WireReply {
    pub fn of(reply: &ClientReply) -> Self {
        Self {
            invocation_id: reply.invocation_id.clone(),
            outcome: WireOutcome::from(&reply.outcome),
        }
    }

    pub fn into_reply(self, to: InstanceId) -> ClientReply {
        ClientReply {
            to,
            invocation_id: self.invocation_id,
            outcome: self.outcome.into(),
        }
    }
}

/// An [`Outcome`] as the Redis buses carry it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum WireOutcome {
    Void,
    Result(serde_json::Value),
    Error(String),
}

impl From<&Outcome> for WireOutcome {
    fn from(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Void => Self::Void,
            Outcome::Result(value) => Self::Result(value.clone()),
            Outcome::Error(error) => Self::Error(error.clone()),
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(outcome: WireOutcome) -> Self {
        match outcome {
            WireOutcome::Void => Self::Void,
            WireOutcome::Result(value) => Self::Result(value),
            WireOutcome::Error(error) => Self::Error(error),
        }
    }
}

/// What one instance publishes and the others receive.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// A framed hub record for an audience.
    Message {
        /// Who receives it.
        audience: Audience,
        /// The record, encoded once for every recipient.
        record: Bytes,
        /// Which message it is, the same on every instance that delivers it (see
        /// [`MessageId`]); `None` from an instance that sends none.
        id: Option<MessageId>,
    },
    /// A group change for a connection on whatever instance holds it.
    Group(GroupCommand),
    /// An instance's heartbeat (and direct URL).
    Announcement(Announcement),
    /// A client asked for a result, for the instance holding it.
    Invoke(ClientInvocation),
    /// A client's result, for the instance that asked.
    Reply(ClientReply),
    /// A marker this instance sends itself on the topic of `audience`: when it comes
    /// back ([`Event::Fenced`]), every message published on that topic before it was sent
    /// has been handed to this instance's event stream already, because the broker keeps
    /// the order of one topic's messages and the bus hands them on in that order. Other
    /// instances ignore it. Used before a stateful session moves away, so that it leaves
    /// with everything published before the move began (see `Connections::hand_over`).
    Fence {
        /// Whose topic the marker travels on.
        audience: Audience,
        /// Which fence.
        id: u64,
    },
    /// Bytes for one instance only, carried on its [`Topic::Instance`] topic; the bus
    /// neither reads nor reorders them (one sender's frames to one instance arrive in the
    /// order they were published). They must be self-delimiting: a bus may join payloads
    /// that queued together for one instance into one message, end to end, and the
    /// receiver reads that as the payloads in order (the relay's batches of
    /// length-prefixed frames are).
    ToInstance {
        /// The instance the bytes are for.
        to: InstanceId,
        /// The bytes.
        payload: Bytes,
    },
}

/// What the stream of a bus yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Another instance published this (a bus never hands an instance its own messages:
    /// it delivered them locally already).
    Received(Envelope),
    /// The bus (re)connected and its subscriptions are live: a moment to announce.
    Connected,
    /// A fence this instance published came back ([`Envelope::Fence`]).
    Fenced(u64),
}

/// The inbound side of a bus: everything other instances published for this one.
pub type Events = BoxStream<'static, Event>;

/// Takes the payloads of [`Envelope::ToInstance`] addressed to this instance (the relay
/// of routed requests, which lives above the bus and is handed in by the application).
pub type InstanceHandler = Arc<dyn Fn(Bytes) -> BoxFuture<'static, ()> + Send + Sync>;

/// How instances reach each other. Implementations must keep the order of one sender's
/// messages, and keep carrying after their broker comes back.
pub trait Bus: Send + Sync {
    /// `in-process`, `redis` or `redis-cluster`, for `/healthz`.
    fn name(&self) -> &'static str;

    /// Whether the bus reaches other instances at all (false for the in-process bus):
    /// routing relays requests over a bus only if it does.
    fn is_shared(&self) -> bool {
        true
    }

    /// False while the bus cannot carry messages (its broker is unreachable).
    fn is_healthy(&self) -> bool;

    /// Carries an envelope to the other instances (to those subscribed to its audience's
    /// topic, for messages). Returns once it is queued, not delivered.
    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, ()>;

    /// Makes messages for these topics reach this instance; resolves once they do (or at
    /// once while disconnected: the bus subscribes them again when it reconnects).
    fn subscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()>;

    /// Stops messages for these topics reaching this instance.
    fn unsubscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()>;

    /// Whether some instance listens for `topic` right now. `Some(false)`: nobody holds
    /// what it names, so a client-result call fails at once, as ASP.NET's Redis backplane
    /// does from PUBLISH's receiver count. `None`: the bus cannot tell (then the call
    /// waits for its timeout).
    fn is_heard(&self, _topic: Topic) -> BoxFuture<'_, Option<bool>> {
        Box::pin(async { None })
    }

    /// Resolves once everything published before the call has been handed to the broker
    /// (or after a bounded wait while it is unreachable): an instance that stops waits on
    /// it so that its goodbye is not lost with the process.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Takes the cluster-wide claim of `connection` for this instance as its first
    /// transport request starts here (see [`claims`]): [`Claim::Held`] by this instance
    /// when it got it (or had it), by another when that one serves the connection,
    /// [`Claim::Closed`] when the connection ended. [`Claim::Unknown`] when the bus keeps no
    /// claims (the in-process bus: one instance, whose connection registry already answers
    /// 404 and 409 itself) or cannot reach its broker.
    fn claim(&self, _connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        Box::pin(async { Claim::Unknown })
    }

    /// Reads the claim of `connection` without taking it ([`Claim::Free`] if nobody has it).
    fn lookup_claim(&self, _connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        Box::pin(async { Claim::Unknown })
    }

    /// Ends this instance's claim of `connection`: with `closed_for`, it becomes the closed
    /// marker for that long (the token is spent everywhere); without, it is released.
    fn end_claim(
        &self,
        _connection: &ConnectionId,
        _closed_for: Option<std::time::Duration>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Refreshes this instance's claims of `connections` (every
    /// [`claims::CLAIM_REFRESH`]), a bounded number of claims per round trip.
    fn refresh_claims(&self, _connections: Vec<ConnectionId>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The bus of a single instance: there is nobody else to tell.
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcess;

impl InProcess {
    /// The bus, and its stream, which never yields.
    pub fn open() -> (Arc<dyn Bus>, Events) {
        (Arc::new(Self), Box::pin(futures_util::stream::pending()))
    }
}

impl Bus for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn is_healthy(&self) -> bool {
        true
    }

    fn publish(&self, _: Envelope) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn subscribe(&self, _: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn unsubscribe(&self, _: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// How far a bus's publisher got: messages queued versus messages the broker took, so
/// that [`Bus::flush`] can wait for what was queued before it.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    queued: AtomicU64,
    published: AtomicU64,
    /// Woken whenever the broker took more.
    advanced: tokio::sync::Notify,
}

impl Progress {
    /// One message is about to be queued (counted first, so the publisher never counts
    /// it before this does).
    pub(crate) fn queued(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// The message counted by [`Progress::queued`] did not fit in the queue.
    pub(crate) fn dropped(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// The publisher is done with `count` messages (taken by the broker, or lost).
    pub(crate) fn published(&self, count: usize) {
        self.published.fetch_add(count as u64, Ordering::AcqRel);
        self.advanced.notify_waiters();
    }

    /// Resolves once every message queued before the call is published, or after
    /// `timeout`.
    pub(crate) async fn flushed(&self, timeout: std::time::Duration) {
        let target = self.queued.load(Ordering::Acquire);
        let drained = async {
            loop {
                // Made before the check, so a publish finishing in between still wakes it.
                let advanced = self.advanced.notified();
                if self.published.load(Ordering::Acquire) >= target {
                    return;
                }
                advanced.await;
            }
        };
        if tokio::time::timeout(timeout, drained).await.is_err() {
            log::warn!("bus: the broker did not take the last messages in time");
        }
    }
}

/// A bus could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// `REDIS_URL` is not usable.
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(#[from] ::redis::RedisError),
    /// `REDIS_CLUSTER_URLS` is not usable.
    #[error("invalid REDIS_CLUSTER_URLS: {0}")]
    RedisClusterUrls(::redis::RedisError),
}

/// Opens the bus the settings choose, for the hub whose channels start with `namespace`
/// (e.g. `stickless:chat`). Must run inside a tokio runtime (buses run their own tasks).
pub fn open(
    settings: &Settings,
    namespace: &str,
    instance: InstanceId,
    metrics: Arc<Metrics>,
) -> Result<(Arc<dyn Bus>, Events), BusError> {
    if !settings.redis_cluster_urls.is_empty() {
        let (bus, events) = redis_cluster::RedisClusterBus::start(
            &settings.redis_cluster_urls,
            namespace,
            instance,
            metrics,
        )?;
        return Ok((Arc::new(bus), events));
    }
    match &settings.redis_url {
        Some(url) => {
            let (bus, events) = redis::RedisBus::start(url, namespace, instance, metrics)?;
            Ok((Arc::new(bus), events))
        }
        None => Ok(InProcess::open()),
    }
}
