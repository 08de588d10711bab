//! The backplane carries messages between instances.
//!
//! [`InProcess`] is the default: one instance, nothing to carry. [`redis::RedisBackplane`]
//! uses Redis pub/sub so that `All`, `Group`, `Client` and `User` reach recipients on every
//! instance. Local recipients never go through the backplane (see [`crate::clients`]).

pub mod redis;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::clients::{Audience, GroupAction, Topic};
use crate::protocol::token::InstanceId;

/// How instances reach each other.
pub trait Backplane: Send + Sync {
    /// `in-process` or `redis`, for `/healthz`.
    fn name(&self) -> &'static str;

    /// False while the backplane cannot carry messages (Redis unreachable).
    fn is_healthy(&self) -> bool;

    /// Carries a record to the recipients on the other instances.
    fn publish<'a>(&'a self, audience: &'a Audience, record: &'a Bytes) -> BoxFuture<'a, ()>;

    /// Makes messages for these topics reach this instance; resolves once they do (or at
    /// once while disconnected: topics are subscribed again on reconnect).
    fn subscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()>;

    /// Stops messages for these topics reaching this instance.
    fn unsubscribe(&self, topics: Vec<Topic>) -> BoxFuture<'_, ()>;

    /// Asks the instance holding a connection to change its groups.
    fn group_action(&self, action: GroupAction) -> BoxFuture<'_, ()>;

    /// The direct URL another instance advertised, if known.
    fn peer_url(&self, instance: &InstanceId) -> Option<String>;
}

/// The default backplane of a single instance: there is nobody else to tell.
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcess;

impl Backplane for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn is_healthy(&self) -> bool {
        true
    }

    fn publish<'a>(&'a self, _: &'a Audience, _: &'a Bytes) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn subscribe(&self, _: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn unsubscribe(&self, _: Vec<Topic>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn group_action(&self, _: GroupAction) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn peer_url(&self, _: &InstanceId) -> Option<String> {
        None
    }
}
