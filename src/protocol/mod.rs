//! The SignalR wire protocol, as pure data transformations.
//!
//! Nothing here does I/O or knows about actix, tokio, awc or Redis: every function takes
//! bytes or values and returns bytes or values, so the whole module is unit-tested (and
//! fuzzable) on its own. Specs: `TransportProtocols.md` and `HubProtocol.md` in
//! `dotnet/aspnetcore` `src/SignalR/docs/specs/`.
//!
//! - [`framing`]: the 0x1E record separator of JSON; "incomplete" versus "invalid" input.
//! - [`varint`]: the VarInt length prefix of MessagePack records, likewise.
//! - [`handshake`]: the first record of every connection and its reply.
//! - [`message`]: the hub messages (Invocation, Completion, Ping, Close, …), and their JSON
//!   encoding.
//! - [`msgpack`]: their MessagePack encoding, with values converted to and from JSON ones.
//! - [`hub_protocol`]: JSON and MessagePack behind one facade: parse, encode, readers, and
//!   messages encoded once per protocol.
//! - [`negotiate`]: `POST {hub}/negotiate` request and response, transport names.
//! - [`sse`]: Server-Sent Events framing of outgoing records.
//! - [`token`]: identifiers and the signed connection token.

pub mod framing;
pub mod handshake;
pub mod hub_protocol;
pub mod message;
pub mod msgpack;
pub mod negotiate;
pub mod sse;
pub mod token;
pub mod varint;

#[cfg(test)]
mod properties;
