//! Configuration: every setting is an environment variable and a `--flag` of the same
//! name (DESIGN.md, "Configuration"). Invalid values stop the process at start with a
//! message naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::protocol::token::{ClusterKey, InstanceId};
use crate::routing::{ForwardBudget, Routes};

/// Shortest cluster secret accepted: it keys the HMAC of every token.
pub const MIN_SECRET_LEN: usize = 16;

/// All settings of one instance.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "stickless",
    version,
    about = "SignalR-compatible real-time server that needs no sticky sessions"
)]
pub struct Settings {
    /// Address to bind; port 0 picks a free port.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// This instance's name (1-64 of A-Z a-z 0-9 - _); default: host name plus a random suffix.
    #[arg(long, env = "INSTANCE_ID", value_parser = parse_instance_id)]
    pub instance_id: Option<InstanceId>,

    /// Folder of the chat page.
    #[arg(long, env = "STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,

    /// Redis backplane (redis:// or rediss://); unset = in-process backplane, one instance.
    #[arg(long, env = "REDIS_URL", value_parser = parse_redis_url)]
    pub redis_url: Option<String>,

    /// Redis Cluster bus with sharded pub/sub: seed nodes, comma-separated
    /// (`redis://host:port,redis://host:port`); excludes REDIS_URL.
    #[arg(long, env = "REDIS_CLUSTER_URLS", value_delimiter = ',', value_parser = parse_redis_url)]
    pub redis_cluster_urls: Vec<String>,

    /// Where misrouted requests are re-forwarded (http://host:port); unset = no forwarding.
    #[arg(long, env = "LOAD_BALANCER_URL", value_parser = parse_base_url)]
    pub load_balancer_url: Option<String>,

    /// HMAC key shared by all instances (at least 16 characters); default: random per process.
    #[arg(long, env = "CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,

    /// Re-forward budget per misrouted request: `auto` sizes it from the cluster's size
    /// for at most one miss in a million under a random balancer (capped at 128), or a number; 0
    /// disables re-forwarding through the load balancer.
    #[arg(long, env = "MAX_FORWARD_ATTEMPTS", default_value = "auto")]
    pub max_forward_attempts: ForwardBudget,

    /// Routes to a connection held by another instance, tried in this fixed order:
    /// adopt, direct, bus, load-balancer (comma-separated; `none` turns all off).
    #[arg(long, env = "ROUTES", default_value = "adopt,direct,bus,load-balancer")]
    pub routes: Routes,

    /// This instance's direct URL (http://host:port), announced over Redis for owner-directed
    /// routing; `{hostname}` in it is replaced by the host name (one value for every replica).
    #[arg(long, env = "ADVERTISE_URL", value_parser = parse_base_url)]
    pub advertise_url: Option<String>,

    /// Serve a misrouted WebSocket for a fresh token right here instead of forwarding it.
    #[arg(long, env = "ADOPT_WEBSOCKETS", default_value_t = true, action = ArgAction::Set)]
    pub adopt_websockets: bool,

    /// Largest hub message accepted from a client, in bytes.
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(256..=16 * 1024 * 1024))]
    pub max_message_size: u64,

    /// Records queued for one client before it is disconnected as too slow.
    #[arg(long, env = "OUTBOUND_QUEUE_LENGTH", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(8..=1_000_000))]
    pub outbound_queue_length: u64,

    /// Items buffered per client-to-server stream before the server stops reading from
    /// that connection until the hub method takes one (ASP.NET's StreamBufferCapacity).
    #[arg(long, env = "STREAM_BUFFER_CAPACITY", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub stream_buffer_capacity: u64,

    /// Client-to-server streams one connection may have open at once; an invocation that
    /// would open more is refused with an error.
    #[arg(long, env = "MAX_CLIENT_STREAMS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_client_streams: u64,

    /// Longest a hub method waits for a client's result (`invoke`); ASP.NET waits forever.
    #[arg(long, env = "CLIENT_RESULT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub client_result_timeout: Duration,

    /// Negotiated connections allowed to wait for their transport at once (all hubs);
    /// past this, negotiate answers 503 and `stickless_negotiations_refused_total` counts
    /// it. Each waits at most DISCONNECT_TIMEOUT.
    #[arg(long, env = "MAX_PENDING_NEGOTIATIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pending_negotiations: u64,

    /// Origins allowed to connect from other sites (comma-separated); empty = CORS off.
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Send a Ping when nothing was sent for this long (WebSockets, SSE).
    #[arg(long, env = "KEEP_ALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keep_alive_interval: Duration,

    /// Close a client silent for this long, counted from its first Ping (WebSockets, SSE).
    #[arg(long, env = "CLIENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub client_timeout: Duration,

    /// Time a client has to send its handshake.
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Drop a connection with no active transport request for this long.
    #[arg(long, env = "DISCONNECT_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub disconnect_timeout: Duration,

    /// Answer an idle long poll with an empty 200 after this long (must stay under 100 s).
    #[arg(long, env = "POLL_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub poll_timeout: Duration,

    /// Time clients get to receive their Close message at shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Offer stateful reconnect to clients that ask for it (`withStatefulReconnect()`):
    /// negotiate answers `useStatefulReconnect`, and a dropped WebSocket resumes on any
    /// instance with no message lost (README, "Stateful reconnect").
    #[arg(long, env = "ALLOW_STATEFUL_RECONNECT", default_value_t = true, action = ArgAction::Set)]
    pub allow_stateful_reconnect: bool,

    /// Bytes of unacknowledged messages kept per stateful connection for replay; a client
    /// that falls further behind is closed with a Close message (ASP.NET's default).
    #[arg(long, env = "STATEFUL_RECONNECT_BUFFER_SIZE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub stateful_reconnect_buffer_size: u64,

    /// Send clients the detail of server errors (exception-like text after ASP.NET's
    /// generic messages), like ASP.NET's `EnableDetailedErrors`; off by default, because
    /// the detail may reveal the server's internals.
    #[arg(long, env = "ENABLE_DETAILED_ERRORS", default_value_t = false, action = ArgAction::Set)]
    pub enable_detailed_errors: bool,

    /// HTTP worker threads; default: one per core.
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,

    /// Log filter (env_logger syntax).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// The documented defaults, and nothing else: no environment variable and no command-line
/// argument is read, so a test or an embedding application gets the same settings whatever
/// the shell exports. Change what you need with struct update syntax:
/// `Settings { listen_addr: "127.0.0.1:0".parse()?, ..Settings::default() }`.
impl Default for Settings {
    fn default() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        // The defaults stay where `--help` shows them (the `#[arg]` attributes); only
        // the environment lookup is switched off.
        let command = Self::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command
            .try_get_matches_from(["stickless"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are settings")
    }
}

/// A combination of settings that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Several instances need one secret, or their tokens and probes would not verify.
    #[error("{0} is set, so instances must share a CLUSTER_SECRET: set CLUSTER_SECRET (at least {MIN_SECRET_LEN} characters) on every instance")]
    SecretRequired(&'static str),
    /// A secret too short to be a key.
    #[error("CLUSTER_SECRET must be at least {MIN_SECRET_LEN} characters long")]
    SecretTooShort,
    /// Long polls must end before the client's 100 s request timeout.
    #[error("POLL_TIMEOUT must be between 1s and 95s (the client gives up on a poll after 100 s)")]
    PollTimeout,
    /// Pings must come often enough for the client's 30 s server timeout.
    #[error(
        "KEEP_ALIVE_INTERVAL must be between 1s and 25s (clients drop a server silent for 30 s)"
    )]
    KeepAlive,
    /// One bus only: a Redis server or a Redis Cluster.
    #[error("REDIS_URL and REDIS_CLUSTER_URLS are both set: set REDIS_URL for one Redis server, or REDIS_CLUSTER_URLS for a Redis Cluster, not both")]
    TwoBuses,
}

impl Settings {
    /// Checks settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.is_some() && !self.redis_cluster_urls.is_empty() {
            return Err(ConfigError::TwoBuses);
        }
        match &self.cluster_secret {
            Some(secret) if secret.len() < MIN_SECRET_LEN => {
                return Err(ConfigError::SecretTooShort)
            }
            Some(_) => {}
            None if self.redis_url.is_some() => {
                return Err(ConfigError::SecretRequired("REDIS_URL"))
            }
            None if !self.redis_cluster_urls.is_empty() => {
                return Err(ConfigError::SecretRequired("REDIS_CLUSTER_URLS"))
            }
            None if self.load_balancer_url.is_some() => {
                return Err(ConfigError::SecretRequired("LOAD_BALANCER_URL"))
            }
            None if self.advertise_url.is_some() => {
                return Err(ConfigError::SecretRequired("ADVERTISE_URL"))
            }
            None => {}
        }
        if self.poll_timeout < Duration::from_secs(1) || self.poll_timeout > Duration::from_secs(95)
        {
            return Err(ConfigError::PollTimeout);
        }
        if self.keep_alive_interval < Duration::from_secs(1)
            || self.keep_alive_interval > Duration::from_secs(25)
        {
            return Err(ConfigError::KeepAlive);
        }
        Ok(())
    }

    /// The HMAC key: the configured secret, or a random one for a lone instance.
    pub fn cluster_key(&self) -> ClusterKey {
        match &self.cluster_secret {
            Some(secret) => ClusterKey::from_secret(secret.as_bytes()),
            None => ClusterKey::random(),
        }
    }

    /// The advertised URL with `{hostname}` expanded.
    pub fn advertise_url(&self) -> Option<String> {
        self.advertise_url
            .as_ref()
            .map(|url| url.replace("{hostname}", &host_name()))
    }

    /// The configured instance id, or the host name plus a random suffix.
    pub fn instance_id(&self) -> InstanceId {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let host: String = host_name()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let name = if host.is_empty() {
            format!("stickless-{suffix}")
        } else {
            format!("{host}-{suffix}")
        };
        InstanceId::parse(&name).unwrap_or_else(|_| {
            InstanceId::parse(&format!("stickless-{suffix}")).expect("a valid fallback id")
        })
    }
}

/// This machine's (or container's) host name.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn parse_instance_id(raw: &str) -> Result<InstanceId, String> {
    InstanceId::parse(raw).map_err(|e| e.to_string())
}

fn parse_redis_url(raw: &str) -> Result<String, String> {
    let ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|scheme| raw.starts_with(scheme));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!("{raw:?} is not a redis:// or rediss:// URL"))
    }
}

/// Accepts `http://host[:port]` with no path, query or trailing slash worries.
fn parse_base_url(raw: &str) -> Result<String, String> {
    let rest = raw
        .strip_prefix("http://")
        .ok_or_else(|| format!("{raw:?} must start with http://"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!("{raw:?} must be http://host[:port] with no path"));
    }
    Ok(format!("http://{authority}"))
}

/// Accepts `500ms`, `15s`, `2m` or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => raw.split_at(at),
        None => (raw, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 500ms, 15s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(format!("{raw:?} is not a duration like 500ms, 15s or 2m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn base_urls_are_normalised_and_checked() {
        assert_eq!(
            parse_base_url("http://lb:8080/"),
            Ok("http://lb:8080".into())
        );
        assert!(parse_base_url("https://lb").is_err());
        assert!(parse_base_url("http://lb/path").is_err());
        assert!(parse_base_url("lb:8080").is_err());
    }

    #[test]
    fn a_cluster_needs_a_shared_secret() {
        let mut settings = Settings {
            redis_url: Some("redis://127.0.0.1".into()),
            ..Settings::default()
        };
        assert!(matches!(
            settings.validate(),
            Err(ConfigError::SecretRequired("REDIS_URL"))
        ));
        settings.cluster_secret = Some("short".into());
        assert!(matches!(
            settings.validate(),
            Err(ConfigError::SecretTooShort)
        ));
        settings.cluster_secret = Some("0123456789abcdef".into());
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn redis_and_redis_cluster_exclude_each_other() {
        let mut settings = Settings::try_parse_from([
            "stickless",
            "--redis-cluster-urls",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        ])
        .expect("two seed nodes parse");
        assert_eq!(settings.redis_cluster_urls.len(), 2);
        assert!(matches!(
            settings.validate(),
            Err(ConfigError::SecretRequired("REDIS_CLUSTER_URLS"))
        ));
        settings.cluster_secret = Some("0123456789abcdef".into());
        assert!(settings.validate().is_ok());
        settings.redis_url = Some("redis://127.0.0.1".into());
        assert!(matches!(settings.validate(), Err(ConfigError::TwoBuses)));
        assert!(
            Settings::try_parse_from(["stickless", "--redis-cluster-urls", "127.0.0.1:7000"])
                .is_err()
        );
    }

    #[test]
    fn the_defaults_are_valid() {
        let settings = Settings::default();
        assert!(settings.validate().is_ok());
        assert_eq!(settings.listen_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(settings.instance_id, None);
        assert_eq!(settings.static_dir, PathBuf::from("static"));
        assert_eq!(settings.redis_url, None);
        assert_eq!(settings.load_balancer_url, None);
        assert_eq!(settings.cluster_secret, None);
        assert_eq!(settings.max_forward_attempts, ForwardBudget::Auto);
        assert_eq!(settings.routes, Routes::ALL);
        assert_eq!(settings.advertise_url, None);
        assert!(settings.adopt_websockets);
        assert_eq!(settings.max_message_size, 32 * 1024);
        assert_eq!(settings.outbound_queue_length, 1024);
        assert!(settings.cors_origins.is_empty());
        assert_eq!(settings.keep_alive_interval, Duration::from_secs(15));
        assert_eq!(settings.client_timeout, Duration::from_secs(30));
        assert_eq!(settings.handshake_timeout, Duration::from_secs(15));
        assert_eq!(settings.disconnect_timeout, Duration::from_secs(15));
        assert_eq!(settings.poll_timeout, Duration::from_secs(90));
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(settings.workers, None);
        assert_eq!(settings.log_filter, "info");
        assert!(!settings.instance_id().as_str().is_empty());
    }
}
