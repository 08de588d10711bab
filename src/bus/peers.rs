//! Peer discovery: which instances are alive, and which answer on which direct URL, for
//! routing (DESIGN.md, "Routing").
//!
//! Every instance sends a heartbeat over a bus — with its `ADVERTISE_URL` if it has one —
//! once when the bus (re)connects, asking the others to answer ([`Announcement::reply`]
//! false), and then every [`ANNOUNCE_EVERY`]. An instance not heard from for [`PEER_TTL`]
//! is forgotten, so a dead instance stops being a direct target and stops counting in the
//! cluster's size (which sizes the load balancer's attempt budget, see
//! [`crate::routing::ForwardBudget`]). An instance that stops gracefully says goodbye
//! ([`Peers::goodbye`]) and the others forget it at once, so it stops counting and being
//! asked well before [`PEER_TTL`]. This is not a method of the bus: the bus only carries
//! the announcements.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{Announcement, Bus, Envelope};
use crate::protocol::token::InstanceId;

/// How often an instance sends its heartbeat.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// An instance not heard from for this long is forgotten.
const PEER_TTL: Duration = Duration::from_secs(35);
/// How long after its first heartbeat an instance may still be learning of the others
/// (their answers travel one broker round trip; this leaves room for a busy machine).
const SETTLE: Duration = Duration::from_millis(500);

/// What is known of one other instance.
#[derive(Debug)]
struct Peer {
    url: Option<String>,
    seen: Instant,
}

/// The other instances, as their heartbeats describe them.
#[derive(Debug)]
pub struct Peers {
    instance: InstanceId,
    advertise_url: Option<String>,
    known: Mutex<HashMap<InstanceId, Peer>>,
    /// Set once this instance said goodbye: it announces itself no more.
    left: AtomicBool,
    /// When this instance first announced itself (or was made, until it does).
    greeted: OnceLock<Instant>,
    made: Instant,
}

impl Peers {
    /// Discovery for `instance`, which announces `advertise_url` if it has one.
    pub fn new(instance: InstanceId, advertise_url: Option<String>) -> Self {
        Self {
            instance,
            advertise_url,
            known: Mutex::new(HashMap::new()),
            left: AtomicBool::new(false),
            greeted: OnceLock::new(),
            made: Instant::now(),
        }
    }

    /// Waits until the answers to this instance's first heartbeat had time to arrive, so
    /// that a question to every live instance (a stateful session's handover) reaches
    /// them all even right after a (re)start. Returns at once for an instance that has
    /// been up for a while.
    pub async fn settled(&self) {
        let since = self.greeted.get().copied().unwrap_or(self.made);
        tokio::time::sleep_until((since + SETTLE).into()).await;
    }

    fn live<T>(&self, instance: &InstanceId, what: impl FnOnce(&Peer) -> T) -> Option<T> {
        let known = self.known.lock().ok()?;
        let peer = known.get(instance)?;
        (peer.seen.elapsed() < PEER_TTL).then(|| what(peer))
    }

    /// The direct URL `instance` announced recently, if any.
    pub fn url(&self, instance: &InstanceId) -> Option<String> {
        self.live(instance, |peer| peer.url.clone()).flatten()
    }

    /// Whether `instance` sent a heartbeat within [`PEER_TTL`].
    pub fn is_alive(&self, instance: &InstanceId) -> bool {
        self.live(instance, |_| ()).is_some()
    }

    /// The other instances heard from recently.
    pub fn live_instances(&self) -> Vec<InstanceId> {
        self.known.lock().map_or_else(
            |_| Vec::new(),
            |known| {
                known
                    .iter()
                    .filter(|(_, peer)| peer.seen.elapsed() < PEER_TTL)
                    .map(|(id, _)| id.clone())
                    .collect()
            },
        )
    }

    /// Instances in the cluster: this one and every other heard from within [`PEER_TTL`].
    pub fn cluster_size(&self) -> usize {
        let others = self.known.lock().map_or(0, |known| {
            known
                .values()
                .filter(|peer| peer.seen.elapsed() < PEER_TTL)
                .count()
        });
        others + 1
    }

    /// This instance's heartbeat.
    fn hello(&self, reply: bool) -> Envelope {
        Envelope::Announcement(Announcement {
            instance: self.instance.clone(),
            url: self.advertise_url.clone(),
            reply,
            leaving: false,
        })
    }

    /// Publishes this instance's heartbeat, unless it said goodbye.
    async fn announce(&self, bus: &dyn Bus, reply: bool) {
        if !self.left.load(Ordering::Acquire) {
            bus.publish(self.hello(reply)).await;
        }
    }

    /// Announces this instance on `bus`, asking the others to answer.
    pub async fn connected(&self, bus: &dyn Bus) {
        self.greeted.get_or_init(Instant::now);
        self.announce(bus, false).await;
    }

    /// Tells the others on `bus` that this instance is stopping, and waits (bounded) until
    /// the bus has handed that to its broker. No heartbeat follows it.
    pub async fn goodbye(&self, bus: &dyn Bus) {
        self.left.store(true, Ordering::Release);
        bus.publish(Envelope::Announcement(Announcement {
            instance: self.instance.clone(),
            url: None,
            reply: true,
            leaving: true,
        }))
        .await;
        bus.flush().await;
    }

    /// Records another instance's heartbeat, and answers a first one (even from a peer we
    /// know: it may have restarted and forgotten us).
    pub async fn receive(&self, announcement: Announcement, bus: &dyn Bus) {
        if announcement.instance == self.instance {
            return;
        }
        if announcement.leaving {
            if let Ok(mut known) = self.known.lock() {
                known.remove(&announcement.instance);
            }
            return;
        }
        if let Ok(mut known) = self.known.lock() {
            let peer = Peer {
                url: announcement.url,
                seen: Instant::now(),
            };
            known.insert(announcement.instance, peer);
            // Forget the dead now and then, so the map stays the cluster's size.
            known.retain(|_, peer| peer.seen.elapsed() < PEER_TTL * 4);
        }
        if !announcement.reply {
            self.announce(bus, true).await;
        }
    }

    /// Sends this instance's heartbeat on `bus` every [`ANNOUNCE_EVERY`], forever.
    pub async fn run(self: Arc<Self>, bus: Arc<dyn Bus>) {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        loop {
            tick.tick().await;
            self.announce(&*bus, true).await;
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

    fn announce(instance: &str, url: Option<&str>) -> Announcement {
        Announcement {
            instance: id(instance),
            url: url.map(str::to_owned),
            reply: true,
            leaving: false,
        }
    }

    #[tokio::test]
    async fn announced_urls_are_known_and_our_own_is_ignored() {
        let peers = Peers::new(id("me"), Some("http://me".into()));
        peers
            .receive(announce("b", Some("http://b")), &InProcess)
            .await;
        peers
            .receive(announce("me", Some("http://fake")), &InProcess)
            .await;
        assert_eq!(peers.url(&id("b")), Some("http://b".into()));
        assert_eq!(peers.url(&id("me")), None);
        assert_eq!(peers.url(&id("c")), None);
    }

    #[tokio::test]
    async fn heartbeats_without_a_url_count_in_the_cluster_size() {
        let peers = Peers::new(id("me"), None);
        assert_eq!(peers.cluster_size(), 1);
        peers.receive(announce("b", None), &InProcess).await;
        peers.receive(announce("c", None), &InProcess).await;
        peers.receive(announce("b", None), &InProcess).await;
        assert_eq!(peers.cluster_size(), 3);
        assert!(peers.is_alive(&id("b")));
        assert!(!peers.is_alive(&id("d")));
        assert_eq!(peers.url(&id("b")), None);
    }

    #[tokio::test]
    async fn a_goodbye_forgets_the_instance_at_once() {
        let peers = Peers::new(id("me"), None);
        peers
            .receive(announce("b", Some("http://b")), &InProcess)
            .await;
        peers.receive(announce("c", None), &InProcess).await;
        assert_eq!(peers.cluster_size(), 3);
        let goodbye = Announcement {
            leaving: true,
            ..announce("b", None)
        };
        peers.receive(goodbye, &InProcess).await;
        assert_eq!(peers.cluster_size(), 2);
        assert!(!peers.is_alive(&id("b")));
        assert_eq!(peers.url(&id("b")), None);
        assert!(peers.is_alive(&id("c")));
    }
}
