//! Identifiers and the signed connection token.
//!
//! The token is what the client sends as `?id=`. stickless makes it carry its own routing
//! information: which instance negotiated (owns) the connection, the public connection id,
//! and when it was issued, with an HMAC-SHA256 over all three under the cluster secret:
//!
//! ```text
//! <owner instance>.<connection id>.<issued, unix seconds, hex>.<HMAC, 16 bytes, base64url>
//! ```
//!
//! A connection negotiated at version 0 gets `<owner>.<id>.<issued>.v0.<HMAC>` instead
//! (the marker is signed too): a version-0 client knows only one value, `connectionId`,
//! and sends it as `?id=`, so, as in ASP.NET, the token is also the connection's public id
//! and [`ClusterKey::verify`] names the whole token as the connection id. Every instance
//! that sees such a token (routing, adoption) then agrees on the id without asking.
//!
//! Every part is URL-safe, as the JS client does not encode `id=` (`HttpConnection.ts`
//! `_createConnectUrl`). Without the secret a token can be neither forged nor derived from
//! the public connection id, so an instance can reject a bad token at once instead of
//! asking the whole cluster about it. The same key signs the marker of internal probes.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of HMAC kept in a token: 128 bits is far beyond guessing over HTTP.
const MAC_LEN: usize = 16;

/// The signed fourth part that marks a version-0 token.
const VERSION_ZERO_MARKER: &str = "v0";

/// Longest instance id accepted.
pub const MAX_INSTANCE_ID_LEN: usize = 64;

/// An identifier that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Instance ids are 1–64 characters of `A–Z a–z 0–9 - _`.
    #[error("instance id {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'")]
    BadInstanceId(String),
}

/// This instance's name: URL-safe, and free of `.` so that it can lead a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceId(String);

impl InstanceId {
    /// Checks and wraps an instance id.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_INSTANCE_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::BadInstanceId(raw.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `text` as logs may show it: everything after the version-0 marker of a token (its
/// signature) is cut off, leaving `<owner>.<id>.<issued>.v0.…`, which identifies the
/// connection in the log but cannot be presented as `?id=`.
pub fn redact_for_log(text: &str) -> Cow<'_, str> {
    let marker = format!(".{VERSION_ZERO_MARKER}.");
    match text.find(&marker) {
        Some(at) => Cow::Owned(format!("{}{marker}…", &text[..at])),
        None => Cow::Borrowed(text),
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public id of a connection: 16 random bytes in base64url (22 characters), as
/// ASP.NET makes them (`HttpConnectionManager.MakeNewConnectionId`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(String);

impl ConnectionId {
    /// A new random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Wraps an id received from a hub method argument or the backplane. Such ids are only
    /// ever compared with ids of live connections, never trusted for routing.
    pub fn from_untrusted(raw: &str) -> Self {
        Self(raw.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as logs may show it: a version-0 id is the connection's token (see
    /// [`ClusterKey::mint_connection`]), so its signature is left out.
    pub fn for_log(&self) -> Cow<'_, str> {
        redact_for_log(&self.0)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The secret a client presents as `?id=`. Only [`ClusterKey::mint`] makes one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionToken(String);

impl ConnectionToken {
    /// Wraps a string already known to be a valid token (tests, and tokens just verified).
    pub fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// The instance that negotiated the connection.
    pub owner: InstanceId,
    /// The connection's public id.
    pub connection_id: ConnectionId,
    /// When the token was minted, in seconds since the Unix epoch.
    pub issued_at: u64,
}

/// Why a token was rejected. Deliberately coarse: the client only ever learns "404".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not four dot-separated parts of the right alphabet.
    #[error("malformed connection token")]
    Malformed,
    /// The HMAC does not match.
    #[error("connection token signature does not verify")]
    BadSignature,
}

/// The cluster secret as an HMAC key.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

impl ClusterKey {
    /// A key from a configured secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(secret.to_vec())
    }

    /// A random key: tokens then verify on this process only, which is right for a
    /// single instance.
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    fn mac(&self, label: &str, parts: &[&str]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label.as_bytes());
        for part in parts {
            mac.update(b"\0");
            mac.update(part.as_bytes());
        }
        mac
    }

    fn tag(&self, label: &str, parts: &[&str]) -> String {
        let bytes = self.mac(label, parts).finalize().into_bytes();
        URL_SAFE_NO_PAD.encode(&bytes[..MAC_LEN])
    }

    fn check(&self, label: &str, parts: &[&str], tag: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(tag) {
            Ok(tag) if tag.len() == MAC_LEN => {
                self.mac(label, parts).verify_truncated_left(&tag).is_ok()
            }
            _ => false,
        }
    }

    /// Makes the public id and the token of a connection negotiated at `negotiate_version`
    /// (`TransportProtocols.md`: version 0 has no `connectionToken`; the client sends its
    /// `connectionId` as `?id=`). From version 1 on, the id is `claims.connection_id` and the
    /// token is [`ClusterKey::mint`]'s. In version 0 both are one version-0 token, and
    /// [`ClusterKey::verify`] of it returns that token as the connection id.
    pub fn mint_connection(
        &self,
        claims: &TokenClaims,
        negotiate_version: u32,
    ) -> (ConnectionId, ConnectionToken) {
        if negotiate_version > 0 {
            return (claims.connection_id.clone(), self.mint(claims));
        }
        let issued = format!("{:x}", claims.issued_at);
        let parts = [
            claims.owner.as_str(),
            claims.connection_id.as_str(),
            &issued,
            VERSION_ZERO_MARKER,
        ];
        let tag = self.tag("stickless-token-v1", &parts);
        let token = format!("{}.{tag}", parts.join("."));
        (ConnectionId(token.clone()), ConnectionToken(token))
    }

    /// Makes the token for a new connection.
    pub fn mint(&self, claims: &TokenClaims) -> ConnectionToken {
        let issued = format!("{:x}", claims.issued_at);
        let parts = [
            claims.owner.as_str(),
            claims.connection_id.as_str(),
            &issued,
        ];
        let tag = self.tag("stickless-token-v1", &parts);
        ConnectionToken(format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], tag))
    }

    /// Checks a token presented by a client and says what it names. For a version-0
    /// token (see [`ClusterKey::mint_connection`]) the connection id is the token itself.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let parts: Vec<&str> = token.splitn(6, '.').collect();
        let (owner, id, issued, marker, tag) = match parts[..] {
            [owner, id, issued, tag] => (owner, id, issued, None, tag),
            [owner, id, issued, VERSION_ZERO_MARKER, tag] => {
                (owner, id, issued, Some(VERSION_ZERO_MARKER), tag)
            }
            _ => return Err(TokenError::Malformed),
        };
        let owner = InstanceId::parse(owner).map_err(|_| TokenError::Malformed)?;
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let issued_at = u64::from_str_radix(issued, 16).map_err(|_| TokenError::Malformed)?;
        if !id_ok {
            return Err(TokenError::Malformed);
        }
        let signed = [owner.as_str(), id, issued];
        let signed = match marker {
            Some(marker) => [&signed[..], &[marker]].concat(),
            None => signed.to_vec(),
        };
        if !self.check("stickless-token-v1", &signed, tag) {
            return Err(TokenError::BadSignature);
        }
        let connection_id = match marker {
            Some(_) => ConnectionId(token.to_owned()),
            None => ConnectionId(id.to_owned()),
        };
        Ok(TokenClaims {
            owner,
            connection_id,
            issued_at,
        })
    }

    /// The value of the header that marks a request as an internal probe between
    /// instances, valid around `now` (seconds since the Unix epoch).
    pub fn probe_marker(&self, now: u64) -> String {
        let now = now.to_string();
        format!("{now}.{}", self.tag("stickless-probe-v1", &[&now]))
    }

    /// Whether a probe marker was made with this key within `max_skew` seconds of `now`.
    pub fn verify_probe_marker(&self, value: &str, now: u64, max_skew: u64) -> bool {
        let Some((at, tag)) = value.split_once('.') else {
            return false;
        };
        let Ok(at_secs) = at.parse::<u64>() else {
            return false;
        };
        at_secs.abs_diff(now) <= max_skew && self.check("stickless-probe-v1", &[at], tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            owner: InstanceId::parse("node-a_1").unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: 1_700_000_000,
        }
    }

    #[test]
    fn a_minted_token_verifies_and_names_its_owner() {
        let key = ClusterKey::from_secret(b"secret");
        let claims = claims();
        let token = key.mint(&claims);
        assert_eq!(key.verify(token.as_str()), Ok(claims));
    }

    #[test]
    fn a_version_zero_token_is_its_own_connection_id_everywhere() {
        let key = ClusterKey::from_secret(b"secret");
        let claims = claims();
        let (id, token) = key.mint_connection(&claims, 0);
        assert_eq!(id.as_str(), token.as_str());
        let verified = key.verify(token.as_str()).unwrap();
        assert_eq!(verified.connection_id, id);
        assert_eq!(verified.owner, claims.owner);
        assert_eq!(verified.issued_at, claims.issued_at);
        assert!(token
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
    }

    #[test]
    fn version_one_connections_keep_separate_id_and_token() {
        let key = ClusterKey::from_secret(b"secret");
        let claims = claims();
        let (id, token) = key.mint_connection(&claims, 1);
        assert_eq!(id, claims.connection_id);
        assert_eq!(key.verify(token.as_str()), Ok(claims));
    }

    #[test]
    fn the_version_zero_marker_cannot_be_added_or_removed() {
        let key = ClusterKey::from_secret(b"secret");
        let v1 = key.mint(&claims()).as_str().to_owned();
        let (head, tag) = v1.rsplit_once('.').unwrap();
        assert_eq!(
            key.verify(&format!("{head}.v0.{tag}")),
            Err(TokenError::BadSignature)
        );
        let (_, v0) = key.mint_connection(&claims(), 0);
        let stripped = v0.as_str().replacen(".v0.", ".", 1);
        assert_eq!(key.verify(&stripped), Err(TokenError::BadSignature));
        let (_, v0) = key.mint_connection(&claims(), 0);
        let forged = v0.as_str().replacen(".v0.", ".v1.", 1);
        assert_eq!(key.verify(&forged), Err(TokenError::Malformed));
    }

    #[test]
    fn tokens_are_url_safe() {
        let token = ClusterKey::random().mint(&claims());
        assert!(token
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
    }

    #[test]
    fn a_token_from_another_secret_does_not_verify() {
        let token = ClusterKey::from_secret(b"one").mint(&claims());
        assert_eq!(
            ClusterKey::from_secret(b"two").verify(token.as_str()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn changing_any_part_of_a_token_breaks_it() {
        let key = ClusterKey::from_secret(b"secret");
        let token = key.mint(&claims()).as_str().to_owned();
        for (i, c) in token.char_indices() {
            let replacement = if c == 'A' { 'B' } else { 'A' };
            let mut forged = token.clone();
            forged.replace_range(i..i + 1, &replacement.to_string());
            assert!(key.verify(&forged).is_err(), "forged {forged} verified");
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let key = ClusterKey::random();
        for bad in [
            "",
            "a",
            "a.b.c",
            "a.b.c.d.e",
            "a b.c.1.x",
            "a.b.zz.x",
            "...",
        ] {
            assert_eq!(key.verify(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(InstanceId::parse("app-1_x").is_ok());
        for bad in ["", "a.b", "a b", "é", &"x".repeat(65)] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn probe_markers_expire_and_need_the_key() {
        let key = ClusterKey::from_secret(b"secret");
        let marker = key.probe_marker(1000);
        assert!(key.verify_probe_marker(&marker, 1010, 30));
        assert!(!key.verify_probe_marker(&marker, 1100, 30));
        assert!(!ClusterKey::from_secret(b"other").verify_probe_marker(&marker, 1000, 30));
        assert!(!key.verify_probe_marker("1000.AAAA", 1000, 30));
        assert!(!key.verify_probe_marker("nonsense", 1000, 30));
    }
}
