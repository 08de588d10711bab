//! The Redis Cluster bus: sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE` / `SUNSUBSCRIBE`,
//! Redis 7+) over the redis crate's cluster connection (`REDIS_CLUSTER_URLS`).
//!
//! Classic `PUBLISH` on a Redis Cluster is broadcast to every node over the cluster bus, so
//! it does not scale with the cluster. A sharded channel lives on the one shard that owns
//! its key slot: a publish costs one node, and a subscriber needs a connection to that node
//! only ([Redis sharded pub/sub](https://redis.io/docs/latest/develop/interact/pubsub/#sharded-pubsub)).
//!
//! Channels, with `{p}` = the hub's namespace (e.g. `stickless:chat`). Only the part in
//! braces (the hash tag) picks the slot, so all of one target's traffic lives on one shard:
//!
//! | channel | carries |
//! |---|---|
//! | `{{p}:all}` | messages to every connection (`All`, `Others`) |
//! | `{{p}:all}:instances` | instances announcing their `ADVERTISE_URL` |
//! | `{{p}:connection:<id>}` | messages to one connection, group joins/leaves and client-result invocations for it |
//! | `{{p}:group:<name>}` | messages to a group's members |
//! | `{{p}:user:<id>}` | messages to a user's connections |
//! | `{{p}:return:<instanceId>}` | clients' results for the instance that asked |
//!
//! One key per started connection, `{{p}:connection:<id>}:claim` (in its connection's
//! slot): the instance serving it, or `!closed` once it ended (see [`claims`]).
//!
//! `all` sits on one fixed tag rather than being published once per shard: every instance
//! subscribes to it anyway, so one shard carries it at the cost of one publish, and
//! the order of one sender's broadcasts stays simple. The price: while the master owning
//! that slot is down, broadcasts between instances stop (see below). A group command
//! travels on its connection's channel, so only the instance holding that connection
//! receives it, on that connection's shard.
//!
//! Payloads are a one-line JSON header (kind, sender, audience) followed by a newline and
//! the record's raw bytes, so records cross unescaped. An instance ignores its own
//! messages: it delivered them locally already.
//!
//! Failures. The cluster connection reconnects to nodes on its own and subscribes every
//! confirmed channel again on the node that now owns its slot. On top of that, every
//! [`MAINTAIN_EVERY`] the bus reads `CLUSTER SLOTS` and pings every master on connections
//! of its own; a wanted channel whose shard came back or whose slot moved (a restart, a
//! failover, a resharding) is subscribed again, and one that could not be subscribed (its
//! shard was down) is retried. While a master does not answer, or a subscription is
//! missing, [`Bus::is_healthy`] is false (`/healthz` says `degraded`). Messages whose
//! channel hashes to a dead shard are lost (counted as publish errors); the others keep
//! flowing. While no master answers, messages wait in the same bounded queue as the Redis
//! bus's, and are dropped (and counted) when it is full.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::claims::{Claim, ClaimStore};
use super::{
    Announcement, Audience, Bus, BusError, Envelope, Event, Events, GroupCommand, MessageId,
    Progress, Topic, WireCall, WireReply,
};
use crate::metrics::Metrics;
use crate::protocol::token::{ConnectionId, InstanceId};

/// Messages waiting to be published while the cluster is slow or away (as the Redis bus).
const PUBLISH_QUEUE: usize = 8192;
/// Messages received and not yet taken by the hub host; past this, reading waits.
const INBOUND_QUEUE: usize = 8192;
/// First delay between attempts to reach the cluster at start; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between attempts to reach the cluster at start.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for a node to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the cluster to confirm a publish, a subscription or a ping.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How often every master is pinged and missing subscriptions are retried.
pub const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// The header line of a payload; the record's bytes follow it after a newline.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Header {
    /// A hub record (the payload's remainder) for an audience.
    Message {
        origin: String,
        audience: WireAudience,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A group change for a connection on the instance that holds it.
    Group {
        origin: String,
        connection: String,
        group: String,
        join: bool,
    },
    /// An instance's heartbeat, with its direct URL if it advertises one.
    Hello {
        origin: String,
        url: Option<String>,
        reply: bool,
        /// A goodbye (absent from heartbeats, so older instances read them unchanged).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        leaving: bool,
    },
    /// Opaque bytes (the payload's remainder) for one instance, on its own channel.
    ToInstance { origin: String, to: String },
    /// A client asked for a result (on the connection's channel).
    Invoke {
        origin: String,
        connection: String,
        #[serde(flatten)]
        call: WireCall,
    },
    /// A client's result (on the return channel of the instance that asked).
    Reply {
        origin: String,
        to: String,
        #[serde(flatten)]
        reply: WireReply,
    },
    /// A fence its sender sends itself ([`Envelope::Fence`]).
    Fence { origin: String, id: u64 },
}

/// An [`Audience`] as it travels: the channel alone does not say `except`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "camelCase")]
enum WireAudience {
    All { except: Vec<String> },
    Connection { id: String },
    Group { name: String, except: Vec<String> },
    User { id: String },
}

impl WireAudience {
    fn from_audience(audience: &Audience) -> Self {
        let ids = |ids: &[ConnectionId]| ids.iter().map(|id| id.to_string()).collect();
        match audience {
            Audience::All { except } => Self::All {
                except: ids(except),
            },
            Audience::Connection(id) => Self::Connection { id: id.to_string() },
            Audience::Group { name, except } => Self::Group {
                name: name.clone(),
                except: ids(except),
            },
            Audience::User(id) => Self::User { id: id.clone() },
        }
    }

    fn into_audience(self) -> Audience {
        // Ids from another instance are only looked up, never trusted as tokens.
        let ids = |ids: Vec<String>| {
            ids.iter()
                .map(|id| ConnectionId::from_untrusted(id))
                .collect()
        };
        match self {
            Self::All { except } => Audience::All {
                except: ids(except),
            },
            Self::Connection { id } => Audience::Connection(ConnectionId::from_untrusted(&id)),
            Self::Group { name, except } => Audience::Group {
                name,
                except: ids(except),
            },
            Self::User { id } => Audience::User(id),
        }
    }
}

/// Hash-tagged channel names of one hub.
#[derive(Debug, Clone)]
struct Channels {
    namespace: String,
}

impl Channels {
    fn all(&self) -> String {
        format!("{{{}:all}}", self.namespace)
    }

    fn instances(&self) -> String {
        format!("{{{}:all}}:instances", self.namespace)
    }

    /// An instance's return channel, for clients' results (on a shard of its own).
    fn returns(&self, instance: &InstanceId) -> String {
        format!("{{{}:return:{instance}}}", self.namespace)
    }

    /// The key of a connection's claim ([`claims`]): hash-tagged as the connection's
    /// channel, so it lives in that slot.
    fn claim(&self, connection: &ConnectionId) -> String {
        format!("{{{}:connection:{connection}}}:claim", self.namespace)
    }

    fn topic(&self, topic: &Topic) -> String {
        match topic {
            Topic::Connection(id) => format!("{{{}:connection:{id}}}", self.namespace),
            Topic::Group(name) => format!("{{{}:group:{name}}}", self.namespace),
            Topic::User(user) => format!("{{{}:user:{user}}}", self.namespace),
            Topic::Instance(id) => format!("{{{}:instance:{id}}}", self.namespace),
        }
    }

    /// Where messages to `audience` (and fences on its topic) go.
    fn audience(&self, audience: &Audience) -> String {
        match audience {
            Audience::All { .. } => self.all(),
            Audience::Connection(id) => self.topic(&Topic::Connection(id.clone())),
            Audience::Group { name, .. } => self.topic(&Topic::Group(name.clone())),
            Audience::User(user) => self.topic(&Topic::User(user.clone())),
        }
    }

    /// Where an envelope goes.
    fn of(&self, envelope: &Envelope) -> String {
        match envelope {
            Envelope::Message { audience, .. } | Envelope::Fence { audience, .. } => {
                self.audience(audience)
            }
            Envelope::Group(command) => self.topic(&Topic::Connection(command.connection.clone())),
            Envelope::Announcement(_) => self.instances(),
            Envelope::ToInstance { to, .. } => self.topic(&Topic::Instance(to.clone())),
            Envelope::Invoke(invocation) => {
                self.topic(&Topic::Connection(invocation.connection.clone()))
            }
            Envelope::Reply(reply) => self.returns(&reply.to),
        }
    }
}

/// Encodes an envelope as a header line plus the record's bytes.
fn encode(origin: &InstanceId, envelope: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    let origin = origin.to_string();
    let (header, record) = match envelope {
        Envelope::Message {
            audience,
            record,
            id,
        } => (
            Header::Message {
                origin,
                audience: WireAudience::from_audience(audience),
                id: id.map(|id| id.0),
            },
            Some(record),
        ),
        Envelope::Group(command) => (
            Header::Group {
                origin,
                connection: command.connection.to_string(),
                group: command.group.clone(),
                join: command.join,
            },
            None,
        ),
        Envelope::Announcement(announcement) => (
            Header::Hello {
                origin,
                url: announcement.url.clone(),
                reply: announcement.reply,
                leaving: announcement.leaving,
            },
            None,
        ),
        Envelope::ToInstance { to, payload } => (
            Header::ToInstance {
                origin,
                to: to.to_string(),
            },
            Some(payload),
        ),
        Envelope::Invoke(invocation) => (
            Header::Invoke {
                origin,
                connection: invocation.connection.to_string(),
                call: WireCall::of(invocation),
            },
            None,
        ),
        Envelope::Reply(reply) => (
            Header::Reply {
                origin,
                to: reply.to.to_string(),
                reply: WireReply::of(reply),
            },
            None,
        ),
        Envelope::Fence { id, .. } => (Header::Fence { origin, id: *id }, None),
    };
    let mut payload = serde_json::to_vec(&header)?;
    payload.push(b'\n');
    if let Some(record) = record {
        payload.extend_from_slice(record);
    }
    Ok(payload)
}

/// Why a payload from the cluster was not turned into an envelope.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    /// No header line.
    #[error("no header line")]
    NoHeader,
    /// The header is not one of ours.
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
    /// The sender's id is not an instance id.
    #[error("bad sender id")]
    Origin,
}

/// Decodes a payload; `Ok(None)` for this instance's own messages (but not its fences)
/// and for other instances' fences.
fn decode(me: &InstanceId, payload: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let split = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(DecodeError::NoHeader)?;
    let (header, rest) = payload.split_at(split);
    let record = &rest[1..];
    let header: Header = serde_json::from_slice(header)?;
    let origin = match &header {
        Header::Message { origin, .. }
        | Header::Group { origin, .. }
        | Header::Hello { origin, .. }
        | Header::ToInstance { origin, .. }
        | Header::Invoke { origin, .. }
        | Header::Reply { origin, .. }
        | Header::Fence { origin, .. } => origin,
    };
    if origin == me.as_str() {
        // Its own messages were delivered here already; its fences are what it waits for.
        return Ok(match header {
            Header::Fence { id, .. } => Some(Decoded::Fenced(id)),
            _ => None,
        });
    }
    Ok(Some(Decoded::Envelope(match header {
        Header::Message { audience, id, .. } => Envelope::Message {
            audience: audience.into_audience(),
            record: Bytes::copy_from_slice(record),
            id: id.map(MessageId),
        },
        Header::Group {
            connection,
            group,
            join,
            ..
        } => Envelope::Group(GroupCommand {
            connection: ConnectionId::from_untrusted(&connection),
            group,
            join,
        }),
        Header::Hello {
            origin,
            url,
            reply,
            leaving,
        } => Envelope::Announcement(Announcement {
            instance: InstanceId::parse(&origin).map_err(|_| DecodeError::Origin)?,
            url,
            reply,
            leaving,
        }),
        Header::ToInstance { to, .. } => Envelope::ToInstance {
            to: InstanceId::parse(&to).map_err(|_| DecodeError::Origin)?,
            payload: Bytes::copy_from_slice(record),
        },
        Header::Invoke {
            origin,
            connection,
            call,
        } => Envelope::Invoke(call.into_invocation(
            ConnectionId::from_untrusted(&connection),
            InstanceId::parse(&origin).map_err(|_| DecodeError::Origin)?,
        )),
        Header::Reply { to, reply, .. } => Envelope::Reply(
            reply.into_reply(InstanceId::parse(&to).map_err(|_| DecodeError::Origin)?),
        ),
        // Another instance's fence: only its sender reads it.
        Header::Fence { .. } => return Ok(None),
    })))
}

/// What a payload from the cluster is.
#[derive(Debug)]
enum Decoded {
    /// Another instance's envelope.
    Envelope(Envelope),
    /// One of this instance's fences came back.
    Fenced(u64),
}

/// The (channel, payload) of a sharded message push; `None` for any other push.
fn sharded_message(push: PushInfo) -> Option<(String, Vec<u8>)> {
    if push.kind != PushKind::SMessage {
        return None;
    }
    let mut data = push.data.into_iter();
    let channel = match data.next()? {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok()?,
        _ => return None,
    };
    match data.next()? {
        Value::BulkString(payload) => Some((channel, payload)),
        _ => None,
    }
}

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The slot of a key or channel: CRC16 (XMODEM) of its hash tag, or of the whole name when
/// it has none, modulo 16384 (Redis Cluster specification, "Hash tags").
fn slot_of(channel: &str) -> u16 {
    let key = channel.as_bytes();
    let tag = key.iter().position(|b| *b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(key)) % SLOTS
}

/// A master's address.
type Address = (String, u16);

/// What the last probe saw: which master serves which slots, and which masters answered.
#[derive(Debug, Default)]
struct Topology {
    /// `(first slot, last slot, master)`.
    ranges: Vec<(u16, u16, Address)>,
    /// Masters that did not answer.
    down: HashSet<Address>,
}

impl Topology {
    /// The master of `channel`'s slot, if known and it answered.
    fn live_owner(&self, channel: &str) -> Option<&Address> {
        let slot = slot_of(channel);
        self.ranges
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, master)| master)
            .filter(|master| !self.down.contains(*master))
    }

    /// Whether the master of `channel`'s slot is known and answered.
    fn serves(&self, channel: &str) -> bool {
        self.live_owner(channel).is_some()
    }

    /// Whether some master answered.
    fn any_up(&self) -> bool {
        self.ranges
            .iter()
            .any(|(_, _, master)| !self.down.contains(master))
    }

    /// Whether every slot has a master and every master answered.
    fn all_up(&self) -> bool {
        let covered: u32 = self
            .ranges
            .iter()
            .map(|(first, last, _)| u32::from(last.saturating_sub(*first)) + 1)
            .sum();
        covered == u32::from(SLOTS) && self.down.is_empty()
    }
}

/// Pings every master on connections of its own. The cluster connection is not used for
/// this: a command for a dead node makes it rebuild every node's connection (dropping the
/// subscriptions of the live shards), and a fan-out to "all masters" skips a node whose
/// connection is being repaired.
struct Probe {
    /// The seeds' settings (password, timeouts); each master's address replaces theirs.
    template: ConnectionInfo,
    seeds: Vec<Address>,
    connections: HashMap<Address, MultiplexedConnection>,
}

impl Probe {
    fn new(seeds: &[String]) -> Result<Self, redis::RedisError> {
        let infos = seeds
            .iter()
            .map(|seed| seed.as_str().into_connection_info())
            .collect::<Result<Vec<_>, _>>()?;
        let template = infos.first().cloned().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no seed node"))
        })?;
        let seeds = infos
            .iter()
            .filter_map(|info| match info.addr() {
                ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
                _ => None,
            })
            .collect();
        Ok(Self {
            template,
            seeds,
            connections: HashMap::new(),
        })
    }

    /// Runs `command` on `address`, connecting first if needed; a failure drops the
    /// connection so the next probe connects afresh.
    async fn query(&mut self, address: &Address, command: &redis::Cmd) -> Option<Value> {
        let mut connection = match self.connections.get(address) {
            Some(connection) => connection.clone(),
            None => {
                let info = self
                    .template
                    .clone()
                    .set_addr(ConnectionAddr::Tcp(address.0.clone(), address.1));
                let client = redis::Client::open(info).ok()?;
                let connect = client.get_multiplexed_async_connection();
                let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .ok()?
                    .ok()?;
                self.connections.insert(address.clone(), connection.clone());
                connection
            }
        };
        let reply = tokio::time::timeout(REDIS_TIMEOUT, command.query_async(&mut connection));
        match reply.await {
            Ok(Ok(value)) => Some(value),
            _ => {
                self.connections.remove(address);
                None
            }
        }
    }

    /// Reads the slot map from the first node that answers (a known master, else a seed),
    /// then pings every master.
    async fn run(&mut self) -> Topology {
        let mut candidates: Vec<Address> = self.connections.keys().cloned().collect();
        candidates.extend(self.seeds.iter().cloned());
        let mut ranges = Vec::new();
        for address in candidates {
            let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
            if let Some(reply) = self.query(&address, &slots).await {
                ranges = slot_ranges(&reply);
                if !ranges.is_empty() {
                    break;
                }
            }
        }
        let masters: HashSet<Address> = ranges.iter().map(|(_, _, m)| m.clone()).collect();
        self.connections
            .retain(|address, _| masters.contains(address));
        let mut down = HashSet::new();
        for master in masters {
            if self.query(&master, &redis::cmd("PING")).await.is_none() {
                down.insert(master);
            }
        }
        Topology { ranges, down }
    }
}

/// The slot ranges and their masters in a `CLUSTER SLOTS` reply: each entry is
/// `[first slot, last slot, [master host, master port, …], replicas…]`
/// ([CLUSTER SLOTS](https://redis.io/docs/latest/commands/cluster-slots/)).
fn slot_ranges(reply: &Value) -> Vec<(u16, u16, Address)> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    let int = |value: Option<&Value>| match value {
        Some(Value::Int(n)) => u16::try_from(*n).ok(),
        _ => None,
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let Some(Value::Array(master)) = fields.get(2) else {
                return None;
            };
            let host = match master.first() {
                Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                _ => return None,
            };
            Some((
                int(fields.first())?,
                int(fields.get(1))?,
                (host, int(master.get(1))?),
            ))
        })
        .collect()
}

struct Shared {
    channels: Channels,
    instance: InstanceId,
    /// Set once the cluster was reached; the connection then repairs itself.
    connection: Mutex<Option<ClusterConnection>>,
    /// Every channel this instance needs (the fixed ones and its topics').
    wanted: Mutex<HashSet<String>>,
    /// Wanted channels not confirmed yet (their shard was unreachable): retried.
    missing: Mutex<HashSet<String>>,
    /// Which master serves which slots, and which answered the last probe.
    topology: Mutex<Topology>,
    /// Whether some master answered the last probe: the publisher waits for it.
    reachable: watch::Sender<bool>,
    publish_tx: mpsc::Sender<(String, Vec<u8>)>,
    /// Messages queued versus published ([`Bus::flush`]).
    progress: Progress,
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    /// Whether claims work (logged on each change).
    claims: ClaimStore,
}

/// A bus over Redis Cluster sharded pub/sub.
#[derive(Clone)]
pub struct RedisClusterBus {
    shared: Arc<Shared>,
}

impl RedisClusterBus {
    /// Starts the bus for the hub whose channels start with `namespace`, reaching the
    /// cluster through the seed nodes `seeds` (`redis://host:port` each). Connecting goes on
    /// in the background until the cluster answers. Must run inside a tokio runtime.
    pub fn start(
        seeds: &[String],
        namespace: &str,
        instance: InstanceId,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Events), BusError> {
        let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
        let client = ClusterClientBuilder::new(seeds.to_vec())
            // Pushes (and so subscriptions) on a cluster connection need RESP3.
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_tx)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(REDIS_TIMEOUT)
            // A dead shard fails its publishes quickly instead of holding the queue.
            .retries(1)
            .build()
            .map_err(BusError::RedisClusterUrls)?;
        let probe = Probe::new(seeds).map_err(BusError::RedisClusterUrls)?;
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(INBOUND_QUEUE);
        let channels = Channels {
            namespace: namespace.to_owned(),
        };
        let fixed = [
            channels.all(),
            channels.instances(),
            channels.returns(&instance),
        ];
        let shared = Arc::new(Shared {
            channels,
            claims: ClaimStore::new(instance.clone()),
            instance,
            connection: Mutex::new(None),
            wanted: Mutex::new(fixed.iter().cloned().collect()),
            missing: Mutex::new(fixed.into_iter().collect()),
            topology: Mutex::new(Topology::default()),
            reachable: watch::Sender::new(false),
            publish_tx,
            progress: Progress::default(),
            events: events_tx,
            metrics,
        });
        let bus = Self { shared };
        tokio::spawn(bus.clone().maintain(client, probe));
        tokio::spawn(bus.clone().publisher(publish_rx));
        tokio::spawn(bus.clone().receiver(push_rx));
        let events = futures_util::stream::unfold(events_rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        });
        Ok((bus, Box::pin(events)))
    }

    fn connection(&self) -> Option<ClusterConnection> {
        self.shared.connection.lock().ok()?.clone()
    }

    /// Subscribes one channel; false if the cluster did not confirm it.
    async fn ssubscribe(&self, connection: &mut ClusterConnection, channel: &str) -> bool {
        // One channel per command: channels of one SSUBSCRIBE must share a slot.
        match tokio::time::timeout(REDIS_TIMEOUT, connection.ssubscribe(channel)).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                log::warn!("bus: SSUBSCRIBE {channel} failed, will retry: {error}");
                false
            }
            Err(_) => {
                log::warn!("bus: SSUBSCRIBE {channel} timed out, will retry");
                false
            }
        }
    }

    /// Subscribes the missing channels that are still wanted.
    async fn subscribe_missing(&self, connection: &mut ClusterConnection) {
        let missing: Vec<String> = match self.shared.missing.lock() {
            Ok(missing) => missing.iter().cloned().collect(),
            Err(_) => return,
        };
        for channel in missing {
            // A command for a dead node makes the cluster connection rebuild every node's
            // connection, cutting the live shards' subscriptions: wait for the shard.
            if self.shard_up(&channel) && self.ssubscribe(connection, &channel).await {
                if let Ok(mut missing) = self.shared.missing.lock() {
                    missing.remove(&channel);
                }
            }
        }
    }

    /// Reaches the cluster (with backoff), then every [`MAINTAIN_EVERY`] probes the masters
    /// and retries missing subscriptions; tells the hub host when the bus becomes healthy.
    async fn maintain(self, client: redis::cluster::ClusterClient, mut probe: Probe) {
        let shared = &self.shared;
        let mut backoff = MIN_BACKOFF;
        let mut connection = loop {
            match client.get_async_connection().await {
                Ok(connection) => break connection,
                Err(error) => {
                    log::warn!(
                        "bus: cannot reach the Redis Cluster ({error}); retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        if let Ok(mut slot) = shared.connection.lock() {
            *slot = Some(connection.clone());
        }
        log::info!("bus: connected to the Redis Cluster");
        let mut was_healthy = false;
        let mut tick = tokio::time::interval(MAINTAIN_EVERY);
        loop {
            tick.tick().await;
            let topology = probe.run().await;
            self.resubscribe_moved(&topology);
            shared.reachable.send_replace(topology.any_up());
            if let Ok(mut slot) = shared.topology.lock() {
                *slot = topology;
            }
            self.subscribe_missing(&mut connection).await;
            let healthy = self.is_healthy();
            if healthy && !was_healthy {
                log::info!("bus: every master answers and every channel is subscribed");
                // A peer may have missed this instance's announcements meanwhile.
                let _ = shared.events.send(Event::Connected).await;
            } else if !healthy && was_healthy {
                log::warn!(
                    "bus: degraded (a master does not answer, or a subscription is missing)"
                );
            }
            was_healthy = healthy;
        }
    }

    /// Marks as missing every wanted channel whose live master is not the one it had: its
    /// shard came back (a restarted master may have lost its subscribers) or its slot moved
    /// (failover, resharding). The cluster connection resubscribes on its own too; an
    /// `SSUBSCRIBE` repeated on a subscribed connection changes nothing, so both may run.
    fn resubscribe_moved(&self, new: &Topology) {
        let shared = &self.shared;
        let (Ok(old), Ok(wanted), Ok(mut missing)) = (
            shared.topology.lock(),
            shared.wanted.lock(),
            shared.missing.lock(),
        ) else {
            return;
        };
        for channel in wanted.iter() {
            let now = new.live_owner(channel);
            if now.is_some() && now != old.live_owner(channel) {
                missing.insert(channel.clone());
            }
        }
    }

    /// Whether the master owning `channel`'s slot answered the last probe.
    fn shard_up(&self, channel: &str) -> bool {
        self.shared
            .topology
            .lock()
            .map(|topology| topology.serves(channel))
            .unwrap_or(false)
    }

    /// Turns pushes from every node into events, in order.
    async fn receiver(self, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
        let shared = &self.shared;
        while let Some(push) = pushes.recv().await {
            let Some((channel, payload)) = sharded_message(push) else {
                continue;
            };
            let event = match decode(&shared.instance, &payload) {
                Ok(Some(Decoded::Envelope(envelope))) => {
                    shared.metrics.backplane_received();
                    Event::Received(envelope)
                }
                Ok(Some(Decoded::Fenced(id))) => Event::Fenced(id),
                Ok(None) => continue,
                Err(error) => {
                    log::warn!("bus: ignoring a malformed message on {channel}: {error}");
                    continue;
                }
            };
            if shared.events.send(event).await.is_err() {
                return; // The hub host is gone.
            }
        }
    }

    /// Publishes queued messages one after another, which keeps one sender's order.
    /// While no master answers, it waits, as the Redis bus waits for Redis: the queue
    /// keeps what is published meanwhile, up to its bound. While only some shards are down,
    /// their messages are dropped so the others' keep flowing.
    async fn publisher(self, mut queue: mpsc::Receiver<(String, Vec<u8>)>) {
        let shared = &self.shared;
        let mut reachable = shared.reachable.subscribe();
        while let Some((channel, payload)) = queue.recv().await {
            if reachable.wait_for(|up| *up).await.is_err() {
                return; // The bus is gone.
            }
            self.publish_one(&channel, &payload).await;
            shared.progress.published(1);
        }
    }

    /// Publishes one message (or loses it, counted, when its shard is down or fails).
    async fn publish_one(&self, channel: &str, payload: &[u8]) {
        let shared = &self.shared;
        let Some(mut connection) = self.connection() else {
            return; // Not reachable without a connection: unreachable in practice.
        };
        if !self.shard_up(channel) {
            // Lost, as SPUBLISH to a dead shard would lose it, without disturbing the
            // cluster connection (see `subscribe_missing`).
            shared.metrics.backplane_published(false);
            log::debug!("bus: the shard of {channel} is down; message lost");
            return;
        }
        let mut command = redis::cmd("SPUBLISH");
        command.arg(channel).arg(payload);
        let publish = command.query_async::<i64>(&mut connection);
        let result = match tokio::time::timeout(REDIS_TIMEOUT, publish).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        shared.metrics.backplane_published(result.is_ok());
        if let Err(error) = result {
            log::warn!("bus: SPUBLISH to {channel} failed, message lost: {error}");
        }
    }

    async fn change(&self, topics: Vec<Topic>, subscribe: bool) {
        let channels: Vec<String> = topics
            .iter()
            .map(|t| self.shared.channels.topic(t))
            .collect();
        if let (Ok(mut wanted), Ok(mut missing)) =
            (self.shared.wanted.lock(), self.shared.missing.lock())
        {
            for channel in &channels {
                if subscribe {
                    wanted.insert(channel.clone());
                    missing.insert(channel.clone());
                } else {
                    wanted.remove(channel);
                    missing.remove(channel);
                }
            }
        }
        let Some(mut connection) = self.connection() else {
            return; // Not connected yet: `maintain` subscribes what is missing.
        };
        for channel in channels {
            if !self.shard_up(&channel) {
                continue; // `maintain` subscribes it once its shard is back.
            }
            if subscribe {
                if self.ssubscribe(&mut connection, &channel).await {
                    if let Ok(mut missing) = self.shared.missing.lock() {
                        missing.remove(&channel);
                    }
                }
            } else {
                let unsubscribe = connection.sunsubscribe(&channel);
                if !matches!(
                    tokio::time::timeout(REDIS_TIMEOUT, unsubscribe).await,
                    Ok(Ok(()))
                ) {
                    // Harmless: messages for it find no local recipient.
                    log::debug!("bus: SUNSUBSCRIBE {channel} not confirmed");
                }
            }
        }
    }
}

impl Bus for RedisClusterBus {
    fn name(&self) -> &'static str {
        "redis-cluster"
    }

    fn claim(&self, connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move { self.shared.claims.claim(self.connection(), &key).await })
    }

    fn lookup_claim(&self, connection: &ConnectionId) -> BoxFuture<'_, Claim> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move { self.shared.claims.lookup(self.connection(), &key).await })
    }

    fn end_claim(
        &self,
        connection: &ConnectionId,
        closed_for: Option<Duration>,
    ) -> BoxFuture<'_, ()> {
        let key = self.shared.channels.claim(connection);
        Box::pin(async move {
            let redis = self.connection();
            self.shared.claims.end(redis, &key, closed_for).await
        })
    }

    fn refresh_claims(&self, connections: Vec<ConnectionId>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let keys: Vec<String> = connections
                .iter()
                .map(|id| self.shared.channels.claim(id))
                .collect();
            let redis = self.connection();
            self.shared.claims.refresh_each(redis, &keys).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.progress.flushed(REDIS_TIMEOUT))
    }

    fn is_healthy(&self) -> bool {
        let shared = &self.shared;
        let subscribed = shared
            .missing
            .lock()
            .map(|missing| missing.is_empty())
            .unwrap_or(false);
        subscribed
            && shared
                .topology
                .lock()
                .map(|topology| topology.all_up())
                .unwrap_or(false)
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let channel = self.shared.channels.of(&envelope);
            let payload = match encode(&self.shared.instance, &envelope) {
                Ok(payload) => payload,
                Err(error) => {
                    log::error!("bus message not encodable: {error}");
                    return;
                }
            };
            self.shared.progress.queued();
            if self.shared.publish_tx.try_send((channel, payload)).is_err() {
                self.shared.progress.dropped();
                self.shared.metrics.backplane_published(false);
                log::warn!("bus publish queue full; message dropped");
            }
        })
    }

    fn subscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change(topics, true))
    }

    fn unsubscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change(topics, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{ClientInvocation, ClientReply};

    fn channels() -> Channels {
        Channels {
            namespace: "stickless:chat".into(),
        }
    }

    /// The hash tag Redis Cluster hashes: the text between the first `{` and the next `}`.
    fn hash_tag(channel: &str) -> &str {
        let open = channel.find('{').expect("a tag");
        let close = open + channel[open..].find('}').expect("a closed tag");
        &channel[open + 1..close]
    }

    #[test]
    fn every_target_has_its_own_hash_tag_and_announcements_share_alls() {
        let channels = channels();
        let group = channels.topic(&Topic::Group("room".into()));
        assert_eq!(group, "{stickless:chat:group:room}");
        assert_eq!(hash_tag(&group), "stickless:chat:group:room");
        assert_eq!(hash_tag(&channels.all()), hash_tag(&channels.instances()));
        let id = ConnectionId::from_untrusted("abc");
        let command = Envelope::Group(GroupCommand {
            connection: id.clone(),
            group: "room".into(),
            join: true,
        });
        assert_eq!(
            channels.of(&command),
            channels.topic(&Topic::Connection(id))
        );
    }

    #[test]
    fn envelopes_cross_unchanged_and_own_messages_are_ignored() {
        let me = InstanceId::parse("node-1").expect("id");
        let other = InstanceId::parse("node-2").expect("id");
        let record = Bytes::from_static(b"{\"type\":1}\x1e\n\x00binary");
        let envelopes = [
            Envelope::Message {
                audience: Audience::Group {
                    name: "a}b{c".into(),
                    except: vec![ConnectionId::from_untrusted("x")],
                },
                record: record.clone(),
                id: Some(MessageId(u64::MAX)),
            },
            Envelope::Message {
                audience: Audience::All { except: vec![] },
                record,
                id: None,
            },
            Envelope::Group(GroupCommand {
                connection: ConnectionId::from_untrusted("c"),
                group: "g".into(),
                join: false,
            }),
            Envelope::Announcement(Announcement {
                instance: other.clone(),
                url: Some("http://10.0.0.2:8080".into()),
                reply: true,
                leaving: false,
            }),
            Envelope::Announcement(Announcement {
                instance: other.clone(),
                url: None,
                reply: true,
                leaving: true,
            }),
            Envelope::ToInstance {
                to: me.clone(),
                payload: Bytes::from_static(b"\x01frames\n\x00"),
            },
            Envelope::Invoke(ClientInvocation {
                connection: ConnectionId::from_untrusted("c"),
                invocation_id: "7.node-2".into(),
                reply_to: other.clone(),
                target: "Ask".into(),
                arguments: vec![serde_json::json!("q"), serde_json::json!({"a": [1]})],
            }),
            Envelope::Reply(ClientReply {
                to: me.clone(),
                invocation_id: "7.node-1".into(),
                outcome: crate::protocol::message::Outcome::Error("no".into()),
            }),
        ];
        for envelope in envelopes {
            let payload = encode(&other, &envelope).expect("encodes");
            assert!(matches!(
                decode(&me, &payload).expect("decodes"),
                Some(Decoded::Envelope(got)) if got == envelope
            ));
            assert!(decode(&other, &payload).expect("decodes").is_none());
        }
    }

    #[test]
    fn a_fence_comes_back_to_its_sender_only() {
        let me = InstanceId::parse("node-1").unwrap();
        let other = InstanceId::parse("node-2").unwrap();
        let fence = Envelope::Fence {
            audience: Audience::All { except: vec![] },
            id: 42,
        };
        let payload = encode(&me, &fence).expect("encodes");
        assert!(matches!(
            decode(&me, &payload).expect("decodes"),
            Some(Decoded::Fenced(42))
        ));
        assert!(decode(&other, &payload).expect("decodes").is_none());
    }

    #[test]
    fn slots_are_computed_as_redis_does() {
        // The examples of the CLUSTER KEYSLOT page and the cluster specification.
        assert_eq!(slot_of("somekey"), 11058);
        assert_eq!(slot_of("foo{hash_tag}"), 2515);
        assert_eq!(slot_of("123456789"), 12739);
        // An empty tag does not count: the whole name is hashed.
        assert_ne!(slot_of("{}a"), slot_of("a"));
        assert_eq!(slot_of("{user}:a"), slot_of("{user}:b"));
    }

    #[test]
    fn the_topology_knows_live_owners_and_full_coverage() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |first: i64, last: i64, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk("id")]),
            ])
        };
        let reply = Value::Array(vec![
            entry(0, 5460, 7000),
            entry(5461, 10922, 7001),
            entry(10923, 16383, 7002),
        ]);
        let ranges = slot_ranges(&reply);
        assert_eq!(ranges.len(), 3);
        let mut topology = Topology {
            ranges,
            down: HashSet::new(),
        };
        assert!(topology.all_up());
        let channel = "foo{hash_tag}"; // slot 2515, on 7000
        assert_eq!(
            topology.live_owner(channel),
            Some(&("127.0.0.1".to_owned(), 7000))
        );
        topology.down.insert(("127.0.0.1".to_owned(), 7000));
        assert!(!topology.serves(channel));
        assert!(topology.serves("somekey")); // slot 11058, on 7002
        assert!(!topology.all_up());
        assert!(topology.any_up());
        // A master missing from the reply leaves slots uncovered: not healthy.
        let partial = Topology {
            ranges: slot_ranges(&Value::Array(vec![entry(0, 5460, 7000)])),
            down: HashSet::new(),
        };
        assert!(!partial.all_up());
        assert!(Topology::default().live_owner(channel).is_none());
        assert!(!Topology::default().any_up());
        assert!(slot_ranges(&Value::Nil).is_empty());
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let me = InstanceId::parse("node-1").expect("id");
        assert!(matches!(
            decode(&me, b"no header"),
            Err(DecodeError::NoHeader)
        ));
        assert!(matches!(decode(&me, b"{}\n"), Err(DecodeError::Header(_))));
        let bad_origin = br#"{"kind":"hello","origin":"bad id!","url":"u","reply":true}
"#;
        assert!(matches!(decode(&me, bad_origin), Err(DecodeError::Origin)));
    }
}
