//! Routing: the one place that decides where a request for a connection goes
//! (DESIGN.md, "Routing").
//!
//! For a request with `?id=TOKEN`:
//!
//! 1. the token does not verify → 404 at once, nothing forwarded (no amplification);
//! 2. the connection is here → serve it;
//! 3. the token names this instance, which no longer has it → 404 at once;
//! 4. the request is an internal probe → 404 at once: probes are never re-forwarded;
//! 5. otherwise the owner is elsewhere:
//!    - a WebSocket for a fresh token is **adopted**: served here, 0 extra hops (nothing
//!      else will ever look for it, since this server offers no stateful reconnect);
//!    - with the owner's advertised URL known, go **direct** (1 hop);
//!    - else **re-forward through the load balancer**, the reference technique
//!      (davidfowl/SmartLoadBalancer), up to `MAX_FORWARD_ATTEMPTS`.
//!
//! Forward targets come from configuration (and instances' own announcements over
//! Redis), never from request headers. A probe is recognised only by a marker signed with
//! the cluster secret, so a client cannot forge one to steer routing.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, ACCEPT, CONNECTION, UPGRADE};
use actix_web::http::Method;

use crate::bus::peers::Peers;
use crate::connection::{Connection, Connections};
use crate::metrics::Rejection;
use crate::protocol::negotiate::TransportKind;
use crate::protocol::token::{ClusterKey, ConnectionId, InstanceId, TokenClaims};

/// The header that marks a request sent by one instance to another.
pub const PROBE_HEADER: &str = "x-stickless-probe";

/// How far apart two instances' clocks may be for a probe marker to verify.
const PROBE_MAX_SKEW_SECS: u64 = 60;

/// What a request to `{hub}` is, by ASP.NET's rules (TransportProtocols.md; the table
/// in `HttpConnectionDispatcher.ExecuteAsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// GET with a WebSocket upgrade.
    WebSocket,
    /// GET accepting `text/event-stream`.
    EventStream,
    /// Any other GET: a long poll.
    Poll,
    /// POST: records from an SSE or long-polling client.
    Send,
    /// DELETE: a long-polling client stops.
    Delete,
}

impl RequestKind {
    /// Classifies a request; `None` for methods the endpoint does not take (405).
    pub fn classify(method: &Method, headers: &HeaderMap) -> Option<Self> {
        let has = |name, token: &str| {
            headers
                .get_all(name)
                .any(|value: &actix_web::http::header::HeaderValue| {
                    value
                        .to_str()
                        .is_ok_and(|v| v.to_ascii_lowercase().contains(token))
                })
        };
        match *method {
            Method::GET if has(UPGRADE, "websocket") && has(CONNECTION, "upgrade") => {
                Some(Self::WebSocket)
            }
            Method::GET if has(ACCEPT, "text/event-stream") => Some(Self::EventStream),
            Method::GET => Some(Self::Poll),
            Method::POST => Some(Self::Send),
            Method::DELETE => Some(Self::Delete),
            _ => None,
        }
    }

    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websockets",
            Self::EventStream => "server_sent_events",
            Self::Poll => "long_polling",
            Self::Send => "send",
            Self::Delete => "delete",
        }
    }

    /// The transport a GET starts or continues.
    pub fn transport(self) -> Option<TransportKind> {
        match self {
            Self::WebSocket => Some(TransportKind::WebSockets),
            Self::EventStream => Some(TransportKind::ServerSentEvents),
            Self::Poll => Some(TransportKind::LongPolling),
            Self::Send | Self::Delete => None,
        }
    }
}

/// Where a request should go.
#[derive(Debug)]
pub enum Route {
    /// Serve it from this connection.
    Local(Arc<Connection>),
    /// Serve a WebSocket here for a connection another instance negotiated.
    Adopt(TokenClaims),
    /// Send it to another instance.
    Forward(ForwardPlan),
    /// Answer 404 without asking anyone.
    Reject(Rejection),
}

/// How to reach the owner of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardPlan {
    /// The instance that owns the connection, for logs.
    pub owner: InstanceId,
    /// The connection, for logs.
    pub connection_id: ConnectionId,
    /// The owner's advertised URL, tried first.
    pub direct: Option<String>,
    /// The load balancer's URL and how many times to try it.
    pub load_balancer: Option<(String, u32)>,
}

/// The routing policy of one instance.
pub struct Router {
    instance: InstanceId,
    /// The cluster key: it signs the markers of internal probes.
    key: ClusterKey,
    load_balancer: Option<String>,
    max_attempts: u32,
    adoption_window: Option<Duration>,
    peers: Arc<Peers>,
}

impl Router {
    /// A router. `adoption_window` is how old a token may be for its WebSocket to be
    /// adopted (`None` turns adoption off); it is the disconnect timeout, after which the
    /// owner has dropped a connection that never started anyway.
    pub fn new(
        instance: InstanceId,
        key: ClusterKey,
        load_balancer: Option<String>,
        max_attempts: u32,
        adoption_window: Option<Duration>,
        peers: Arc<Peers>,
    ) -> Self {
        Self {
            instance,
            key,
            load_balancer,
            max_attempts,
            adoption_window,
            peers,
        }
    }

    /// Whether a request carries a valid probe marker.
    pub fn is_probe(&self, marker: Option<&str>, now_secs: u64) -> bool {
        marker.is_some_and(|m| {
            self.key
                .verify_probe_marker(m, now_secs, PROBE_MAX_SKEW_SECS)
        })
    }

    /// Decides where the request for `token`, which `key` signed, goes.
    pub fn route(
        &self,
        key: &ClusterKey,
        connections: &Connections,
        token: &str,
        probe: bool,
        websocket: bool,
        now_secs: u64,
    ) -> Route {
        let Ok(claims) = key.verify(token) else {
            return Route::Reject(Rejection::BadToken);
        };
        if let Some(connection) = connections.get(token) {
            return Route::Local(connection);
        }
        if claims.owner == self.instance {
            return Route::Reject(Rejection::Gone);
        }
        if probe {
            return Route::Reject(Rejection::ProbeMiss);
        }
        let fresh = self
            .adoption_window
            .is_some_and(|window| now_secs.saturating_sub(claims.issued_at) <= window.as_secs());
        if websocket && fresh {
            return Route::Adopt(claims);
        }
        let plan = ForwardPlan {
            owner: claims.owner.clone(),
            connection_id: claims.connection_id.clone(),
            direct: self.peers.url(&claims.owner),
            load_balancer: self
                .load_balancer
                .clone()
                .filter(|_| self.max_attempts > 0)
                .map(|url| (url, self.max_attempts)),
        };
        if plan.direct.is_none() && plan.load_balancer.is_none() {
            return Route::Reject(Rejection::NoRoute);
        }
        Route::Forward(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcess;
    use crate::config::Settings;
    use crate::connection::SessionConfig;
    use crate::hub::host::HubHost;
    use crate::hub::Hub;
    use crate::metrics::Metrics;

    const NOW: u64 = 1_800_000_000;

    fn setup(lb: Option<&str>, attempts: u32) -> (Router, Connections, ClusterKey) {
        let key = ClusterKey::from_secret(b"0123456789abcdef");
        let me = InstanceId::parse("me").unwrap();
        let metrics = Arc::new(Metrics::default());
        let host = HubHost::new(
            Hub::builder("t").build().unwrap(),
            Arc::new(InProcess),
            me.clone(),
        );
        let connections = Connections::new(
            Arc::new(host),
            metrics,
            SessionConfig::from_settings(&Settings::default()),
        );
        let router = Router::new(
            me,
            key.clone(),
            lb.map(str::to_owned),
            attempts,
            Some(Duration::from_secs(15)),
            Arc::new(Peers::new(InstanceId::parse("me").unwrap(), None)),
        );
        (router, connections, key)
    }

    fn token(key: &ClusterKey, owner: &str, issued_at: u64) -> String {
        key.mint(&TokenClaims {
            owner: InstanceId::parse(owner).unwrap(),
            connection_id: ConnectionId::random(),
            issued_at,
        })
        .as_str()
        .to_owned()
    }

    #[test]
    fn forged_tokens_are_rejected_without_forwarding() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let forged = token(
            &ClusterKey::from_secret(b"not the cluster secret"),
            "other",
            NOW,
        );
        assert!(matches!(
            router.route(&key, &connections, &forged, false, false, NOW),
            Route::Reject(Rejection::BadToken)
        ));
        assert!(matches!(
            router.route(&key, &connections, "random", false, true, NOW),
            Route::Reject(Rejection::BadToken)
        ));
    }

    #[test]
    fn our_own_lost_connections_and_probes_are_not_forwarded() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let mine = token(&key, "me", NOW);
        assert!(matches!(
            router.route(&key, &connections, &mine, false, false, NOW),
            Route::Reject(Rejection::Gone)
        ));
        let theirs = token(&key, "other", NOW);
        assert!(matches!(
            router.route(&key, &connections, &theirs, true, false, NOW),
            Route::Reject(Rejection::ProbeMiss)
        ));
    }

    #[test]
    fn other_owners_are_reached_through_the_load_balancer() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let theirs = token(&key, "other", NOW);
        let Route::Forward(plan) = router.route(&key, &connections, &theirs, false, false, NOW)
        else {
            panic!("not forwarded");
        };
        assert_eq!(plan.owner.as_str(), "other");
        assert_eq!(plan.direct, None);
        assert_eq!(plan.load_balancer, Some(("http://lb".into(), 10)));
    }

    #[test]
    fn a_budget_of_zero_disables_forwarding() {
        let (router, connections, key) = setup(Some("http://lb"), 0);
        let theirs = token(&key, "other", NOW);
        assert!(matches!(
            router.route(&key, &connections, &theirs, false, false, NOW),
            Route::Reject(Rejection::NoRoute)
        ));
    }

    #[test]
    fn fresh_websockets_are_adopted_and_stale_ones_forwarded() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let fresh = token(&key, "other", NOW - 3);
        assert!(matches!(
            router.route(&key, &connections, &fresh, false, true, NOW),
            Route::Adopt(_)
        ));
        let stale = token(&key, "other", NOW - 60);
        assert!(matches!(
            router.route(&key, &connections, &stale, false, true, NOW),
            Route::Forward(_)
        ));
    }

    #[test]
    fn probe_markers_must_be_signed_with_the_cluster_key() {
        let (router, _, key) = setup(None, 10);
        assert!(router.is_probe(Some(&key.probe_marker(NOW)), NOW));
        assert!(!router.is_probe(Some(&ClusterKey::random().probe_marker(NOW)), NOW));
        assert!(!router.is_probe(Some("1.x"), NOW));
        assert!(!router.is_probe(None, NOW));
    }
}
