//! Hubs: the application's methods, and what they can do to other clients.
//!
//! A template user declares a hub with [`Hub::builder`], one line per method. Arguments
//! are deserialized from the invocation's `arguments` array into a tuple of Rust types and
//! the result is serialized back, so a method is an ordinary async closure:
//!
//! ```
//! use stickless::{Hub, HubContext, HubError};
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
//! # Ok::<(), stickless::BuildError>(())
//! ```
//!
//! The hub knows nothing of transports or routing: it sees a [`HubContext`] and returns
//! values. Its [`host::HubHost`] turns invocations into Completions, streams and errors.

mod handler;
pub mod host;
pub(crate) mod stream;

use handler::{Bound, States};
pub use handler::{HookHandler, MethodHandler, State, StreamHandler};
pub use stream::{ClientStream, StreamError};

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header::HeaderName;
use actix_web::HttpRequest;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde_json::Value;

use crate::clients::{Clients, Groups, InvokeError, SendError};
use crate::protocol::negotiate::TransportKind;
use crate::protocol::token::{ConnectionId, InstanceId};
use stream::Feed;

/// An error a hub method returns. The caller's Completion carries ASP.NET's text for it:
/// "An unexpected error occurred invoking 'M' on the server.", followed by
/// `HubException: <message>` for a [`HubError::Message`] and, only when detailed errors
/// are enabled (`ENABLE_DETAILED_ERRORS`), by the detail of the other kinds.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A message meant for the caller, like ASP.NET's `HubException`.
    #[error("{0}")]
    Message(String),
    /// Sending to other clients failed.
    #[error("An unexpected error occurred: {0}")]
    Send(#[from] SendError),
    /// The invocation's arguments do not bind to the method's parameters.
    #[error(
        "Failed to invoke '{target}' due to an error on the server. InvalidDataException: {detail}"
    )]
    Arguments {
        /// The method as the client named it.
        target: String,
        /// Why they do not bind.
        detail: String,
    },
    /// Any other failure, named by its kind, like an exception's type in ASP.NET
    /// (`InvalidOperationException`); callers see it only with detailed errors.
    #[error("{kind}: {message}")]
    Exception {
        /// The kind, shown before the message.
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// A client stream the method reads failed.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// A client asked for a result did not give one.
    #[error("{0}")]
    Invoke(#[from] InvokeError),
}

/// A hub is declared wrongly; found when it is built, before any client connects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A handler takes a `State<S>` the hub was not given with `.state(…)`.
    #[error("in hub {hub:?}, {handler} takes State<{state}>, but the hub has no such state: add .state(…) to Hub::builder({hub:?})")]
    MissingState {
        /// The hub.
        hub: String,
        /// The method or hook.
        handler: String,
        /// The state's type.
        state: &'static str,
    },
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

    /// A failure of some kind whose detail callers see only with detailed errors
    /// (`ENABLE_DETAILED_ERRORS`), as an exception other than `HubException` in ASP.NET.
    pub fn exception(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Exception {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// The text a caller's Completion carries when method `name` failed with this error,
    /// as ASP.NET's `DefaultHubDispatcher` words it (`ErrorMessageHelper.BuildErrorMessage`:
    /// the exception's type and message follow for a `HubException`, or for any exception
    /// when `detailed`).
    pub fn client_text(&self, name: &str, detailed: bool) -> String {
        let generic = format!("An unexpected error occurred invoking '{name}' on the server.");
        match self {
            Self::Message(message) => format!("{generic} HubException: {message}"),
            Self::Send(error) if detailed => format!("{generic} SendError: {error}"),
            Self::Send(_) => generic,
            Self::Arguments { .. } if detailed => self.to_string(),
            Self::Arguments { target, .. } => {
                format!("Failed to invoke '{target}' due to an error on the server.")
            }
            // ASP.NET raises a client's error as a `HubException` with the client's text.
            Self::Invoke(InvokeError::Client(text)) => format!("{generic} HubException: {text}"),
            Self::Invoke(error) if detailed => format!("{generic} InvokeError: {error}"),
            // ASP.NET hands the method a client stream's error as a plain `Exception`.
            Self::Stream(StreamError::Client(text)) if detailed => {
                format!("{generic} Exception: {text}")
            }
            Self::Stream(error) if detailed => format!("{generic} StreamError: {error}"),
            Self::Exception { .. } if detailed => format!("{generic} {self}"),
            Self::Invoke(_) | Self::Stream(_) | Self::Exception { .. } => generic,
        }
    }
}

/// Who is calling, and the ways to reach other clients.
#[derive(Clone)]
pub struct HubContext {
    /// The caller's connection id.
    pub connection_id: ConnectionId,
    /// The caller's user id, from the application's user hook ([`crate::App::user_id`]).
    pub user: Option<String>,
    /// The transport the caller uses.
    pub transport: TransportKind,
    /// The instance serving the caller.
    pub instance: InstanceId,
    /// The HTTP request that started the caller's transport.
    pub request: Arc<RequestHead>,
    clients: Clients,
}

/// What the hub keeps of the HTTP request that started a connection's transport (the
/// WebSocket upgrade, the event stream, the first poll) — ASP.NET's
/// `Context.GetHttpContext()` for hub code: its headers, cookies and query.
///
/// Every connection keeps one for its whole life, so it is kept small: the headers as a
/// list of copied text values, not a clone of the request's `HeaderMap` (whose hash table
/// came to about 6.5 KiB for a WebSocket upgrade, a fifth of an idle connection, measured
/// with heaptrack; its values would also have kept the request's read buffer alive).
/// Values that are not text are dropped: [`RequestHead::header`] could not return them.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    headers: Box<[(HeaderName, Box<str>)]>,
    query: Box<str>,
}

impl RequestHead {
    /// Keeps the headers and query of `req`.
    pub fn of(req: &HttpRequest) -> Self {
        Self {
            headers: req
                .headers()
                .iter()
                .filter_map(|(name, value)| Some((name.clone(), value.to_str().ok()?.into())))
                .collect(),
            query: req.query_string().into(),
        }
    }

    /// The text values of header `name` (any case), in the request's order.
    fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + 'n
    where
        'a: 'n,
    {
        self.headers
            .iter()
            .filter(move |(key, _)| key.as_str().eq_ignore_ascii_case(name))
            .map(|(_, value)| &**value)
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.values(name).next()
    }

    /// A cookie's value, from the `Cookie` headers.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.values(actix_web::http::header::COOKIE.as_str())
            .flat_map(|line| line.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// A query parameter's value (percent-decoded), e.g. `numRedirects`.
    pub fn query(&self, name: &str) -> Option<String> {
        actix_web::web::Query::<Vec<(String, String)>>::from_query(&self.query)
            .ok()?
            .into_inner()
            .into_iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
    }
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
    dyn Fn(HubContext, Vec<Value>, Vec<Feed>) -> BoxFuture<'static, Result<Option<Value>, HubError>>
        + Send
        + Sync,
>;
type StreamFn = Arc<
    dyn Fn(HubContext, Vec<Value>, Vec<Feed>) -> Result<BoxStream<'static, Value>, HubError>
        + Send
        + Sync,
>;
/// A bound connect or disconnect hook.
#[doc(hidden)]
pub type LifecycleFn = Arc<dyn Fn(HubContext) -> BoxFuture<'static, ()> + Send + Sync>;

/// A registered method, bound to its state (public only for the handler traits).
#[doc(hidden)]
#[derive(Clone)]
pub enum Method {
    /// Returns one value (or nothing).
    Unary(UnaryFn),
    /// Returns a stream of items.
    Stream(StreamFn),
}

/// A hub: named methods plus connect and disconnect hooks, bound to their state.
pub struct Hub {
    name: String,
    transports: Vec<TransportKind>,
    requires_user: bool,
    methods: HashMap<String, (String, Method)>,
    on_connected: Option<LifecycleFn>,
    on_disconnected: Option<LifecycleFn>,
}

/// Binds a handler once the hub's states are known.
type Binder<T> = Box<dyn FnOnce(&States) -> Result<Bound<T>, &'static str> + Send>;

/// Declares a hub: its state, methods and hooks. Nothing is checked until
/// [`HubBuilder::build`] (which [`crate::App::build`] calls), so the order of the calls
/// does not matter.
pub struct HubBuilder {
    name: String,
    transports: Vec<TransportKind>,
    requires_user: bool,
    states: States,
    methods: Vec<(String, Binder<Method>)>,
    on_connected: Option<Binder<LifecycleFn>>,
    on_disconnected: Option<Binder<LifecycleFn>>,
}

impl HubBuilder {
    /// Gives the hub's handlers a state of type `S`, which they take as a [`State<S>`]
    /// argument. One state per type: a second of the same type replaces the first.
    pub fn state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.states.insert(state);
        self
    }

    /// Adds a method returning one value; `()` makes it void. See [`MethodHandler`] for
    /// the shapes a handler may have.
    pub fn method<M>(mut self, name: &str, handler: impl MethodHandler<M>) -> Self {
        let target = name.to_owned();
        let binder: Binder<Method> = Box::new(move |states| handler.bind(&target, states));
        self.methods.push((name.to_owned(), binder));
        self
    }

    /// Adds a method that streams items to the caller (`connection.stream(...)`). See
    /// [`StreamHandler`] for the shapes a handler may have.
    pub fn stream<M>(mut self, name: &str, handler: impl StreamHandler<M>) -> Self {
        let target = name.to_owned();
        let binder: Binder<Method> = Box::new(move |states| handler.bind(&target, states));
        self.methods.push((name.to_owned(), binder));
        self
    }

    /// Offers only these transports (ASP.NET's `HttpConnectionDispatcherOptions.Transports`):
    /// negotiate lists only them, and a request on another is refused. All by default.
    pub fn transports(mut self, transports: &[TransportKind]) -> Self {
        self.transports = transports.to_vec();
        self
    }

    /// Admits only connections with a user (from [`crate::App::user_id`]): negotiate and
    /// transport requests without one get 401, as an `[Authorize]` hub does in ASP.NET.
    pub fn require_user(mut self) -> Self {
        self.requires_user = true;
        self
    }

    /// Runs when a connection has completed its handshake.
    pub fn on_connected<M>(mut self, hook: impl HookHandler<M>) -> Self {
        self.on_connected = Some(Box::new(move |states| hook.bind(states)));
        self
    }

    /// Runs when a connection has ended, for whatever reason.
    pub fn on_disconnected<M>(mut self, hook: impl HookHandler<M>) -> Self {
        self.on_disconnected = Some(Box::new(move |states| hook.bind(states)));
        self
    }

    /// The hub's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The finished hub: every handler bound to its state. Fails on a handler that asks
    /// for a state the hub was not given, or two methods of one name.
    pub fn build(self) -> Result<Hub, BuildError> {
        let Self {
            name,
            transports,
            requires_user,
            states,
            methods,
            on_connected,
            on_disconnected,
        } = self;
        let missing = |handler: &str, state: &'static str| BuildError::MissingState {
            hub: name.clone(),
            handler: handler.to_owned(),
            state,
        };
        let mut bound = HashMap::new();
        for (method, binder) in methods {
            let Bound(call) = binder(&states).map_err(|state| missing(&method, state))?;
            if bound.contains_key(&method.to_lowercase()) {
                return Err(BuildError::DuplicateMethod {
                    hub: name.clone(),
                    method,
                });
            }
            bound.insert(method.to_lowercase(), (method, call));
        }
        let hook = |binder: Option<Binder<LifecycleFn>>, which: &str| {
            binder
                .map(|binder| binder(&states).map(|Bound(hook)| hook))
                .transpose()
                .map_err(|state| missing(which, state))
        };
        let on_connected = hook(on_connected, "on_connected")?;
        let on_disconnected = hook(on_disconnected, "on_disconnected")?;
        Ok(Hub {
            name,
            transports,
            requires_user,
            methods: bound,
            on_connected,
            on_disconnected,
        })
    }
}

impl Hub {
    /// Starts declaring a hub; `name` names its bus channels (`stickless:<name>:…`) and
    /// must be unique in the application. Its path is chosen when it is mounted
    /// ([`crate::App::hub`]).
    pub fn builder(name: &str) -> HubBuilder {
        HubBuilder {
            name: name.to_owned(),
            transports: TransportKind::ALL.to_vec(),
            requires_user: false,
            states: States::default(),
            methods: Vec::new(),
            on_connected: None,
            on_disconnected: None,
        }
    }

    /// The hub's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the hub offers this transport.
    pub fn allows(&self, transport: TransportKind) -> bool {
        self.transports.contains(&transport)
    }

    /// Whether connections need a user.
    pub fn requires_user(&self) -> bool {
        self.requires_user
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
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures_util::StreamExt;

    use super::host::{Caller, HubHost, Invoked};
    use super::*;
    use crate::bus::InProcess;
    use crate::protocol::message::{HubMessage, Outcome};

    #[test]
    fn the_request_head_keeps_headers_cookies_and_query() {
        let req = actix_web::test::TestRequest::get()
            .uri("/chat?id=abc&numRedirects=2&name=a%20b")
            .insert_header(("Content-Type", "text/plain"))
            .append_header(("Cookie", "a=1; user=ann"))
            .append_header(("Cookie", "b=2"))
            .to_http_request();
        let head = RequestHead::of(&req);
        assert_eq!(head.header("content-type"), Some("text/plain"));
        assert_eq!(head.header("CONTENT-TYPE"), Some("text/plain"));
        assert_eq!(head.header("x-missing"), None);
        assert_eq!(head.cookie("user"), Some("ann"));
        assert_eq!(head.cookie("b"), Some("2"), "every Cookie header is read");
        assert_eq!(head.cookie("c"), None);
        assert_eq!(head.query("numRedirects").as_deref(), Some("2"));
        assert_eq!(head.query("name").as_deref(), Some("a b"));
    }

    #[derive(Default)]
    struct Count(AtomicU32);

    struct Greeting(&'static str);

    fn counter() -> HubBuilder {
        Hub::builder("counter")
            .method(
                "Add",
                |_ctx: HubContext, State(count): State<Count>, (n,): (u32,)| async move {
                    Ok(count.0.fetch_add(n, Ordering::Relaxed) + n)
                },
            )
            .stream(
                "Repeat",
                |_ctx: HubContext, State(greeting): State<Greeting>, (n,): (usize,)| {
                    Ok(futures_util::stream::iter(vec![greeting.0; n]))
                },
            )
            .on_connected(|_ctx: HubContext, State(count): State<Count>| async move {
                count.0.fetch_add(100, Ordering::Relaxed);
            })
    }

    /// Runs one invocation on `host` and returns the messages the caller gets.
    async fn invoke(host: &HubHost, target: &str, arguments: Vec<Value>) -> Vec<HubMessage> {
        let caller = Caller {
            connection_id: ConnectionId::random(),
            user: None,
            transport: TransportKind::LongPolling,
            request: Default::default(),
        };
        let message = HubMessage::Invocation {
            invocation_id: Some("1".into()),
            target: target.into(),
            arguments,
            stream_ids: vec![],
        };
        match host.invoke(&host.context(&caller), message, vec![]) {
            Invoked::Done(reply) => reply.into_iter().collect(),
            Invoked::Unary(running) => running.await.into_iter().collect(),
            Invoked::Stream { messages, .. } => messages.collect().await,
        }
    }

    fn result(value: u32) -> Vec<HubMessage> {
        vec![HubMessage::Completion {
            invocation_id: "1".into(),
            outcome: Outcome::Result(Value::from(value)),
        }]
    }

    #[tokio::test]
    async fn handlers_share_the_state_the_hub_was_given() {
        let hub = counter()
            .state(Count::default())
            .state(Greeting("hi"))
            .build()
            .unwrap();
        let host = HubHost::new(hub, Arc::new(InProcess), InstanceId::parse("i").unwrap());
        assert_eq!(invoke(&host, "Add", vec![Value::from(2)]).await, result(2));
        assert_eq!(invoke(&host, "add", vec![Value::from(3)]).await, result(5));
        let caller = Caller {
            connection_id: ConnectionId::random(),
            user: None,
            transport: TransportKind::WebSockets,
            request: Default::default(),
        };
        let (outbox, _rx) = crate::outbox::tests::outbox(4);
        host.connect(&caller, outbox).await;
        assert_eq!(
            invoke(&host, "Add", vec![Value::from(0)]).await,
            result(105)
        );
    }

    #[test]
    fn a_missing_state_is_found_when_the_hub_is_built() {
        let error = counter().state(Count::default()).build().err().unwrap();
        assert_eq!(
            error,
            BuildError::MissingState {
                hub: "counter".into(),
                handler: "Repeat".into(),
                state: std::any::type_name::<Greeting>(),
            }
        );
        assert!(error.to_string().contains("Greeting"), "{error}");
        let error = counter().state(Greeting("hi")).build().err().unwrap();
        assert!(
            matches!(&error, BuildError::MissingState { handler, .. } if handler == "Add"),
            "{error}"
        );
    }

    #[test]
    fn two_methods_of_one_name_are_refused() {
        let error = Hub::builder("h")
            .method("Go", |_ctx: HubContext, ()| async move { Ok(()) })
            .method("go", |_ctx: HubContext, ()| async move { Ok(()) })
            .build()
            .err()
            .unwrap();
        assert!(
            matches!(error, BuildError::DuplicateMethod { .. }),
            "{error}"
        );
    }
}
