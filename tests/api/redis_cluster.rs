//! The Redis Cluster bus on a real 3-master Redis Cluster: cross-instance delivery of every
//! kind of message, and what survives when one master's process dies.
//!
//! [`RedisCluster`] is this file's own fixture: three `redis-server --cluster-enabled yes`
//! on free loopback ports in a temporary folder, joined with
//! `redis-cli --cluster create … --cluster-replicas 0`. Needs `redis-server` and `redis-cli`
//! 7 or later (sharded pub/sub).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use stickless::{demo, App, Hub, HubBuilder, HubContext, HubError, InstanceId};

use crate::helpers::app::{start, test_settings};
use crate::helpers::{eventually, is_call, within, Api, HubClient, LpClient, TestApp, WsClient};

/// Masters in the test cluster.
const MASTERS: usize = 3;
/// How long a node may be silent before the others mark it failed. Short, so the
/// survivors notice a killed master within the test's deadlines.
const NODE_TIMEOUT_MS: &str = "2000";
/// Upper bound for the cluster to form or a node to come back.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// A free loopback port for a master, from the launcher (below the kernel's ephemeral
/// range, so an outgoing connection cannot take it before the master binds or rebinds it).
fn free_port() -> u16 {
    crate::devcluster::free_port().expect("a free loopback port")
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
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let unique = format!("stickless-redis-cluster-{}-{nanos}", std::process::id());
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
            redis_cli(port, &["PING"])
                .await
                .ok()
                .filter(|pong| pong == "PONG")
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
                    && !redis_cli(port, &["CLUSTER", "NODES"])
                        .await
                        .ok()?
                        .contains("fail");
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
            eventually(
                CLUSTER_DEADLINE,
                "the dead master marked fail",
                || async move {
                    let nodes = redis_cli(port, &["CLUSTER", "NODES"]).await.ok()?;
                    nodes
                        .lines()
                        .any(|line| {
                            line.contains(&format!(":{dead_port}@")) && line.contains("fail")
                        })
                        .then_some(())
                },
            )
            .await;
        }
    }

    /// Moves the (keyless) slot of `channel` to master `to`, as `redis-cli --cluster
    /// reshard` does: `IMPORTING` on the target, `MIGRATING` on the source, then the new
    /// owner on every node ([CLUSTER SETSLOT](https://redis.io/docs/latest/commands/cluster-setslot/)).
    pub async fn move_slot_of(&self, channel: &str, to: usize) {
        let from = self.owner_of(channel).await;
        let slot = redis_cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", channel])
            .await
            .expect("CLUSTER KEYSLOT");
        let id = |index: usize| redis_cli(self.nodes[index].port, &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from).await.expect("an id"), id(to).await.expect("an id"));
        let setslot = |index: usize, state: &'static str, node: String| {
            let port = self.nodes[index].port;
            let slot = slot.clone();
            async move {
                let args = ["CLUSTER", "SETSLOT", slot.as_str(), state, node.as_str()];
                let reply = redis_cli(port, &args).await.expect("CLUSTER SETSLOT");
                assert_eq!(reply, "OK", "CLUSTER SETSLOT {state} on master {index}");
            }
        };
        setslot(to, "IMPORTING", from_id).await;
        setslot(from, "MIGRATING", to_id.clone()).await;
        setslot(to, "NODE", to_id.clone()).await;
        setslot(from, "NODE", to_id.clone()).await;
        for index in (0..MASTERS).filter(|i| *i != from && *i != to) {
            setslot(index, "NODE", to_id.clone()).await;
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

// ---------------------------------------------------------------------------------------
// Instances on the cluster bus
// ---------------------------------------------------------------------------------------

/// The secret every instance of a test shares.
const SECRET: &str = "redis-cluster-test-secret";
/// The namespace of the test hub's channels (`stickless:<hub>`).
const NAMESPACE: &str = "stickless:chat";

/// A hub (at `/chat`, where the helpers' clients connect) with one method per kind of
/// target, including a group join for a connection on any instance. Every delivery is a
/// call of `Got(text)`, except `Send`, which broadcasts `Send(text)` (the helpers' marker).
fn test_hub() -> HubBuilder {
    Hub::builder("chat")
        .method("Send", |ctx: HubContext, (text,): (String,)| async move {
            ctx.clients().all().send("Send", (text,)).await?;
            Ok(())
        })
        .method(
            "JoinGroup",
            |ctx: HubContext, (group,): (String,)| async move {
                ctx.groups().add(ctx.connection_id.as_str(), &group).await;
                Ok(())
            },
        )
        .method(
            "AddToGroup",
            |ctx: HubContext, (connection, group): (String, String)| async move {
                ctx.groups().add(&connection, &group).await;
                Ok(())
            },
        )
        .method(
            "SendToGroup",
            |ctx: HubContext, (group, text): (String, String)| async move {
                ctx.clients().group(&group).send("Got", (text,)).await?;
                Ok::<_, HubError>(())
            },
        )
        .method(
            "SendTo",
            |ctx: HubContext, (connection, text): (String, String)| async move {
                ctx.clients()
                    .client(&connection)
                    .send("Got", (text,))
                    .await?;
                Ok(())
            },
        )
        .method(
            "SendToUser",
            |ctx: HubContext, (user, text): (String, String)| async move {
                ctx.clients().user(&user).send("Got", (text,)).await?;
                Ok(())
            },
        )
        .method(
            "Ask",
            |ctx: HubContext, (connection, question): (String, String)| async move {
                let answer: String = ctx
                    .clients()
                    .client(&connection)
                    .invoke("Question", (question,))
                    .await?;
                Ok::<_, HubError>(answer)
            },
        )
}

/// Starts an in-process instance named `name` on the cluster bus and waits until its
/// `/healthz` says `ok` (every master answers, every channel subscribed).
async fn spawn_instance(redis: &RedisCluster, name: &str) -> TestApp {
    let mut settings = test_settings();
    settings.redis_cluster_urls = redis.urls();
    settings.cluster_secret = Some(SECRET.into());
    settings.instance_id = Some(InstanceId::parse(name).expect("an instance id"));
    let app = start(
        App::new(settings)
            .hub("/chat", test_hub())
            .user_id(demo::user_id),
    )
    .await;
    assert_eq!(app.instance, name);
    wait_for_status(&app.api, "ok").await;
    assert_eq!(app.api.healthz().await["backplane"], "redis-cluster");
    app
}

/// Waits until `/healthz` of `api` reports `status`.
async fn wait_for_status(api: &Api, status: &str) {
    let what = format!("/healthz says {status}");
    eventually(CLUSTER_DEADLINE, &what, || async move {
        (api.healthz().await["status"] == status).then_some(())
    })
    .await;
}

/// Whether `record` is a call of `Got(text)`.
fn got(record: &Value, text: &str) -> bool {
    is_call(record, "Got") && record["arguments"][0] == text
}

/// Broadcasts `Send(marker)` from `clients[from]` and returns, per client, the texts of the
/// `Got` calls it received before the marker. Only meaningful for messages whose channel
/// lives on the same shard as `all`, or that were awaited already: order is kept per
/// channel, not across shards.
async fn got_before_marker(
    clients: &mut [Box<dyn HubClient>],
    from: usize,
    marker: &str,
) -> Vec<Vec<String>> {
    clients[from].fire("Send", json!([marker])).await;
    let mut seen = Vec::new();
    for client in clients.iter_mut() {
        let texts = client
            .records_before_marker(marker)
            .await
            .iter()
            .filter(|r| is_call(r, "Got"))
            .map(|r| r["arguments"][0].as_str().unwrap_or_default().to_owned())
            .collect();
        seen.push(texts);
    }
    seen
}

/// A group name whose channel lives on master `wanted` (`true`) or on any other master
/// (`false`).
async fn group_on(redis: &RedisCluster, wanted: usize, on_it: bool) -> String {
    for n in 0..1000 {
        let name = format!("room-{n}");
        let owner = redis
            .owner_of(&format!("{{{NAMESPACE}:group:{name}}}"))
            .await;
        if (owner == wanted) == on_it {
            return name;
        }
    }
    panic!("no group name found for master {wanted}");
}

/// Sends `Got("<group> probe N")` to `group` from `sender` until `member` receives one,
/// failing after [`CLUSTER_DEADLINE`]: for a change (a join over the bus, a moved slot)
/// that takes effect at a moment no client can observe otherwise.
async fn probe_group(
    sender: &mut dyn HubClient,
    member: &mut dyn HubClient,
    group: &str,
    what: &str,
) {
    let prefix = format!("{group} probe");
    let is_probe = |r: &Value| {
        is_call(r, "Got")
            && r["arguments"][0]
                .as_str()
                .is_some_and(|t| t.starts_with(&prefix))
    };
    let deadline = std::time::Instant::now() + CLUSTER_DEADLINE;
    for probe in 1.. {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not take effect"
        );
        sender
            .call("SendToGroup", json!([group, format!("{prefix} {probe}")]))
            .await;
        // Anything else (a keep-alive Ping) is not what this waits for.
        let record = member.next_record(Duration::from_millis(500)).await;
        if record.as_ref().is_some_and(is_probe) {
            return;
        }
    }
}

#[actix_web::test]
async fn every_kind_of_message_crosses_instances_over_a_redis_cluster() {
    let redis = RedisCluster::start().await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let c = spawn_instance(&redis, "node-c").await;
    let alice = [("Authorization", "Bearer alice")];
    let mut clients: Vec<Box<dyn HubClient>> = vec![
        Box::new(WsClient::connect(&a).await),
        Box::new(LpClient::connect(&b).await),
        Box::new(WsClient::connect(&c).await),
        Box::new(WsClient::connect_via(&b, &b, &alice).await),
        Box::new(LpClient::connect_with_headers(&c, &alice).await),
    ];
    let ids: Vec<String> = clients
        .iter()
        .map(|c| c.connection_id().to_owned())
        .collect();

    // All: every client on every instance.
    clients[0].call("Send", json!(["to all"])).await;
    for client in clients.iter_mut() {
        client.recv_call("Send", &|m| m == "to all").await;
    }

    // Group: clients 1 (on b) and 2 (on c) join themselves; the send comes from a.
    clients[1].call("JoinGroup", json!(["room"])).await;
    clients[2].call("JoinGroup", json!(["room"])).await;
    clients[0]
        .call("SendToGroup", json!(["room", "to room"]))
        .await;
    clients[1].recv("room on b", &|r| got(r, "to room")).await;
    clients[2].recv("room on c", &|r| got(r, "to room")).await;

    // Client: one connection on another instance.
    clients[0]
        .call("SendTo", json!([ids[4], "to one connection"]))
        .await;
    clients[4]
        .recv("the connection's message", &|r| got(r, "to one connection"))
        .await;

    // User: both of alice's connections, on b and on c.
    clients[0]
        .call("SendToUser", json!(["alice", "to alice"]))
        .await;
    clients[3].recv("alice on b", &|r| got(r, "to alice")).await;
    clients[4].recv("alice on c", &|r| got(r, "to alice")).await;

    // A group join for a connection on another instance travels on that connection's
    // channel; the group's messages travel on the group's channel, maybe another shard,
    // so the test waits for the join to show rather than assume an order between them.
    clients[0]
        .call("AddToGroup", json!([ids[2], "remote"]))
        .await;
    let (sender, rest) = clients.split_at_mut(1);
    probe_group(
        sender[0].as_mut(),
        rest[1].as_mut(),
        "remote",
        "the remote group join",
    )
    .await;

    // Nobody got what was not theirs (everything above was awaited, so the marker comes
    // after it).
    let seen = got_before_marker(&mut clients, 0, "end").await;
    for (index, texts) in seen.iter().enumerate() {
        assert!(
            texts.iter().all(|t| t.starts_with("remote probe")) || index == 2,
            "client {index} got {texts:?}"
        );
        if index != 2 {
            assert!(texts.is_empty(), "client {index} got {texts:?}");
        }
    }
}

#[actix_web::test]
async fn a_client_result_crosses_a_redis_cluster_and_back() {
    let redis = RedisCluster::start().await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let mut asker = WsClient::connect(&a).await;
    let mut asked = LpClient::connect(&b).await;
    let target = asked.connection_id().to_owned();
    // The asker's method waits for the answer while the asked client, on the other
    // instance, gets the question with an invocation id and answers it.
    let id = asker.next_id();
    asker
        .send(json!({
            "type": 1, "invocationId": id, "target": "Ask", "arguments": [target, "why?"]
        }))
        .await;
    let question = asked
        .recv("the question", &|r| is_call(r, "Question"))
        .await;
    assert_eq!(question["arguments"], json!(["why?"]));
    let question_id = question["invocationId"]
        .as_str()
        .expect("a client-result invocation has an id")
        .to_owned();
    asked
        .send(json!({ "type": 3, "invocationId": question_id, "result": "because" }))
        .await;
    let completion = asker
        .recv("the answer", &|r| crate::helpers::is_completion(r, &id))
        .await;
    assert_eq!(completion["result"], "because", "{completion}");
}

#[actix_web::test]
async fn a_dead_master_loses_only_its_shards_messages_and_the_bus_recovers_with_it() {
    let mut redis = RedisCluster::start().await;
    let all_shard = redis.owner_of(&format!("{{{NAMESPACE}:all}}")).await;
    let dead = (all_shard + 1) % MASTERS;
    let doomed = group_on(&redis, dead, true).await;
    let surviving = group_on(&redis, dead, false).await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let mut sender = WsClient::connect(&a).await;
    let mut member = LpClient::connect(&b).await;
    member.call("JoinGroup", json!([doomed.as_str()])).await;
    member.call("JoinGroup", json!([surviving.as_str()])).await;
    sender
        .call("SendToGroup", json!([doomed.as_str(), "before"]))
        .await;
    member
        .recv("the doomed shard works at first", &|r| got(r, "before"))
        .await;
    let errors = "stickless_backplane_publish_errors_total";
    let errors_before = a.metric(errors).await;

    redis.kill_node(dead);

    // Both instances notice: one master does not answer.
    wait_for_status(&a, "degraded").await;
    wait_for_status(&b, "degraded").await;
    redis.wait_until_marked_failed(dead).await;

    // Messages on the surviving shards flow: a group there, and `all`.
    sender
        .call("SendToGroup", json!([doomed.as_str(), "lost"]))
        .await;
    sender
        .call("SendToGroup", json!([surviving.as_str(), "survives"]))
        .await;
    member
        .recv("the surviving shard's group", &|r| got(r, "survives"))
        .await;
    sender.call("Send", json!(["all survives"])).await;
    member.recv_call("Send", &|m| m == "all survives").await;
    // The message on the dead shard was lost, and counted.
    eventually(CLUSTER_DEADLINE, "the lost publish counted", || async {
        (a.metric(errors).await > errors_before).then_some(())
    })
    .await;

    redis.start_node(dead).await;
    redis.wait_until_ok(0..MASTERS).await;

    // Both instances recover, and the subscription on the restarted shard is back.
    wait_for_status(&a, "ok").await;
    wait_for_status(&b, "ok").await;
    sender
        .call("SendToGroup", json!([doomed.as_str(), "after"]))
        .await;
    member
        .recv("the restarted shard's group", &|r| got(r, "after"))
        .await;
    assert!(
        !member.inbox().records.iter().any(|r| got(r, "lost")),
        "a message published while its shard was dead arrived: {:?}",
        member.inbox().records
    );
}

#[actix_web::test]
async fn a_group_follows_its_slot_when_the_cluster_is_resharded() {
    let redis = RedisCluster::start().await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let mut sender = WsClient::connect(&a).await;
    let mut member = LpClient::connect(&b).await;
    member.call("JoinGroup", json!(["moving"])).await;
    sender
        .call("SendToGroup", json!(["moving", "before"]))
        .await;
    member
        .recv("the group before resharding", &|r| got(r, "before"))
        .await;
    let channel = format!("{{{NAMESPACE}:group:moving}}");
    let from = redis.owner_of(&channel).await;
    let to = (from + 1) % MASTERS;

    redis.move_slot_of(&channel, to).await;
    assert_eq!(redis.owner_of(&channel).await, to);

    probe_group(
        &mut sender,
        &mut member,
        "moving",
        "resubscribing the moved slot",
    )
    .await;
    wait_for_status(&a, "ok").await;
    wait_for_status(&b, "ok").await;
}

#[actix_web::test]
async fn when_the_master_of_all_dies_broadcasts_stay_local_and_groups_elsewhere_flow() {
    let mut redis = RedisCluster::start().await;
    let dead = redis.owner_of(&format!("{{{NAMESPACE}:all}}")).await;
    let surviving = group_on(&redis, dead, false).await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let mut sender = WsClient::connect(&a).await;
    let mut neighbour = LpClient::connect(&a).await;
    let mut member = LpClient::connect(&b).await;
    member.call("JoinGroup", json!([surviving.as_str()])).await;

    redis.kill_node(dead);
    wait_for_status(&a, "degraded").await;
    wait_for_status(&b, "degraded").await;

    // The broadcast reaches the sender's own instance only.
    sender.call("Send", json!(["broadcast"])).await;
    neighbour.recv_call("Send", &|m| m == "broadcast").await;
    sender.recv_call("Send", &|m| m == "broadcast").await;
    // A group on another shard still crosses; published after the broadcast by the same
    // sender, it shows the broadcast was handled (dropped) before it.
    sender
        .call("SendToGroup", json!([surviving.as_str(), "group flows"]))
        .await;
    member
        .recv("the surviving shard's group", &|r| got(r, "group flows"))
        .await;
    assert!(
        !member
            .inbox()
            .records
            .iter()
            .any(|r| is_call(r, "Send") && r["arguments"][0] == "broadcast"),
        "a broadcast crossed instances while the master of all was dead: {:?}",
        member.inbox().records
    );

    redis.start_node(dead).await;
    redis.wait_until_ok(0..MASTERS).await;
    wait_for_status(&a, "ok").await;
    wait_for_status(&b, "ok").await;
    sender.call("Send", json!(["broadcast again"])).await;
    member.recv_call("Send", &|m| m == "broadcast again").await;
}

#[actix_web::test]
async fn tokens_are_single_use_across_a_redis_cluster_with_the_claim_in_its_connections_slot() {
    use awc::http::StatusCode;
    use awc::ws;

    use crate::helpers::{assert_refused, RECV_TIMEOUT, SETTLE_TIMEOUT};

    let redis = RedisCluster::start().await;
    let a = spawn_instance(&redis, "node-a").await;
    let b = spawn_instance(&redis, "node-b").await;
    let (id, token) = a.negotiate().await;
    let mut ws = a
        .ws_raw(&format!("id={token}"), &[])
        .await
        .expect("the WebSocket on its owner");
    ws.handshake().await;

    // node-b would adopt the fresh token: node-a serves it.
    assert_refused(
        b.ws_raw(&format!("id={token}"), &[]).await,
        StatusCode::CONFLICT,
    );
    // The claim shares its slot with the connection's channel (one shard for both).
    let key = format!("{{{NAMESPACE}:connection:{id}}}:claim");
    let port = redis.nodes[0].port;
    let slot = |name: String| async move {
        redis_cli(port, &["CLUSTER", "KEYSLOT", &name])
            .await
            .expect("KEYSLOT")
    };
    assert_eq!(
        slot(key.clone()).await,
        slot(format!("{{{NAMESPACE}:connection:{id}}}")).await
    );

    ws.send_message(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
        .await;
    ws.wait_closed(RECV_TIMEOUT).await;
    eventually(SETTLE_TIMEOUT, "the connection to end", || async {
        (a.poll(&token).await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    crate::helpers::wait_refused(&b, &token, StatusCode::NOT_FOUND).await;
}

#[actix_web::test]
async fn the_chat_demo_keeps_presence_and_history_on_a_redis_cluster() {
    let redis = RedisCluster::start().await;
    let chat_instance = |name: &'static str| {
        let redis = &redis;
        async move {
            let mut settings = test_settings();
            settings.redis_cluster_urls = redis.urls();
            settings.cluster_secret = Some(SECRET.into());
            settings.instance_id = Some(InstanceId::parse(name).expect("an instance id"));
            let chat = demo::chat::hub(&settings);
            let app = start(App::new(settings).hub("/chat", chat)).await;
            wait_for_status(&app.api, "ok").await;
            app
        }
    };
    let a = chat_instance("node-a").await;
    let b = chat_instance("node-b").await;
    let mut ann = WsClient::connect(&a).await;
    let mut bob = LpClient::connect(&b).await;
    ann.call("Join", json!(["Ann"])).await;
    bob.call("Join", json!(["Bob"])).await;
    ann.call("SendMessage", json!(["hello from node-a"])).await;

    // Each instance lists the other's member: presence lives on the cluster, not in the
    // instance (its keys share one slot, so its multi-key pipelines run there).
    let names = |online: Value| -> Vec<String> {
        let mut names: Vec<String> = online
            .as_array()
            .expect("Online returns a list")
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(bob.call("Online", json!([])).await), ["Ann", "Bob"]);
    assert_eq!(names(ann.call("Online", json!([])).await), ["Ann", "Bob"]);
    // The lobby's history, written on node-a, is read on node-b.
    let history = bob.call("History", json!([null])).await;
    assert!(
        history
            .as_array()
            .is_some_and(|h| h.iter().any(|m| m["text"] == "hello from node-a")),
        "{history}"
    );
}
