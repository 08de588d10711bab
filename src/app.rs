//! The application builder: mounts any number of hubs, each at its own path, and starts
//! an instance serving them (the top of DESIGN.md's "Layers").
//!
//! ```no_run
//! use stickless::{App, Hub, HubContext, HubError, Settings};
//!
//! # async fn start(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
//! let echo = Hub::builder("echo").method("Echo", |_ctx: HubContext, (text,): (String,)| async move {
//!     Ok::<_, HubError>(text)
//! });
//! let app = App::new(settings).hub("/echo", echo).build().await?;
//! println!("listening on port {}", app.port());
//! app.run_until_stopped().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Each hub gets its own negotiate route (`{path}/negotiate`), connections, groups and
//! users, its own bus channel namespace (`stickless:<hub name>`), and connection tokens
//! signed with its own key (derived from `CLUSTER_SECRET`), so a token of one hub is
//! refused at another hub's path. Routing, forwarding and health cover every hub.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpRequest};
use rand::RngCore;

use crate::bus;
use crate::bus::peers::Peers;
use crate::bus::Topic;
use crate::config::Settings;
use crate::connection::{Connections, SessionConfig};
use crate::forwarding;
use crate::forwarding::relay::Relay;
use crate::http::{max_body_size, AppState, HubEndpoint, ResponseHeadersFn, RoutesFn};
use crate::hub::host::HubHost;
use crate::hub::{HubBuilder, UserIdProvider};
use crate::metrics::Metrics;
use crate::protocol::token::{is_stateful, ClusterKey};
use crate::routing::Router;
use crate::startup::{Application, StartError};

/// Declares an application: its settings, its hubs and how users are identified.
pub struct App {
    settings: Settings,
    hubs: Vec<(String, HubBuilder)>,
    user_id: UserIdProvider,
    routes: Option<RoutesFn>,
    response_headers: Option<ResponseHeadersFn>,
}

impl App {
    /// An application with these settings and no hub yet.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            hubs: Vec::new(),
            user_id: Arc::new(|_: &HttpRequest| None),
            routes: None,
            response_headers: None,
        }
    }

    /// Adds the application's own HTTP routes beside the hubs (e.g. a token endpoint),
    /// as actix-web's `App::configure` does. They take precedence over the chat page's
    /// static files, not over the hubs' paths.
    pub fn routes(
        mut self,
        routes: impl Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    ) -> Self {
        self.routes = Some(Arc::new(routes));
        self
    }

    /// Adds headers to every response, chosen from its request (e.g. `Set-Cookie` on
    /// negotiate responses), as an ASP.NET middleware can.
    pub fn response_headers(
        mut self,
        headers: impl Fn(&HttpRequest) -> Vec<(HeaderName, HeaderValue)> + Send + Sync + 'static,
    ) -> Self {
        self.response_headers = Some(Arc::new(headers));
        self
    }

    /// Mounts `hub` at `path` (e.g. `/chat`): clients connect to `{path}` after
    /// `POST {path}/negotiate`.
    pub fn hub(mut self, path: &str, hub: HubBuilder) -> Self {
        self.hubs.push((path.to_owned(), hub));
        self
    }

    /// Sets how the user id of a connection (for `Clients::user`) is found from the
    /// request that starts its transport; by default connections have no user. A real
    /// application verifies its authentication here.
    pub fn user_id(
        mut self,
        user_id: impl Fn(&HttpRequest) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.user_id = Arc::new(user_id);
        self
    }

    /// Checks the declaration, starts every hub's bus and binds the listen address (port
    /// 0 picks a free one). Must run inside the actix (tokio) runtime, which the bus and
    /// sweeper tasks join.
    pub async fn build(self) -> Result<Application, StartError> {
        let settings = self.settings;
        settings.validate()?;
        check_paths(&self.hubs)?;
        let instance = settings.instance_id();
        // A lone instance without a configured secret signs with a random one.
        let secret = settings
            .cluster_secret
            .as_ref()
            .map(|secret| secret.as_bytes().to_vec())
            .unwrap_or_else(|| {
                let mut bytes = vec![0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                bytes
            });
        let metrics = Arc::new(Metrics::default());
        let peers = Arc::new(Peers::new(instance.clone(), settings.advertise_url()));
        let session = SessionConfig::from_settings(&settings);
        let mut hubs = Vec::new();
        let mut relay = None;
        for (index, (path, hub)) in self.hubs.into_iter().enumerate() {
            let hub = hub.build()?;
            let namespace = format!("stickless:{}", hub.name());
            let (bus, events) =
                bus::open(&settings, &namespace, instance.clone(), metrics.clone())?;
            // Heartbeats and relayed requests travel on the first hub's bus only: one
            // carrier is enough (a relayed request names its hub in its path).
            let discovery = (index == 0).then(|| peers.clone());
            let mut frames = None;
            if discovery.is_some() {
                tokio::spawn(peers.clone().run(bus.clone()));
                if bus.is_shared() {
                    let (started, handler) = Relay::start(
                        instance.clone(),
                        bus.clone(),
                        ClusterKey::from_secret(&secret),
                        settings.poll_timeout + forwarding::POLL_GRACE,
                        max_body_size(&settings),
                    );
                    bus.subscribe(vec![Topic::Instance(instance.clone())]).await;
                    relay = Some(started);
                    frames = Some(handler);
                }
            }
            let host = Arc::new(
                HubHost::new(hub, bus, instance.clone())
                    .with_client_result_timeout(settings.client_result_timeout)
                    .with_detailed_errors(settings.enable_detailed_errors),
            );
            tokio::spawn(host.clone().drain(events, discovery, frames));
            let connections = Arc::new(Connections::new(host, metrics.clone(), session.clone()));
            tokio::spawn(connections.clone().run_sweeper());
            tokio::spawn(connections.clone().run_claim_refresher());
            hubs.push(Arc::new(HubEndpoint {
                key: hub_key(&secret, &path),
                path,
                connections,
                user_id: self.user_id.clone(),
            }));
        }
        if let Some(relay) = &relay {
            let endpoints = hubs.clone();
            relay.set_holds(Box::new(move |path_and_query: &str| {
                holds_connection(&endpoints, path_and_query)
            }));
        }
        let router = Router::new(
            instance.clone(),
            ClusterKey::from_secret(&secret),
            settings.load_balancer_url.clone(),
            settings.max_forward_attempts,
            settings.routes,
            settings
                .adopt_websockets
                .then_some(settings.disconnect_timeout),
            peers,
            relay.as_ref().map(|relay| relay.bus().clone()),
        );
        let state = AppState {
            settings,
            instance,
            hubs,
            router,
            relay,
            metrics,
            stopping: AtomicBool::new(false),
            routes: self.routes,
            response_headers: self.response_headers,
        };
        Application::start(state, ClusterKey::from_secret(&secret))
    }
}

/// Whether a request (path and query) is for a connection one of `hubs` holds here: the
/// owner's check before it accepts a relayed request.
fn holds_connection(hubs: &[Arc<HubEndpoint>], path_and_query: &str) -> bool {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let Some(hub) = hubs.iter().find(|hub| hub.path == path) else {
        return false;
    };
    let Ok(query) = actix_web::web::Query::<Vec<(String, String)>>::from_query(query) else {
        return false;
    };
    query
        .into_inner()
        .into_iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("id"))
        // A stateful-reconnect session can be served by any instance: it moves to the one
        // that serves its WebSocket (a draining instance sends such WebSockets over the bus).
        .is_some_and(|(_, token)| hub.connections.get(&token).is_some() || is_stateful(&token))
}

/// The key that signs one hub's connection tokens.
fn hub_key(secret: &[u8], path: &str) -> ClusterKey {
    ClusterKey::from_secret(&[secret, b"\0hub:", path.as_bytes()].concat())
}

/// Paths are `/name` (URL-safe, no trailing slash) and unique; hub names are unique
/// (they name the bus namespaces).
fn check_paths(hubs: &[(String, HubBuilder)]) -> Result<(), StartError> {
    if hubs.is_empty() {
        return Err(StartError::Mount("no hub is mounted".into()));
    }
    let mut paths = HashSet::new();
    let mut names = HashSet::new();
    for (path, hub) in hubs {
        let valid = path.len() > 1
            && path.starts_with('/')
            && !path.ends_with('/')
            && path[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !valid {
            return Err(StartError::Mount(format!(
                "hub path {path:?} must look like \"/chat\""
            )));
        }
        if !paths.insert(path.as_str()) {
            return Err(StartError::Mount(format!("two hubs at {path}")));
        }
        if !names.insert(hub.name()) {
            return Err(StartError::Mount(format!(
                "two hubs named {:?}: the name is the bus namespace",
                hub.name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;

    #[test]
    fn paths_and_names_must_be_unique_and_well_formed() {
        let mounted = |hubs: &[(&str, &str)]| {
            let hubs: Vec<(String, HubBuilder)> = hubs
                .iter()
                .map(|(path, name)| (path.to_string(), Hub::builder(name)))
                .collect();
            check_paths(&hubs).map_err(|e| e.to_string())
        };
        assert_eq!(mounted(&[("/a", "a"), ("/b", "b")]), Ok(()));
        assert!(mounted(&[]).is_err());
        assert!(mounted(&[("a", "a")]).is_err());
        assert!(mounted(&[("/a/", "a")]).is_err());
        assert!(mounted(&[("/a", "a"), ("/a", "b")]).is_err());
        assert!(mounted(&[("/a", "x"), ("/b", "x")]).is_err());
    }

    #[test]
    fn every_hub_signs_with_its_own_key() {
        use crate::protocol::token::{ConnectionId, InstanceId, TokenClaims};
        let claims = TokenClaims {
            owner: InstanceId::parse("i").unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: 1,
        };
        let token = hub_key(b"secret", "/a").mint(&claims);
        assert!(hub_key(b"secret", "/a").verify(token.as_str()).is_ok());
        assert!(hub_key(b"secret", "/b").verify(token.as_str()).is_err());
        assert!(hub_key(b"other", "/a").verify(token.as_str()).is_err());
    }
}
