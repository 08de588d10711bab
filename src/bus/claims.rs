//! Cluster-wide connection claims: which instance serves a connection's transport, kept in
//! the Redis the bus already uses, so that a token is single-use across the cluster as it is
//! on one ASP.NET server (`HttpConnectionDispatcher`: 404 once a connection ended, 409 for a
//! second transport of a live one), wherever the balancer sends the request.
//!
//! One key per connection (namespaced per hub; on Redis Cluster hash-tagged with the
//! connection's channel, so it lives in that slot): its value is the id of the instance
//! that serves the connection, or [`CLOSED`] once the connection ended.
//!
//! - An instance takes the claim when a connection's first transport request starts there
//!   (one atomic script, [`CLAIM_SCRIPT`]: take it if free, else say who holds it). It
//!   lives [`CLAIM_TTL`] and the holder refreshes it every [`CLAIM_REFRESH`] for all its
//!   connections, so a crashed instance leaves nothing behind for long: on one Redis a few
//!   hundred claims per script call ([`REFRESH_SCRIPT`]), on Redis Cluster (a slot per
//!   claim) a bounded number of calls at a time. Never thousands of calls at once: those
//!   queue on the connection that new connections' claims also use, and made them wait past
//!   their timeout (seen at 10,000 connections).
//! - When the connection ends, the holder turns its claim into the closed marker, which
//!   lives as long as the token could still be adopted (the caller's TTL), so that the
//!   token gets 404 on every instance.
//!
//! Redis errors never fail a request: the caller is told [`Claim::Unknown`] and serves as
//! it would without claims; the bus logs once when claims stop working and once when they
//! work again ([`ClaimStore`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::protocol::token::InstanceId;

/// How long a claim lives without a refresh.
pub const CLAIM_TTL: Duration = Duration::from_secs(30);
/// How often an instance refreshes the claims of the connections it serves.
pub const CLAIM_REFRESH: Duration = Duration::from_secs(10);
/// The value of an ended connection's claim (not a valid instance id, which never holds
/// `!`).
pub const CLOSED: &str = "!closed";
/// Longest wait for Redis to answer a claim: past it the request goes on without one.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes the claim `KEYS[1]` for instance `ARGV[1]` for `ARGV[2]` ms if nobody holds it,
/// refreshes it if that instance holds it already; returns the holder (or the closed
/// marker). Atomic, so of two instances starting the same connection at once one wins.
pub const CLAIM_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return held
";

/// [`CLAIM_SCRIPT`]'s rule for every key of `KEYS` at once: instance `ARGV[1]`'s claims
/// live `ARGV[2]` ms more (taken again if Redis lost them); a claim another instance holds,
/// or a closed marker, is left alone. Returns how many keys it saw.
const REFRESH_SCRIPT: &str = r"
for _, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if not held then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  elseif held == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  end
end
return #KEYS
";

/// Claims one [`REFRESH_SCRIPT`] call refreshes (one Redis).
const REFRESH_CHUNK: usize = 256;
/// Claim refreshes in flight at once on Redis Cluster, where every claim is in its own slot.
const REFRESH_IN_FLIGHT: usize = 32;

/// Ends instance `ARGV[1]`'s claim `KEYS[1]`: with a TTL in `ARGV[2]` (ms) it becomes the
/// closed marker `ARGV[3]`, without one it is deleted. A claim another instance holds is
/// left alone.
const END_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
end
return 1
";

/// What the claims say about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody serves it (a lookup only; [`crate::bus::Bus::claim`] takes a free claim).
    Free,
    /// This instance serves it.
    Held(InstanceId),
    /// It ended: its token is spent.
    Closed,
    /// The bus keeps no claims, or could not reach its store: go on as without claims.
    Unknown,
}

impl Claim {
    /// Reads a key's value.
    fn of(value: Option<String>) -> Self {
        match value {
            None => Self::Free,
            Some(value) if value == CLOSED => Self::Closed,
            Some(value) => InstanceId::parse(&value).map_or(Self::Unknown, Self::Held),
        }
    }
}

/// One instance's claims in one hub's namespace: the bus owns it and hands it the
/// connection to Redis it has (`None` while it has none). Logs once when claims stop
/// working and once when they work again.
#[derive(Debug)]
pub struct ClaimStore {
    instance: InstanceId,
    down: AtomicBool,
}

impl ClaimStore {
    /// The claims `instance` takes.
    pub fn new(instance: InstanceId) -> Self {
        Self {
            instance,
            down: AtomicBool::new(false),
        }
    }

    /// Records an outcome; returns the claim, or [`Claim::Unknown`] on an error.
    fn record(&self, outcome: Result<Claim, String>) -> Claim {
        match outcome {
            Ok(claim) => {
                self.worked(Ok(()));
                claim
            }
            Err(error) => {
                self.worked(Err(error));
                Claim::Unknown
            }
        }
    }

    /// Logs when claims stop working and when they work again.
    fn worked(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    log::info!("bus: connection claims work again");
                }
            }
            Err(error) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "bus: connection claims unavailable ({error}); tokens are served \
                         without the cluster-wide single-use check until they are back"
                    );
                }
            }
        }
    }

    /// Runs `command` on `connection` within [`CLAIM_TIMEOUT`].
    async fn run<C, T>(&self, connection: Option<C>, command: redis::Cmd) -> Result<T, String>
    where
        C: ConnectionLike + Send,
        T: redis::FromRedisValue,
    {
        let mut connection = connection.ok_or("the broker is unreachable")?;
        match tokio::time::timeout(CLAIM_TIMEOUT, command.query_async::<T>(&mut connection)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    }

    /// Takes (or refreshes) the claim `key`.
    pub async fn claim<C: ConnectionLike + Send>(&self, connection: Option<C>, key: &str) -> Claim {
        let mut command = redis::cmd("EVAL");
        command
            .arg(CLAIM_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(self.instance.as_str())
            .arg(CLAIM_TTL.as_millis() as u64);
        let outcome = self.run::<C, Option<String>>(connection, command).await;
        self.record(outcome.map(Claim::of))
    }

    /// Reads the claim `key` without taking it.
    pub async fn lookup<C: ConnectionLike + Send>(
        &self,
        connection: Option<C>,
        key: &str,
    ) -> Claim {
        let mut command = redis::cmd("GET");
        command.arg(key);
        let outcome = self.run::<C, Option<String>>(connection, command).await;
        self.record(outcome.map(Claim::of))
    }

    /// Ends this instance's claim `key`: the closed marker for `closed_for`, or deleted
    /// (`None`).
    pub async fn end<C: ConnectionLike + Send>(
        &self,
        connection: Option<C>,
        key: &str,
        closed_for: Option<Duration>,
    ) {
        let ttl = closed_for.map_or(String::new(), |ttl| ttl.as_millis().max(1).to_string());
        let mut command = redis::cmd("EVAL");
        command
            .arg(END_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(self.instance.as_str())
            .arg(ttl)
            .arg(CLOSED);
        let outcome = self.run::<C, i64>(connection, command).await;
        self.record(outcome.map(|_| Claim::Free));
    }

    /// Refreshes this instance's claims `keys` on one Redis: [`REFRESH_CHUNK`] keys per
    /// script call, one call after another, so a claim taken meanwhile waits for one call
    /// at most.
    pub async fn refresh<C: ConnectionLike + Clone + Send>(
        &self,
        connection: Option<C>,
        keys: &[String],
    ) {
        let Some(connection) = connection else {
            return;
        };
        for chunk in keys.chunks(REFRESH_CHUNK) {
            let mut command = redis::cmd("EVAL");
            command.arg(REFRESH_SCRIPT).arg(chunk.len());
            for key in chunk {
                command.arg(key);
            }
            command
                .arg(self.instance.as_str())
                .arg(CLAIM_TTL.as_millis() as u64);
            let outcome = self.run::<C, i64>(Some(connection.clone()), command).await;
            self.worked(outcome.map(drop));
        }
    }

    /// Refreshes this instance's claims `keys` on Redis Cluster, where each lives in its
    /// own slot: one [`CLAIM_SCRIPT`] call per claim, [`REFRESH_IN_FLIGHT`] at a time.
    pub async fn refresh_each<C: ConnectionLike + Clone + Send>(
        &self,
        connection: Option<C>,
        keys: &[String],
    ) {
        let Some(connection) = connection else {
            return;
        };
        for chunk in keys.chunks(REFRESH_IN_FLIGHT) {
            let claims = chunk
                .iter()
                .map(|key| self.claim(Some(connection.clone()), key));
            futures_util::future::join_all(claims).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_claims() {
        assert_eq!(Claim::of(None), Claim::Free);
        assert_eq!(Claim::of(Some(CLOSED.into())), Claim::Closed);
        assert_eq!(
            Claim::of(Some("node-2".into())),
            Claim::Held(InstanceId::parse("node-2").unwrap())
        );
        assert_eq!(Claim::of(Some("not an id".into())), Claim::Unknown);
        assert!(InstanceId::parse(CLOSED).is_err(), "no instance is CLOSED");
    }
}
