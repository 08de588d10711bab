//! Routing benchmark: what a misrouted request costs, in a real cluster on loopback.
//!
//! For each cluster size N (default 2, 4 and 16) and each route to an owner elsewhere, it
//! starts `redis-server`, N instances and nginx (the shipped `nginx.conf`) with the
//! devcluster launcher — instances configured with only that route enabled — and
//! measures, for long-polling `WhoAmI` invocations (a POST and a poll each, so two
//! requests per round trip), the round-trip latency when both requests go
//!
//! - straight to the owner (`local`),
//! - to another instance that reaches the owner directly (`direct`, 1 hop),
//! - to another instance that relays them over Redis (`bus`, 1 broker round trip),
//! - through nginx, re-forwarded until they reach the owner (`load_balancer`),
//!
//! the attempts each forward needed (through nginx), and the messages per second of a
//! WebSocket (pipelined `WhoAmI` invocations, [`WINDOWS`] in flight) served locally,
//! forwarded directly, and relayed over the bus (the median of [`WS_RUNS`] runs). Build
//! the server first:
//!
//! ```sh
//! cargo build --release --bins --example bench && target/release/examples/bench 2,4,16 300
//! ```
//!
//! Arguments: cluster sizes (default `2,4,16`), round trips per mode (default 300),
//! invocations per WebSocket run (default [`WS_MESSAGES`]; more gives steadier rates).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
// The cluster launcher's code, shared with the `stickless-cluster` binary (dev tooling,
// not part of the library).
#[path = "../src/bin/stickless-cluster/devcluster.rs"]
#[allow(dead_code)]
mod devcluster;

use devcluster::{Cluster, ClusterOptions};

const RS: char = '\u{1e}';
/// Invocations in flight on the benchmarked WebSocket: 64, where each invocation's round
/// trip sets the rate (latency-bound), and 1024, enough to keep every leg busy, which
/// measures what the socket can carry (throughput-bound).
const WINDOWS: [usize; 2] = [64, 1024];
/// Invocations per WebSocket throughput run, unless the third argument says otherwise.
const WS_MESSAGES: usize = 20000;

/// A client, and a connection token negotiated at `owner`.
async fn negotiate(owner: &str) -> (awc::Client, String) {
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
    (client, token)
}

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
        let (client, token) = negotiate(owner).await;
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

/// One row of the latency table.
struct Row {
    instances: usize,
    route: String,
    samples: Vec<Duration>,
    attempts: Option<f64>,
}

impl Row {
    fn print(mut self) {
        self.samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mean = self.samples.iter().sum::<Duration>() / self.samples.len() as u32;
        println!(
            "| {:>2} | {:<14} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8} |",
            self.instances,
            self.route,
            ms(percentile(&self.samples, 0.50)),
            ms(percentile(&self.samples, 0.99)),
            ms(mean),
            self.attempts
                .map(|a| format!("{a:.2}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
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
                devcluster::http_get(address, "/metrics", Duration::from_secs(3)).expect("metrics");
            body.lines()
                .filter(|line| line.starts_with(prefix))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

async fn round_trips(poller: &Poller, via: &str, rounds: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        samples.push(poller.who_am_i(via, n).await);
    }
    samples
}

/// Runs of [`websocket_rate`] per row; the row is their median, so one run slowed by
/// something else on the machine does not make the figure.
const WS_RUNS: usize = 3;

/// The median of [`WS_RUNS`] runs of [`websocket_run`].
async fn websocket_rate(owner: &str, via: &str, messages: usize, window: usize) -> f64 {
    let mut rates = Vec::with_capacity(WS_RUNS);
    for _ in 0..WS_RUNS {
        rates.push(websocket_run(owner, via, messages, window).await);
    }
    rates.sort_by(f64::total_cmp);
    rates[WS_RUNS / 2]
}

/// Messages per second over a WebSocket to `via` for a connection negotiated at `owner`:
/// pipelined `WhoAmI` invocations, `window` in flight, each answered by a Completion.
async fn websocket_run(owner: &str, via: &str, messages: usize, window: usize) -> f64 {
    let (client, token) = negotiate(owner).await;
    let url = format!("ws{}/chat?id={token}", via.trim_start_matches("http"));
    let (_, mut socket) = client
        .ws(url)
        .max_frame_size(1 << 20)
        .connect()
        .await
        .expect("WebSocket");
    socket
        .send(awc::ws::Message::Text(
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").into(),
        ))
        .await
        .expect("handshake");
    let completions = |frame: &awc::ws::Frame| match frame {
        awc::ws::Frame::Text(bytes) => String::from_utf8_lossy(bytes).matches("\"type\":3").count(),
        _ => 0,
    };
    // The handshake answer first.
    let _ = socket.next().await.expect("handshake answer");
    let started = Instant::now();
    let (mut sent, mut answered) = (0, 0);
    while answered < messages {
        if sent < messages && sent - answered < window {
            let call = format!(
                "{{\"type\":1,\"invocationId\":\"{sent}\",\"target\":\"WhoAmI\",\"arguments\":[]}}{RS}"
            );
            socket
                .send(awc::ws::Message::Text(call.into()))
                .await
                .expect("send");
            sent += 1;
            continue;
        }
        let frame = socket.next().await.expect("socket open").expect("frame");
        answered += completions(&frame);
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let _ = socket.send(awc::ws::Message::Close(None)).await;
    rate
}

/// The routes benchmarked: (label, `ROUTES`, advertise direct URLs).
const ROUTES: [(&str, &str, bool); 3] = [
    ("direct", "direct", true),
    ("bus", "bus", false),
    ("load_balancer", "load-balancer", false),
];

#[actix_web::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "2,4,16".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .map(|n: usize| n.max(2))
        .collect();
    let rounds: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(300)
        .max(10);
    let ws_messages: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(WS_MESSAGES)
        .max(WINDOWS[1]);
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("stickless")))
        .filter(|bin| bin.is_file())
        .expect("build the server first: cargo build --release --bins");
    println!(
        "stickless routing benchmark: {rounds} long-polling WhoAmI round trips (2 requests each) per row; WebSocket: {ws_messages} pipelined WhoAmI, {WINDOWS:?} in flight, median of {WS_RUNS} runs\n"
    );
    println!("|  N | route          | p50 (ms) | p99 (ms) | mean (ms) | attempts per forward |");
    println!("|---:|----------------|---------:|---------:|---------:|---------:|");
    let mut rates = Vec::new();
    for &instances in &sizes {
        for (label, routes, advertise) in ROUTES {
            let mut options = ClusterOptions::new(instances, &bin);
            options.direct_routing = advertise;
            options.env.push(("RUST_LOG".into(), "warn".into()));
            options.env.push(("ROUTES".into(), routes.into()));
            let cluster = Cluster::start(options).expect("cluster");
            // Heartbeats and announcements: wait until the owner knows everyone.
            let deadline = Instant::now() + Duration::from_secs(20);
            while metric_sum(&cluster, "stickless_cluster_instances")
                < (instances * instances) as f64
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let owner = cluster.instances[0].url.clone();
            let other = cluster.instances[1].url.clone();
            let poller = Poller::connect(&owner).await;
            if label == "direct" {
                let samples = round_trips(&poller, &owner, rounds).await;
                Row {
                    instances,
                    route: "local".into(),
                    samples,
                    attempts: None,
                }
                .print();
            }
            let via = if label == "load_balancer" {
                &cluster.url
            } else {
                &other
            };
            let before_sent = metric_sum(&cluster, "stickless_forward_requests_sent_total");
            let before_count = metric_sum(&cluster, "stickless_forward_attempts_count");
            let samples = round_trips(&poller, via, rounds).await;
            let sent = metric_sum(&cluster, "stickless_forward_requests_sent_total") - before_sent;
            let forwarded = metric_sum(&cluster, "stickless_forward_attempts_count") - before_count;
            let attempts = (forwarded > 0.0).then(|| sent / forwarded);
            Row {
                instances,
                route: label.into(),
                samples,
                attempts,
            }
            .print();
            if instances == sizes[0] {
                for window in WINDOWS {
                    if label == "direct" {
                        let rate = websocket_rate(&owner, &owner, ws_messages, window).await;
                        rates.push(("local", window, rate));
                    }
                    if label != "load_balancer" {
                        let rate = websocket_rate(&owner, &other, ws_messages, window).await;
                        rates.push((label, window, rate));
                    }
                }
            }
        }
    }
    println!(
        "\n| WebSocket (N = {}) | in flight | messages/s | of direct |\n|---|---:|---:|---:|",
        sizes[0]
    );
    for &(label, window, rate) in &rates {
        let direct = rates
            .iter()
            .find(|&&(l, w, _)| l == "direct" && w == window)
            .map_or(f64::NAN, |&(_, _, r)| r);
        println!("| {label} | {window} | {rate:.0} | {:.2}× |", rate / direct);
    }
}
