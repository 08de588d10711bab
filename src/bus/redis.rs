//! The Redis pub/sub bus.
//!
//! Channels, namespaced per hub (`{p}` = `stickless:<hub>`, e.g. `stickless:chat`):
//!
//! | channel | carries |
//! |---|---|
//! | `{p}:all` | messages to every connection (`All`, `Others`) |
//! | `{p}:connection:<connectionId>` | messages to one connection |
//! | `{p}:group:<group>` | messages to a group's members |
//! | `{p}:user:<userId>` | messages to a user's connections |
//! | `{p}:internal:groups` | join/leave requests for connections on other instances |
//! | `{p}:internal:instances` | instances' heartbeats, with their `ADVERTISE_URL` if any (first hub only) |
//! | `{p}:internal:return:<instanceId>` | clients' results for the instance that asked (client invocations travel on the connection's channel) |
//! | `{p}:instance:<instanceId>` | frames for one instance only (relayed requests and their answers), raw bytes |
//!
//! One key per started connection, `{p}:claim:<connectionId>`: the instance serving it, or
//! `!closed` once it ended (see [`claims`]).
//!
//! An instance subscribes to `all`, the internal channels, and the connection, group and
//! user channels it was told to (those of its own connections, as ASP.NET's Redis
//! backplane does), so a message to a group crosses to just the instances that have
//! members. Payloads are JSON with the sender's instance id (except on instance channels,
//! whose payloads are the sender's bytes as they are: only one instance reads them, never
//! the sender); an instance ignores its own
//! messages, since it already delivered them locally. One publisher task sends everything
//! in order, which keeps the order of one sender's messages; under load it sends what
//! queued meanwhile as one pipeline (one round trip) rather than a round trip each, and
//! consecutive payloads for one instance channel in it as one message (they are
//! self-delimiting, see [`Envelope::ToInstance`]).
//!
//! If Redis goes away, local delivery goes on, both tasks reconnect with capped
//! exponential backoff, every topic is subscribed again, and [`Bus::is_healthy`] is false
//! meanwhile (`/healthz` says `degraded`). Messages published while Redis is unreachable
//! wait in a bounded queue and are dropped (and counted) when it is full.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::claims::{Claim, ClaimStore};
use super::{
    Announcement, Audience, Bus, BusError, Envelope, Event, Events, GroupCommand, MessageId,
    Progress, Topic, WireCall, WireReply,
};
use crate::metrics::Metrics;
use crate::protocol::token::{ConnectionId, InstanceId};

/// Messages waiting to be published while Redis is slow or away.
const PUBLISH_QUEUE: usize = 8192;
/// Most messages sent to Redis in one pipeline.
const PUBLISH_BATCH: usize = 256;
/// Messages received and not yet taken by the hub host; past this, reading from Redis
/// waits.
const INBOUND_QUEUE: usize = 8192;
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for Redis to confirm a publish or a subscription.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest message made by joining payloads for one instance.
const MAX_JOINED: usize = 1024 * 1024;

/// The messages of one pipeline: `batch` in order, except that each run of consecutive
/// payloads for the same instance channel (those starting with `instances`) is joined end
/// to end into one message of at most [`MAX_JOINED`] bytes (a single larger payload goes
/// alone). So everything that queued for one instance while the previous pipeline was in
/// flight reaches it as one message: one PUBLISH, one delivery, one wake-up of its drain.
/// Instance payloads are self-delimiting ([`Envelope::ToInstance`]), so the receiver reads
/// a joined message as the payloads it is made of, in order.
fn joined<'a>(batch: &'a [(String, Bytes)], instances: &str) -> Vec<(&'a str, Bytes)> {
    let mut out: Vec<(&'a str, Bytes)> = Vec::with_capacity(batch.len());
    let mut run: Vec<&'a Bytes> = Vec::new();
    let mut run_channel = "";
    let mut run_bytes = 0;
    let flush = |out: &mut Vec<(&'a str, Bytes)>, run: &mut Vec<&'a Bytes>, channel: &'a str| {
        match run.len() {
            0 => {}
            1 => out.push((channel, run[0].clone())),
            _ => {
                let mut joined = BytesMut::with_capacity(run.iter().map(|p| p.len()).sum());
                for payload in run.iter() {
                    joined.extend_from_slice(payload);
                }
                out.push((channel, joined.freeze()));
            }
        }
        run.clear();
    };
    for (channel, payload) in batch {
        let joins = channel.starts_with(instances)
            && channel == run_channel
            && run_bytes + payload.len() <= MAX_JOINED;
        if !joins {
            flush(&mut out, &mut run, run_channel);
            run_bytes = 0;
        }
        if channel.starts_with(instances) {
            run_channel = channel;
            run_bytes += payload.len();
            run.push(payload);
        } else {
            run_channel = "";
            out.push((channel, payload.clone()));
        }
    }
    flush(&mut out, &mut run, run_channel);
    out
}

/// A group command as it travels.
#[derive(Debug, Serialize, Deserialize)]
struct WireGroup {
    connection: String,
    group: String,
    join: bool,
}

/// What travels on the channels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Wire {
    /// A framed hub record for the channel's audience.
    Message {
        origin: String,
        #[serde(default)]
        except: Vec<String>,
        record: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A group change for a connection on some instance.
    Group { origin: String, action: WireGroup },
    /// An instance's direct URL; `reply` is false on the first announcement, which asks
    /// the others to announce themselves back.
    Hello {
        origin: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        reply: bool,
        /// A goodbye (absent from heartbeats, so older instances read them unchanged).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        leaving: bool,
    },
    /// A client asked for a result (on the connection's channel).
    Invoke {
        origin: String,
        #[serde(flatten)]
        call: WireCall,
    },
    /// A client's result (on the return channel of the instance that asked).
    Reply {
        origin: String,
        #[serde(flatten)]
        reply: WireReply,
    },
    /// A fence its sender sends itself ([`Envelope::Fence`]).
    Fence { origin: String, id: u64 },
}

/// Channel names of one hub.
#[derive(Debug, Clone)]
struct Channels {
    prefix: String,
}

impl Channels {
    fn all(&self) -> String {
        format!("{}:all", self.prefix)
    }
    fn groups(&self) -> String {
        format!("{}:internal:groups", self.prefix)
    }
    fn instances(&self) -> String {
        format!("{}:internal:instances", self.prefix)
    }
    fn returns(&self, instance: &InstanceId) -> String {
        format!("{}:internal:return:{instance}", self.prefix)
    }
    /// The key of a connection's claim ([`claims`]).
    fn claim(&self, connection: &ConnectionId) -> String {
        format!("{}:claim:{connection}", self.prefix)
    }
    fn topic(&self, topic: &Topic) -> String {
        match topic {
            Topic::Connection(id) => format!("{}:connection:{id}", self.prefix),
            Topic::Group(name) => format!("{}:group:{name}", self.prefix),
            Topic::User(user) => format!("{}:user:{user}", self.prefix),
            Topic::Instance(id) => format!("{}{id}", self.instance_prefix()),
        }
    }
    /// What every instance channel starts with.
    fn instance_prefix(&self) -> String {
        format!("{}:instance:", self.prefix)
    }
    /// The channel of an audience, and whom it leaves out.
    fn of(&self, audience: &Audience) -> (String, Vec<String>) {
        let ids = |except: &[ConnectionId]| except.iter().map(|id| id.to_string()).collect();
        match audience {
            Audience::All { except } => (self.all(), ids(except)),
            Audience::Connection(id) => (self.topic(&Topic::Connection(id.clone())), vec![]),
            Audience::Group { name, except } => {
                (self.topic(&Topic::Group(name.clone())), ids(except))
            }
            Audience::User(user) => (self.topic(&Topic::User(user.clone())), vec![]),
        }
    }
    /// The audience of a message that arrived on `channel`.
    fn audience(&self, channel: &str, except: Vec<String>) -> Option<Audience> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        let except = || {
            except
                .iter()
                .map(|id| ConnectionId::from_untrusted(id))
                .collect()
        };
        if rest == "all" {
            Some(Audience::All { except: except() })
        } else if let Some(id) = rest.strip_prefix("connection:") {
            Some(Audience::Connection(ConnectionId::from_untrusted(id)))
        } else if let Some(name) = rest.strip_prefix("group:") {
            Some(Audience::Group {
                name: name.to_owned(),
                except: except(),
            })
        } else {
            rest.strip_prefix("user:")
                .map(|user| Audience::User(user.to_owned()))
        }
    }
}

struct Shared {
    client: redis::Client,
    channels: Channels,
    instance: InstanceId,
    subscribed: AtomicBool,
    publishing: AtomicBool,
    sink: Mutex<Option<PubSubSink>>,
    /// The topic channels this instance needs, subscribed again after every reconnect.
    wanted: Mutex<HashSet<String>>,
    /// This instance's own channel, whose payloads are raw bytes.
    own_channel: String,
    /// What every instance channel starts with.
    instance_channels: String,
    publish_tx: mpsc::Sender<(String, Bytes)>,
    /// Messages queued versus taken by Redis ([`Bus::flush`]).
    progress: Progress,
    /// A connection for queries (`PUBSUB NUMSUB`, claims), opened on first use and again
    /// after an error.
    queries: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Whether claims work (logged on each change).
    claims: ClaimStore,
    metrics: Arc<Metrics>,
}

/// A bus over Redis pub/sub.
#[derive(Clone)]
pub struct RedisBus {
    shared: Arc<Shared>,
}

impl RedisBus {
    /// Starts the subscriber and publisher tasks for the channels under `namespace` (they
    /// connect, and keep reconnecting, in the background). Must run inside a tokio
    /// runtime.
    pub fn start(
        url: &str,
        namespace: &str,
        instance: InstanceId,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Events), BusError> {
        let client = redis::Client::open(url)?;
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(INBOUND_QUEUE);
        let channels = Channels {
            prefix: namespace.to_owned(),
        };
        let shared = Arc::new(Shared {
            client,
            own_channel: channels.topic(&Topic::Instance(instance.clone())),
            instance_channels: channels.instance_prefix(),
            channels,
            claims: ClaimStore::new(instance.clone()),
            instance,
            subscribed: AtomicBool::new(false),
            publishing: AtomicBool::new(false),
            sink: Mutex::new(None),
            wanted: Mutex::new(HashSet::new()),
            publish_tx,
            progress: Progress::default(),
            queries: tokio::sync::Mutex::new(None),
            metrics,
        });
        let bus = Self { shared };
        tokio::spawn(bus.clone().subscriber(events_tx));
        tokio::spawn(bus.clone().publisher(publish_rx));
        let events = futures_util::stream::unfold(events_rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        });
        Ok((bus, Box::pin(events)))
    }

    fn enqueue(&self, channel: String, wire: &Wire) {
        let payload = match serde_json::to_vec(wire) {
            Ok(payload) => payload,
            Err(error) => {
                log::error!("bus message not encodable: {error}");
                return;
            }
        };
        self.enqueue_bytes(channel, Bytes::from(payload));
    }

    fn enqueue_bytes(&self, channel: String, payload: Bytes) {
        // Counted before it is queued, so the publisher never counts it first.
        self.shared.progress.queued();
        if self.shared.publish_tx.try_send((channel, payload)).is_err() {
            self.shared.progress.dropped();
            self.shared.metrics.backplane_published(false);
            log::warn!("bus publish queue full; message dropped");
        }
    }

    /// The connection for queries (`PUBSUB NUMSUB`, claims), opened on first use and
    /// again after an error; `None` while Redis cannot be reached.
    async fn query_connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        let mut slot = self.shared.queries.lock().await;
        if slot.is_none() {
            let connecting = self.shared.client.get_multiplexed_async_connection();
            *slot = tokio::time::timeout(REDIS_TIMEOUT, connecting)
                .await
                .ok()?
                .ok();
        }
        slot.clone()
    }

    /// A query failed or was slow: the next one opens a new connection.
    async fn query_failed(&self) {
        *self.shared.queries.lock().await = None;
    }

    /// Drops the query connection when a claim could not be read.
    async fn checked(&self, claim: Claim) -> Claim {
        if claim == Claim::Unknown {
            self.query_failed().await;
        }
        claim
    }

    fn current_sink(&self) -> Option<PubSubSink> {
        self.shared.sink.lock().ok().and_then(|sink| sink.clone())
    }

    async fn change_subscriptions(&self, topics: Vec<Topic>, subscribe: bool) {
        if topics.is_empty() {
            return;
        }
        let channels: Vec<String> = topics
            .iter()
            .map(|t| self.shared.channels.topic(t))
            .collect();
        // The wish is recorded before the sink is read, and the subscriber publishes the
        // sink before it reads the wishes: either this call sees the new sink, or the
        // reconnect sees this wish.
        if let Ok(mut wanted) = self.shared.wanted.lock() {
            for channel in &channels {
                if subscribe {
                    wanted.insert(channel.clone());
                } else {
                    wanted.remove(channel);
                }
            }
        }
        let Some(mut sink) = self.current_sink() else {
            return; // Disconnected: the reconnect subscribes every wanted channel.
        };
        let change = async {
            if subscribe {
                sink.subscribe(&channels).await
            } else {
                sink.unsubscribe(&channels).await
            }
        };
        // A Redis that hangs must not hang the connection that waits for its topics.
        match tokio::time::timeout(REDIS_TIMEOUT, change).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                log::warn!("bus (un)subscribe failed, will resubscribe on reconnect: {error}")
            }
            Err(_) => log::warn!("bus (un)subscribe timed out, will resubscribe on reconnect"),
        }
    }

    async fn subscriber(self, events: mpsc::Sender<Event>) {
        let shared = &self.shared;
        let mut backoff = MIN_BACKOFF;
        let mut connected_before = false;
        loop {
            match shared.client.get_async_pubsub().await {
                Ok(pubsub) => {
                    let (sink, mut stream) = pubsub.split();
                    if let Ok(mut slot) = shared.sink.lock() {
                        *slot = Some(sink.clone());
                    }
                    let mut channels = vec![
                        shared.channels.all(),
                        shared.channels.groups(),
                        shared.channels.instances(),
                        shared.channels.returns(&shared.instance),
                    ];
                    if let Ok(wanted) = shared.wanted.lock() {
                        channels.extend(wanted.iter().cloned());
                    }
                    let mut sink = sink;
                    match sink.subscribe(&channels).await {
                        Ok(()) => {
                            shared.subscribed.store(true, Ordering::Relaxed);
                            backoff = MIN_BACKOFF;
                            let again = if connected_before {
                                shared.metrics.backplane_reconnected();
                                "re"
                            } else {
                                ""
                            };
                            log::info!(
                                "bus: {again}connected to Redis, {} channels subscribed",
                                channels.len()
                            );
                            connected_before = true;
                            if events.send(Event::Connected).await.is_err() {
                                return; // Nobody drains this bus any more.
                            }
                            while let Some(message) = stream.next().await {
                                let Some(event) = self.receive(&message) else {
                                    continue;
                                };
                                if events.send(event).await.is_err() {
                                    return;
                                }
                            }
                            log::warn!("bus: lost the Redis subscription; reconnecting");
                        }
                        Err(error) => log::warn!("bus: subscribing failed: {error}"),
                    }
                }
                Err(error) => {
                    log::warn!("bus: cannot connect to Redis ({error}); retrying in {backoff:?}")
                }
            }
            shared.subscribed.store(false, Ordering::Relaxed);
            if let Ok(mut slot) = shared.sink.lock() {
                *slot = None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Decodes a message from Redis; `None` for our own and for malformed ones.
    fn receive(&self, message: &redis::Msg) -> Option<Event> {
        let shared = &self.shared;
        if message.get_channel_name() == shared.own_channel {
            shared.metrics.backplane_received();
            return Some(Event::Received(Envelope::ToInstance {
                to: shared.instance.clone(),
                payload: Bytes::copy_from_slice(message.get_payload_bytes()),
            }));
        }
        let wire: Wire = match serde_json::from_slice(message.get_payload_bytes()) {
            Ok(wire) => wire,
            Err(error) => {
                log::warn!(
                    "bus: ignoring a malformed message on {}: {error}",
                    message.get_channel_name()
                );
                return None;
            }
        };
        let envelope = match wire {
            Wire::Message { origin, .. }
            | Wire::Group { origin, .. }
            | Wire::Hello { origin, .. }
            | Wire::Invoke { origin, .. }
            | Wire::Reply { origin, .. }
                if origin == shared.instance.as_str() =>
            {
                return None
            }
            Wire::Message {
                except, record, id, ..
            } => {
                shared.metrics.backplane_received();
                let audience = shared
                    .channels
                    .audience(message.get_channel_name(), except)?;
                Envelope::Message {
                    audience,
                    record: Bytes::from(record),
                    id: id.map(MessageId),
                }
            }
            Wire::Group { action, .. } => {
                shared.metrics.backplane_received();
                Envelope::Group(GroupCommand {
                    connection: ConnectionId::from_untrusted(&action.connection),
                    group: action.group,
                    join: action.join,
                })
            }
            Wire::Hello {
                origin,
                url,
                reply,
                leaving,
            } => {
                let Ok(instance) = InstanceId::parse(&origin) else {
                    log::warn!("bus: ignoring an announcement from a bad instance id");
                    return None;
                };
                Envelope::Announcement(Announcement {
                    instance,
                    url,
                    reply,
                    leaving,
                })
            }
            Wire::Invoke { origin, call } => {
                shared.metrics.backplane_received();
                let Some(Audience::Connection(connection)) =
                    shared.channels.audience(message.get_channel_name(), vec![])
                else {
                    return None;
                };
                Envelope::Invoke(call.into_invocation(connection, InstanceId::parse(&origin).ok()?))
            }
            Wire::Reply { reply, .. } => {
                shared.metrics.backplane_received();
                Envelope::Reply(reply.into_reply(shared.instance.clone()))
            }
            Wire::Fence { origin, id } => {
                // Only its sender reads it.
                return (origin == shared.instance.as_str()).then_some(Event::Fenced(id));
            }
        };
        Some(Event::Received(envelope))
    }

    async fn publisher(self, mut queue: mpsc::Receiver<(String, Bytes)>) {
        let shared = &self.shared;
        let mut backoff = MIN_BACKOFF;
        // A batch whose pipeline failed is sent again, first, once Redis is back, so a
        // message sent while Redis is down waits like the ones queued behind it (at least
        // once: a pipeline cut off half-way may publish its first messages twice).
        let mut batch: Vec<(String, Bytes)> = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            let mut connection = match shared.client.get_multiplexed_async_connection().await {
                Ok(connection) => connection,
                Err(error) => {
                    shared.publishing.store(false, Ordering::Relaxed);
                    log::debug!("bus publisher: cannot connect ({error}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            shared.publishing.store(true, Ordering::Relaxed);
            backoff = MIN_BACKOFF;
            loop {
                if batch.is_empty() && queue.recv_many(&mut batch, PUBLISH_BATCH).await == 0 {
                    return;
                }
                // Whatever is queued goes in one pipeline: one round trip to Redis for
                // many messages, still published in queue order (Redis runs a
                // connection's commands in order).
                let mut pipeline = redis::pipe();
                for (channel, payload) in joined(&batch, &shared.instance_channels) {
                    pipeline
                        .cmd("PUBLISH")
                        .arg(channel)
                        .arg(payload.as_ref())
                        .ignore();
                }
                let publish = pipeline.query_async::<()>(&mut connection);
                let result = match tokio::time::timeout(REDIS_TIMEOUT, publish).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                if let Err(error) = result {
                    log::warn!("bus: publishing failed ({error}); reconnecting");
                    break;
                }
                shared.metrics.backplane_batch(batch.len() as u64, true);
                shared.progress.published(batch.len());
                batch.clear();
            }
            shared.publishing.store(false, Ordering::Relaxed);
            if batch.is_empty() && queue.is_closed() && queue.is_empty() {
                return;
            }
        }
    }
}

impl Bus for RedisBus {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_healthy(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed)
            && self.shared.publishing.load(Ordering::Relaxed)
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, ()> {
        let origin = self.shared.instance.to_string();
        let channels = &self.shared.channels;
        let (channel, wire) = match envelope {
            Envelope::Message {
                audience,
                record,
                id,
            } => {
                let (channel, except) = channels.of(&audience);
                let wire = Wire::Message {
                    origin,
                    except,
                    // Records are JSON text, so UTF-8; a lossy copy cannot change them.
                    record: String::from_utf8_lossy(&record).into_owned(),
                    id: id.map(|id| id.0),
                };
                (channel, wire)
            }
            Envelope::Group(command) => {
                let action = WireGroup {
                    connection: command.connection.to_string(),
                    group: command.group,
                    join: command.join,
                };
                (channels.groups(), Wire::Group { origin, action })
            }
            Envelope::Announcement(hello) => {
                let wire = Wire::Hello {
                    origin,
                    url: hello.url,
                    reply: hello.reply,
                    leaving: hello.leaving,
                };
                (channels.instances(), wire)
            }
            Envelope::Invoke(invocation) => {
                let channel = channels.topic(&Topic::Connection(invocation.connection.clone()));
                let call = WireCall::of(&invocation);
                (channel, Wire::Invoke { origin, call })
            }
            Envelope::Reply(reply) => {
                let wire = Wire::Reply {
                    origin,
                    reply: WireReply::of(&reply),
                };
                (channels.returns(&reply.to), wire)
            }
            Envelope::ToInstance { to, payload } => {
                self.enqueue_bytes(channels.topic(&Topic::Instance(to)), payload);
                return Box::pin(async {});
            }
            Envelope::Fence { audience, id } => {
                (channels.of(&audience).0, Wire::Fence { origin, id })
            }
        };
        self.enqueue(channel, &wire);
        Box::pin(async {})
    }

    fn subscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change_subscriptions(topics, true))
    }

    fn is_heard(&self, topic: Topic) -> BoxFuture<'_, Option<bool>> {
        let channel = self.shared.channels.topic(&topic);
        Box::pin(async move {
            let mut connection = self.query_connection().await?;
            let mut command = redis::cmd("PUBSUB");
            command.arg("NUMSUB").arg(&channel);
            let asked = command.query_async::<(String, u64)>(&mut connection);
            match tokio::time::timeout(REDIS_TIMEOUT, asked).await {
                Ok(Ok((_, listeners))) => Some(listeners > 0),
                _ => {
                    self.query_failed().await;
                    None
                }
            }
        })
    }

    fn claim(&self, connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move {
            let claim = self
                .shared
                .claims
                .claim(self.query_connection().await, &key)
                .await;
            self.checked(claim).await
        })
    }

    fn lookup_claim(&self, connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move {
            let claim = self
                .shared
                .claims
                .lookup(self.query_connection().await, &key)
                .await;
            self.checked(claim).await
        })
    }

    fn end_claim(
        &self,
        connection: &ConnectionId,
        closed_for: Option<Duration>,
    ) -> BoxFuture<'_, ()> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move {
            let redis = self.query_connection().await;
            self.shared.claims.end(redis, &key, closed_for).await
        })
    }

    fn refresh_claims(&self, connections: Vec<ConnectionId>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let keys: Vec<String> = connections
                .iter()
                .map(|id| self.shared.channels.claim(id))
                .collect();
            let redis = self.query_connection().await;
            self.shared.claims.refresh(redis, &keys).await
        })
    }

    fn unsubscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change_subscriptions(topics, false))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.progress.flushed(REDIS_TIMEOUT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_keeps_its_id_on_the_wire_and_one_without_reads_as_none() {
        let wire = Wire::Message {
            origin: "node-1".into(),
            except: vec![],
            record: "{}".into(),
            id: Some(u64::MAX),
        };
        let text = serde_json::to_string(&wire).unwrap();
        assert!(matches!(
            serde_json::from_str(&text),
            Ok(Wire::Message {
                id: Some(u64::MAX),
                ..
            })
        ));
        // What an instance that sends no ids publishes.
        let older = r#"{"kind":"message","origin":"node-2","record":"{}"}"#;
        assert!(matches!(
            serde_json::from_str(older),
            Ok(Wire::Message { id: None, .. })
        ));
    }

    #[test]
    fn channels_map_back_to_their_audience() {
        let channels = Channels {
            prefix: "stickless:chat".into(),
        };
        let group = channels.topic(&Topic::Group("a:b".into()));
        assert_eq!(group, "stickless:chat:group:a:b");
        assert_eq!(
            channels.audience(&group, vec!["x".into()]),
            Some(Audience::Group {
                name: "a:b".into(),
                except: vec![ConnectionId::from_untrusted("x")]
            })
        );
        assert_eq!(
            channels.audience("stickless:chat:user:alice", vec![]),
            Some(Audience::User("alice".into()))
        );
        assert_eq!(channels.audience("stickless:other:all", vec![]), None);
        assert_eq!(channels.audience("stickless:chat:bogus", vec![]), None);
    }

    #[test]
    fn consecutive_payloads_for_one_instance_travel_as_one_message() {
        let instances = "p:instance:";
        let item = |channel: &str, payload: &'static [u8]| {
            (channel.to_owned(), Bytes::from_static(payload))
        };
        let batch = vec![
            item("p:instance:a", b"1"),
            item("p:instance:a", b"2"),
            item("p:all", b"x"),
            item("p:all", b"y"),
            item("p:instance:a", b"3"),
            item("p:instance:b", b"4"),
            item("p:instance:b", b"5"),
        ];
        let sent = joined(&batch, instances);
        let sent: Vec<(&str, &[u8])> = sent
            .iter()
            .map(|(channel, payload)| (*channel, payload.as_ref()))
            .collect();
        assert_eq!(
            sent,
            vec![
                ("p:instance:a", &b"12"[..]),
                ("p:all", b"x"),
                ("p:all", b"y"),
                ("p:instance:a", b"3"),
                ("p:instance:b", b"45"),
            ]
        );
        // A run stops growing at the size bound.
        let big = Bytes::from(vec![0u8; MAX_JOINED]);
        let batch = vec![
            ("p:instance:a".to_owned(), big.clone()),
            ("p:instance:a".to_owned(), Bytes::from_static(b"1")),
        ];
        assert_eq!(joined(&batch, instances).len(), 2);
    }
}
