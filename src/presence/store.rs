//! Where presence and history live: in this process, or in Redis when `REDIS_URL` is set.
//!
//! The Redis connection is opened on first use and kept (a `ConnectionManager`, which
//! reconnects by itself); every command has a deadline, so a Redis that hangs costs a
//! caller at most [`REDIS_TIMEOUT`], never a stuck hub method.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::FromRedisValue;
use tokio::sync::OnceCell;

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

/// A lazily opened Redis connection shared by the presence and history components.
pub(crate) struct RedisStore {
    url: String,
    connection: OnceCell<ConnectionManager>,
}

impl RedisStore {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            connection: OnceCell::new(),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let open = async {
            let client = redis::Client::open(self.url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(2);
            let manager = tokio::time::timeout(
                REDIS_TIMEOUT,
                ConnectionManager::new_with_config(client, config),
            )
            .await
            .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))??;
            Ok::<_, StoreError>(manager)
        };
        self.connection.get_or_try_init(|| open).await.cloned()
    }

    /// Runs one pipeline (atomically, as MULTI/EXEC when `pipe` says so).
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection().await?;
        tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<T>(&mut connection))
            .await
            .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))?
            .map_err(StoreError::from)
    }
}
