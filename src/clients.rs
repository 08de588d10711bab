//! Who receives a message: the `All` / `Others` / `Caller` / `Client` / `Group` / `User`
//! API that hub methods use, and the index of this instance's own connections that
//! delivers to them.
//!
//! Sending first delivers to local recipients directly, then hands the same message to the
//! bus (the backplane), which carries it to the other instances (it never comes back here: an
//! instance ignores its own messages). The message is encoded once per protocol, whatever
//! the audience: each recipient gets the record of its connection's protocol from one
//! shared [`EncodedMessage`], and the bus carries the JSON record.
//!
//! One client can also be asked for a result ([`SingleClient::invoke`], ASP.NET's client
//! results): the invocation carries an id, the client answers with a Completion, and
//! [`ClientResults`] matches the answer to the waiting method — across instances when the
//! client is held elsewhere (the owner relays its Completion back over the bus).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::bus::{
    Audience, Bus, ClientInvocation, ClientReply, Envelope, GroupCommand, MessageId, Topic,
};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::hub_protocol::{EncodedMessage, HubProtocol};
use crate::protocol::message::{HubMessage, Outcome};
use crate::protocol::token::{ConnectionId, InstanceId};

/// How long a hub method waits for a client's result by default (`CLIENT_RESULT_TIMEOUT`).
/// ASP.NET waits forever unless the method passes a cancellation token; a server with
/// many instances wants a bound, so that a lost answer never pins a method for good.
pub const DEFAULT_CLIENT_RESULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The arguments do not serialize to JSON.
    #[error("arguments could not be serialized: {0}")]
    Arguments(#[from] serde_json::Error),
}

/// A client asked for a result did not give one. The texts follow ASP.NET's.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No instance holds the connection.
    #[error("Connection '{0}' does not exist.")]
    NotConnected(ConnectionId),
    /// The connection ended before it answered.
    #[error("Connection '{0}' disconnected.")]
    Disconnected(ConnectionId),
    /// The client answered with an error, e.g. `Client didn't provide a result.` when it
    /// has no handler for the method.
    #[error("{0}")]
    Client(String),
    /// No answer came within the timeout (`CLIENT_RESULT_TIMEOUT`).
    #[error("Connection '{connection}' did not answer '{method}' within {}s.", timeout.as_secs())]
    TimedOut {
        /// The connection asked.
        connection: ConnectionId,
        /// The client method.
        method: String,
        /// The time it had.
        timeout: Duration,
    },
    /// The answer is not of the type the method expects.
    #[error("the result of '{method}' is not of the expected type: {error}")]
    WrongType {
        /// The client method.
        method: String,
        /// Why it did not deserialize.
        error: serde_json::Error,
    },
    /// The arguments do not serialize.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// Who waits for an answer.
#[derive(Debug)]
enum Waiter {
    /// A method on this instance.
    Here(oneshot::Sender<Outcome>),
    /// A method on another instance: the answer is relayed there.
    Elsewhere(InstanceId),
}

/// A client's result waited for: by whom, from which connection.
#[derive(Debug)]
struct Pending {
    connection: ConnectionId,
    waiter: Waiter,
}

/// What to do with a client's Completion.
#[derive(Debug, PartialEq)]
pub enum Answered {
    /// It was no result anybody waits for (unknown ids are ignored, as ASP.NET does).
    Unknown,
    /// A method on this instance has it.
    Delivered,
    /// It belongs to a method on another instance: publish this.
    Relay(ClientReply),
}

/// The client results this instance waits for, or relays, by invocation id.
#[derive(Debug)]
pub struct ClientResults {
    instance: InstanceId,
    timeout: Duration,
    next: AtomicU64,
    pending: Mutex<HashMap<String, Pending>>,
}

impl ClientResults {
    /// No results waited for yet; methods wait at most `timeout`.
    pub fn new(instance: InstanceId, timeout: Duration) -> Self {
        Self {
            instance,
            timeout,
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new invocation id, unique in the cluster (it names this instance).
    fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{n}.{}", self.instance)
    }

    /// Waits here for `connection`'s answer to `id`.
    fn expect(&self, connection: &ConnectionId, id: &str) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            connection: connection.clone(),
            waiter: Waiter::Here(tx),
        };
        self.lock().insert(id.to_owned(), pending);
        rx
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Relays `connection`'s answer to `id` to the instance `reply_to`.
    pub fn relay(&self, connection: &ConnectionId, id: &str, reply_to: InstanceId) {
        let pending = Pending {
            connection: connection.clone(),
            waiter: Waiter::Elsewhere(reply_to),
        };
        self.lock().insert(id.to_owned(), pending);
    }

    /// A Completion from `connection`: hands it to the method waiting here, or says where
    /// to relay it. Only the connection asked can answer (ASP.NET checks this too).
    pub fn complete(&self, connection: &ConnectionId, id: &str, outcome: Outcome) -> Answered {
        let mut pending = self.lock();
        match pending.get(id) {
            Some(entry) if &entry.connection == connection => {}
            _ => return Answered::Unknown,
        }
        let Some(entry) = pending.remove(id) else {
            return Answered::Unknown;
        };
        drop(pending);
        self.settle(entry.waiter, id, outcome)
    }

    fn settle(&self, waiter: Waiter, id: &str, outcome: Outcome) -> Answered {
        match waiter {
            Waiter::Here(tx) => {
                let _ = tx.send(outcome); // The method may have timed out meanwhile.
                Answered::Delivered
            }
            Waiter::Elsewhere(to) => Answered::Relay(ClientReply {
                to,
                invocation_id: id.to_owned(),
                outcome,
            }),
        }
    }

    /// An answer relayed from the instance holding the client.
    pub fn answer(&self, reply: ClientReply) {
        let waiter = self.lock().remove(&reply.invocation_id);
        if let Some(Pending {
            waiter: Waiter::Here(tx),
            ..
        }) = waiter
        {
            let _ = tx.send(reply.outcome);
        }
    }

    /// A connection ended: every answer it still owed fails with "disconnected"; the
    /// replies to relay to other instances are returned.
    pub fn disconnected(&self, connection: &ConnectionId) -> Vec<ClientReply> {
        let owed: Vec<(String, Pending)> = {
            let mut pending = self.lock();
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, entry)| &entry.connection == connection)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|entry| (id, entry)))
                .collect()
        };
        // A method here sees its waiter dropped: `Disconnected`. One elsewhere gets the
        // same text as a client's error (the bus carries outcomes, not error kinds).
        let error = InvokeError::Disconnected(connection.clone()).to_string();
        owed.into_iter()
            .filter_map(|(id, entry)| match entry.waiter {
                Waiter::Here(_) => None,
                Waiter::Elsewhere(to) => Some(ClientReply {
                    to,
                    invocation_id: id,
                    outcome: Outcome::Error(error.clone()),
                }),
            })
            .collect()
    }

    /// Results waited for or relayed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Member {
    outbox: Outbox,
    user: Option<String>,
    groups: HashSet<String>,
}

#[derive(Debug, Default)]
struct Index {
    connections: HashMap<ConnectionId, Member>,
    groups: HashMap<String, HashSet<ConnectionId>>,
    users: HashMap<String, HashSet<ConnectionId>>,
}

/// This instance's connections, groups and users.
#[derive(Debug, Default)]
pub struct LocalClients {
    index: RwLock<Index>,
}

impl LocalClients {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing every connection, so a poisoned lock is used as is.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection; returns the topics this instance newly needs.
    pub fn add(&self, id: &ConnectionId, user: Option<&str>, outbox: Outbox) -> Vec<Topic> {
        let mut index = self.write();
        let mut topics = vec![Topic::Connection(id.clone())];
        if let Some(user) = user {
            let members = index.users.entry(user.to_owned()).or_default();
            if members.is_empty() {
                topics.push(Topic::User(user.to_owned()));
            }
            members.insert(id.clone());
        }
        let member = Member {
            outbox,
            user: user.map(str::to_owned),
            groups: HashSet::new(),
        };
        index.connections.insert(id.clone(), member);
        topics
    }

    /// The groups a local connection is in (for a session that moves elsewhere).
    pub fn groups_of(&self, id: &ConnectionId) -> Vec<String> {
        self.read()
            .connections
            .get(id)
            .map(|member| member.groups.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The user of a local connection, if it has one.
    pub fn user_of(&self, id: &ConnectionId) -> Option<String> {
        self.read()
            .connections
            .get(id)
            .and_then(|member| member.user.clone())
    }

    /// Forgets a connection; returns the topics this instance no longer needs.
    pub fn remove(&self, id: &ConnectionId) -> Vec<Topic> {
        let mut index = self.write();
        let Some(member) = index.connections.remove(id) else {
            return Vec::new();
        };
        let mut topics = vec![Topic::Connection(id.clone())];
        for group in member.groups {
            if remove_from(&mut index.groups, &group, id) {
                topics.push(Topic::Group(group));
            }
        }
        if let Some(user) = member.user {
            if remove_from(&mut index.users, &user, id) {
                topics.push(Topic::User(user));
            }
        }
        topics
    }

    /// Adds a local connection to a group. Returns `Err(())` if the connection is not
    /// here, `Ok(Some(topic))` if the group is new on this instance.
    #[allow(clippy::result_unit_err)]
    pub fn join(&self, id: &ConnectionId, group: &str) -> Result<Option<Topic>, ()> {
        let mut index = self.write();
        let Some(member) = index.connections.get_mut(id) else {
            return Err(());
        };
        member.groups.insert(group.to_owned());
        let members = index.groups.entry(group.to_owned()).or_default();
        let new = members.is_empty();
        members.insert(id.clone());
        Ok(new.then(|| Topic::Group(group.to_owned())))
    }

    /// Removes a local connection from a group. Returns `Err(())` if the connection is
    /// not here, `Ok(Some(topic))` if the group has no member left on this instance.
    #[allow(clippy::result_unit_err)]
    pub fn leave(&self, id: &ConnectionId, group: &str) -> Result<Option<Topic>, ()> {
        let mut index = self.write();
        let Some(member) = index.connections.get_mut(id) else {
            return Err(());
        };
        if !member.groups.remove(group) {
            return Ok(None);
        }
        let emptied = remove_from(&mut index.groups, group, id);
        Ok(emptied.then(|| Topic::Group(group.to_owned())))
    }

    /// Joins or leaves a group for a connection if it is here, and subscribes the bus to
    /// a group new on this instance (or unsubscribes it from one left empty). Returns
    /// once messages to the group reach the connection; `Err(())` if it is not here.
    #[allow(clippy::result_unit_err)]
    pub async fn change_group(
        &self,
        bus: &dyn Bus,
        id: &ConnectionId,
        group: &str,
        join: bool,
    ) -> Result<(), ()> {
        let changed = if join {
            self.join(id, group)?
        } else {
            self.leave(id, group)?
        };
        match changed {
            Some(topic) if join => bus.subscribe(vec![topic]).await,
            Some(topic) => bus.unsubscribe(vec![topic]).await,
            None => {}
        }
        Ok(())
    }

    /// Whether the connection is on this instance.
    pub fn contains(&self, id: &ConnectionId) -> bool {
        self.read().connections.contains_key(id)
    }

    /// Queues `message` (hub message `id`) for every local recipient, each in its
    /// connection's protocol; returns how many got it.
    pub fn deliver(
        &self,
        audience: &Audience,
        message: &EncodedMessage,
        id: Option<MessageId>,
    ) -> usize {
        let index = self.read();
        let mut push = |connection: &ConnectionId| -> usize {
            let Some(member) = index.connections.get(connection) else {
                return 0;
            };
            let record = message.record(member.outbox.protocol());
            usize::from(member.outbox.push_delivery(record, id) == Pushed::Queued)
        };
        match audience {
            Audience::All { except } => {
                let ids: Vec<&ConnectionId> = index.connections.keys().collect();
                ids.into_iter()
                    .filter(|id| !except.contains(id))
                    .map(&mut push)
                    .sum()
            }
            Audience::Connection(id) => push(id),
            Audience::Group { name, except } => index
                .groups
                .get(name)
                .map(|members| {
                    members
                        .iter()
                        .filter(|id| !except.contains(id))
                        .map(&mut push)
                        .sum()
                })
                .unwrap_or(0),
            Audience::User(user) => index
                .users
                .get(user)
                .map(|members| members.iter().map(&mut push).sum())
                .unwrap_or(0),
        }
    }

    /// Local connections.
    pub fn len(&self) -> usize {
        self.read().connections.len()
    }

    /// Whether there are no local connections.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes `id` from the set under `key`; true if the set became empty (and was dropped).
fn remove_from(
    map: &mut HashMap<String, HashSet<ConnectionId>>,
    key: &str,
    id: &ConnectionId,
) -> bool {
    let Some(set) = map.get_mut(key) else {
        return false;
    };
    set.remove(id);
    if set.is_empty() {
        map.remove(key);
        true
    } else {
        false
    }
}

/// The way to every connection of the cluster, as seen from one caller.
#[derive(Clone)]
pub struct Clients {
    local: Arc<LocalClients>,
    bus: Arc<dyn Bus>,
    results: Arc<ClientResults>,
    caller: ConnectionId,
}

impl Clients {
    /// The clients API for hub code running on behalf of `caller`.
    pub fn new(
        local: Arc<LocalClients>,
        bus: Arc<dyn Bus>,
        results: Arc<ClientResults>,
        caller: ConnectionId,
    ) -> Self {
        Self {
            local,
            bus,
            results,
            caller,
        }
    }

    fn target(&self, audience: Audience) -> Target<'_> {
        Target {
            clients: self,
            audience,
        }
    }

    /// Every connection.
    pub fn all(&self) -> Target<'_> {
        self.target(Audience::All { except: vec![] })
    }

    /// Every connection but the caller.
    pub fn others(&self) -> Target<'_> {
        self.target(Audience::All {
            except: vec![self.caller.clone()],
        })
    }

    /// The caller only; it can also be asked for a result.
    pub fn caller(&self) -> SingleClient<'_> {
        SingleClient {
            clients: self,
            connection: self.caller.clone(),
        }
    }

    /// One connection, on whatever instance; it can also be asked for a result.
    pub fn client(&self, connection_id: &str) -> SingleClient<'_> {
        SingleClient {
            clients: self,
            connection: ConnectionId::from_untrusted(connection_id),
        }
    }

    /// A group's members, on every instance.
    pub fn group(&self, name: &str) -> Target<'_> {
        self.target(Audience::Group {
            name: name.to_owned(),
            except: vec![],
        })
    }

    /// A group's members but the caller.
    pub fn others_in_group(&self, name: &str) -> Target<'_> {
        self.target(Audience::Group {
            name: name.to_owned(),
            except: vec![self.caller.clone()],
        })
    }

    /// Every connection of a user, on every instance.
    pub fn user(&self, user_id: &str) -> Target<'_> {
        self.target(Audience::User(user_id.to_owned()))
    }

    /// Group membership, for any connection of the cluster.
    pub fn groups(&self) -> Groups {
        Groups {
            local: self.local.clone(),
            bus: self.bus.clone(),
        }
    }
}

/// Recipients chosen, ready to send.
pub struct Target<'a> {
    clients: &'a Clients,
    audience: Audience,
}

/// The arguments of a client method: a tuple such as `(text,)` or `(a, b)` for several;
/// `()` for none; any other value is the one argument.
fn arguments_of(args: impl Serialize) -> Result<Vec<Value>, SendError> {
    Ok(match serde_json::to_value(args)? {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        one => vec![one],
    })
}

/// The Invocation of a client method (HubProtocol.md, "Invocation"): with an id it asks
/// for a result.
fn invocation(invocation_id: Option<String>, method: &str, arguments: Vec<Value>) -> HubMessage {
    HubMessage::Invocation {
        invocation_id,
        target: method.to_owned(),
        arguments,
        stream_ids: Vec::new(),
    }
}

/// One connection, chosen with [`Clients::caller`] or [`Clients::client`].
pub struct SingleClient<'a> {
    clients: &'a Clients,
    connection: ConnectionId,
}

impl SingleClient<'_> {
    /// Calls `method` on the client with `args` (see [`Target::send`]).
    pub async fn send(self, method: &str, args: impl Serialize) -> Result<(), SendError> {
        self.clients
            .target(Audience::Connection(self.connection))
            .send(method, args)
            .await
    }

    /// Calls `method` on the client and waits for its result (ASP.NET's client results,
    /// `Clients.Client(id).InvokeAsync<T>`), wherever the client is connected: the
    /// instance holding it relays its answer back over the bus. Waits at most
    /// `CLIENT_RESULT_TIMEOUT` (30 s by default).
    ///
    /// ```no_run
    /// # async fn demo(ctx: stickless::HubContext, id: &str) -> Result<(), stickless::HubError> {
    /// let answer: String = ctx.clients().client(id).invoke("GetName", ()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn invoke<T: DeserializeOwned>(
        self,
        method: &str,
        args: impl Serialize,
    ) -> Result<T, InvokeError> {
        let Clients {
            local,
            bus,
            results,
            ..
        } = self.clients;
        let connection = self.connection;
        let arguments = arguments_of(args)?;
        let id = results.next_id();
        // Waiting starts before the client is asked: its answer can come at once.
        let answer = results.expect(&connection, &id);
        if local.contains(&connection) {
            let message = EncodedMessage::new(invocation(Some(id.clone()), method, arguments));
            let delivered = local.deliver(
                &Audience::Connection(connection.clone()),
                &message,
                Some(MessageId::random()),
            );
            if delivered == 0 {
                results.forget(&id);
                return Err(InvokeError::Disconnected(connection));
            }
        } else if bus.is_shared() {
            if bus.is_heard(Topic::Connection(connection.clone())).await == Some(false) {
                results.forget(&id);
                return Err(InvokeError::NotConnected(connection));
            }
            let asked = ClientInvocation {
                connection: connection.clone(),
                invocation_id: id.clone(),
                reply_to: results.instance.clone(),
                target: method.to_owned(),
                arguments,
            };
            bus.publish(Envelope::Invoke(asked)).await;
        } else {
            results.forget(&id);
            return Err(InvokeError::NotConnected(connection));
        }
        let outcome = match tokio::time::timeout(results.timeout, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => return Err(InvokeError::Disconnected(connection)),
            Err(_) => {
                results.forget(&id);
                return Err(InvokeError::TimedOut {
                    connection,
                    method: method.to_owned(),
                    timeout: results.timeout,
                });
            }
        };
        let value = match outcome {
            Outcome::Void => Value::Null,
            Outcome::Result(value) => value,
            Outcome::Error(error) => return Err(InvokeError::Client(error)),
        };
        serde_json::from_value(value).map_err(|error| InvokeError::WrongType {
            method: method.to_owned(),
            error,
        })
    }
}

impl Target<'_> {
    /// Calls `method` on every recipient with `args`: a tuple such as `(text,)` or
    /// `(a, b)` for several arguments; any other value is sent as the one argument.
    pub async fn send(self, method: &str, args: impl Serialize) -> Result<(), SendError> {
        let message = EncodedMessage::new(invocation(None, method, arguments_of(args)?));
        let id = MessageId::random();
        let Clients { local, bus, .. } = self.clients;
        local.deliver(&self.audience, &message, Some(id));
        if let Audience::Connection(id) = &self.audience {
            if local.contains(id) {
                return Ok(());
            }
        }
        // The bus carries JSON records; the receiving instances re-encode for their
        // MessagePack connections, once per message.
        let envelope = Envelope::Message {
            audience: self.audience,
            record: message.record(HubProtocol::Json),
            id: Some(id),
        };
        bus.publish(envelope).await;
        Ok(())
    }
}

/// Adds connections to groups and removes them, wherever the connection lives.
#[derive(Clone)]
pub struct Groups {
    local: Arc<LocalClients>,
    bus: Arc<dyn Bus>,
}

impl Groups {
    /// Adds a connection to a group. Returns once messages to the group reach it when it
    /// is on this instance; for a connection elsewhere, once the request is published.
    pub async fn add(&self, connection_id: &str, group: &str) {
        self.change(connection_id, group, true).await
    }

    /// Removes a connection from a group.
    pub async fn remove(&self, connection_id: &str, group: &str) {
        self.change(connection_id, group, false).await
    }

    async fn change(&self, connection_id: &str, group: &str, join: bool) {
        let id = ConnectionId::from_untrusted(connection_id);
        let here = self.local.change_group(&*self.bus, &id, group, join).await;
        if here.is_err() {
            let command = GroupCommand {
                connection: id,
                group: group.to_owned(),
                join,
            };
            self.bus.publish(Envelope::Group(command)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::tests::outbox;

    fn local() -> LocalClients {
        LocalClients::default()
    }

    #[test]
    fn groups_and_users_report_topics_only_on_first_join_and_last_leave() {
        let local = local();
        let (a, b) = (ConnectionId::random(), ConnectionId::random());
        let topics = local.add(&a, Some("alice"), outbox(4).0);
        assert_eq!(
            topics,
            vec![Topic::Connection(a.clone()), Topic::User("alice".into())]
        );
        assert_eq!(
            local.add(&b, Some("alice"), outbox(4).0),
            vec![Topic::Connection(b.clone())]
        );
        assert_eq!(
            local.join(&a, "room"),
            Ok(Some(Topic::Group("room".into())))
        );
        assert_eq!(local.join(&b, "room"), Ok(None));
        assert_eq!(local.leave(&a, "room"), Ok(None));
        assert_eq!(
            local.remove(&b),
            vec![Topic::Connection(b.clone()), Topic::Group("room".into())]
        );
        assert_eq!(
            local.remove(&a),
            vec![Topic::Connection(a), Topic::User("alice".into())]
        );
        assert_eq!(local.join(&ConnectionId::random(), "room"), Err(()));
    }

    #[test]
    fn delivery_respects_the_audience() {
        let local = local();
        let (a, b) = (ConnectionId::random(), ConnectionId::random());
        let (outbox_a, mut rx_a) = outbox(8);
        let (outbox_b, mut rx_b) = outbox(8);
        local.add(&a, Some("alice"), outbox_a);
        local.add(&b, None, outbox_b);
        local.join(&b, "room").unwrap();
        let record = EncodedMessage::new(HubMessage::Ping);
        assert_eq!(
            local.deliver(
                &Audience::All {
                    except: vec![a.clone()]
                },
                &record,
                None
            ),
            1
        );
        assert_eq!(
            local.deliver(&Audience::User("alice".into()), &record, None),
            1
        );
        assert_eq!(
            local.deliver(
                &Audience::Group {
                    name: "room".into(),
                    except: vec![]
                },
                &record,
                None
            ),
            1
        );
        assert_eq!(
            local.deliver(
                &Audience::Group {
                    name: "none".into(),
                    except: vec![]
                },
                &record,
                None
            ),
            0
        );
        assert_eq!(
            local.deliver(&Audience::Connection(ConnectionId::random()), &record, None),
            0
        );
        let drain = |rx: &mut crate::queue::Receiver<bytes::Bytes>| {
            std::iter::from_fn(|| rx.try_recv().ok()).count()
        };
        assert_eq!(drain(&mut rx_a), 1);
        assert_eq!(drain(&mut rx_b), 2);
    }

    #[test]
    fn one_message_is_encoded_once_per_protocol_whatever_the_number_of_recipients() {
        let local = local();
        let mut receivers = Vec::new();
        for protocol in [
            HubProtocol::Json,
            HubProtocol::MessagePack,
            HubProtocol::Json,
            HubProtocol::MessagePack,
        ] {
            let (outbox, rx) = outbox(4);
            outbox.set_protocol(protocol);
            local.add(&ConnectionId::random(), None, outbox);
            receivers.push((protocol, rx));
        }
        let message = EncodedMessage::new(HubMessage::Invocation {
            invocation_id: None,
            target: "Send".into(),
            arguments: vec![Value::from("hi")],
            stream_ids: vec![],
        });
        assert_eq!(
            local.deliver(&Audience::All { except: vec![] }, &message, None),
            4
        );
        for (protocol, rx) in &mut receivers {
            let record = rx.try_recv().expect("a record");
            assert_eq!(record, protocol.encode(message.message()));
            // The very bytes of the shared encoding: not encoded again for this recipient.
            assert_eq!(record.as_ptr(), message.record(*protocol).as_ptr());
        }
    }
}
