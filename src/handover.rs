//! Moving a stateful-reconnect session to the instance its client's new WebSocket reached
//! (DESIGN.md, "Routing" item 6; README, "Stateful reconnect").
//!
//! The instance that received the WebSocket (the *puller*) first starts receiving for the
//! connection ([`crate::connection::Connections::begin_move`]), then asks where the session
//! is and which groups it is in: `POST {hub}?id=TOKEN&handover=groups`, marked as an
//! internal probe, sent to the token's owner and every other live instance at once,
//! directly (advertised URL) or relayed over the bus. The instance that holds it answers
//! with the groups (nothing changes there); every other answers 404. The puller joins those
//! groups too, then asks that instance for the session: `POST {hub}?id=TOKEN&handover=1`
//! (and, should it have moved on meanwhile, every live instance again). The holder fences
//! every topic the session hears (`HubHost::fence`), freezes it and answers 200 with its
//! state ([`Moved`], JSON here). Its registry removal is atomic, so a session is never
//! served by two instances, and a second puller gets 404.
//!
//! Wire form of the state: JSON with the replay records in base64url, so that MessagePack
//! records travel as they are.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

use crate::bus::peers::Peers;
use crate::connection::Moved;
use crate::forwarding::frame::{Frame, Open};
use crate::forwarding::relay::{Opened, Relay};
use crate::outbox::{MessageId, ReplayState};
use crate::protocol::hub_protocol::HubProtocol;
use crate::protocol::token::{ClusterKey, InstanceId};
use crate::routing::PROBE_HEADER;

/// The query flag of a handover request.
pub const HANDOVER_FLAG: &str = "handover";
/// Its value for the first step: the session's groups, nothing frozen.
pub const HANDOVER_GROUPS: &str = "groups";

/// Longest wait for one instance's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest session state accepted (the replay buffer is bounded; this bounds the rest).
const MAX_STATE_BYTES: usize = 16 * 1024 * 1024;

/// A session's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Not the JSON of a session.
    #[error("malformed session state: {0}")]
    Json(#[from] serde_json::Error),
    /// A record is not base64url.
    #[error("malformed replay record: {0}")]
    Record(#[from] base64::DecodeError),
    /// A protocol this server does not speak.
    #[error("unknown hub protocol {0:?}")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    user: Option<String>,
    groups: Vec<String>,
    protocol: String,
    next: u64,
    limit: usize,
    records: Vec<(u64, String)>,
    /// Message ids of records, by sequence number (absent from an instance that sends
    /// none: the records are then told apart by bytes, `Outbox::complete_move`).
    #[serde(default)]
    ids: Vec<(u64, u64)>,
    processed: u64,
    acked: u64,
    fresh: bool,
}

/// Encodes a session's state for the instance that pulls it.
pub fn encode(moved: &Moved) -> Vec<u8> {
    let wire = Wire {
        user: moved.user.clone(),
        groups: moved.groups.clone(),
        protocol: moved.protocol.name().to_owned(),
        next: moved.replay.next,
        limit: moved.replay.limit,
        records: moved
            .replay
            .records
            .iter()
            .map(|(n, r)| (*n, URL_SAFE_NO_PAD.encode(r)))
            .collect(),
        ids: moved.replay.ids.iter().map(|(n, id)| (*n, id.0)).collect(),
        processed: moved.processed,
        acked: moved.acked,
        fresh: moved.fresh,
    };
    // A struct of strings and numbers always serializes.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// Decodes a session's state from the instance that held it.
pub fn decode(bytes: &[u8]) -> Result<Moved, HandoverError> {
    let wire: Wire = serde_json::from_slice(bytes)?;
    let protocol =
        HubProtocol::from_name(&wire.protocol).ok_or(HandoverError::Protocol(wire.protocol))?;
    let records = wire
        .records
        .into_iter()
        .map(|(n, r)| Ok((n, Bytes::from(URL_SAFE_NO_PAD.decode(r)?))))
        .collect::<Result<Vec<_>, base64::DecodeError>>()?;
    Ok(Moved {
        user: wire.user,
        groups: wire.groups,
        protocol,
        replay: ReplayState {
            next: wire.next,
            records,
            ids: wire
                .ids
                .into_iter()
                .map(|(n, id)| (n, MessageId(id)))
                .collect(),
            limit: wire.limit,
        },
        processed: wire.processed,
        acked: wire.acked,
        fresh: wire.fresh,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How this instance reaches the others to pull a session.
pub struct Puller<'a> {
    /// This instance.
    pub me: &'a InstanceId,
    /// Live instances and their advertised URLs.
    pub peers: &'a Peers,
    /// The bus relay, if the bus reaches other instances.
    pub relay: Option<&'a std::sync::Arc<Relay>>,
    /// Signs the probe marker of direct requests.
    pub key: &'a ClusterKey,
}

impl Puller<'_> {
    /// Asks the token's owner and every other live instance where the session is: the
    /// instance that holds it and the session's groups there, or `None` if none does.
    pub async fn locate(
        &self,
        hub_path: &str,
        token: &str,
        owner: &InstanceId,
    ) -> Option<(InstanceId, Vec<String>)> {
        let path = format!("{hub_path}?id={token}&{HANDOVER_FLAG}={HANDOVER_GROUPS}");
        self.ask_around(&path, owner, |body| {
            serde_json::from_slice::<Vec<String>>(body).map_err(HandoverError::Json)
        })
        .await
    }

    /// Asks `holder` (and every other live instance, in case the session moved on) for the
    /// session; the state of the one that held it (its registry removal is atomic: only
    /// one can), or `None`.
    pub async fn pull(&self, hub_path: &str, token: &str, holder: &InstanceId) -> Option<Moved> {
        let path = format!("{hub_path}?id={token}&{HANDOVER_FLAG}=1");
        self.ask_around(&path, holder, decode)
            .await
            .map(|(_, moved)| moved)
    }

    /// Asks `first` and every other live instance at once; the first good answer.
    ///
    /// Instances that became known while the first round was out are asked in a second
    /// one: an instance that just started learns its peers from their answers to its
    /// first heartbeat, and the session may be held by any of them.
    async fn ask_around<T>(
        &self,
        path: &str,
        first: &InstanceId,
        read: impl Fn(&[u8]) -> Result<T, HandoverError>,
    ) -> Option<(InstanceId, T)> {
        // Right after a (re)start this instance may not know every peer yet.
        self.peers.settled().await;
        let mut asked: Vec<InstanceId> = vec![self.me.clone()];
        let mut candidates = vec![first.clone()];
        for _ in 0..2 {
            candidates.extend(self.peers.live_instances());
            // Each instance once: the owner is usually among the live ones too.
            let round: Vec<InstanceId> = candidates
                .drain(..)
                .filter(|instance| {
                    let new = !asked.contains(instance);
                    if new {
                        asked.push(instance.clone());
                    }
                    new
                })
                .collect();
            if round.is_empty() {
                continue;
            }
            if let Some(answer) = self.ask_all(path, &round, &read).await {
                return Some(answer);
            }
        }
        None
    }

    /// Asks `instances` at once and returns as soon as one answers 200 with something
    /// `read` accepts: a dead instance costs one timeout, not one per candidate, so a
    /// client whose instance was killed learns it (404) and starts anew quickly.
    async fn ask_all<T>(
        &self,
        path: &str,
        instances: &[InstanceId],
        read: &impl Fn(&[u8]) -> Result<T, HandoverError>,
    ) -> Option<(InstanceId, T)> {
        let mut asks: FuturesUnordered<_> = instances
            .iter()
            .map(|instance| async move {
                let ask = async {
                    match self.peers.url(instance) {
                        Some(url) => self.ask_direct(&url, path).await,
                        None => self.ask_over_bus(instance, path).await,
                    }
                };
                // One bound for the whole exchange, the bus relay's accept wait included.
                let answer = tokio::time::timeout(ASK_TIMEOUT, ask).await.ok().flatten();
                (instance, answer)
            })
            .collect();
        while let Some((instance, answer)) = asks.next().await {
            match answer.map(|body| read(&body)) {
                Some(Ok(value)) => {
                    log::debug!("handover step {path:?} answered by {instance}");
                    return Some((instance.clone(), value));
                }
                Some(Err(error)) => log::warn!("handover from {instance}: {error}"),
                None => {}
            }
        }
        None
    }

    async fn ask_direct(&self, base: &str, path: &str) -> Option<Bytes> {
        let client = awc::Client::builder()
            .timeout(ASK_TIMEOUT)
            .disable_redirects()
            .finish();
        let mut response = client
            .post(format!("{base}{path}"))
            .insert_header((PROBE_HEADER, self.key.probe_marker(now_secs())))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.body().limit(MAX_STATE_BYTES).await.ok()
    }

    async fn ask_over_bus(&self, instance: &InstanceId, path: &str) -> Option<Bytes> {
        let relay = self.relay?;
        let open = Open {
            reply_to: String::new(),
            method: "POST".into(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            websocket: false,
        };
        let Opened::Accepted(mut exchange) = relay.open(instance, open).await else {
            return None;
        };
        let mut body = BytesMut::new();
        let mut ok = false;
        let collect = async {
            while let Some(frame) = exchange.next().await {
                match frame {
                    Frame::Head { status, .. } => ok = status == 200,
                    Frame::Data(chunk) if body.len() + chunk.len() <= MAX_STATE_BYTES => {
                        body.extend_from_slice(&chunk)
                    }
                    Frame::End => break,
                    _ => return false,
                }
            }
            true
        };
        // Bounded by the caller (`ask_all`), accept wait and all.
        let complete = collect.await;
        (complete && ok).then(|| body.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_state_survives_its_wire_form() {
        let moved = Moved {
            user: Some("ann".into()),
            groups: vec!["room".into()],
            protocol: HubProtocol::MessagePack,
            replay: ReplayState {
                next: 9,
                records: vec![(7, Bytes::from_static(b"\x03\x91\x06")), (8, Bytes::new())],
                ids: vec![(8, MessageId(u64::MAX))],
                limit: 100_000,
            },
            processed: 4,
            acked: 3,
            fresh: false,
        };
        assert_eq!(decode(&encode(&moved)).unwrap(), moved);
    }

    #[test]
    fn a_bad_state_is_an_error_not_a_panic() {
        assert!(decode(b"{").is_err());
        let bad_record = br#"{"user":null,"groups":[],"protocol":"json","next":1,"limit":1,"records":[[1,"***"]],"processed":0,"acked":0,"fresh":false}"#;
        assert!(matches!(decode(bad_record), Err(HandoverError::Record(_))));
        let bad_protocol = br#"{"user":null,"groups":[],"protocol":"xml","next":1,"limit":1,"records":[],"processed":0,"acked":0,"fresh":false}"#;
        assert!(matches!(
            decode(bad_protocol),
            Err(HandoverError::Protocol(_))
        ));
    }
}
