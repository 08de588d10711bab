//! # stickless
//!
//! A SignalR-compatible real-time server on actix-web that runs any number of instances
//! behind a plain round-robin load balancer, with no sticky sessions.
//!
//! ## The way of a request
//!
//! ```text
//! http          negotiate · {hub} GET/POST/DELETE · /healthz · /metrics · static files
//!  └ routing    is the connection here? if not: adopt, go direct, or re-forward
//!     ├ forwarding   awc: HTTP, event streams and WebSockets relayed to the owner
//!     └ transport    WebSockets · Server-Sent Events · Long Polling (move records only)
//!        └ connection     one client's state; its session runs handshake, pings, hub calls
//!           └ hub         the application's methods (chat: the demo's hub)
//!              └ clients  All / Others / Caller / Client / Group / User
//!                 └ backplane   in-process (one instance) or Redis pub/sub
//! protocol      pure: negotiate JSON, handshake, hub messages, 0x1E framing, tokens
//! ```
//!
//! - [`protocol`]: the SignalR wire format, pure and unit-tested.
//! - [`http`]: the routes and the mapping of errors to what the SignalR client expects.
//! - [`routing`]: the one decision of where a request for a connection goes.
//! - [`forwarding`]: carries misrouted requests to the owning instance.
//! - [`transport`]: WebSockets, Server-Sent Events and Long Polling.
//! - [`connection`]: connections, their registry and their protocol sessions.
//! - [`outbox`]: a connection's bounded outbound queue and close signal.
//! - [`hub`]: declaring hub methods, and the context they run in.
//! - [`chat`]: the demo's hub — the module a template user edits.
//! - [`clients`]: who receives a message, and local delivery.
//! - [`bus`]: the backplane, carrying messages between instances; [`bus::peers`]: discovery.
//! - [`metrics`], [`config`], [`startup`]: counters, settings, start and stop.
//! - [`devcluster`]: redis-server, N instances and nginx on loopback, for tests and demos.

pub mod app;
pub mod bus;
pub mod clients;
pub mod config;
pub mod connection;
pub mod demo;
pub mod devcluster;
pub mod forwarding;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod routing;
pub mod startup;
pub mod transport;

pub use app::App;
pub use clients::{Clients, Groups};
pub use config::Settings;
pub use hub::{BuildError, Hub, HubBuilder, HubContext, HubError, State};
pub use startup::{AppHandle, Application, StartError};
