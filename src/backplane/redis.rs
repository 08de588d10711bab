//! The Redis pub/sub backplane.
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
//! | `{p}:internal:instances` | instances announcing their `ADVERTISE_URL` |
//!
//! An instance subscribes to `all`, the internal channels, and the connection, group and
//! user channels of its own connections only (as ASP.NET's Redis backplane does), so a
//! message to a group crosses to just the instances that have members. Payloads are JSON
//! with the sender's instance id; an instance ignores its own messages, since it already
//! delivered them locally. One publisher task sends everything in order, which keeps the
//! order of one sender's messages.
//!
//! If Redis goes away, local delivery goes on, both tasks reconnect with capped
//! exponential backoff, every topic is subscribed again, and [`Backplane::is_healthy`]
//! is false meanwhile (`/healthz` says `degraded`). Messages published while Redis is
//! unreachable wait in a bounded queue and are dropped (and counted) when it is full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Backplane;
use crate::clients::{apply_group_action, Audience, GroupAction, LocalClients, Topic};
use crate::metrics::Metrics;
use crate::protocol::token::{ConnectionId, InstanceId};

/// Messages waiting to be published while Redis is slow or away.
const PUBLISH_QUEUE: usize = 8192;
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for Redis to confirm a publish or a subscription.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an instance announces its direct URL.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// An announced URL is forgotten when not repeated for this long.
const PEER_TTL: Duration = Duration::from_secs(35);

/// The Redis backplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `REDIS_URL` is not usable.
    #[error("invalid REDIS_URL: {0}")]
    Url(#[from] redis::RedisError),
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
    },
    /// A group change for a connection on some instance.
    Group { origin: String, action: GroupAction },
    /// An instance's direct URL; `reply` is false on the first announcement, which asks
    /// the others to announce themselves back.
    Hello {
        origin: String,
        url: String,
        reply: bool,
    },
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
    fn topic(&self, topic: &Topic) -> String {
        match topic {
            Topic::Connection(id) => format!("{}:connection:{id}", self.prefix),
            Topic::Group(name) => format!("{}:group:{name}", self.prefix),
            Topic::User(user) => format!("{}:user:{user}", self.prefix),
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
    advertise_url: Option<String>,
    subscribed: AtomicBool,
    publishing: AtomicBool,
    sink: Mutex<Option<PubSubSink>>,
    publish_tx: mpsc::Sender<(String, String)>,
    peers: Mutex<HashMap<String, (String, Instant)>>,
    local: Arc<LocalClients>,
    metrics: Arc<Metrics>,
}

/// A backplane over Redis pub/sub.
#[derive(Clone)]
pub struct RedisBackplane {
    shared: Arc<Shared>,
}

impl RedisBackplane {
    /// Starts the subscriber and publisher tasks for hub `hub` (they connect, and keep
    /// reconnecting, in the background). Must run inside a tokio runtime.
    pub fn start(
        url: &str,
        hub: &str,
        instance: InstanceId,
        advertise_url: Option<String>,
        local: Arc<LocalClients>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let shared = Arc::new(Shared {
            client,
            channels: Channels {
                prefix: format!("stickless:{hub}"),
            },
            instance,
            advertise_url,
            subscribed: AtomicBool::new(false),
            publishing: AtomicBool::new(false),
            sink: Mutex::new(None),
            publish_tx,
            peers: Mutex::new(HashMap::new()),
            local,
            metrics,
        });
        let backplane = Self { shared };
        tokio::spawn(backplane.clone().subscriber());
        tokio::spawn(backplane.clone().publisher(publish_rx));
        Ok(backplane)
    }

    fn enqueue(&self, channel: String, wire: &Wire) {
        let payload = match serde_json::to_string(wire) {
            Ok(payload) => payload,
            Err(error) => {
                log::error!("backplane message not encodable: {error}");
                return;
            }
        };
        if self.shared.publish_tx.try_send((channel, payload)).is_err() {
            self.shared.metrics.backplane_published(false);
            log::warn!("backplane publish queue full; message dropped");
        }
    }

    fn announce(&self, reply: bool) {
        if let Some(url) = &self.shared.advertise_url {
            let hello = Wire::Hello {
                origin: self.shared.instance.to_string(),
                url: url.clone(),
                reply,
            };
            self.enqueue(self.shared.channels.instances(), &hello);
        }
    }

    fn current_sink(&self) -> Option<PubSubSink> {
        self.shared.sink.lock().ok().and_then(|sink| sink.clone())
    }

    async fn change_subscriptions(&self, topics: Vec<Topic>, subscribe: bool) {
        if topics.is_empty() {
            return;
        }
        let Some(mut sink) = self.current_sink() else {
            return; // Disconnected: the reconnect subscribes every current topic.
        };
        let channels: Vec<String> = topics
            .iter()
            .map(|t| self.shared.channels.topic(t))
            .collect();
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
                log::warn!("backplane (un)subscribe failed, will resubscribe on reconnect: {error}")
            }
            Err(_) => {
                log::warn!("backplane (un)subscribe timed out, will resubscribe on reconnect")
            }
        }
    }

    async fn subscriber(self) {
        let shared = &self.shared;
        let mut backoff = MIN_BACKOFF;
        let mut connected_before = false;
        loop {
            match shared.client.get_async_pubsub().await {
                Ok(pubsub) => {
                    let (sink, mut stream) = pubsub.split();
                    // The sink is published before the topics are read, so a topic added
                    // concurrently is either in this list or subscribed through this sink.
                    if let Ok(mut slot) = shared.sink.lock() {
                        *slot = Some(sink.clone());
                    }
                    let mut channels = vec![
                        shared.channels.all(),
                        shared.channels.groups(),
                        shared.channels.instances(),
                    ];
                    channels.extend(
                        shared
                            .local
                            .topics()
                            .iter()
                            .map(|t| shared.channels.topic(t)),
                    );
                    let mut sink = sink;
                    match sink.subscribe(&channels).await {
                        Ok(()) => {
                            shared.subscribed.store(true, Ordering::Relaxed);
                            backoff = MIN_BACKOFF;
                            if connected_before {
                                shared.metrics.backplane_reconnected();
                                log::info!(
                                    "backplane: reconnected to Redis, {} channels subscribed",
                                    channels.len()
                                );
                            } else {
                                log::info!(
                                    "backplane: connected to Redis, {} channels subscribed",
                                    channels.len()
                                );
                            }
                            connected_before = true;
                            self.announce(false);
                            while let Some(message) = stream.next().await {
                                self.receive(&message).await;
                            }
                            log::warn!("backplane: lost the Redis subscription; reconnecting");
                        }
                        Err(error) => log::warn!("backplane: subscribing failed: {error}"),
                    }
                }
                Err(error) => log::warn!(
                    "backplane: cannot connect to Redis ({error}); retrying in {backoff:?}"
                ),
            }
            shared.subscribed.store(false, Ordering::Relaxed);
            if let Ok(mut slot) = shared.sink.lock() {
                *slot = None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn receive(&self, message: &redis::Msg) {
        let shared = &self.shared;
        let wire: Wire = match serde_json::from_slice(message.get_payload_bytes()) {
            Ok(wire) => wire,
            Err(error) => {
                log::warn!(
                    "backplane: ignoring a malformed message on {}: {error}",
                    message.get_channel_name()
                );
                return;
            }
        };
        match wire {
            Wire::Message { origin, .. }
            | Wire::Group { origin, .. }
            | Wire::Hello { origin, .. }
                if origin == shared.instance.as_str() => {}
            Wire::Message { except, record, .. } => {
                shared.metrics.backplane_received();
                if let Some(audience) = shared.channels.audience(message.get_channel_name(), except)
                {
                    shared.local.deliver(&audience, &Bytes::from(record));
                }
            }
            Wire::Group { action, .. } => {
                shared.metrics.backplane_received();
                apply_group_action(&shared.local, self, &action).await;
            }
            Wire::Hello { origin, url, reply } => {
                if let Ok(mut peers) = shared.peers.lock() {
                    peers.insert(origin, (url, Instant::now()));
                }
                // Answer every first announcement, even from a peer we know: it may have
                // restarted and forgotten us.
                if !reply {
                    self.announce(true);
                }
            }
        }
    }

    async fn publisher(self, mut queue: mpsc::Receiver<(String, String)>) {
        let shared = &self.shared;
        let mut backoff = MIN_BACKOFF;
        let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
        // A message whose PUBLISH failed: it is sent again, first, once Redis is back,
        // so a message sent while Redis is down waits like the ones queued behind it.
        let mut unsent: Option<(String, String)> = None;
        loop {
            let mut connection = match shared.client.get_multiplexed_async_connection().await {
                Ok(connection) => connection,
                Err(error) => {
                    shared.publishing.store(false, Ordering::Relaxed);
                    log::debug!(
                        "backplane publisher: cannot connect ({error}); retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            shared.publishing.store(true, Ordering::Relaxed);
            backoff = MIN_BACKOFF;
            loop {
                let (channel, payload) = match unsent.take() {
                    Some(item) => item,
                    None => tokio::select! {
                        next = queue.recv() => match next {
                            Some(item) => item,
                            None => return,
                        },
                        _ = announce.tick() => {
                            self.announce(true);
                            continue;
                        }
                    },
                };
                let mut command = redis::cmd("PUBLISH");
                command.arg(&channel).arg(&payload);
                let publish = command.query_async::<i64>(&mut connection);
                let result = match tokio::time::timeout(REDIS_TIMEOUT, publish).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                if let Err(error) = result {
                    log::warn!("backplane: publish to {channel} failed ({error}); reconnecting");
                    unsent = Some((channel, payload));
                    break;
                }
                shared.metrics.backplane_published(true);
            }
            shared.publishing.store(false, Ordering::Relaxed);
        }
    }
}

impl Backplane for RedisBackplane {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_healthy(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed)
            && self.shared.publishing.load(Ordering::Relaxed)
    }

    fn publish<'a>(&'a self, audience: &'a Audience, record: &'a Bytes) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let channels = &self.shared.channels;
            let (channel, except) = match audience {
                Audience::All { except } => (channels.all(), except.clone()),
                Audience::Connection(id) => {
                    (channels.topic(&Topic::Connection(id.clone())), vec![])
                }
                Audience::Group { name, except } => {
                    (channels.topic(&Topic::Group(name.clone())), except.clone())
                }
                Audience::User(user) => (channels.topic(&Topic::User(user.clone())), vec![]),
            };
            let wire = Wire::Message {
                origin: self.shared.instance.to_string(),
                except: except.iter().map(|id| id.to_string()).collect(),
                // Records are JSON text, so UTF-8; a lossy copy cannot change them.
                record: String::from_utf8_lossy(record).into_owned(),
            };
            self.enqueue(channel, &wire);
        })
    }

    fn subscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change_subscriptions(topics, true))
    }

    fn unsubscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(self.change_subscriptions(topics, false))
    }

    fn group_action(&self, action: GroupAction) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let wire = Wire::Group {
                origin: self.shared.instance.to_string(),
                action,
            };
            self.enqueue(self.shared.channels.groups(), &wire);
        })
    }

    fn peer_url(&self, instance: &InstanceId) -> Option<String> {
        let peers = self.shared.peers.lock().ok()?;
        let (url, seen) = peers.get(instance.as_str())?;
        (seen.elapsed() < PEER_TTL).then(|| url.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
