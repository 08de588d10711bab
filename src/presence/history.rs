//! The recent messages of each conversation (a hub's lobby, a room), so a client that
//! joins or reconnects sees what was said. Messages are stored as the JSON clients
//! receive; each carries an id, which lets a client drop what it already shows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use super::store::{RedisStore, Store};
use super::{lock, StoreError};

/// Messages kept per conversation.
pub const HISTORY_LEN: usize = 100;

/// The last [`HISTORY_LEN`] messages of each conversation, in Redis (a capped list per
/// conversation: `LPUSH` + `LTRIM`) or in this process.
pub struct History {
    prefix: String,
    redis: Option<RedisStore>,
    local: Mutex<HashMap<String, VecDeque<String>>>,
}

impl History {
    /// History for the hub named `hub`, kept in `store` (each conversation is one key,
    /// so it fits a Redis Cluster as it is).
    pub fn new(hub: &str, store: Store<'_>) -> Self {
        Self {
            prefix: format!("stickless:{hub}:history"),
            redis: store.redis(),
            local: Mutex::default(),
        }
    }

    /// Keeps `message` as the newest of `conversation`, dropping the oldest past
    /// [`HISTORY_LEN`].
    pub async fn push(&self, conversation: &str, message: &Value) -> Result<(), StoreError> {
        let json = message.to_string();
        let Some(redis) = &self.redis else {
            let mut local = lock(&self.local);
            let list = local.entry(conversation.to_owned()).or_default();
            list.push_front(json);
            list.truncate(HISTORY_LEN);
            return Ok(());
        };
        let key = format!("{}:{conversation}", self.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .lpush(&key, json)
            .ignore()
            .ltrim(&key, 0, HISTORY_LEN as isize - 1)
            .ignore();
        redis.run(&pipe).await
    }

    /// The kept messages of `conversation`, oldest first.
    pub async fn recent(&self, conversation: &str) -> Result<Vec<Value>, StoreError> {
        let newest_first: Vec<String> = match &self.redis {
            None => lock(&self.local)
                .get(conversation)
                .map(|list| list.iter().cloned().collect())
                .unwrap_or_default(),
            Some(redis) => {
                let mut pipe = redis::pipe();
                pipe.lrange(
                    format!("{}:{conversation}", self.prefix),
                    0,
                    HISTORY_LEN as isize - 1,
                );
                let (list,): (Vec<String>,) = redis.run(&pipe).await?;
                list
            }
        };
        Ok(newest_first
            .iter()
            .rev()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_newest_hundred_of_each_conversation_oldest_first() {
        let history = History::new("t", Store::InProcess);
        for i in 0..150 {
            history.push("lobby", &Value::from(i)).await.unwrap();
        }
        history.push("room:a", &Value::from("x")).await.unwrap();
        let lobby = history.recent("lobby").await.unwrap();
        assert_eq!(lobby.len(), HISTORY_LEN);
        assert_eq!(lobby.first(), Some(&Value::from(50)));
        assert_eq!(lobby.last(), Some(&Value::from(149)));
        assert_eq!(
            history.recent("room:a").await.unwrap(),
            vec![Value::from("x")]
        );
        assert!(history.recent("room:b").await.unwrap().is_empty());
    }
}
