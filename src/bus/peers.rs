//! Peer discovery: which instance answers on which direct URL, for owner-directed
//! routing (DESIGN.md, "Routing").
//!
//! Instances with an `ADVERTISE_URL` announce it over a bus: once when the bus
//! (re)connects, asking the others to answer ([`Announcement::reply`] false), and then
//! every [`ANNOUNCE_EVERY`]. A URL not repeated for [`PEER_TTL`] is forgotten, so a dead
//! instance stops being a direct target. This is not a method of the bus: the bus only
//! carries the announcements.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Announcement, Bus, Envelope};
use crate::protocol::token::InstanceId;

/// How often an instance announces its direct URL.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// An announced URL is forgotten when not repeated for this long.
const PEER_TTL: Duration = Duration::from_secs(35);

/// The direct URLs of the other instances, as they announced them.
#[derive(Debug)]
pub struct Peers {
    instance: InstanceId,
    advertise_url: Option<String>,
    known: Mutex<HashMap<InstanceId, (String, Instant)>>,
}

impl Peers {
    /// Discovery for `instance`, which announces `advertise_url` if it has one.
    pub fn new(instance: InstanceId, advertise_url: Option<String>) -> Self {
        Self {
            instance,
            advertise_url,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The direct URL `instance` announced recently, if any.
    pub fn url(&self, instance: &InstanceId) -> Option<String> {
        let known = self.known.lock().ok()?;
        let (url, seen) = known.get(instance)?;
        (seen.elapsed() < PEER_TTL).then(|| url.clone())
    }

    /// This instance's announcement, if it advertises a URL.
    fn hello(&self, reply: bool) -> Option<Envelope> {
        let url = self.advertise_url.clone()?;
        Some(Envelope::Announcement(Announcement {
            instance: self.instance.clone(),
            url,
            reply,
        }))
    }

    /// Announces this instance on `bus`, asking the others to answer.
    pub async fn connected(&self, bus: &dyn Bus) {
        if let Some(hello) = self.hello(false) {
            bus.publish(hello).await;
        }
    }

    /// Records another instance's announcement, and answers a first one (even from a
    /// peer we know: it may have restarted and forgotten us).
    pub async fn receive(&self, announcement: Announcement, bus: &dyn Bus) {
        if announcement.instance == self.instance {
            return;
        }
        if let Ok(mut known) = self.known.lock() {
            known.insert(announcement.instance, (announcement.url, Instant::now()));
        }
        if !announcement.reply {
            if let Some(hello) = self.hello(true) {
                bus.publish(hello).await;
            }
        }
    }

    /// Announces this instance on `bus` every [`ANNOUNCE_EVERY`], forever.
    pub async fn run(self: Arc<Self>, bus: Arc<dyn Bus>) {
        if self.advertise_url.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        loop {
            tick.tick().await;
            if let Some(hello) = self.hello(true) {
                bus.publish(hello).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcess;

    fn id(name: &str) -> InstanceId {
        InstanceId::parse(name).unwrap()
    }

    #[tokio::test]
    async fn announced_urls_are_known_and_our_own_is_ignored() {
        let peers = Peers::new(id("me"), Some("http://me".into()));
        let announce = |instance: &str, url: &str| Announcement {
            instance: id(instance),
            url: url.into(),
            reply: true,
        };
        peers.receive(announce("b", "http://b"), &InProcess).await;
        peers
            .receive(announce("me", "http://fake"), &InProcess)
            .await;
        assert_eq!(peers.url(&id("b")), Some("http://b".into()));
        assert_eq!(peers.url(&id("me")), None);
        assert_eq!(peers.url(&id("c")), None);
    }
}
