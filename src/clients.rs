//! Who receives a message: the `All` / `Others` / `Caller` / `Client` / `Group` / `User`
//! API that hub methods use, and the index of this instance's own connections that
//! delivers to them.
//!
//! Sending first delivers to local recipients directly, then hands the same message to the
//! bus (the backplane), which carries it to the other instances (it never comes back here: an
//! instance ignores its own messages). The message is encoded once per protocol, whatever
//! the audience: each recipient gets the record of its connection's protocol from one
//! shared [`EncodedMessage`], and the bus carries the JSON record.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::Value;

use crate::bus::{Audience, Bus, Envelope, GroupCommand, Topic};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::hub_protocol::{EncodedMessage, HubProtocol};
use crate::protocol::message::HubMessage;
use crate::protocol::token::ConnectionId;

/// A message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The arguments do not serialize to JSON.
    #[error("arguments could not be serialized: {0}")]
    Arguments(#[from] serde_json::Error),
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

    /// Queues `message` for every local recipient, each in its connection's protocol;
    /// returns how many got it.
    pub fn deliver(&self, audience: &Audience, message: &EncodedMessage) -> usize {
        let index = self.read();
        let mut push = |id: &ConnectionId| -> usize {
            let Some(member) = index.connections.get(id) else {
                return 0;
            };
            let record = message.record(member.outbox.protocol());
            usize::from(member.outbox.push(record) == Pushed::Queued)
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
    caller: ConnectionId,
}

impl Clients {
    /// The clients API for hub code running on behalf of `caller`.
    pub fn new(local: Arc<LocalClients>, bus: Arc<dyn Bus>, caller: ConnectionId) -> Self {
        Self { local, bus, caller }
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

    /// The caller only.
    pub fn caller(&self) -> Target<'_> {
        self.target(Audience::Connection(self.caller.clone()))
    }

    /// One connection, on whatever instance.
    pub fn client(&self, connection_id: &str) -> Target<'_> {
        self.target(Audience::Connection(ConnectionId::from_untrusted(
            connection_id,
        )))
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

impl Target<'_> {
    /// Calls `method` on every recipient with `args`: a tuple such as `(text,)` or
    /// `(a, b)` for several arguments; any other value is sent as the one argument.
    pub async fn send(self, method: &str, args: impl Serialize) -> Result<(), SendError> {
        let arguments = match serde_json::to_value(args)? {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            one => vec![one],
        };
        let message = EncodedMessage::new(HubMessage::Invocation {
            invocation_id: None,
            target: method.to_owned(),
            arguments,
            stream_ids: Vec::new(),
        });
        let Clients { local, bus, .. } = self.clients;
        local.deliver(&self.audience, &message);
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
                &record
            ),
            1
        );
        assert_eq!(local.deliver(&Audience::User("alice".into()), &record), 1);
        assert_eq!(
            local.deliver(
                &Audience::Group {
                    name: "room".into(),
                    except: vec![]
                },
                &record
            ),
            1
        );
        assert_eq!(
            local.deliver(
                &Audience::Group {
                    name: "none".into(),
                    except: vec![]
                },
                &record
            ),
            0
        );
        assert_eq!(
            local.deliver(&Audience::Connection(ConnectionId::random()), &record),
            0
        );
        let drain = |rx: &mut tokio::sync::mpsc::Receiver<bytes::Bytes>| {
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
            local.deliver(&Audience::All { except: vec![] }, &message),
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
