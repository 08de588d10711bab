//! Where presence and history live: in this process, in Redis (`REDIS_URL`), or in a Redis
//! Cluster (`REDIS_CLUSTER_URLS`).
//!
//! The Redis connection is opened on first use and kept (a `ConnectionManager`, or a
//! cluster connection; both reconnect by themselves); every command has a deadline, so a
//! Redis that hangs costs a caller at most [`REDIS_TIMEOUT`], never a stuck hub method.
//! On a Redis Cluster a pipeline must stay in one hash slot: the keys that one pipeline
//! touches share a hash tag (see the key table in the module above).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::FromRedisValue;
use tokio::sync::OnceCell;

use crate::config::Settings;

/// Longest wait for Redis to connect or to answer one command (or pipeline).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Presence or history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused the command or the connection.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Where a hub's presence and history are kept.
#[derive(Debug, Clone, Copy)]
pub enum Store<'a> {
    /// In this process: the whole truth on one instance, this instance's share in a
    /// cluster without Redis.
    InProcess,
    /// One Redis, at this URL.
    Redis(&'a str),
    /// A Redis Cluster, reached through these seed URLs.
    RedisCluster(&'a [String]),
}

impl<'a> Store<'a> {
    /// The Redis the settings name for the backplane (`REDIS_URL` or
    /// `REDIS_CLUSTER_URLS`), or this process.
    pub fn of(settings: &'a Settings) -> Self {
        match (&settings.redis_url, settings.redis_cluster_urls.as_slice()) {
            (Some(url), _) => Self::Redis(url),
            (None, []) => Self::InProcess,
            (None, seeds) => Self::RedisCluster(seeds),
        }
    }

    pub(crate) fn redis(self) -> Option<RedisStore> {
        match self {
            Self::InProcess => None,
            Self::Redis(url) => Some(RedisStore::new(Target::One(url.to_owned()))),
            Self::RedisCluster(seeds) => Some(RedisStore::new(Target::Cluster(seeds.to_vec()))),
        }
    }
}

enum Target {
    One(String),
    Cluster(Vec<String>),
}

#[derive(Clone)]
enum Connection {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A lazily opened Redis connection shared by the presence and history components.
pub(crate) struct RedisStore {
    target: Target,
    connection: OnceCell<Connection>,
}

impl RedisStore {
    fn new(target: Target) -> Self {
        Self {
            target,
            connection: OnceCell::new(),
        }
    }

    async fn open(&self) -> Result<Connection, StoreError> {
        match &self.target {
            Target::One(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(2);
                Ok(Connection::One(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Target::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT)
                    .retries(2)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn connection(&self) -> Result<Connection, StoreError> {
        let open = async {
            tokio::time::timeout(REDIS_TIMEOUT, self.open())
                .await
                .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))?
        };
        self.connection.get_or_try_init(|| open).await.cloned()
    }

    /// Runs one pipeline (atomically, as MULTI/EXEC when `pipe` says so).
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let query = async {
            match self.connection().await? {
                Connection::One(mut one) => Ok(pipe.query_async::<T>(&mut one).await?),
                Connection::Cluster(mut cluster) => Ok(pipe.query_async::<T>(&mut cluster).await?),
            }
        };
        tokio::time::timeout(REDIS_TIMEOUT, query)
            .await
            .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))?
    }
}
