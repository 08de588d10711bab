//! Routing benchmark: what a misrouted request costs, in a real cluster on loopback.
//!
//! Starts `redis-server`, N instances and nginx (the shipped `nginx.conf`) with the
//! devcluster launcher, then measures, for long-polling `WhoAmI` invocations (a POST and a
//! poll each), the round-trip latency when every request goes
//!
//! - straight to the owner (`local`),
//! - to another instance that forwards it directly to the owner (`direct`, 1 hop),
//! - through nginx, re-forwarded until it reaches the owner (`load_balancer`),
//!
//! and, through nginx, the attempts each forward needed. Build the server first:
//!
//! ```sh
//! cargo build --release --bins && cargo run --release --example bench -- 3 300
//! ```
//!
//! Arguments: instances (default 3), round trips per mode (default 300).

use std::time::{Duration, Instant};

use serde_json::Value;
use stickless::devcluster::{Cluster, ClusterOptions};

const RS: char = '\u{1e}';

struct Poller {
    client: awc::Client,
    token: String,
}

impl Poller {
    async fn post(&self, base: &str, body: String) {
        let url = format!("{base}/chat?id={}", self.token);
        let response = self.client.post(url).send_body(body).await.expect("POST");
        assert!(
            response.status().is_success(),
            "POST answered {}",
            response.status()
        );
    }

    async fn poll(&self, base: &str) -> String {
        let url = format!("{base}/chat?id={}&_=1", self.token);
        let mut response = self.client.get(url).send().await.expect("poll");
        assert!(
            response.status().is_success(),
            "poll answered {}",
            response.status()
        );
        let body = response.body().await.expect("poll body");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Negotiates on `owner` and completes the long-polling handshake there.
    async fn connect(owner: &str) -> Self {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(120))
            .finish();
        let mut negotiated = client
            .post(format!("{owner}/chat/negotiate?negotiateVersion=1"))
            .send()
            .await
            .expect("negotiate");
        let body: Value = negotiated.json().await.expect("negotiate JSON");
        let token = body["connectionToken"].as_str().expect("token").to_owned();
        let poller = Self { client, token };
        poller.poll(owner).await;
        poller
            .post(
                owner,
                format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"),
            )
            .await;
        assert!(poller.poll(owner).await.starts_with("{}"));
        poller
    }

    /// One `WhoAmI` round trip with both requests sent to `via`.
    async fn who_am_i(&self, via: &str, n: usize) -> Duration {
        let started = Instant::now();
        let call = format!(
            "{{\"type\":1,\"invocationId\":\"{n}\",\"target\":\"WhoAmI\",\"arguments\":[]}}{RS}"
        );
        self.post(via, call).await;
        let answer = self.poll(via).await;
        assert!(answer.contains("\"type\":3"), "no completion: {answer}");
        started.elapsed()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(mode: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{mode:<22} n={:<5} mean={:>8.3} ms  p50={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        mean.as_secs_f64() * 1e3,
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
}

fn metric_sum(cluster: &Cluster, prefix: &str) -> f64 {
    cluster
        .instances
        .iter()
        .map(|instance| {
            let address = instance
                .url
                .trim_start_matches("http://")
                .parse()
                .expect("address");
            let (_, body) =
                stickless::devcluster::http_get(address, "/metrics", Duration::from_secs(3))
                    .expect("metrics");
            body.lines()
                .filter(|line| line.starts_with(prefix))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

async fn run(cluster: &Cluster, rounds: usize, label: &str) {
    let owner = &cluster.instances[0].url;
    let other = &cluster.instances[1].url;
    let poller = Poller::connect(owner).await;
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        samples.push(poller.who_am_i(owner, n).await);
    }
    report("local", samples);
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        samples.push(poller.who_am_i(other, n).await);
    }
    report(&format!("{label} (to B)"), samples);
    let before_sent = metric_sum(cluster, "stickless_forward_requests_sent_total");
    let before_count = metric_sum(cluster, "stickless_forward_attempts_count");
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        samples.push(poller.who_am_i(&cluster.url, n).await);
    }
    report(&format!("{label} (nginx)"), samples);
    let sent = metric_sum(cluster, "stickless_forward_requests_sent_total") - before_sent;
    let forwarded = metric_sum(cluster, "stickless_forward_attempts_count") - before_count;
    println!(
        "{:<22} {} of {} requests through nginx were misrouted; {:.2} attempts per forwarded request",
        "",
        forwarded,
        rounds * 2,
        if forwarded > 0.0 { sent / forwarded } else { 0.0 }
    );
}

#[actix_web::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let instances: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(2);
    let rounds: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(300)
        .max(10);
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("stickless")))
        .filter(|bin| bin.is_file())
        .expect("build the server first: cargo build --release --bins");
    println!("stickless routing benchmark: {instances} instances, {rounds} WhoAmI round trips per mode, long polling");
    for (direct, label) in [(true, "direct"), (false, "load_balancer")] {
        let mut options = ClusterOptions::new(instances, &bin);
        options.direct_routing = direct;
        options.env.push(("RUST_LOG".into(), "warn".into()));
        let cluster = Cluster::start(options).expect("cluster");
        // Give the instances time to hear each other's announcements.
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("-- routing mode: {label}");
        run(&cluster, rounds, label).await;
    }
}
