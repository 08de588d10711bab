//! The handshake: the first record a client sends on every connection, and the server's
//! reply (`HubProtocol.md`, "Overview"; ASP.NET `HandshakeProtocol.cs`).
//!
//! The request and the reply are JSON records ended by 0x1E whichever hub protocol is
//! chosen, MessagePack included. The reply to a good request is `{}`; to a bad one
//! `{"error":"…"}`, after which the server closes. The reply must not contain `type`: the
//! JS client would take it for a hub message and fail the start.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::framing::{frame, FrameError};
use super::hub_protocol::{HubProtocol, TransferFormat};
use super::negotiate::TransportKind;

/// The JSON protocol's name. Kept for callers that predate [`HubProtocol`].
pub const JSON_PROTOCOL: &str = "json";

/// The highest protocol version accepted (both protocols): 2, which clients send when
/// stateful reconnect was negotiated. Versions 0 and 1 are accepted too, as ASP.NET's
/// `IsVersionSupported` (`version <= 2`) does: signalrcore sends 0.
pub const MAX_JSON_VERSION: u32 = HubProtocol::MAX_VERSION;

/// A parsed handshake request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HandshakeRequest {
    /// The hub protocol's name as the client wrote it, `json` or `messagepack` in any case.
    pub protocol: String,
    /// The hub protocol's version.
    pub version: u32,
}

/// What an accepted handshake settled: the connection speaks `protocol` from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The hub protocol of every later record, both directions.
    pub protocol: HubProtocol,
    /// The version the client asked for (0, 1 or 2); 2 means it may use Ack and Sequence.
    pub version: u32,
}

/// A handshake the server refuses; the text (ASP.NET's wording, `HubConnectionContext.cs`
/// `HandshakeAsync`) is sent to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a JSON object with a string `protocol` and a numeric `version`. The detail is for
    /// logs and [`HandshakeError::detailed`]; ASP.NET hides it from clients by default.
    #[error("An unexpected error occurred during connection handshake.")]
    Malformed(String),
    /// A protocol this server does not offer, named as the client wrote it.
    #[error("The protocol '{0}' is not supported.")]
    UnsupportedProtocol(String),
    /// A version of the protocol this server does not know.
    #[error("The server does not support version {version} of the '{protocol}' protocol.")]
    UnsupportedVersion {
        /// The protocol's name as the client wrote it.
        protocol: String,
        /// The version asked for.
        version: u32,
    },
    /// A binary protocol on a text-only transport (Server-Sent Events).
    #[error(
        "Cannot use the '{protocol}' protocol on the current transport. \
         The transport does not support '{format}' transfer format."
    )]
    UnsupportedTransferFormat {
        /// The protocol's own name.
        protocol: HubProtocol,
        /// The format it needs.
        format: TransferFormat,
    },
    /// No handshake within the handshake timeout, or a handshake larger than the maximum
    /// message size (ASP.NET answers both with this text).
    #[error("Handshake was canceled.")]
    TimedOut,
}

impl HandshakeError {
    /// The text with the detail ASP.NET adds when `EnableDetailedErrors` is on
    /// (`ErrorMessageHelper.BuildErrorMessage`: message, exception type, exception text).
    pub fn detailed(&self) -> String {
        match self {
            Self::Malformed(detail) => format!("{self} InvalidDataException: {detail}"),
            _ => self.to_string(),
        }
    }
}

impl From<FrameError> for HandshakeError {
    /// A handshake record that cannot be framed: over the size limit, ASP.NET answers
    /// "Handshake was canceled." (`HandshakeSizeLimitExceeded`); otherwise it is malformed.
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::TooLarge { .. } => Self::TimedOut,
            other => Self::Malformed(other.to_string()),
        }
    }
}

impl HandshakeRequest {
    /// Parses and checks one handshake record (without its separator) for a server that
    /// speaks only JSON. See [`accept`] for the choice among several protocols.
    pub fn parse(record: &str) -> Result<Self, HandshakeError> {
        let request = Self::parse_any(record)?;
        request.agree(&[HubProtocol::Json])?;
        Ok(request)
    }

    /// Parses one handshake record without judging its protocol or version.
    pub fn parse_any(record: &str) -> Result<Self, HandshakeError> {
        serde_json::from_str(record).map_err(|error| HandshakeError::Malformed(error.to_string()))
    }

    /// The protocol asked for, if it is one this server knows (names ignore case).
    pub fn hub_protocol(&self) -> Option<HubProtocol> {
        HubProtocol::from_name(&self.protocol)
    }

    /// Checks the request against the protocols offered, in ASP.NET's order: protocol,
    /// then version.
    pub fn agree(&self, offered: &[HubProtocol]) -> Result<Agreed, HandshakeError> {
        let protocol = self
            .hub_protocol()
            .filter(|protocol| offered.contains(protocol))
            .ok_or_else(|| HandshakeError::UnsupportedProtocol(self.protocol.clone()))?;
        if !protocol.is_version_supported(self.version) {
            return Err(HandshakeError::UnsupportedVersion {
                protocol: self.protocol.clone(),
                version: self.version,
            });
        }
        Ok(Agreed {
            protocol,
            version: self.version,
        })
    }
}

/// Parses and checks the handshake record of a connection on `transport`, among the
/// `offered` protocols: protocol, version, then whether the transport can carry the
/// protocol's transfer format (ASP.NET's order and texts).
pub fn accept(
    record: &str,
    offered: &[HubProtocol],
    transport: TransportKind,
) -> Result<Agreed, HandshakeError> {
    let agreed = HandshakeRequest::parse_any(record)?.agree(offered)?;
    let format = agreed.protocol.transfer_format();
    if !transport.supports(format) {
        return Err(HandshakeError::UnsupportedTransferFormat {
            protocol: agreed.protocol,
            format,
        });
    }
    Ok(agreed)
}

/// The framed reply to an accepted handshake.
pub fn success_reply() -> Bytes {
    frame("{}")
}

/// The framed reply to a refused handshake.
pub fn error_reply(error: &HandshakeError) -> Bytes {
    error_reply_detailed(error, false)
}

/// The framed reply to a refused handshake, with [`HandshakeError::detailed`] text when
/// the server enables detailed errors (ASP.NET's `EnableDetailedErrors`).
pub fn error_reply_detailed(error: &HandshakeError, detailed: bool) -> Bytes {
    let text = if detailed {
        error.detailed()
    } else {
        error.to_string()
    };
    frame(&json!({ "error": text }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_zero_to_two_of_json_are_accepted() {
        for version in [0, 1, 2] {
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
    fn protocol_names_ignore_case() {
        let request = HandshakeRequest::parse(r#"{"protocol":"JSON","version":1}"#).unwrap();
        assert_eq!(request.hub_protocol(), Some(HubProtocol::Json));
        let agreed = accept(
            r#"{"protocol":"MessagePack","version":1}"#,
            &HubProtocol::ALL,
            TransportKind::WebSockets,
        );
        assert_eq!(
            agreed,
            Ok(Agreed {
                protocol: HubProtocol::MessagePack,
                version: 1
            })
        );
    }

    #[test]
    fn accept_checks_protocol_version_and_transfer_format_in_aspnet_order() {
        let all = &HubProtocol::ALL;
        let sse = TransportKind::ServerSentEvents;
        let refuse = |record: &str, offered: &[HubProtocol], transport| {
            accept(record, offered, transport).unwrap_err().to_string()
        };
        assert_eq!(
            refuse(r#"{"protocol":"messagepack","version":1}"#, all, sse),
            "Cannot use the 'messagepack' protocol on the current transport. \
             The transport does not support 'Binary' transfer format."
        );
        assert_eq!(
            refuse(r#"{"protocol":"MessagePack","version":3}"#, all, sse),
            "The server does not support version 3 of the 'MessagePack' protocol."
        );
        assert_eq!(
            refuse(
                r#"{"protocol":"messagepack","version":1}"#,
                &[HubProtocol::Json],
                TransportKind::LongPolling
            ),
            "The protocol 'messagepack' is not supported."
        );
        assert_eq!(
            accept(r#"{"protocol":"json","version":0}"#, all, sse).map(|a| a.protocol),
            Ok(HubProtocol::Json)
        );
    }

    #[test]
    fn malformed_requests_get_aspnet_text_and_details_only_on_request() {
        let error = HandshakeRequest::parse("{").unwrap_err();
        assert_eq!(
            error.to_string(),
            "An unexpected error occurred during connection handshake."
        );
        assert!(error.detailed().starts_with(
            "An unexpected error occurred during connection handshake. InvalidDataException: "
        ));
    }

    #[test]
    fn an_oversized_handshake_is_canceled_as_aspnet_says() {
        let error = HandshakeError::from(FrameError::TooLarge { size: 9, max: 8 });
        assert_eq!(error.to_string(), "Handshake was canceled.");
        assert!(matches!(
            HandshakeError::from(FrameError::NotUtf8),
            HandshakeError::Malformed(_)
        ));
    }

    #[test]
    fn detailed_replies_are_only_sent_when_asked_for() {
        let error = HandshakeError::Malformed("EOF".into());
        assert_eq!(
            &error_reply(&error)[..],
            b"{\"error\":\"An unexpected error occurred during connection handshake.\"}\x1e"
        );
        assert_eq!(
            &error_reply_detailed(&error, true)[..],
            &b"{\"error\":\"An unexpected error occurred during connection handshake. InvalidDataException: EOF\"}\x1e"[..]
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
