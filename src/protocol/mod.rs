//! The SignalR wire protocol, as pure data transformations.
//!
//! Nothing here does I/O or knows about actix, tokio, awc or Redis: every function takes
//! bytes or values and returns bytes or values, so the whole module is unit-tested (and
//! fuzzable) on its own. Specs: `TransportProtocols.md` and `HubProtocol.md` in
//! `dotnet/aspnetcore` `src/SignalR/docs/specs/`.
//!
//! - [`framing`]: the 0x1E record separator; "incomplete" versus "invalid" input.
//! - [`handshake`]: the first record of every connection and its reply.
//! - [`message`]: the hub messages (Invocation, Completion, Ping, Close, …).
//! - [`negotiate`]: `POST {hub}/negotiate` request and response, transport names.
//! - [`sse`]: Server-Sent Events framing of outgoing records.
//! - [`token`]: identifiers and the signed connection token.

pub mod framing;
pub mod handshake;
pub mod message;
pub mod negotiate;
pub mod sse;
pub mod token;
