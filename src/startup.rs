//! Running an instance (zero-to-production `startup.rs`): [`crate::App::build`] binds
//! (port 0 picks a free one) and returns an [`Application`]; [`Application::port`] says
//! where, and [`Application::run_until_stopped`] serves until [`AppHandle::shutdown`].

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_cors::Cors;
use actix_http::{HttpService, KeepAlive};
use actix_service::{apply_fn_factory, map_config, IntoServiceFactory};
use actix_web::dev::{AppConfig, Server, ServerHandle, Service};
use actix_web::middleware::{Condition, DefaultHeaders, Logger};
use actix_web::{http, web};
use futures_util::future::LocalBoxFuture;

use crate::bus::BusError;
use crate::config::ConfigError;
use crate::forwarding::Forwarder;
use crate::http::{access_log_request_line, max_body_size, routes, AppState};
use crate::hub::BuildError;
use crate::outbox::Closing;
use crate::protocol::token::ClusterKey;

/// While draining, how often stateful sessions whose clients came back here lose their
/// socket again.
const STATEFUL_RETRY: Duration = Duration::from_secs(1);

/// The response header naming the instance that served a request.
pub const INSTANCE_HEADER: &str = "X-Stickless-Instance";

/// An instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Settings that cannot work together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A hub is declared wrongly (e.g. a method needs a state the hub does not have).
    #[error(transparent)]
    Hub(#[from] BuildError),
    /// Two hubs at one path, a path that is not `/name`, two hubs of one name, or none.
    #[error("{0}")]
    Mount(String),
    /// The bus (backplane) could not be set up.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound, not yet running instance.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

/// Stops a running instance.
#[derive(Clone)]
pub struct AppHandle {
    server: ServerHandle,
    state: web::Data<AppState>,
}

fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods(["GET", "POST", "DELETE"])
        .allowed_headers([
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            http::header::HeaderName::from_static("x-requested-with"),
            http::header::HeaderName::from_static("x-signalr-user-agent"),
        ])
        .expose_headers([INSTANCE_HEADER])
        // The client sends credentials by default (`withCredentials`), which needs an exact
        // origin and this header (signalr-protocol.md, "Credentials and CORS").
        .supports_credentials()
        .max_age(600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}

impl Application {
    /// Binds the listen address and prepares the server for the hubs in `state`;
    /// `key` (the cluster key) signs the probes of forwarded requests.
    pub(crate) fn start(state: AppState, key: ClusterKey) -> Result<Self, StartError> {
        let settings = &state.settings;
        let listener =
            TcpListener::bind(settings.listen_addr).map_err(|source| StartError::Bind {
                addr: settings.listen_addr,
                source,
            })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: settings.listen_addr,
                source,
            })?
            .port();
        if !settings.static_dir.join("index.html").is_file() {
            log::warn!(
                "no index.html in STATIC_DIR {}: the chat page is not served",
                settings.static_dir.display()
            );
        }
        if let Some(relay) = &state.relay {
            // The owner serves relayed requests against itself, over loopback.
            let ip = match settings.listen_addr.ip() {
                ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_owned(),
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                std::net::IpAddr::V4(ip) => ip.to_string(),
            };
            relay.set_loopback(format!("http://{ip}:{port}"));
        }
        let workers = settings.workers;
        let shutdown_secs = settings.shutdown_timeout.as_secs().max(1);
        let state = web::Data::new(state);
        let app_state = state.clone();
        let make_app = move || {
            let settings = &app_state.settings;
            let forwarder = Forwarder::new(
                key.clone(),
                app_state.metrics.clone(),
                settings.poll_timeout,
                max_body_size(settings),
                app_state.relay.clone(),
            );
            let mut app = actix_web::App::new()
                .app_data(app_state.clone())
                .app_data(web::Data::new(forwarder))
                .wrap(Condition::new(
                    !settings.cors_origins.is_empty(),
                    cors(&settings.cors_origins),
                ))
                .wrap(DefaultHeaders::new().add((INSTANCE_HEADER, app_state.instance.as_str())))
                .wrap_fn({
                    let hook = app_state.response_headers.clone();
                    move |req, srv| {
                        let added = hook.as_ref().map(|hook| hook(req.request()));
                        let response = srv.call(req);
                        async move {
                            let mut response = response.await?;
                            for (name, value) in added.into_iter().flatten() {
                                response.headers_mut().append(name, value);
                            }
                            Ok(response)
                        }
                    }
                })
                .wrap(
                    // `%r` would log the connection token and the access token.
                    Logger::new("%a \"%{request}xi\" %s %b %Dms")
                        .custom_request_replace("request", access_log_request_line)
                        .log_target("stickless::access"),
                )
                .configure(routes(&app_state.hubs));
            if let Some(own) = &app_state.routes {
                app = app.configure(|cfg| own(cfg));
            }
            if settings.static_dir.join("index.html").is_file() {
                app = app.service(
                    actix_files::Files::new("/", &settings.static_dir).index_file("index.html"),
                );
            }
            app
        };
        // What actix-web's `HttpServer` would build, plus the upgrade service
        // (`crate::upgrade`): the same settings (its defaults, and ours below).
        let builder = actix_server::Server::build();
        let graceful = builder.graceful_shutdown_signal();
        let mut builder = builder
            // Signals are ours: clients get a Close message before the server stops.
            .disable_signals()
            .shutdown_timeout(shutdown_secs);
        if let Some(workers) = workers {
            builder = builder.workers(workers);
        }
        let local_addr = state.settings.listen_addr;
        let server = builder
            .listen("stickless", listener, move || {
                let graceful = graceful.clone();
                let http = HttpService::build()
                    .graceful_shutdown_signal(move || {
                        let graceful = graceful.clone();
                        async move { graceful.notified().await }
                    })
                    .keep_alive(KeepAlive::default())
                    .client_request_timeout(Duration::from_secs(5))
                    .client_disconnect_timeout(Duration::from_secs(1))
                    // A client that closes its side ends a streaming response at once (SSE),
                    // instead of when a later write fails.
                    .h1_allow_half_closed(false)
                    .local_addr(local_addr)
                    .upgrade(crate::upgrade::service(make_app().into_factory()))
                    // The request's own `Host` header names the host; nothing here reads the
                    // configured one (`AppConfig::new` is not public).
                    .finish(map_config(make_app().into_factory(), |_| {
                        AppConfig::default()
                    }))
                    .tcp();
                // Boxed: actix-server's task for a connection keeps the service's future
                // twice (as it was moved in and as it is awaited), and that future is sized
                // for HTTP/2 as well (awc turns actix-http's `http2` feature on). Boxed, the
                // task holds two pointers and the future is allocated once: 1.3 KiB less
                // for every open connection, every WebSocket included.
                apply_fn_factory(http, |io, service| -> LocalBoxFuture<'static, _> {
                    Box::pin(service.call(io))
                })
            })
            .map_err(|source| StartError::Bind {
                addr: state.settings.listen_addr,
                source,
            })?
            .run();
        let paths: Vec<&str> = state.hubs.iter().map(|hub| hub.path.as_str()).collect();
        log::info!(
            "instance {} ready on port {port} (hubs: {}, backplane: {}, routes: {}, load balancer: {})",
            state.instance,
            paths.join(" "),
            state.bus_name(),
            state.router.routes(),
            state.settings.load_balancer_url.as_deref().unwrap_or("unset")
        );
        Ok(Self {
            port,
            server,
            state,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the instance.
    pub fn handle(&self) -> AppHandle {
        AppHandle {
            server: self.server.handle(),
            state: self.state.clone(),
        }
    }

    /// Serves until stopped.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

impl AppHandle {
    /// Drains the instance, then stops it: no new negotiations (503, `/healthz` says
    /// `draining`); clients without stateful reconnect get a Close message that allows
    /// reconnecting (to another instance, behind a load balancer); stateful clients lose
    /// their socket without a close frame, resume wherever the balancer sends them, and their
    /// sessions move there — a client that lands here again loses its socket again, once a
    /// second. All within `SHUTDOWN_TIMEOUT`; then it says goodbye to the other instances
    /// and stops.
    /// The Close carries no error, as ASP.NET's at shutdown (`{"type":7,"allowReconnect":
    /// true}`): clients such as pysignalr treat any Close error as fatal and would not
    /// reconnect.
    pub async fn shutdown(&self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        let hubs = &self.state.hubs;
        let count: usize = hubs.iter().map(|hub| hub.connections.len()).sum();
        log::info!("draining: {count} connection(s)");
        let closing = Closing::with_message(None, true);
        let deadline = Instant::now() + self.state.settings.shutdown_timeout;
        let mut stateful: usize = hubs.iter().map(|hub| hub.connections.drain(&closing)).sum();
        let mut retry = Instant::now() + STATEFUL_RETRY;
        while stateful > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if Instant::now() >= retry {
                stateful = hubs.iter().map(|hub| hub.connections.drain(&closing)).sum();
                retry = Instant::now() + STATEFUL_RETRY;
            }
        }
        log::info!("draining: {stateful} stateful session(s) left here");
        while self.state.metrics.live_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The others forget this instance now, not after the peer TTL: it stops counting
        // in their cluster size and attempt budget and being a route. Said after the
        // clients were told to go, so their last requests still find it; heartbeats
        // travel on the first hub's bus.
        if let Some(hub) = hubs.first() {
            let bus = hub.connections.host().bus();
            self.state.router.peers().goodbye(&**bus).await;
        }
        // Transports flush the Close message right after the session ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.server.stop(true).await;
    }
}
