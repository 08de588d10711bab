//! Hubs: the application's methods, and what they can do to other clients.
//!
//! A template user declares a hub with [`Hub::builder`], one line per method. Arguments
//! are deserialized from the invocation's `arguments` array into a tuple of Rust types and
//! the result is serialized back, so a method is an ordinary async closure:
//!
//! ```
//! use stickless::hub::{Hub, HubContext, HubError};
//!
//! let hub = Hub::builder("chat")
//!     .method("Echo", |_ctx: HubContext, (text,): (String,)| async move {
//!         Ok::<_, HubError>(text)
//!     })
//!     .method("Shout", |ctx: HubContext, (text,): (String,)| async move {
//!         ctx.clients().all().send("Shouted", (text.to_uppercase(),)).await?;
//!         Ok::<_, HubError>(())
//!     })
//!     .build()?;
//! assert!(hub.has_method("echo")); // names are matched ignoring case, as ASP.NET does
//! # Ok::<(), stickless::hub::BuildError>(())
//! ```
//!
//! The hub knows nothing of transports or routing: it sees a [`HubContext`] and returns
//! values. Its [`host::HubHost`] turns invocations into Completions, streams and errors.

pub mod host;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use actix_web::HttpRequest;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::clients::{Clients, Groups, SendError};
use crate::protocol::negotiate::TransportKind;
use crate::protocol::token::{ConnectionId, InstanceId};

/// An error a hub method returns; its text is sent to the caller in the Completion.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A message meant for the caller, like ASP.NET's `HubException`.
    #[error("{0}")]
    Message(String),
    /// Sending to other clients failed.
    #[error("An unexpected error occurred: {0}")]
    Send(#[from] SendError),
}

/// A hub is declared wrongly; found when it is built, before any client connects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// Two methods whose names differ only in case (clients match names ignoring case).
    #[error("hub {hub:?} declares the method {method:?} twice")]
    DuplicateMethod {
        /// The hub.
        hub: String,
        /// The method.
        method: String,
    },
}

impl HubError {
    /// An error whose text the caller sees.
    pub fn new(message: impl Into<String>) -> Self {
        Self::Message(message.into())
    }
}

/// Who is calling, and the ways to reach other clients.
#[derive(Clone)]
pub struct HubContext {
    /// The caller's connection id.
    pub connection_id: ConnectionId,
    /// The caller's user id, from the [`UserIdProvider`].
    pub user: Option<String>,
    /// The transport the caller uses.
    pub transport: TransportKind,
    /// The instance serving the caller.
    pub instance: InstanceId,
    clients: Clients,
}

impl HubContext {
    /// Send to `All`, `Others`, `Caller`, a `Client`, a `Group` or a `User`.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// Add and remove connections to and from groups.
    pub fn groups(&self) -> Groups {
        self.clients.groups()
    }
}

/// Finds the user id of a connection from the request that starts its transport, for
/// `Clients::user`. Applications replace the demo's with their own authentication.
pub type UserIdProvider = Arc<dyn Fn(&HttpRequest) -> Option<String> + Send + Sync>;

type UnaryFn = Arc<
    dyn Fn(HubContext, Vec<Value>) -> BoxFuture<'static, Result<Value, HubError>> + Send + Sync,
>;
type StreamFn = Arc<
    dyn Fn(HubContext, Vec<Value>) -> Result<BoxStream<'static, Value>, HubError> + Send + Sync,
>;
type LifecycleFn = Arc<dyn Fn(HubContext) -> BoxFuture<'static, ()> + Send + Sync>;

/// A registered method.
#[derive(Clone)]
pub(crate) enum Method {
    /// Returns one value (or nothing).
    Unary(UnaryFn),
    /// Returns a stream of items.
    Stream(StreamFn),
}

/// A hub: named methods plus connect and disconnect hooks.
pub struct Hub {
    name: String,
    methods: HashMap<String, (String, Method)>,
    on_connected: Option<LifecycleFn>,
    on_disconnected: Option<LifecycleFn>,
}

/// Binds an invocation's arguments to `A`. Zero arguments bind to `()`; otherwise the
/// array binds to a tuple (or a `Vec`), so a wrong count is an error, as in ASP.NET.
fn bind<A: DeserializeOwned>(target: &str, args: Vec<Value>) -> Result<A, HubError> {
    let count = args.len();
    let bound = if count == 0 {
        serde_json::from_value(Value::Null)
            .or_else(|_| serde_json::from_value(Value::Array(vec![])))
    } else {
        serde_json::from_value(Value::Array(args))
    };
    bound.map_err(|error| {
        HubError::new(format!(
            "Failed to invoke '{target}' due to an error on the server. InvalidDataException: Invocation provides {count} argument(s) that do not match the method: {error}"
        ))
    })
}

/// Declares a hub's methods.
pub struct HubBuilder {
    hub: Hub,
    duplicates: Vec<String>,
}

impl HubBuilder {
    /// Adds a method returning one value; `()` makes it void.
    pub fn method<A, R, F, Fut>(self, name: &str, method: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HubError>> + Send + 'static,
    {
        let target = name.to_owned();
        let call: UnaryFn = Arc::new(move |ctx, args| match bind::<A>(&target, args) {
            Ok(args) => method(ctx, args)
                .map(|result| {
                    result.and_then(|value| {
                        serde_json::to_value(value)
                            .map_err(|e| HubError::Send(SendError::Arguments(e)))
                    })
                })
                .boxed(),
            Err(error) => futures_util::future::ready(Err(error)).boxed(),
        });
        self.insert(name, Method::Unary(call))
    }

    /// Adds a method that streams items to the caller (`connection.stream(...)`).
    pub fn stream<A, T, F, S>(self, name: &str, method: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        T: Serialize + 'static,
        F: Fn(HubContext, A) -> Result<S, HubError> + Send + Sync + 'static,
        S: Stream<Item = T> + Send + 'static,
    {
        let target = name.to_owned();
        let call: StreamFn = Arc::new(move |ctx, args| {
            let args = bind::<A>(&target, args)?;
            let items = method(ctx, args)?;
            Ok(items
                .map(|item| serde_json::to_value(item).unwrap_or(Value::Null))
                .boxed())
        });
        self.insert(name, Method::Stream(call))
    }

    /// Runs when a connection has completed its handshake.
    pub fn on_connected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hub.on_connected = Some(Arc::new(move |ctx| hook(ctx).boxed()));
        self
    }

    /// Runs when a connection has ended, for whatever reason.
    pub fn on_disconnected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hub.on_disconnected = Some(Arc::new(move |ctx| hook(ctx).boxed()));
        self
    }

    fn insert(mut self, name: &str, method: Method) -> Self {
        let previous = self
            .hub
            .methods
            .insert(name.to_lowercase(), (name.to_owned(), method));
        if previous.is_some() {
            self.duplicates.push(name.to_owned());
        }
        self
    }

    /// The hub's name.
    pub fn name(&self) -> &str {
        &self.hub.name
    }

    /// The finished hub, once its declaration is checked.
    pub fn build(self) -> Result<Hub, BuildError> {
        if let Some(method) = self.duplicates.into_iter().next() {
            return Err(BuildError::DuplicateMethod {
                hub: self.hub.name,
                method,
            });
        }
        Ok(self.hub)
    }
}

impl Hub {
    /// Starts declaring a hub; `name` is its path (`/chat`) and Redis channel namespace.
    pub fn builder(name: &str) -> HubBuilder {
        HubBuilder {
            hub: Hub {
                name: name.to_owned(),
                methods: HashMap::new(),
                on_connected: None,
                on_disconnected: None,
            },
            duplicates: Vec::new(),
        }
    }

    /// The hub's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a method of that name (any case) exists.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(&name.to_lowercase())
    }

    /// The method of that name, matched ignoring case as ASP.NET's `DefaultHubDispatcher`
    /// does, with its declared name.
    pub(crate) fn method(&self, name: &str) -> Option<&(String, Method)> {
        self.methods.get(&name.to_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_bind_to_tuples_and_unit() {
        let one: (String,) = bind("m", vec![Value::from("x")]).unwrap();
        assert_eq!(one.0, "x");
        let () = bind("m", vec![]).unwrap();
        let error = bind::<(String,)>("Send", vec![]).unwrap_err().to_string();
        assert!(error.contains("Failed to invoke 'Send'"), "{error}");
        assert!(bind::<(String,)>("m", vec![Value::from(1)]).is_err());
        assert!(bind::<(String,)>("m", vec![Value::from("a"), Value::from("b")]).is_err());
    }
}
