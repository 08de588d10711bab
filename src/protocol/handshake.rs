//! The handshake: the first record a client sends on every connection, and the server's
//! reply (`HubProtocol.md`, "Overview"; ASP.NET `HandshakeProtocol.cs`).
//!
//! The reply to a good request is `{}`; to a bad one `{"error":"…"}`, after which the
//! server closes. The reply must not contain `type`: the JS client would take it for a
//! hub message and fail the start.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::framing::frame;

/// The only hub protocol this server speaks.
pub const JSON_PROTOCOL: &str = "json";

/// Versions of the JSON protocol accepted: 1, and 2, which clients send when stateful
/// reconnect was negotiated (ASP.NET's `JsonHubProtocol.IsVersionSupported` accepts ≤ 2).
pub const MAX_JSON_VERSION: u32 = 2;

/// A parsed handshake request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HandshakeRequest {
    /// The hub protocol's name, `json` or `messagepack`.
    pub protocol: String,
    /// The hub protocol's version.
    pub version: u32,
}

/// A handshake the server refuses; the text is sent to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a JSON object with a string `protocol` and a numeric `version`.
    #[error("Handshake request is malformed: {0}")]
    Malformed(String),
    /// A protocol other than JSON (ASP.NET's wording).
    #[error("The protocol '{0}' is not supported.")]
    UnsupportedProtocol(String),
    /// A JSON protocol version this server does not know (ASP.NET's wording).
    #[error("The server does not support version {version} of the '{protocol}' protocol.")]
    UnsupportedVersion {
        /// The protocol's name.
        protocol: String,
        /// The version asked for.
        version: u32,
    },
    /// No handshake within the handshake timeout (ASP.NET's wording).
    #[error("Handshake was canceled.")]
    TimedOut,
}

impl HandshakeRequest {
    /// Parses and checks one handshake record (without its separator).
    pub fn parse(record: &str) -> Result<Self, HandshakeError> {
        let request: Self = serde_json::from_str(record)
            .map_err(|error| HandshakeError::Malformed(error.to_string()))?;
        if request.protocol != JSON_PROTOCOL {
            return Err(HandshakeError::UnsupportedProtocol(request.protocol));
        }
        if request.version == 0 || request.version > MAX_JSON_VERSION {
            return Err(HandshakeError::UnsupportedVersion {
                protocol: request.protocol,
                version: request.version,
            });
        }
        Ok(request)
    }
}

/// The framed reply to an accepted handshake.
pub fn success_reply() -> Bytes {
    frame("{}")
}

/// The framed reply to a refused handshake.
pub fn error_reply(error: &HandshakeError) -> Bytes {
    frame(&json!({ "error": error.to_string() }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_one_and_two_of_json_are_accepted() {
        for version in [1, 2] {
            let record = format!(r#"{{"protocol":"json","version":{version}}}"#);
            assert_eq!(HandshakeRequest::parse(&record).unwrap().version, version);
        }
    }

    #[test]
    fn messagepack_is_refused_with_aspnet_wording() {
        let error = HandshakeRequest::parse(r#"{"protocol":"messagepack","version":1}"#);
        assert_eq!(
            error.unwrap_err().to_string(),
            "The protocol 'messagepack' is not supported."
        );
    }

    #[test]
    fn unknown_versions_are_refused() {
        let error = HandshakeRequest::parse(r#"{"version":3,"protocol":"json"}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "The server does not support version 3 of the 'json' protocol."
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"protocol":1,"version":1}"#,
            r#"{"protocol":"json"}"#,
        ] {
            assert!(matches!(
                HandshakeRequest::parse(bad),
                Err(HandshakeError::Malformed(_))
            ));
        }
    }

    #[test]
    fn replies_carry_no_type_and_end_with_the_separator() {
        assert_eq!(&success_reply()[..], b"{}\x1e");
        let reply = error_reply(&HandshakeError::TimedOut);
        assert_eq!(&reply[..], b"{\"error\":\"Handshake was canceled.\"}\x1e");
    }
}
