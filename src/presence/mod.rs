//! Presence and history for chat-like hubs: who is online cluster-wide, and the recent
//! messages of a conversation. A hub holds them as its state (`State<…>`), the way the
//! demo's chat hub does.
//!
//! - [`Presence`]: the members of a hub (connections that joined with a name) and the
//!   join / leave / rename events, **coalesced**: events are queued and sent as one
//!   `Presence` batch per [`FLUSH_INTERVAL`] to everybody, so N connects cost about one
//!   message per client per interval instead of N²/2 messages. With Redis the members
//!   live in one hash per instance, kept alive by a heartbeat; when an instance dies its
//!   heartbeat stops and a surviving instance announces its members as left within
//!   seconds.
//! - [`History`]: the last [`HISTORY_LEN`] messages of each conversation, in a capped
//!   Redis list (`LPUSH` + `LTRIM`) or in process.
//!
//! Redis keys (`<hub>` is the hub's name; the braces are a Redis Cluster hash tag, which
//! keeps a hub's presence keys in one slot):
//!
//! | key | holds |
//! |---|---|
//! | `{stickless:<hub>:presence}:instances` | sorted set: instance id → time of its last heartbeat (ms) |
//! | `{stickless:<hub>:presence}:instance:<id>` | hash: connection id → member JSON, of that instance |
//! | `stickless:<hub>:history:<conversation>` | list: the newest messages first, at most 100 |

mod history;
mod store;

pub use history::{History, HISTORY_LEN};
pub use store::{Store, StoreError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::clients::Clients;
use store::RedisStore;

/// How often queued presence events go out as one batch (and the Redis heartbeat beats).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Most events one batch names; past this a batch says how many it left out. Every
/// client hears of every join, so naming them all would cost N²/2 events for N connects
/// however they are batched; chat products likewise say "Bob and 79 others joined".
pub const MAX_BATCH_EVENTS: usize = 20;
/// An instance whose heartbeat is older than this is dead: its members are announced as
/// left by whichever instance notices first.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// A dead instance's member hash outlives its heartbeat by this much, so a survivor can
/// still read whom to announce as left; with no survivor at all, Redis drops it then.
const HASH_TTL: Duration = Duration::from_secs(60);

/// One connection that joined: a member of the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// The member's connection id.
    pub connection_id: String,
    /// The member's display name.
    pub name: String,
    /// The instance that serves the member.
    pub instance: String,
    /// When the member joined, in ms since the Unix epoch.
    pub since: u64,
}

/// What happened to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PresenceKind {
    /// The connection joined with a name.
    Joined,
    /// The connection ended, or its instance died.
    Left,
    /// The member chose another name (`oldName` says which it had).
    Renamed,
}

/// One change of presence, as clients receive it in a `Presence` batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceEvent {
    /// What happened.
    pub kind: PresenceKind,
    /// Whose connection.
    pub connection_id: String,
    /// The member's name (the new one, for a rename).
    pub name: String,
    /// The name before a rename.
    pub old_name: Option<String>,
    /// The instance that served the member.
    pub instance: String,
    /// When it happened, in ms since the Unix epoch.
    pub at: u64,
}

impl PresenceEvent {
    fn new(kind: PresenceKind, member: &Member, old_name: Option<String>) -> Self {
        Self {
            kind,
            connection_id: member.connection_id.clone(),
            name: member.name.clone(),
            old_name,
            instance: member.instance.clone(),
            at: now_ms(),
        }
    }
}

/// One interval's presence changes, as clients receive them in `Presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceBatch {
    /// The changes, oldest first; at most [`MAX_BATCH_EVENTS`].
    pub events: Vec<PresenceEvent>,
    /// Changes left out of `events` (the member list is then only approximate: call
    /// `Online()` to refresh it).
    pub omitted: usize,
}

impl PresenceBatch {
    /// The batch for `events`, trimmed to [`MAX_BATCH_EVENTS`].
    pub fn of(mut events: Vec<PresenceEvent>) -> Self {
        let omitted = events.len().saturating_sub(MAX_BATCH_EVENTS);
        events.truncate(MAX_BATCH_EVENTS);
        Self { events, omitted }
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who is online in a hub, and the coalesced events about it. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    /// The members this instance serves (the whole truth without Redis).
    local: Mutex<HashMap<String, Member>>,
    /// Events waiting for the next batch.
    pending: Mutex<Vec<PresenceEvent>>,
    /// Set once the flushing task runs.
    flusher: OnceLock<()>,
    redis: Option<(RedisStore, Keys)>,
}

/// The Redis keys of one hub's presence.
struct Keys {
    instances: String,
    prefix: String,
}

impl Keys {
    fn instance(&self, instance: &str) -> String {
        format!("{}:instance:{instance}", self.prefix)
    }
}

impl Presence {
    /// Presence for the hub named `hub`, kept in `store`. Nothing is opened until first
    /// use.
    pub fn new(hub: &str, store: Store<'_>) -> Self {
        let redis = store.redis().map(|redis| {
            // One hash tag for every key of a hub's presence: a heartbeat or a member
            // listing touches several in one pipeline, which a Redis Cluster runs only
            // within one slot.
            let prefix = format!("{{stickless:{hub}:presence}}");
            let keys = Keys {
                instances: format!("{prefix}:instances"),
                prefix,
            };
            (redis, keys)
        });
        Self {
            inner: Arc::new(Inner {
                local: Mutex::default(),
                pending: Mutex::default(),
                flusher: OnceLock::new(),
                redis,
            }),
        }
    }

    /// The member's name if `connection_id` joined on this instance.
    pub fn name_of(&self, connection_id: &str) -> Option<String> {
        lock(&self.inner.local)
            .get(connection_id)
            .map(|m| m.name.clone())
    }

    /// Adds (or, for a connection that joined before, renames) a member; everybody hears
    /// of it in the next batch. Returns the event queued, if any.
    pub async fn join(&self, clients: &Clients, member: Member) -> Option<PresenceEvent> {
        self.start(clients, &member.instance);
        let before = lock(&self.inner.local).insert(member.connection_id.clone(), member.clone());
        let event = match before {
            None => PresenceEvent::new(PresenceKind::Joined, &member, None),
            Some(old) if old.name != member.name => {
                PresenceEvent::new(PresenceKind::Renamed, &member, Some(old.name))
            }
            Some(_) => return None,
        };
        self.store(&member).await;
        self.queue(vec![event.clone()]);
        Some(event)
    }

    /// Renames a member; `None` when the connection has not joined.
    pub async fn rename(&self, connection_id: &str, name: &str) -> Option<PresenceEvent> {
        let (member, old) = {
            let mut local = lock(&self.inner.local);
            let member = local.get_mut(connection_id)?;
            if member.name == name {
                return None;
            }
            let old = std::mem::replace(&mut member.name, name.to_owned());
            (member.clone(), old)
        };
        self.store(&member).await;
        let event = PresenceEvent::new(PresenceKind::Renamed, &member, Some(old));
        self.queue(vec![event.clone()]);
        Some(event)
    }

    /// Removes a member (its connection ended); everybody hears of it in the next batch.
    pub async fn leave(&self, connection_id: &str) -> Option<PresenceEvent> {
        let member = lock(&self.inner.local).remove(connection_id)?;
        if let Some((redis, keys)) = &self.inner.redis {
            let mut pipe = redis::pipe();
            pipe.hdel(keys.instance(&member.instance), &member.connection_id);
            if let Err(error) = redis.run::<()>(&pipe).await {
                log::warn!("presence: {} not removed from redis: {error}", member.name);
            }
        }
        let event = PresenceEvent::new(PresenceKind::Left, &member, None);
        self.queue(vec![event.clone()]);
        Some(event)
    }

    /// Everybody online, cluster-wide, oldest member first. Without Redis (or when Redis
    /// cannot be read) this instance's members.
    pub async fn members(&self) -> Vec<Member> {
        let mut members = match &self.inner.redis {
            Some((redis, keys)) => match cluster_members(redis, keys).await {
                Ok(members) => members,
                Err(error) => {
                    log::warn!("presence: cannot read members from redis: {error}");
                    self.local_members()
                }
            },
            None => self.local_members(),
        };
        members.sort_by(|a, b| (a.since, &a.connection_id).cmp(&(b.since, &b.connection_id)));
        members
    }

    fn local_members(&self) -> Vec<Member> {
        lock(&self.inner.local).values().cloned().collect()
    }

    async fn store(&self, member: &Member) {
        let Some((redis, keys)) = &self.inner.redis else {
            return;
        };
        let Ok(json) = serde_json::to_string(member) else {
            return;
        };
        let key = keys.instance(&member.instance);
        let mut pipe = redis::pipe();
        pipe.hset(&key, &member.connection_id, json)
            .ignore()
            .expire(&key, HASH_TTL.as_secs() as i64)
            .ignore();
        if let Err(error) = redis.run::<()>(&pipe).await {
            log::warn!("presence: {} not stored in redis: {error}", member.name);
        }
    }

    fn queue(&self, events: Vec<PresenceEvent>) {
        lock(&self.inner.pending).extend(events);
    }

    /// Starts the task that sends the batches (and beats the heartbeat) once, with the
    /// first caller's clients: `all()` reaches every connection whoever the caller is.
    fn start(&self, clients: &Clients, instance: &str) {
        if self.inner.flusher.set(()).is_err() {
            return;
        }
        let presence = self.clone();
        let clients = clients.clone();
        let instance = instance.to_owned();
        tokio::spawn(async move { presence.flush_forever(clients, instance).await });
    }

    async fn flush_forever(self, clients: Clients, instance: String) {
        if let Some((redis, keys)) = &self.inner.redis {
            // An instance restarted under the same id: the members of its previous life
            // are gone.
            match self.forget_previous_life(redis, keys, &instance).await {
                Ok(gone) => self.queue(gone),
                Err(error) => log::warn!("presence: cannot clear old members: {error}"),
            }
        }
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((redis, keys)) = &self.inner.redis {
                match heartbeat(redis, keys, &instance).await {
                    Ok(gone) => self.queue(gone),
                    Err(error) => log::warn!("presence: heartbeat failed: {error}"),
                }
            }
            let batch = std::mem::take(&mut *lock(&self.inner.pending));
            if batch.is_empty() {
                continue;
            }
            let batch = PresenceBatch::of(batch);
            if let Err(error) = clients.all().send("Presence", (batch,)).await {
                log::warn!("presence: batch not sent: {error}");
            }
        }
    }
}

impl Presence {
    async fn forget_previous_life(
        &self,
        redis: &RedisStore,
        keys: &Keys,
        instance: &str,
    ) -> Result<Vec<PresenceEvent>, StoreError> {
        let key = keys.instance(instance);
        let mut pipe = redis::pipe();
        pipe.hgetall(&key);
        let (entries,): (HashMap<String, String>,) = redis.run(&pipe).await?;
        let stale: Vec<Member> = {
            let local = lock(&self.inner.local);
            entries
                .values()
                .filter_map(|json| serde_json::from_str::<Member>(json).ok())
                .filter(|m| !local.contains_key(&m.connection_id))
                .collect()
        };
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for member in &stale {
            pipe.hdel(&key, &member.connection_id).ignore();
        }
        redis.run::<()>(&pipe).await?;
        Ok(stale
            .iter()
            .map(|m| PresenceEvent::new(PresenceKind::Left, m, None))
            .collect())
    }
}

/// Beats this instance's heartbeat and buries dead instances: each one's members come
/// back as `left` events (only from the instance whose `ZREM` removed it, so once).
async fn heartbeat(
    redis: &RedisStore,
    keys: &Keys,
    instance: &str,
) -> Result<Vec<PresenceEvent>, StoreError> {
    let now = now_ms();
    let stale_before = now.saturating_sub(STALE_AFTER.as_millis() as u64);
    let mut pipe = redis::pipe();
    pipe.zadd(&keys.instances, instance, now)
        .ignore()
        .expire(keys.instance(instance), HASH_TTL.as_secs() as i64)
        .ignore()
        .zrangebyscore(&keys.instances, "-inf", format!("({stale_before}"));
    let (dead,): (Vec<String>,) = redis.run(&pipe).await?;
    let mut gone = Vec::new();
    for dead in dead {
        let mut claim = redis::pipe();
        claim.zrem(&keys.instances, &dead);
        let (removed,): (i64,) = redis.run(&claim).await?;
        if removed == 0 {
            continue; // another instance buried it
        }
        let key = keys.instance(&dead);
        let mut take = redis::pipe();
        take.atomic().hgetall(&key).del(&key).ignore();
        let (entries,): (HashMap<String, String>,) = redis.run(&take).await?;
        log::info!(
            "presence: instance {dead} stopped beating; {} members left",
            entries.len()
        );
        gone.extend(entries.values().filter_map(|json| {
            let member: Member = serde_json::from_str(json).ok()?;
            Some(PresenceEvent::new(PresenceKind::Left, &member, None))
        }));
    }
    Ok(gone)
}

/// The members of every live instance.
async fn cluster_members(redis: &RedisStore, keys: &Keys) -> Result<Vec<Member>, StoreError> {
    let fresh_after = now_ms().saturating_sub(STALE_AFTER.as_millis() as u64);
    let mut pipe = redis::pipe();
    pipe.zrangebyscore(&keys.instances, fresh_after, "+inf");
    let (instances,): (Vec<String>,) = redis.run(&pipe).await?;
    if instances.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for instance in &instances {
        pipe.hvals(keys.instance(instance));
    }
    let hashes: Vec<Vec<String>> = redis.run(&pipe).await?;
    Ok(hashes
        .iter()
        .flatten()
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, name: &str) -> Member {
        Member {
            connection_id: id.into(),
            name: name.into(),
            instance: "i".into(),
            since: 1,
        }
    }

    #[test]
    fn a_batch_names_at_most_its_cap_and_counts_the_rest() {
        let event = PresenceEvent::new(PresenceKind::Joined, &member("a", "Ann"), None);
        let batch = PresenceBatch::of(vec![event.clone(); MAX_BATCH_EVENTS + 7]);
        assert_eq!(batch.events.len(), MAX_BATCH_EVENTS);
        assert_eq!(batch.omitted, 7);
        assert_eq!(PresenceBatch::of(vec![event; 3]).omitted, 0);
    }

    #[tokio::test]
    async fn a_rename_names_the_old_name_and_leaving_twice_is_one_event() {
        let presence = Presence::new("t", Store::InProcess);
        lock(&presence.inner.local).insert("a".into(), member("a", "Ann"));
        let renamed = presence.rename("a", "Bea").await.unwrap();
        assert_eq!(renamed.kind, PresenceKind::Renamed);
        assert_eq!(renamed.old_name.as_deref(), Some("Ann"));
        assert_eq!(
            presence.rename("a", "Bea").await,
            None,
            "same name: no event"
        );
        assert_eq!(presence.members().await, vec![member("a", "Bea")]);
        assert_eq!(presence.leave("a").await.unwrap().kind, PresenceKind::Left);
        assert_eq!(presence.leave("a").await, None);
        let queued: Vec<_> = lock(&presence.inner.pending)
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(queued, [PresenceKind::Renamed, PresenceKind::Left]);
    }
}
