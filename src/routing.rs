//! Routing: the one place that decides where a request for a connection goes
//! (DESIGN.md, "Routing").
//!
//! For a request with `?id=TOKEN`:
//!
//! 1. the token does not verify → 404 at once, nothing forwarded (no amplification);
//! 2. the connection is here → serve it;
//!    - a stateful-reconnect WebSocket held nowhere here moves its session here
//!      ([`Route::Pull`], [`crate::handover`]), even when the token names this instance: the
//!      session may have moved away and back;
//! 3. the token names this instance, which no longer has it → 404 at once;
//! 4. the request is an internal probe → 404 at once: probes are never re-forwarded;
//! 5. this instance is draining and the request would start a long-lived relay or adoption
//!    (a WebSocket, an event stream, a long poll) → 503 with `Retry-After` at once
//!    ([`Rejection::Draining`]): the process exits soon and would cut it, while the load
//!    balancer can send it to a live instance (nginx.conf's `proxy_next_upstream`). Short
//!    sends and DELETEs are still forwarded: they finish well before the exit;
//! 6. otherwise the owner is elsewhere, and the routes `ROUTES` enables are tried in one
//!    fixed order, cheapest first:
//!    - `adopt`: a WebSocket for a fresh token is served here, 0 extra hops (nothing else
//!      will ever look for it; stateful-reconnect tokens, whose client comes back, are
//!      never adopted);
//!    - `direct`: with the owner's advertised URL known, go straight to it (1 hop). If it
//!      cannot be reached (a network error, not a 404), the next route is tried;
//!    - `bus`: with a shared bus (Redis) up, relay the request to the owner over the bus
//!      and the answer back (1 broker round trip, see [`crate::relay`]). It needs no
//!      connectivity between instances; an owner that does not answer within
//!      [`crate::relay::ACCEPT_TIMEOUT`] is taken as gone or unreachable;
//!    - `load-balancer`: re-forward through the load balancer, the reference technique
//!      (davidfowl/SmartLoadBalancer), up to a budget ([`ForwardBudget`]) sized from the
//!      cluster's size, which heartbeats over the bus tell ([`Peers`]);
//!    - else 404, as ASP.NET answers (`No Connection with that ID`).
//!
//! Tokens are single-use across the cluster, as on one ASP.NET server (404 for a token
//! whose connection ended, 409 for a second transport of a live connection), through
//! cluster-wide claims kept by the bus ([`crate::bus::claims`]), checked only where a
//! request would otherwise start something or answer 404 — never for a request served
//! here on an already-started connection:
//!
//! - the first transport request of a connection, wherever it starts (served here, the
//!   owner included, or adopted): [`Router::admit`] takes the claim; held by another
//!   instance → 409, closed → 404;
//! - a send or DELETE for a connection negotiated here that has not started here
//!   ([`Router::claimed_elsewhere`], which reads the claim): it started elsewhere → 409,
//!   ended → 404 (and the copy negotiated here is dropped);
//! - a token this instance would answer 404 for ("gone", step 3): [`Router::gone`] reads
//!   the claim; held by another instance (which adopted it) → 409.
//!
//! Stateful-reconnect tokens take no claims: their session moves ([`Route::Pull`]), and is
//! in one place by construction. Without a shared bus, or with its broker unreachable,
//! the claim is unknown and the request is served as before.
//!
//! Why this order: adoption costs nothing; direct costs one TCP hop; the bus costs one
//! broker round trip per message but needs no path between instances; re-forwarding
//! costs about N requests per miss and, with a random balancer, still misses sometimes.
//! The defaults enable all four, so the same settings work in docker compose (instances
//! reach each other), on Kubernetes (pod IPs as `ADVERTISE_URL`) and where instances
//! cannot reach each other at all (the bus, then the balancer).
//!
//! Forward targets come from configuration (and instances' own announcements over
//! Redis), never from request headers. A probe is recognised only by a marker signed with
//! the cluster secret, so a client cannot forge one to steer routing.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::seq::IndexedRandom;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, ACCEPT, CONNECTION, UPGRADE};
use actix_web::http::Method;

use crate::bus::peers::Peers;
use crate::bus::{Bus, Claim};
use crate::connection::{Connection, Connections};
use crate::metrics::Rejection;
use crate::protocol::negotiate::TransportKind;
use crate::protocol::token::{is_stateful, ClusterKey, ConnectionId, InstanceId, TokenClaims};

/// The header that marks a request sent by one instance to another.
pub const PROBE_HEADER: &str = "x-stickless-probe";

/// How far apart two instances' clocks may be for a probe marker to verify.
const PROBE_MAX_SKEW_SECS: u64 = 60;

/// One way of reaching a connection held elsewhere (see the module doc for the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Serve a fresh WebSocket here.
    Adopt,
    /// Send the request to the owner's advertised URL.
    Direct,
    /// Relay the request to the owner over the bus.
    Bus,
    /// Re-forward the request through the load balancer.
    LoadBalancer,
}

impl RouteKind {
    /// Every route, in the order they are tried.
    pub const ORDER: [Self; 4] = [Self::Adopt, Self::Direct, Self::Bus, Self::LoadBalancer];

    /// The name in `ROUTES`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Adopt => "adopt",
            Self::Direct => "direct",
            Self::Bus => "bus",
            Self::LoadBalancer => "load-balancer",
        }
    }
}

/// The routes `ROUTES` enables; the order they are tried in is always [`RouteKind::ORDER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes([bool; 4]);

impl Routes {
    /// Every route.
    pub const ALL: Self = Self([true; 4]);

    fn index(kind: RouteKind) -> usize {
        match kind {
            RouteKind::Adopt => 0,
            RouteKind::Direct => 1,
            RouteKind::Bus => 2,
            RouteKind::LoadBalancer => 3,
        }
    }

    /// Whether `kind` is enabled.
    pub fn has(self, kind: RouteKind) -> bool {
        self.0[Self::index(kind)]
    }

    /// The same routes without `kind`.
    pub fn without(mut self, kind: RouteKind) -> Self {
        self.0[Self::index(kind)] = false;
        self
    }
}

impl Default for Routes {
    fn default() -> Self {
        Self::ALL
    }
}

impl FromStr for Routes {
    type Err = String;

    /// A comma-separated list such as `adopt,direct,bus,load-balancer`; `none` (or an
    /// empty list) turns every route off.
    fn from_str(raw: &str) -> Result<Self, String> {
        let mut routes = Self([false; 4]);
        for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.eq_ignore_ascii_case("none") {
                continue;
            }
            let kind = RouteKind::ORDER
                .into_iter()
                .find(|kind| kind.name().eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    format!("unknown route {name:?}: use adopt, direct, bus, load-balancer or none")
                })?;
            routes.0[Self::index(kind)] = true;
        }
        Ok(routes)
    }
}

impl fmt::Display for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = RouteKind::ORDER
            .into_iter()
            .filter(|kind| self.has(*kind))
            .map(RouteKind::name)
            .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// The most attempts `MAX_FORWARD_ATTEMPTS=auto` spends on one misrouted request. 128
/// keeps misses at or under one in a million up to 9 instances and at or under 0.1 % up to
/// 19 under a random balancer; past that enable `direct` or `bus`, which never miss a live
/// owner.
pub const AUTO_BUDGET_CAP: u32 = 128;
/// The budget while the cluster's size is unknown (no heartbeat heard yet): the reference
/// technique's default.
pub const AUTO_BUDGET_FLOOR: u32 = 10;
/// The miss rate `auto` sizes the budget for: one misrouted request in a million. A miss
/// costs a send (and with it an SSE or long-polling connection), so the budget is sized
/// for it to practically never happen; attempts are spent only until the owner answers.
const AUTO_TARGET_MISS_RATE: f64 = 1e-6;

/// How many times a misrouted request is re-forwarded through the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardBudget {
    /// Sized from the cluster's size: see [`ForwardBudget::attempts`].
    Auto,
    /// A fixed number; 0 turns re-forwarding off.
    Fixed(u32),
}

impl ForwardBudget {
    /// The attempts for a cluster of `instances`. With a random balancer each attempt
    /// reaches the owner with probability 1/N, so k attempts all miss with probability
    /// (1 − 1/N)^k; `auto` takes the least k with (1 − 1/N)^k ≤ 10⁻⁶, that is
    /// k = ⌈ln 10⁻⁶ / ln(1 − 1/N)⌉ (20 at N = 2, 49 at 4, 118 at 9), at least
    /// [`AUTO_BUDGET_FLOOR`] and at most [`AUTO_BUDGET_CAP`]. A round-robin balancer
    /// needs far fewer (about N), and the forwarder's random pauses between attempts keep
    /// it from doing worse than a random one; attempts are spent only until the owner
    /// answers.
    pub fn attempts(self, instances: usize) -> u32 {
        match self {
            Self::Fixed(attempts) => attempts,
            Self::Auto if instances < 2 => AUTO_BUDGET_FLOOR,
            Self::Auto => {
                let miss_once = 1.0 - 1.0 / instances as f64;
                let k = (AUTO_TARGET_MISS_RATE.ln() / miss_once.ln()).ceil();
                (k as u32).clamp(AUTO_BUDGET_FLOOR, AUTO_BUDGET_CAP)
            }
        }
    }
}

impl FromStr for ForwardBudget {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        if raw.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match raw.trim().parse::<u32>() {
            Ok(attempts) if attempts <= 1000 => Ok(Self::Fixed(attempts)),
            _ => Err(format!("{raw:?} is not `auto` or a number from 0 to 1000")),
        }
    }
}

impl fmt::Display for ForwardBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(attempts) => write!(f, "{attempts}"),
        }
    }
}

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
    /// A stateful-reconnect WebSocket for a session held elsewhere: move the session here
    /// and resume it (DESIGN.md, "Routing" item 6).
    Pull(TokenClaims),
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
    /// Relay over the bus next.
    pub bus: bool,
    /// The load balancer's URL and how many times to try it.
    pub load_balancer: Option<(String, u32)>,
    /// The owner sent a heartbeat recently: a long poll that misses it may be answered
    /// with an empty 200 rather than 404 (see `Forwarder::exhausted`).
    pub owner_alive: bool,
}

/// The routing policy of one instance.
pub struct Router {
    instance: InstanceId,
    /// The cluster key: it signs the markers of internal probes.
    key: ClusterKey,
    load_balancer: Option<String>,
    budget: ForwardBudget,
    routes: Routes,
    adoption_window: Option<Duration>,
    peers: Arc<Peers>,
    /// The bus requests are relayed over (the first hub's), if it reaches other instances.
    relay_bus: Option<Arc<dyn Bus>>,
}

impl Router {
    /// A router that tries the enabled `routes`. `adoption_window` is how old a token may
    /// be for its WebSocket to be adopted (`None` turns adoption off); it is the
    /// disconnect timeout, after which the owner has dropped a connection that never
    /// started anyway. `relay_bus` is the bus requests are relayed over.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instance: InstanceId,
        key: ClusterKey,
        load_balancer: Option<String>,
        budget: ForwardBudget,
        routes: Routes,
        adoption_window: Option<Duration>,
        peers: Arc<Peers>,
        relay_bus: Option<Arc<dyn Bus>>,
    ) -> Self {
        let routes = match adoption_window {
            Some(_) => routes,
            None => routes.without(RouteKind::Adopt),
        };
        Self {
            instance,
            key,
            load_balancer,
            budget,
            routes,
            adoption_window,
            peers,
            relay_bus: relay_bus.filter(|bus| bus.is_shared()),
        }
    }

    /// The routes enabled.
    pub fn routes(&self) -> Routes {
        self.routes
    }

    /// The other instances, as heartbeats tell (this instance says goodbye through it).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The cluster key, which signs the markers of internal requests.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Instances in the cluster, as heartbeats tell.
    pub fn cluster_size(&self) -> usize {
        self.peers.cluster_size()
    }

    /// The load balancer's attempt budget now.
    pub fn attempts(&self) -> u32 {
        self.budget.attempts(self.cluster_size())
    }

    /// Whether a request carries a valid probe marker.
    pub fn is_probe(&self, marker: Option<&str>, now_secs: u64) -> bool {
        marker.is_some_and(|m| {
            self.key
                .verify_probe_marker(m, now_secs, PROBE_MAX_SKEW_SECS)
        })
    }

    /// Where a stateful-reconnect WebSocket goes while this instance drains: to another
    /// live instance (directly or over the bus), which moves the session there — also when
    /// it is held here, which hands it over. A draining instance never takes a session in,
    /// since it would take it down with it. `None` for any other request, or when no other
    /// instance is known (then the usual routes apply).
    pub fn route_while_draining(&self, key: &ClusterKey, token: &str) -> Option<Route> {
        let claims = key.verify(token).ok()?;
        if !is_stateful(token) {
            return None;
        }
        let bus = self.relay_bus.as_ref().is_some_and(|bus| bus.is_healthy());
        let reachable: Vec<InstanceId> = self
            .peers
            .live_instances()
            .into_iter()
            .filter(|peer| bus || self.peers.url(peer).is_some())
            .collect();
        let peer = reachable.choose(&mut rand::rng())?.clone();
        Some(Route::Forward(ForwardPlan {
            direct: self.peers.url(&peer),
            bus,
            load_balancer: None,
            owner_alive: true,
            owner: peer,
            connection_id: claims.connection_id,
        }))
    }

    /// Whether the first transport request of the connection `claims` names (token
    /// `token`) may start on this instance, by its cluster-wide claim on `bus`: `Ok(true)`
    /// when this instance now holds the claim (it refreshes it, and closes it when the
    /// connection ends), `Ok(false)` when there is no claim to hold (stateful tokens, an
    /// in-process bus, an unreachable broker: served as without claims), or the refusal
    /// ([`Router::refusal`]).
    pub async fn admit(
        &self,
        bus: &dyn Bus,
        token: &str,
        claims: &TokenClaims,
    ) -> Result<bool, Rejection> {
        if is_stateful(token) {
            return Ok(false);
        }
        let claim = bus.claim(&claims.connection_id).await;
        match self.refusal(&claim) {
            Some(why) => Err(why),
            None => Ok(matches!(claim, Claim::Held(holder) if holder == self.instance)),
        }
    }

    /// Why a request for a connection that has not started here must not reach it here
    /// (`key` signed `token`): it started elsewhere or ended, by its claim on `bus`
    /// (read, not taken). `None` when nothing is known against it.
    pub async fn claimed_elsewhere(
        &self,
        bus: &dyn Bus,
        key: &ClusterKey,
        token: &str,
    ) -> Option<Rejection> {
        if is_stateful(token) {
            return None;
        }
        let claims = key.verify(token).ok()?;
        self.refusal(&bus.lookup_claim(&claims.connection_id).await)
    }

    /// What a request for a connection this instance does not hold (and would answer 404
    /// for, `why`) is told: the claim's refusal if there is one (409 while another instance
    /// serves it, which adopted it), else `why`. Only for [`Rejection::Gone`]: the other
    /// refusals never name a live connection (a forged token, a probe, no route,
    /// draining).
    pub async fn gone(
        &self,
        bus: &dyn Bus,
        key: &ClusterKey,
        token: &str,
        why: Rejection,
    ) -> Rejection {
        if why != Rejection::Gone {
            return why;
        }
        self.claimed_elsewhere(bus, key, token).await.unwrap_or(why)
    }

    /// What a claim forbids here: [`Rejection::InUse`] (409) while another instance
    /// serves the connection, [`Rejection::Reused`] (404) once it ended.
    fn refusal(&self, claim: &Claim) -> Option<Rejection> {
        match claim {
            Claim::Held(holder) if *holder != self.instance => Some(Rejection::InUse),
            Claim::Closed => Some(Rejection::Reused),
            Claim::Held(_) | Claim::Free | Claim::Unknown => None,
        }
    }

    /// Decides where the request of `kind` for `token`, which `key` signed, goes;
    /// `draining` once this instance's shutdown has begun.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        key: &ClusterKey,
        connections: &Connections,
        token: &str,
        kind: RequestKind,
        probe: bool,
        draining: bool,
        now_secs: u64,
    ) -> Route {
        let websocket = kind == RequestKind::WebSocket;
        let Ok(claims) = key.verify(token) else {
            return Route::Reject(Rejection::BadToken);
        };
        if let Some(connection) = connections.get(token) {
            return Route::Local(connection);
        }
        // Before the owner check: a session may have moved away from its owner and back.
        // Probes too: a draining instance sends its stateful WebSockets here to move.
        let cluster = self.relay_bus.is_some() || self.peers.cluster_size() > 1;
        if websocket && cluster && is_stateful(token) {
            return Route::Pull(claims);
        }
        if claims.owner == self.instance {
            return Route::Reject(Rejection::Gone);
        }
        if probe {
            return Route::Reject(Rejection::ProbeMiss);
        }
        // A relay or an adopted socket started now would be cut when this process exits
        // (`SHUTDOWN_TIMEOUT` at most): refused with 503, which nginx.conf retries on the
        // next instance. A POST send or a DELETE is still forwarded: it is one short
        // exchange that ends long before the exit, and refusing it would lose a message
        // nginx must not resend (a POST may have been processed).
        if draining && kind.transport().is_some() {
            return Route::Reject(Rejection::Draining);
        }
        let fresh = self
            .adoption_window
            .is_some_and(|window| now_secs.saturating_sub(claims.issued_at) <= window.as_secs());
        // A stateful-reconnect token is never adopted: its client may come back later on
        // another socket, and the session must then be in exactly one place.
        if websocket && fresh && self.routes.has(RouteKind::Adopt) && !is_stateful(token) {
            return Route::Adopt(claims);
        }
        let attempts = self.attempts();
        let plan = ForwardPlan {
            direct: self
                .peers
                .url(&claims.owner)
                .filter(|_| self.routes.has(RouteKind::Direct)),
            bus: self.routes.has(RouteKind::Bus)
                && self.relay_bus.as_ref().is_some_and(|bus| bus.is_healthy()),
            load_balancer: self
                .load_balancer
                .clone()
                .filter(|_| attempts > 0 && self.routes.has(RouteKind::LoadBalancer))
                .map(|url| (url, attempts)),
            owner_alive: self.peers.is_alive(&claims.owner),
            owner: claims.owner,
            connection_id: claims.connection_id,
        };
        if plan.direct.is_none() && !plan.bus && plan.load_balancer.is_none() {
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

    /// A bus that says it reaches other instances and is up: all the router asks of it.
    /// The claim it answers for every connection.
    struct SharedBus(Claim);

    impl Bus for SharedBus {
        fn name(&self) -> &'static str {
            "shared"
        }
        fn is_healthy(&self) -> bool {
            true
        }
        fn publish(&self, _: crate::bus::Envelope) -> futures_util::future::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn subscribe(&self, _: Vec<crate::bus::Topic>) -> futures_util::future::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn unsubscribe(
            &self,
            _: Vec<crate::bus::Topic>,
        ) -> futures_util::future::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
        fn claim(&self, _: &ConnectionId) -> futures_util::future::BoxFuture<'_, Claim> {
            Box::pin(async { self.0.clone() })
        }
        fn lookup_claim(&self, _: &ConnectionId) -> futures_util::future::BoxFuture<'_, Claim> {
            Box::pin(async { self.0.clone() })
        }
    }

    fn setup(lb: Option<&str>, attempts: u32) -> (Router, Connections, ClusterKey) {
        setup_with(lb, ForwardBudget::Fixed(attempts), Routes::ALL, None)
    }

    fn setup_with(
        lb: Option<&str>,
        budget: ForwardBudget,
        routes: Routes,
        peers: Option<Arc<Peers>>,
    ) -> (Router, Connections, ClusterKey) {
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
        let peers =
            peers.unwrap_or_else(|| Arc::new(Peers::new(InstanceId::parse("me").unwrap(), None)));
        let router = Router::new(
            me,
            key.clone(),
            lb.map(str::to_owned),
            budget,
            routes,
            Some(Duration::from_secs(15)),
            peers,
            Some(Arc::new(SharedBus(Claim::Unknown))),
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

    /// Routes a request that is no probe, on an instance that is not draining.
    fn plain(
        router: &Router,
        connections: &Connections,
        key: &ClusterKey,
        token: &str,
        kind: RequestKind,
    ) -> Route {
        router.route(key, connections, token, kind, false, false, NOW)
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
            plain(&router, &connections, &key, &forged, RequestKind::Poll),
            Route::Reject(Rejection::BadToken)
        ));
        assert!(matches!(
            plain(
                &router,
                &connections,
                &key,
                "random",
                RequestKind::WebSocket
            ),
            Route::Reject(Rejection::BadToken)
        ));
    }

    #[test]
    fn our_own_lost_connections_and_probes_are_not_forwarded() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let mine = token(&key, "me", NOW);
        assert!(matches!(
            plain(&router, &connections, &key, &mine, RequestKind::Poll),
            Route::Reject(Rejection::Gone)
        ));
        let theirs = token(&key, "other", NOW);
        assert!(matches!(
            router.route(
                &key,
                &connections,
                &theirs,
                RequestKind::Poll,
                true,
                false,
                NOW
            ),
            Route::Reject(Rejection::ProbeMiss)
        ));
    }

    #[test]
    fn other_owners_are_reached_through_the_load_balancer() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let theirs = token(&key, "other", NOW);
        let Route::Forward(plan) = plain(&router, &connections, &key, &theirs, RequestKind::Poll)
        else {
            panic!("not forwarded");
        };
        assert_eq!(plan.owner.as_str(), "other");
        assert_eq!(plan.direct, None);
        assert!(plan.bus);
        assert_eq!(plan.load_balancer, Some(("http://lb".into(), 10)));
    }

    async fn peers_with_other(url: Option<&str>) -> Arc<Peers> {
        let peers = Arc::new(Peers::new(InstanceId::parse("me").unwrap(), None));
        let announcement = crate::bus::Announcement {
            instance: InstanceId::parse("other").unwrap(),
            url: url.map(str::to_owned),
            reply: true,
            leaving: false,
        };
        peers.receive(announcement, &InProcess).await;
        peers
    }

    #[tokio::test]
    async fn the_routes_setting_picks_which_routes_a_plan_holds_in_one_fixed_order() {
        let theirs = |key: &ClusterKey| token(key, "other", NOW);
        let plan = |routes: &str| {
            let routes: Routes = routes.parse().unwrap();
            async move {
                let peers = peers_with_other(Some("http://other")).await;
                let (router, connections, key) = setup_with(
                    Some("http://lb"),
                    ForwardBudget::Fixed(5),
                    routes,
                    Some(peers),
                );
                match plain(
                    &router,
                    &connections,
                    &key,
                    &theirs(&key),
                    RequestKind::Poll,
                ) {
                    Route::Forward(plan) => Some(plan),
                    _ => None,
                }
            }
        };
        let all = plan("adopt,direct,bus,load-balancer").await.unwrap();
        assert_eq!(all.direct.as_deref(), Some("http://other"));
        assert!(all.bus && all.owner_alive);
        assert_eq!(all.load_balancer, Some(("http://lb".into(), 5)));
        // The order written in the setting does not matter; only which are enabled.
        let bus_only = plan("bus").await.unwrap();
        assert_eq!(
            (bus_only.direct, bus_only.bus, bus_only.load_balancer),
            (None, true, None)
        );
        let lb_only = plan("load-balancer").await.unwrap();
        assert_eq!((lb_only.direct, lb_only.bus), (None, false));
        assert!(lb_only.load_balancer.is_some());
        assert!(plan("adopt").await.is_none(), "nothing but adoption: 404");
        assert!(plan("none").await.is_none());
    }

    #[tokio::test]
    async fn adoption_is_a_route_that_can_be_turned_off() {
        let (router, connections, key) = setup_with(
            Some("http://lb"),
            ForwardBudget::Fixed(10),
            "direct,bus,load-balancer".parse().unwrap(),
            None,
        );
        let fresh = token(&key, "other", NOW);
        assert!(matches!(
            plain(&router, &connections, &key, &fresh, RequestKind::WebSocket),
            Route::Forward(_)
        ));
    }

    #[test]
    fn routes_parse_and_print_in_the_fixed_order() {
        let routes: Routes = "load-balancer, BUS".parse().unwrap();
        assert_eq!(routes.to_string(), "bus,load-balancer");
        assert_eq!(Routes::ALL.to_string(), "adopt,direct,bus,load-balancer");
        assert_eq!("".parse::<Routes>().unwrap().to_string(), "none");
        assert!("sticky".parse::<Routes>().is_err());
    }

    #[test]
    fn the_auto_budget_keeps_random_balancer_misses_at_one_in_a_million_up_to_its_cap() {
        let budget = ForwardBudget::Auto;
        assert_eq!(budget.attempts(1), AUTO_BUDGET_FLOOR, "size unknown");
        assert_eq!(budget.attempts(2), 20);
        assert_eq!(budget.attempts(4), 49);
        assert_eq!(budget.attempts(9), 118);
        assert_eq!(budget.attempts(10), AUTO_BUDGET_CAP);
        assert_eq!(budget.attempts(1000), AUTO_BUDGET_CAP);
        let miss = |n: usize, k: u32| (1.0 - 1.0 / n as f64).powi(k as i32);
        for n in 2..=9 {
            let k = budget.attempts(n);
            assert!(
                miss(n, k) <= 1e-6,
                "N={n}: {k} attempts miss {}",
                miss(n, k)
            );
            assert!(miss(n, k - 1) > 1e-6, "N={n}: {k} is not the least");
        }
        // The cap still keeps misses at or under 0.1 % up to 19 instances.
        for n in 10..=19 {
            assert!(miss(n, budget.attempts(n)) <= 0.001, "N={n}");
        }
        assert!(miss(20, budget.attempts(20)) > 0.001);
        assert_eq!(ForwardBudget::Fixed(3).attempts(16), 3);
        assert_eq!("auto".parse(), Ok(ForwardBudget::Auto));
        assert_eq!("7".parse(), Ok(ForwardBudget::Fixed(7)));
        assert!("lots".parse::<ForwardBudget>().is_err());
    }

    #[test]
    fn a_budget_of_zero_disables_re_forwarding() {
        let routes = "adopt,direct,load-balancer".parse().unwrap();
        let (router, connections, key) =
            setup_with(Some("http://lb"), ForwardBudget::Fixed(0), routes, None);
        let theirs = token(&key, "other", NOW);
        assert!(matches!(
            plain(&router, &connections, &key, &theirs, RequestKind::Poll),
            Route::Reject(Rejection::NoRoute)
        ));
    }

    #[test]
    fn fresh_websockets_are_adopted_and_stale_ones_forwarded() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let fresh = token(&key, "other", NOW - 3);
        assert!(matches!(
            plain(&router, &connections, &key, &fresh, RequestKind::WebSocket),
            Route::Adopt(_)
        ));
        let stale = token(&key, "other", NOW - 60);
        assert!(matches!(
            plain(&router, &connections, &key, &stale, RequestKind::WebSocket),
            Route::Forward(_)
        ));
    }

    #[test]
    fn a_draining_instance_starts_no_relay_but_still_forwards_short_requests() {
        let (router, connections, key) = setup(Some("http://lb"), 10);
        let theirs = token(&key, "other", NOW);
        for kind in [
            RequestKind::WebSocket,
            RequestKind::EventStream,
            RequestKind::Poll,
        ] {
            assert!(
                matches!(
                    router.route(&key, &connections, &theirs, kind, false, true, NOW),
                    Route::Reject(Rejection::Draining)
                ),
                "{kind:?}"
            );
        }
        for kind in [RequestKind::Send, RequestKind::Delete] {
            assert!(
                matches!(
                    router.route(&key, &connections, &theirs, kind, false, true, NOW),
                    Route::Forward(_)
                ),
                "{kind:?}"
            );
        }
        // Its own lost connections are still a plain 404.
        let mine = token(&key, "me", NOW);
        assert!(matches!(
            router.route(
                &key,
                &connections,
                &mine,
                RequestKind::Poll,
                false,
                true,
                NOW
            ),
            Route::Reject(Rejection::Gone)
        ));
    }

    #[tokio::test]
    async fn claims_decide_whether_a_connection_starts_here_and_what_a_miss_is_told() {
        let (router, _, key) = setup(None, 10);
        let claims = TokenClaims {
            owner: InstanceId::parse("other").unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: NOW,
        };
        let token = key.mint(&claims);
        let token = token.as_str();
        let held = |id: &str| Claim::Held(InstanceId::parse(id).unwrap());
        let admit = |claim: Claim, token: String| {
            let (router, claims) = (&router, &claims);
            async move { router.admit(&SharedBus(claim), &token, claims).await }
        };
        assert_eq!(admit(held("me"), token.into()).await, Ok(true));
        assert_eq!(
            admit(held("third"), token.into()).await,
            Err(Rejection::InUse)
        );
        assert_eq!(
            admit(Claim::Closed, token.into()).await,
            Err(Rejection::Reused)
        );
        assert_eq!(
            admit(Claim::Unknown, token.into()).await,
            Ok(false),
            "Redis down"
        );
        // Stateful tokens take no claims: their session moves instead.
        let stateful = key.mint_stateful(&claims).as_str().to_owned();
        assert_eq!(admit(held("third"), stateful.clone()).await, Ok(false));

        let gone = |claim: Claim, why: Rejection| {
            let (router, key) = (&router, &key);
            async move { router.gone(&SharedBus(claim), key, token, why).await }
        };
        assert_eq!(gone(held("third"), Rejection::Gone).await, Rejection::InUse);
        assert_eq!(
            gone(Claim::Closed, Rejection::Gone).await,
            Rejection::Reused
        );
        assert_eq!(gone(held("me"), Rejection::Gone).await, Rejection::Gone);
        assert_eq!(gone(Claim::Free, Rejection::Gone).await, Rejection::Gone);
        assert_eq!(
            gone(held("third"), Rejection::ProbeMiss).await,
            Rejection::ProbeMiss,
            "only a token this instance would call gone asks"
        );
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
