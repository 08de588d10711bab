//! # stickless
//!
//! A SignalR-compatible real-time server on actix-web that runs any number of instances
//! behind a plain round-robin load balancer, with no sticky sessions.
//!
//! ## Writing an application
//!
//! Declare hubs, mount them on an [`App`], build it and run it. A method is an async
//! closure or function taking the caller's [`HubContext`], optionally the hub's
//! [`State`], and its arguments as a tuple:
//!
//! ```no_run
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use clap::Parser;
//! use stickless::{App, Hub, HubContext, HubError, Settings, State};
//!
//! #[derive(Default)]
//! struct Likes(AtomicU64);
//!
//! async fn like(
//!     ctx: HubContext,
//!     State(likes): State<Likes>,
//!     (what,): (String,),
//! ) -> Result<u64, HubError> {
//!     let total = likes.0.fetch_add(1, Ordering::Relaxed) + 1;
//!     ctx.clients().others().send("Liked", (what, total)).await?;
//!     Ok(total)
//! }
//!
//! #[actix_web::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let likes = Hub::builder("likes")
//!         .state(Likes::default())
//!         .method("Like", like)
//!         .method("Echo", |_ctx: HubContext, (text,): (String,)| async move {
//!             Ok::<_, HubError>(text)
//!         });
//!     // Every setting is an environment variable and a --flag (README, "Configuration").
//!     let app = App::new(Settings::parse()).hub("/likes", likes).build().await?;
//!     app.run_until_stopped().await?;
//!     Ok(())
//! }
//! ```
//!
//! A handler that takes a `State<S>` the hub was not given fails [`App::build`] with a
//! [`BuildError`], before any client connects. The demo's hubs ([`demo::chat`],
//! [`demo::notifications`]) are the examples to copy.
//!
//! ## The way of a request (the modules, top to bottom)
//!
//! Data flows down, never back up; no module imports one above it.
//!
//! ```text
//! app            App: mounts hubs, each at its own path (main.rs picks the demo)
//! http           {hub}/negotiate · {hub} GET/POST/DELETE per hub · /healthz · /metrics
//!  └ routing     is the connection here? if not: adopt, direct, bus or re-forward
//!     ├ forwarding   awc or the bus: HTTP, event streams and WebSockets relayed to the owner
//!     ├ handover     a stateful-reconnect session moves to where its new WebSocket landed
//!     └ transport    WebSockets · Server-Sent Events · Long Polling (move records only)
//!        └ connection     one client's state; its session moves messages to the host
//!           └ hub         declaring methods and state; hub::host: dispatch, one per hub
//!              └ clients  All / Others / Caller / Client / Group / User; local delivery
//!                 └ bus   the backplane: in-process, Redis pub/sub or Redis Cluster (sharded); bus::peers: discovery
//! outbox         a connection's bounded queue: the one push path, counted
//! protocol       pure: negotiate JSON, handshake, hub messages, 0x1E framing, tokens
//! ```
//!
//! - `app` ([`App`]): the builder; `startup` ([`Application`], [`AppHandle`]): run and
//!   stop; [`config`] ([`Settings`]): every setting.
//! - `http`: the routes of every hub and the mapping of errors to what the SignalR
//!   client expects.
//! - `routing`: the one decision of where a request for a connection goes (routes in one
//!   configurable order, the re-forward budget); `forwarding`: carries misrouted requests
//!   to the owning instance, over HTTP or relayed over the bus (`forwarding::relay`);
//!   `handover`: moves a stateful-reconnect session (replay buffer, groups, user, sequence
//!   counters) to the instance its client's new WebSocket reached.
//! - `transport`: WebSockets, Server-Sent Events and Long Polling.
//! - `connection`: connections, their registry and their sessions.
//! - `hub`: [`Hub`], [`HubBuilder`], [`HubContext`], [`State`], [`HubError`], and
//!   [`ClientStream`] (client-to-server streams, `hub::stream`); `hub::host` turns
//!   invocations into Completions, streams and errors, and drains the hub's bus.
//! - `clients` ([`Clients`], [`Groups`], [`SingleClient`]): who receives a message, and the
//!   client results a method waits for ([`SingleClient::invoke`]).
//! - `bus`: carries messages between instances; owns its addressing types; peer
//!   discovery (advertised URLs) is its own component.
//! - `outbox`, `metrics`: the outbound queue, the counters; `queue`: the bounded queues
//!   between a connection's tasks, which hold no memory while empty.
//! - [`presence`]: who is online cluster-wide (coalesced join/leave/rename batches) and
//!   recent messages, in Redis or in process: state for chat-like hubs.
//! - [`protocol`]: the SignalR wire format, pure and unit-tested.
//! - [`demo`]: the demo's hubs — the module a template user replaces.

pub(crate) mod app;
pub(crate) mod bus;
pub(crate) mod clients;
pub mod config;
pub(crate) mod connection;
pub mod demo;
pub(crate) mod forwarding;
pub(crate) mod handover;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod metrics;
pub(crate) mod outbox;
pub mod presence;
pub mod protocol;
pub(crate) mod queue;
pub(crate) mod routing;
pub mod startup;
pub(crate) mod transport;
pub(crate) mod upgrade;

pub use app::App;
pub use clients::{Clients, Groups, InvokeError, SendError, SingleClient, Target};
pub use config::Settings;
pub use hub::{
    BuildError, ClientStream, HookHandler, Hub, HubBuilder, HubContext, HubError, MethodHandler,
    RequestHead, State, StreamError, StreamHandler,
};
pub use protocol::negotiate::TransportKind;
pub use protocol::token::{ConnectionId, InstanceId};
pub use routing::{ForwardBudget, RouteKind, Routes};
pub use startup::{AppHandle, Application, StartError};
