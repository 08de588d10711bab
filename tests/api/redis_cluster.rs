//! The Redis Cluster bus on a real 3-master Redis Cluster: cross-instance delivery of every
//! kind of message, and what survives when one master's process dies.
//!
//! [`RedisCluster`] is this file's own fixture: three `redis-server --cluster-enabled yes`
//! on free loopback ports in a temporary folder, joined with
//! `redis-cli --cluster create … --cluster-replicas 0`. Needs `redis-server` and `redis-cli`
//! 7 or later (sharded pub/sub).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{eventually, within};

/// Masters in the test cluster.
const MASTERS: usize = 3;
/// How long a node may be silent before the others mark it failed. Short, so the
/// survivors notice a killed master within the test's deadlines.
const NODE_TIMEOUT_MS: &str = "2000";
/// Upper bound for the cluster to form or a node to come back.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// A free loopback port (the OS picks it; it is released at once for the child to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// One master: its client port, its cluster-bus port and its process.
struct Node {
    port: u16,
    bus_port: u16,
    process: Option<Child>,
}

/// A Redis Cluster of [`MASTERS`] masters and no replicas, stopped (and its folder removed)
/// on drop.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts the masters, creates the cluster and waits until every node says
    /// `cluster_state:ok`.
    pub async fn start() -> Self {
        let unique = format!(
            "stickless-redis-cluster-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ u128::from(free_port())
        );
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let nodes = (0..MASTERS)
            .map(|_| Node {
                port: free_port(),
                bus_port: free_port(),
                process: None,
            })
            .collect();
        let mut cluster = Self { dir, nodes };
        for index in 0..MASTERS {
            cluster.start_node(index).await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let created = within(
            CLUSTER_DEADLINE,
            "redis-cli --cluster create",
            tokio::task::spawn_blocking(move || create.status()),
        )
        .await
        .expect("the create task")
        .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_ok(0..MASTERS).await;
        cluster
    }

    /// Seed URLs for `REDIS_CLUSTER_URLS`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    /// Starts (or restarts, with the same config file, hence the same node id and slots)
    /// master `index`, and waits until it answers.
    pub async fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(node.port.to_string())
            .arg("--cluster-port")
            .arg(node.bus_port.to_string())
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(format!("nodes-{index}.conf"))
            .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
            // The surviving shards keep serving their own slots while one is down.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        node.process = Some(child);
        let port = node.port;
        eventually(CLUSTER_DEADLINE, "redis-server answers", || async move {
            redis_cli(port, &["PING"]).await.ok().filter(|pong| pong == "PONG")
        })
        .await;
    }

    /// Kills master `index` (SIGKILL: no goodbye to the cluster or its clients).
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every node in `nodes` reports `cluster_state:ok` and knows every slot's
    /// owner is reachable again.
    pub async fn wait_until_ok(&self, nodes: impl IntoIterator<Item = usize>) {
        for index in nodes {
            let port = self.nodes[index].port;
            eventually(CLUSTER_DEADLINE, "cluster_state:ok", || async move {
                let info = redis_cli(port, &["CLUSTER", "INFO"]).await.ok()?;
                let ok = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{MASTERS}"))
                    && !redis_cli(port, &["CLUSTER", "NODES"]).await.ok()?.contains("fail");
                ok.then_some(())
            })
            .await;
        }
    }

    /// Waits until the surviving masters have marked master `dead` as failed.
    pub async fn wait_until_marked_failed(&self, dead: usize) {
        let dead_port = self.nodes[dead].port;
        for (index, node) in self.nodes.iter().enumerate() {
            if index == dead {
                continue;
            }
            let port = node.port;
            eventually(CLUSTER_DEADLINE, "the dead master marked fail", || async move {
                let nodes = redis_cli(port, &["CLUSTER", "NODES"]).await.ok()?;
                nodes
                    .lines()
                    .any(|line| line.contains(&format!(":{dead_port}@")) && line.contains("fail"))
                    .then_some(())
            })
            .await;
        }
    }

    /// The index of the master that owns the slot of `channel` (as Redis hashes it: by its
    /// hash tag).
    pub async fn owner_of(&self, channel: &str) -> usize {
        let port = self.nodes[0].port;
        let slot: u16 = redis_cli(port, &["CLUSTER", "KEYSLOT", channel])
            .await
            .expect("CLUSTER KEYSLOT")
            .parse()
            .expect("a slot number");
        let nodes = redis_cli(port, &["CLUSTER", "NODES"])
            .await
            .expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <slots...>
            let owns = fields.iter().skip(8).any(|range| {
                let mut bounds = range.split('-').map(|b| b.parse::<u16>().ok());
                match (bounds.next().flatten(), bounds.next().flatten()) {
                    (Some(low), Some(high)) => (low..=high).contains(&slot),
                    (Some(only), None) => only == slot,
                    _ => false,
                }
            });
            if owns {
                let address = fields[1].split('@').next().unwrap_or_default();
                if let Some(index) = self
                    .nodes
                    .iter()
                    .position(|node| address.ends_with(&format!(":{}", node.port)))
                {
                    return index;
                }
            }
        }
        panic!("no master owns slot {slot} of {channel}");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_node(index);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -p PORT args…` and returns its trimmed output.
async fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let mut command = tokio::process::Command::new("redis-cli");
    command.arg("-p").arg(port.to_string()).args(args);
    command.stdin(Stdio::null()).stderr(Stdio::null());
    let output = within(Duration::from_secs(10), "redis-cli", command.output())
        .await
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!("redis-cli exited with {}", output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
