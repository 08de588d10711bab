//! `POST {hub}/negotiate` (`TransportProtocols.md`, "`POST [endpoint-base]/negotiate`
//! request"; client `HttpConnection.ts`).
//!
//! The response lists the transports **in the order the client tries them**, with their
//! exact, case-sensitive names. Errors are HTTP 200 with `{"error":"…"}`: any other status
//! fails the client's `start()` without a readable reason.

use serde::Serialize;
use serde_json::{json, Value};

use super::hub_protocol::TransferFormat;
use super::token::{ConnectionId, ConnectionToken};

/// The highest negotiate version this server speaks; clients asking for more get this.
pub const MAX_NEGOTIATE_VERSION: u32 = 1;

/// The three SignalR transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// WebSockets: both directions on one socket.
    WebSockets,
    /// Server-Sent Events down, POST up.
    ServerSentEvents,
    /// Long Polling down, POST up.
    LongPolling,
}

impl TransportKind {
    /// Every transport, in the order offered to clients.
    pub const ALL: [TransportKind; 3] = [
        TransportKind::WebSockets,
        TransportKind::ServerSentEvents,
        TransportKind::LongPolling,
    ];

    /// The name used on the wire and by the clients' APIs.
    pub fn name(self) -> &'static str {
        match self {
            Self::WebSockets => "WebSockets",
            Self::ServerSentEvents => "ServerSentEvents",
            Self::LongPolling => "LongPolling",
        }
    }

    /// Transfer formats the transport can carry; SSE is text only.
    pub fn transfer_formats(self) -> &'static [&'static str] {
        match self {
            Self::ServerSentEvents => &["Text"],
            Self::WebSockets | Self::LongPolling => &["Text", "Binary"],
        }
    }

    /// Whether the transport can carry records of `format` (`TransportProtocols.md`:
    /// Server-Sent Events carry text only).
    pub fn supports(self, format: TransferFormat) -> bool {
        self.transfer_formats().contains(&format.name())
    }

    /// Whether the transport keeps the connection alive by itself, so hub Pings are off
    /// (the JS client sets `inherentKeepAlive` for Long Polling).
    pub fn has_inherent_keep_alive(self) -> bool {
        self == Self::LongPolling
    }
}

/// The negotiate version a client asked for is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The client requested an invalid protocol version '{0}'")]
pub struct VersionError(pub String);

/// The negotiate version a client asked for is unusable, in ASP.NET's words
/// (`HttpConnectionDispatcher.ProcessNegotiate`); sent as a 200 `{"error"}` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateVersionError {
    /// Not a 32-bit integer (.NET's `int.TryParse`).
    #[error("The client requested an invalid protocol version '{0}'")]
    Invalid(String),
    /// Below the lowest version served (0).
    #[error("The client requested version '{0}', but the server does not support this version.")]
    Unsupported(i32),
}

/// Reads `negotiateVersion` as ASP.NET does: missing means 0; a 32-bit integer, optionally
/// signed and surrounded by white space (`int.TryParse`); negative is unsupported; above
/// ours is lowered to ours. The query name itself is matched ignoring case by the caller.
pub fn parse_negotiate_version(raw: Option<&str>) -> Result<u32, NegotiateVersionError> {
    let Some(raw) = raw else {
        return Ok(0);
    };
    let version = raw
        .trim()
        .parse::<i32>()
        .map_err(|_| NegotiateVersionError::Invalid(raw.to_owned()))?;
    u32::try_from(version)
        .map(|version| version.min(MAX_NEGOTIATE_VERSION))
        .map_err(|_| NegotiateVersionError::Unsupported(version))
}

/// Reads `negotiateVersion`: missing means 0, versions above ours are lowered to ours.
/// Kept for callers that predate [`parse_negotiate_version`], whose error texts are
/// ASP.NET's.
pub fn negotiate_version(raw: Option<&str>) -> Result<u32, VersionError> {
    match raw {
        None => Ok(0),
        Some(raw) => raw
            .parse::<u32>()
            .map(|version| version.min(MAX_NEGOTIATE_VERSION))
            .map_err(|_| VersionError(raw.to_owned())),
    }
}

/// One entry of `availableTransports`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AvailableTransport {
    /// The transport's name.
    pub transport: &'static str,
    /// `Text` and/or `Binary`.
    pub transfer_formats: &'static [&'static str],
}

/// A successful negotiate response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NegotiateResponse {
    /// The version in use.
    pub negotiate_version: u32,
    /// The public id of the new connection.
    pub connection_id: String,
    /// The secret the client sends as `?id=`; absent in version 0, where the id is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_token: Option<String>,
    /// The transports, in the order the client should try them.
    pub available_transports: Vec<AvailableTransport>,
}

impl NegotiateResponse {
    /// The response for a new connection. In version 0 there is no token and the client
    /// sends the connectionId as `?id=`, so the (signed) token is given as the id; the
    /// connection must then be known by that id too, which
    /// [`super::token::ClusterKey::mint_connection`] arranges.
    pub fn new(version: u32, id: &ConnectionId, token: &ConnectionToken) -> Self {
        let (connection_id, connection_token) = if version == 0 {
            (token.as_str().to_owned(), None)
        } else {
            (id.as_str().to_owned(), Some(token.as_str().to_owned()))
        };
        Self {
            negotiate_version: version,
            connection_id,
            connection_token,
            available_transports: TransportKind::ALL
                .iter()
                .map(|kind| AvailableTransport {
                    transport: kind.name(),
                    transfer_formats: kind.transfer_formats(),
                })
                .collect(),
        }
    }
}

/// The body of a negotiate error (sent with status 200).
pub fn error_body(message: &str) -> Value {
    json!({ "error": message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::token::{ClusterKey, InstanceId, TokenClaims};

    #[test]
    fn missing_version_is_zero_and_high_versions_are_lowered() {
        assert_eq!(negotiate_version(None), Ok(0));
        assert_eq!(negotiate_version(Some("1")), Ok(1));
        assert_eq!(negotiate_version(Some("7")), Ok(1));
        assert!(negotiate_version(Some("x")).is_err());
        assert!(negotiate_version(Some("-1")).is_err());
    }

    #[test]
    fn negotiate_versions_are_read_as_aspnet_reads_them() {
        assert_eq!(parse_negotiate_version(None), Ok(0));
        assert_eq!(parse_negotiate_version(Some(" +1 ")), Ok(1));
        assert_eq!(parse_negotiate_version(Some("2147483647")), Ok(1));
        assert_eq!(
            parse_negotiate_version(Some("-1")).unwrap_err().to_string(),
            "The client requested version '-1', but the server does not support this version."
        );
        for bad in ["Invalid", "", "2147483648", "1.0"] {
            assert_eq!(
                parse_negotiate_version(Some(bad)).unwrap_err().to_string(),
                format!("The client requested an invalid protocol version '{bad}'")
            );
        }
    }

    #[test]
    fn a_version_zero_response_names_the_connection_by_its_token() {
        let key = ClusterKey::from_secret(b"secret");
        let claims = TokenClaims {
            owner: InstanceId::parse("a").unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: 1,
        };
        let (id, token) = key.mint_connection(&claims, 0);
        let body = serde_json::to_value(NegotiateResponse::new(0, &id, &token)).unwrap();
        assert_eq!(body["connectionId"], id.as_str());
        assert_eq!(body["negotiateVersion"], 0);
        assert!(body.get("connectionToken").is_none());
        assert_eq!(key.verify(id.as_str()).unwrap().connection_id, id);
    }

    #[test]
    fn the_response_lists_transports_in_the_order_clients_try_them() {
        let id = ConnectionId::random();
        let token = ConnectionToken::from_trusted("tok".into());
        let body = serde_json::to_value(NegotiateResponse::new(1, &id, &token)).unwrap();
        assert_eq!(
            body,
            json!({
                "negotiateVersion": 1,
                "connectionId": id.as_str(),
                "connectionToken": "tok",
                "availableTransports": [
                    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
                    {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
                    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
                ]
            })
        );
    }

    #[test]
    fn version_zero_has_no_token_and_uses_it_as_the_id() {
        let token = ConnectionToken::from_trusted("tok".into());
        let body = serde_json::to_value(NegotiateResponse::new(0, &ConnectionId::random(), &token))
            .unwrap();
        assert_eq!(body["connectionId"], "tok");
        assert!(body.get("connectionToken").is_none());
    }
}
