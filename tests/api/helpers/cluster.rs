//! A real cluster: redis-server, N `stickless` processes and nginx with the repo's own
//! nginx.conf, started by the project's launcher (`src/bin/stickless-cluster/devcluster.rs`, compiled into this test binary), which gives
//! each child a cleared environment and explicit settings.

use std::path::PathBuf;
use std::time::Duration;

use crate::devcluster::{Cluster, ClusterOptions};

use super::app::static_dir;
use super::http::Api;
use super::{eventually, within, SETTLE_TIMEOUT};

/// redis-server, N `stickless` processes and nginx, stopped on drop.
pub struct TestCluster {
    /// The processes.
    pub cluster: Cluster,
    /// The load balancer.
    pub lb: Api,
    /// Each instance, directly.
    pub nodes: Vec<Api>,
    /// Each instance's id.
    pub ids: Vec<String>,
    /// Whether each instance runs (a stopped one is not asked for metrics).
    pub running: Vec<bool>,
}

/// The long-poll timeout of cluster instances.
pub const CLUSTER_POLL_TIMEOUT: &str = "2s";

/// Starts `instances` instances behind nginx; `configure` adjusts the options (direct
/// routing, extra environment) before the start.
pub async fn spawn_cluster(
    instances: usize,
    configure: impl FnOnce(&mut ClusterOptions) + Send + 'static,
) -> TestCluster {
    let start = move || {
        let mut options = ClusterOptions::new(instances, env!("CARGO_BIN_EXE_stickless"));
        options.nginx_conf = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf"));
        options.static_dir = static_dir();
        options.env = vec![
            ("POLL_TIMEOUT".into(), CLUSTER_POLL_TIMEOUT.into()),
            ("SHUTDOWN_TIMEOUT".into(), "1s".into()),
            ("WORKERS".into(), "2".into()),
        ];
        configure(&mut options);
        Cluster::start(options)
    };
    let cluster = within(
        Duration::from_secs(60),
        "cluster start",
        tokio::task::spawn_blocking(start),
    )
    .await
    .expect("cluster start task")
    .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    let lb = Api::new(cluster.url.clone());
    let nodes = cluster
        .instances
        .iter()
        .map(|i| Api::new(i.url.clone()))
        .collect();
    let ids: Vec<String> = cluster.instances.iter().map(|i| i.id.clone()).collect();
    let cluster = TestCluster {
        cluster,
        lb,
        nodes,
        running: vec![true; ids.len()],
        ids,
    };
    wait_until_connected(&cluster).await;
    cluster
}

/// Waits until every instance says `"ok"`: its backplane is connected both ways (the
/// processes answer `/healthz` before that, while `degraded`).
pub async fn wait_until_connected(cluster: &TestCluster) {
    eventually(SETTLE_TIMEOUT, "every backplane connected", || async {
        for (node, _) in cluster
            .nodes
            .iter()
            .zip(&cluster.running)
            .filter(|(_, up)| **up)
        {
            if node.healthz().await["status"] != "ok" {
                return None;
            }
        }
        Some(())
    })
    .await;
}

impl TestCluster {
    /// Stops instance `index` (SIGTERM) and starts it again on the same port. The
    /// instance's [`Api`] is replaced, so no pooled connection to the old process is reused.
    pub fn restart_instance(&mut self, index: usize) {
        self.stop_instance(index);
        self.cluster
            .start_instance(index)
            .unwrap_or_else(|e| panic!("{} did not restart: {e}", self.ids[index]));
        self.nodes[index] = Api::new(self.cluster.instances[index].url.clone());
        self.running[index] = true;
    }

    /// Stops instance `index` with SIGTERM and waits until it has exited.
    pub fn stop_instance(&mut self, index: usize) {
        self.cluster.stop_instance(index);
        self.running[index] = false;
    }

    /// Runs `redis-cli` against the cluster's Redis and returns its answer.
    pub fn redis_cli(&self, args: &[&str]) -> String {
        let port = self
            .cluster
            .redis_url
            .rsplit(':')
            .next()
            .expect("a port")
            .to_owned();
        let output = std::process::Command::new("redis-cli")
            .env_clear()
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(output.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends a signal to instance `index`: `TERM` starts its graceful shutdown, `STOP`
    /// pauses it, `CONT` resumes it.
    pub fn signal(&self, index: usize, signal: &str) {
        let pid = self.cluster.instances[index]
            .pid()
            .expect("a running instance");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }
}
