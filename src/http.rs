//! The HTTP surface: `{hub}/negotiate` and `{hub}` (GET, POST, DELETE) for every mounted
//! hub, `/healthz` and `/metrics`, and the one mapping of every error to the status the
//! SignalR client expects (TransportProtocols.md; DESIGN.md example 6).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::dev::ServiceRequest;
use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;

use crate::config::Settings;
use crate::connection::{Connection, ConnectionError, Connections};
use crate::forwarding::relay::Relay;
use crate::forwarding::Forwarder;
use crate::handover::{self, Puller, HANDOVER_FLAG, HANDOVER_GROUPS};
use crate::hub::{RequestHead, UserIdProvider};
use crate::metrics::{Metrics, Rejection};
use crate::protocol::negotiate::{self, NegotiateResponse, TransportKind};
use crate::protocol::token::{ClusterKey, ConnectionId, ConnectionToken, InstanceId, TokenClaims};
use crate::routing::{RequestKind, Route, Router, PROBE_HEADER};
use crate::transport::{long_polling, receive_post, sse, websocket};

/// Registers an application's own routes.
pub type RoutesFn = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// The headers an application adds to the response to a request.
pub type ResponseHeadersFn = Arc<
    dyn Fn(
            &HttpRequest,
        ) -> Vec<(
            actix_web::http::header::HeaderName,
            actix_web::http::header::HeaderValue,
        )> + Send
        + Sync,
>;

/// Everything the handlers share.
pub struct AppState {
    /// The instance's settings.
    pub settings: Settings,
    /// The instance's id.
    pub instance: InstanceId,
    /// The mounted hubs.
    pub hubs: Vec<Arc<HubEndpoint>>,
    /// The routing policy.
    pub router: Router,
    /// The bus route's end on this instance (with a shared bus only).
    pub relay: Option<Arc<Relay>>,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// Set when shutdown starts: no new connections, and the load balancer is told.
    pub stopping: AtomicBool,
    /// The application's own routes, beside the hubs ([`crate::App::routes`]).
    pub routes: Option<RoutesFn>,
    /// Headers the application adds to responses ([`crate::App::response_headers`]).
    pub response_headers: Option<ResponseHeadersFn>,
}

/// One mounted hub, as its routes see it.
pub struct HubEndpoint {
    /// Its path, e.g. `/chat`.
    pub path: String,
    /// Signs and verifies its connection tokens. Derived per hub from the cluster secret,
    /// so that a token of one hub is refused (404) at another hub's path.
    pub key: ClusterKey,
    /// Its connections on this instance, and its host.
    pub connections: Arc<Connections>,
    /// Finds the user of a connection.
    pub user_id: UserIdProvider,
}

impl AppState {
    /// Whether every hub's bus carries messages.
    fn buses_healthy(&self) -> bool {
        self.hubs
            .iter()
            .all(|hub| hub.connections.host().bus().is_healthy())
    }

    /// The kind of bus, for `/healthz` (every hub has the same kind).
    pub(crate) fn bus_name(&self) -> &'static str {
        self.hubs
            .first()
            .map_or("in-process", |hub| hub.connections.host().bus().name())
    }
}

/// A request the hub endpoint refuses. The texts are ASP.NET's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `id` on a request that needs one.
    #[error("Connection ID required")]
    MissingId,
    /// The id is unknown, forged, or its connection is gone.
    #[error("No Connection with that ID")]
    UnknownConnection,
    /// The connection's state refuses the request.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A body above the limit.
    #[error("Request body too large: the limit is {0} bytes")]
    TooLarge(usize),
    /// A method the endpoint does not take.
    #[error("Method not allowed")]
    MethodNotAllowed,
    /// The request body broke off.
    #[error("Reading the request body failed: {0}")]
    Body(String),
    /// The hub admits only connections with a user, and the request has none.
    #[error("Unauthorized")]
    Unauthorized,
    /// The hub does not offer this transport.
    #[error("{} transport is not supported by this hub", .0.name())]
    TransportNotAllowed(TransportKind),
    /// This instance is shutting down and starts no new long-lived request (503 with
    /// `Retry-After`, which the load balancer retries on another instance).
    #[error("This instance is shutting down.")]
    Draining,
}

impl From<Rejection> for ApiError {
    /// What a client is told for a request routing refused.
    fn from(why: Rejection) -> Self {
        match why {
            Rejection::Draining => Self::Draining,
            Rejection::InUse => Self::Connection(ConnectionError::AlreadyActive),
            Rejection::BadToken
            | Rejection::Gone
            | Rejection::ProbeMiss
            | Rejection::NoRoute
            | Rejection::Reused => Self::UnknownConnection,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MissingId | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::UnknownConnection | Self::TransportNotAllowed(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Connection(
                ConnectionError::WrongTransport | ConnectionError::DeleteNotLongPolling,
            ) => StatusCode::BAD_REQUEST,
            Self::Connection(ConnectionError::AlreadyActive) => StatusCode::CONFLICT,
            Self::Connection(ConnectionError::Gone) => StatusCode::NOT_FOUND,
            Self::Connection(ConnectionError::PostToWebSocket) | Self::MethodNotAllowed => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"));
        if matches!(self, Self::Draining) {
            response.insert_header(("Retry-After", "1"));
        }
        response.body(self.to_string())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The connection token (`id`); an empty one counts as none, as in ASP.NET
/// (`StringValues.IsNullOrEmpty`): 400 "Connection ID required", or, for a WebSocket, a
/// client that skipped negotiation.
fn connection_token(req: &HttpRequest) -> Option<String> {
    query_param(req, "id").filter(|id| !id.is_empty())
}

/// A query parameter, by name ignoring case as ASP.NET does.
fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .ok()?
        .into_inner()
        .into_iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// Query parameters whose values are secrets: `id` is the connection token (whoever holds
/// it reads and writes the connection; in negotiate version 0 it is also the connection
/// id) and `access_token` the bearer credential browsers cannot send as a header.
const SECRET_QUERY_KEYS: [&str; 2] = ["id", "access_token"];

/// A query string as logs may show it: the values of [`SECRET_QUERY_KEYS`] (keys matched
/// as [`query_param`] matches them: decoded, ignoring case) become `[redacted]`.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let key = web::Query::<Vec<(String, String)>>::from_query(pair)
                .ok()
                .and_then(|pairs| pairs.into_inner().into_iter().next())
                .map(|(key, _)| key)
                .unwrap_or_default();
            if SECRET_QUERY_KEYS
                .iter()
                .any(|secret| key.eq_ignore_ascii_case(secret))
            {
                let raw_key = pair.split_once('=').map_or(pair, |(raw_key, _)| raw_key);
                format!("{raw_key}=[redacted]")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The access log's request line (`GET /chat?id=[redacted] HTTP/1.1`): actix's `%r`
/// with the secrets of the query left out.
pub fn access_log_request_line(req: &ServiceRequest) -> String {
    let query = req.query_string();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", redact_query(query))
    };
    format!("{} {}{query} {:?}", req.method(), req.path(), req.version())
}

/// Largest POST body: several records may share one (the client batches its sends).
pub fn max_body_size(settings: &Settings) -> usize {
    settings.max_message_size as usize * 8
}

async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::Body(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Registers the routes of every hub, `/healthz` and `/metrics`.
pub fn routes(hubs: &[Arc<HubEndpoint>]) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |cfg| {
        for hub in hubs {
            let data = web::Data::from(hub.clone());
            cfg.service(
                web::resource(format!("{}/negotiate", hub.path))
                    .app_data(data.clone())
                    .route(web::post().to(negotiate))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource(hub.path.as_str())
                    .app_data(data)
                    .route(web::get().to(hub_get))
                    .route(web::post().to(hub_post))
                    .route(web::delete().to(hub_delete))
                    .default_service(web::to(method_not_allowed)),
            );
        }
        cfg.route("/healthz", web::get().to(healthz))
            .route("/metrics", web::get().to(metrics));
    }
}

async fn method_not_allowed() -> HttpResponse {
    ApiError::MethodNotAllowed.error_response()
}

/// `POST {hub}/negotiate`: a new connection, owned by this instance.
async fn negotiate(
    req: HttpRequest,
    state: web::Data<AppState>,
    hub: web::Data<HubEndpoint>,
) -> HttpResponse {
    if state.stopping.load(Ordering::Relaxed) {
        // A client reconnecting after our Close message must land on another instance
        // (nginx.conf retries a negotiate that gets this 503 on the next one).
        return ApiError::Draining.error_response();
    }
    let version = match negotiate::parse_negotiate_version(
        query_param(&req, "negotiateVersion").as_deref(),
    ) {
        Ok(version) => version,
        // The client reads errors only from a 200 with `{"error"}`.
        Err(error) => return HttpResponse::Ok().json(negotiate::error_body(&error.to_string())),
    };
    let offered = hub.connections.host().hub();
    if offered.requires_user() && (hub.user_id)(&req).is_none() {
        return ApiError::Unauthorized.error_response();
    }
    // Each pending negotiation holds memory until its transport starts or the sweeper
    // drops it, so a flood of negotiations that never start is capped.
    if state.metrics.pending_negotiations() >= state.settings.max_pending_negotiations as i64 {
        state.metrics.negotiation_refused();
        return HttpResponse::ServiceUnavailable()
            .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
            .insert_header(("Retry-After", "1"))
            .body("Too many pending negotiations; try again.");
    }
    // In version 0 the connection id is the token, as in ASP.NET, where a version-0
    // client (signalrcore) knows its connection only by the id it negotiated.
    // Stateful reconnect is granted only when asked for and allowed, and only from
    // negotiate version 1 (a version-0 client knows no token to come back with). The
    // token carries the grant, so any instance can tell where it lands.
    let stateful = state.settings.allow_stateful_reconnect
        && version >= 1
        && negotiate::wants_stateful_reconnect(
            query_param(&req, "useStatefulReconnect").as_deref(),
        );
    let (id, token) = if stateful {
        state.mint_stateful(&hub)
    } else {
        state.mint(&hub, version)
    };
    hub.connections.create(id.clone(), token.clone());
    state.metrics.negotiated();
    let mut response = NegotiateResponse::new(version, &id, &token);
    // Only the transports the hub offers (a client then never tries another).
    response.available_transports.retain(|offer| {
        TransportKind::ALL
            .iter()
            .any(|kind| kind.name() == offer.transport && offered.allows(*kind))
    });
    HttpResponse::Ok().json(if stateful {
        response.with_stateful_reconnect()
    } else {
        response
    })
}

impl AppState {
    fn mint(&self, hub: &HubEndpoint, negotiate_version: u32) -> (ConnectionId, ConnectionToken) {
        let claims = TokenClaims {
            owner: self.instance.clone(),
            connection_id: ConnectionId::random(),
            issued_at: now_secs(),
        };
        hub.key.mint_connection(&claims, negotiate_version)
    }

    fn mint_stateful(&self, hub: &HubEndpoint) -> (ConnectionId, ConnectionToken) {
        let claims = TokenClaims {
            owner: self.instance.clone(),
            connection_id: ConnectionId::random(),
            issued_at: now_secs(),
        };
        let token = hub.key.mint_stateful(&claims);
        (claims.connection_id, token)
    }

    /// Refuses a request routing rejected: a token this instance would answer 404 for may
    /// name a connection another instance serves (409) or one that ended (404), as the
    /// cluster-wide claims tell ([`Router::gone`]). Counted.
    async fn refuse(&self, hub: &HubEndpoint, token: &str, why: Rejection) -> ApiError {
        let bus = hub.connections.host().bus();
        let why = self.router.gone(&**bus, &hub.key, token, why).await;
        self.metrics.rejected(why);
        why.into()
    }

    /// Takes the cluster-wide claim for the first transport request of `connection`
    /// (negotiated here, or adopted) before it starts here ([`Router::admit`]).
    async fn admit(
        &self,
        hub: &HubEndpoint,
        token: &str,
        connection: &Connection,
    ) -> Result<(), ApiError> {
        let Ok(claims) = hub.key.verify(token) else {
            return Ok(()); // Routing verified it already.
        };
        let bus = hub.connections.host().bus();
        match self.router.admit(&**bus, token, &claims).await {
            Ok(true) => {
                connection.set_claim(claims.connection_id);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(why) => {
                self.metrics.rejected(why);
                Err(why.into())
            }
        }
    }

    /// A send or DELETE for a connection negotiated here that has not started here: if its
    /// claim says it started elsewhere or ended, it never will start here (dropped) and
    /// the request is refused ([`Router::claimed_elsewhere`]).
    async fn check_unstarted(
        &self,
        hub: &HubEndpoint,
        token: &str,
        connection: &Connection,
    ) -> Result<(), ApiError> {
        if connection.transport().is_some() {
            return Ok(());
        }
        let bus = hub.connections.host().bus();
        match self.router.claimed_elsewhere(&**bus, &hub.key, token).await {
            Some(why) => {
                hub.connections.dispose(connection);
                self.metrics.rejected(why);
                Err(why.into())
            }
            None => Ok(()),
        }
    }

    fn is_probe(&self, req: &HttpRequest) -> bool {
        let marker = req
            .headers()
            .get(PROBE_HEADER)
            .and_then(|v| v.to_str().ok());
        self.router.is_probe(marker, now_secs())
    }

    fn route(&self, req: &HttpRequest, hub: &HubEndpoint, token: &str, kind: RequestKind) -> Route {
        let marker = req
            .headers()
            .get(PROBE_HEADER)
            .and_then(|v| v.to_str().ok());
        let now = now_secs();
        let probe = self.router.is_probe(marker, now);
        if self.stopping.load(Ordering::Relaxed) && kind == RequestKind::WebSocket && !probe {
            if let Some(route) = self.router.route_while_draining(&hub.key, token) {
                return route;
            }
        }
        self.router.route(
            &hub.key,
            &hub.connections,
            token,
            kind,
            probe,
            self.stopping.load(Ordering::Relaxed),
            now,
        )
    }
}

/// Serves a GET for a connection held here.
async fn serve(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    hub: &HubEndpoint,
    kind: RequestKind,
    connection: Arc<Connection>,
) -> Result<HttpResponse, actix_web::Error> {
    let Some(transport) = kind.transport() else {
        return Err(ApiError::MethodNotAllowed.into());
    };
    let user = (hub.user_id)(req);
    let offered = hub.connections.host().hub();
    if offered.requires_user() && user.is_none() {
        return Err(ApiError::Unauthorized.into());
    }
    if !offered.allows(transport) {
        return Err(ApiError::TransportNotAllowed(transport).into());
    }
    // For WebSockets the upgrade is checked first, so a bad upgrade binds nothing.
    let upgraded = match kind {
        RequestKind::WebSocket => Some(websocket::handshake(req)?),
        _ => None,
    };
    let activation = connection.activate(transport).map_err(ApiError::from)?;
    if activation.first {
        hub.connections
            .start(&connection, transport, user, RequestHead::of(req));
    }
    Ok(match upgraded {
        Some(handshake) => {
            if !activation.first && connection.outbox().is_stateful() {
                state.metrics.stateful_resumed();
            }
            let max_frame = max_body_size(&state.settings);
            websocket::respond(
                handshake,
                payload.into_inner(),
                connection,
                activation,
                max_frame,
            )
        }
        None if kind == RequestKind::EventStream => sse::stream(connection, activation),
        None => long_polling::poll(connection, activation, state.settings.poll_timeout).await,
    })
}

/// `GET {hub}`: a WebSocket, an event stream or a long poll.
async fn hub_get(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    hub: web::Data<HubEndpoint>,
    forwarder: web::Data<Forwarder>,
) -> Result<HttpResponse, actix_web::Error> {
    let kind =
        RequestKind::classify(req.method(), req.headers()).ok_or(ApiError::MethodNotAllowed)?;
    let Some(token) = connection_token(&req) else {
        if kind != RequestKind::WebSocket {
            return Err(ApiError::MissingId.into());
        }
        // A WebSocket without id is a client that skipped negotiation: a new connection.
        let (id, token) = state.mint(&hub, negotiate::MAX_NEGOTIATE_VERSION);
        let connection = hub.connections.create(id, token);
        return serve(&req, payload, &state, &hub, kind, connection).await;
    };
    match state.route(&req, &hub, &token, kind) {
        // The first transport request of a connection negotiated here: it must win the
        // connection's claim, so that no other instance adopts it meanwhile (and this one
        // does not start a connection another adopted or closed). Later requests of a
        // started connection never ask.
        Route::Local(connection) if connection.transport().is_none() => {
            if let Err(refused) = state.admit(&hub, &token, &connection).await {
                // It started elsewhere or ended: it never starts here.
                hub.connections.dispose(&connection);
                return Err(refused.into());
            }
            let served = serve(&req, payload, &state, &hub, kind, connection.clone()).await;
            if served.is_err() && connection.transport().is_none() {
                hub.connections.release_claim(&connection);
            }
            served
        }
        Route::Local(connection) => serve(&req, payload, &state, &hub, kind, connection).await,
        Route::Adopt(claims) => {
            let connection = hub.connections.create(
                claims.connection_id,
                ConnectionToken::from_trusted(token.clone()),
            );
            if let Err(refused) = state.admit(&hub, &token, &connection).await {
                hub.connections.dispose(&connection);
                return Err(refused.into());
            }
            state.metrics.adopted();
            let served = serve(&req, payload, &state, &hub, kind, connection.clone()).await;
            if served.is_err() {
                hub.connections.release_claim(&connection);
                hub.connections.dispose(&connection);
            }
            served
        }
        Route::Pull(claims) => {
            // Receive for the connection before asking for it, so that nothing published
            // while the session moves is missed (`Outbox::complete_move`).
            // The hub sees the request the session resumed with here (ASP.NET keeps the
            // first one, which stayed on the instance the session left).
            let user = (hub.user_id)(&req);
            let request = Arc::new(RequestHead::of(&req));
            let connection = hub
                .connections
                .begin_move(
                    claims.connection_id,
                    ConnectionToken::from_trusted(token.clone()),
                    user,
                    request.clone(),
                )
                .await;
            // What this instance published before it began receiving for the session must
            // reach the old owner before that one's fence (`HubHost::fence`).
            hub.connections.host().flush().await;
            let puller = Puller {
                me: &state.instance,
                peers: state.router.peers(),
                relay: state.relay.as_ref(),
                key: state.router.key(),
            };
            // Where the session is, and its groups: this instance joins them before the
            // holder fences them and lets go, so a group message cannot miss both.
            let moved = match puller.locate(&hub.path, &token, &claims.owner).await {
                Some((holder, groups)) => {
                    hub.connections
                        .receive_for_groups(&connection, &groups)
                        .await;
                    puller.pull(&hub.path, &token, &holder).await
                }
                None => None,
            };
            if moved.as_ref().is_some_and(|moved| moved.fresh) {
                // Negotiated elsewhere and never started: it starts here, with its handshake.
                hub.connections.abort_move(&connection).await;
                let connection = hub
                    .connections
                    .create(connection.id.clone(), ConnectionToken::from_trusted(token));
                let served = serve(&req, payload, &state, &hub, kind, connection.clone()).await;
                if served.is_err() {
                    hub.connections.dispose(&connection);
                }
                return served;
            }
            let resumed = match moved {
                Some(moved) => {
                    hub.connections
                        .complete_move(&connection, moved, request)
                        .await
                }
                None => false,
            };
            if !resumed {
                hub.connections.abort_move(&connection).await;
                state.metrics.rejected(Rejection::Gone);
                return Err(ApiError::UnknownConnection.into());
            }
            serve(&req, payload, &state, &hub, kind, connection).await
        }
        Route::Forward(plan) if kind == RequestKind::WebSocket => {
            forwarder.forward_websocket(&req, payload, &plan).await
        }
        Route::Forward(plan) => Ok(forwarder.forward(&req, Bytes::new(), kind, &plan).await),
        Route::Reject(why) => Err(state.refuse(&hub, &token, why).await.into()),
    }
}

/// `POST {hub}`: records from an SSE or long-polling client.
async fn hub_post(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    hub: web::Data<HubEndpoint>,
    forwarder: web::Data<Forwarder>,
) -> Result<HttpResponse, ApiError> {
    let token = connection_token(&req).ok_or(ApiError::MissingId)?;
    if let Some(step) = query_param(&req, HANDOVER_FLAG).filter(|_| state.is_probe(&req)) {
        // Another instance pulls a stateful session its client resumed there: first it
        // asks for the session's groups (to receive for them too), then for the session.
        if step == HANDOVER_GROUPS {
            return Ok(match hub.connections.groups_before_handover(&token) {
                Some(groups) => HttpResponse::Ok().json(groups),
                None => ApiError::UnknownConnection.error_response(),
            });
        }
        return Ok(match hub.connections.hand_over(&token).await {
            Some(moved) => HttpResponse::Ok()
                .content_type("application/json")
                .body(handover::encode(&moved)),
            None => ApiError::UnknownConnection.error_response(),
        });
    }
    let route = state.route(&req, &hub, &token, RequestKind::Send);
    if let Route::Reject(why) = route {
        return Err(state.refuse(&hub, &token, why).await);
    }
    let body = read_body(payload, max_body_size(&state.settings)).await?;
    match route {
        Route::Local(connection) => {
            state.check_unstarted(&hub, &token, &connection).await?;
            receive_post(&connection, body).await?;
            Ok(HttpResponse::Ok().finish())
        }
        Route::Forward(plan) => Ok(forwarder
            .forward(&req, body, RequestKind::Send, &plan)
            .await),
        Route::Adopt(_) | Route::Pull(_) | Route::Reject(_) => Err(ApiError::UnknownConnection),
    }
}

/// `DELETE {hub}`: a long-polling client stops (202).
async fn hub_delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    hub: web::Data<HubEndpoint>,
    forwarder: web::Data<Forwarder>,
) -> Result<HttpResponse, ApiError> {
    let token = connection_token(&req).ok_or(ApiError::MissingId)?;
    match state.route(&req, &hub, &token, RequestKind::Delete) {
        Route::Local(connection) => {
            state.check_unstarted(&hub, &token, &connection).await?;
            if connection.transport()
                != Some(crate::protocol::negotiate::TransportKind::LongPolling)
            {
                return Err(ConnectionError::DeleteNotLongPolling.into());
            }
            hub.connections.dispose(&connection);
            Ok(HttpResponse::Accepted().finish())
        }
        Route::Forward(plan) => Ok(forwarder
            .forward(&req, Bytes::new(), RequestKind::Delete, &plan)
            .await),
        Route::Reject(why) => Err(state.refuse(&hub, &token, why).await),
        Route::Adopt(_) | Route::Pull(_) => Err(ApiError::UnknownConnection),
    }
}

/// `GET /healthz`: 200 while the instance serves; `degraded` while a hub's bus is down
/// (local clients are still served, so the load balancer should keep the instance);
/// 503 `draining` once shutdown has begun.
async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let (mut response, status) = if state.stopping.load(Ordering::Relaxed) {
        (HttpResponse::ServiceUnavailable(), "draining")
    } else if state.buses_healthy() {
        (HttpResponse::Ok(), "ok")
    } else {
        (HttpResponse::Ok(), "degraded")
    };
    response.json(json!({
        "status": status,
        "instance": state.instance.as_str(),
        "backplane": state.bus_name(),
        "connections": state.metrics.live_connections(),
    }))
}

/// `GET /metrics`: the OpenMetrics text format (Prometheus scrapes it).
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, crate::metrics::CONTENT_TYPE))
        .body(
            state
                .metrics
                .render(state.buses_healthy(), state.router.cluster_size()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_values_are_redacted_whatever_their_case_or_encoding() {
        assert_eq!(
            redact_query("id=abc.def&negotiateVersion=1&ACCESS_TOKEN=s3cr3t&%69d=x&_=1"),
            "id=[redacted]&negotiateVersion=1&ACCESS_TOKEN=[redacted]&%69d=[redacted]&_=1"
        );
        assert_eq!(redact_query("idx=1&id"), "idx=1&id=[redacted]");
    }
}
