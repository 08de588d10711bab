//! Counters for `GET /metrics`, kept and rendered by `prometheus-client` (the Prometheus
//! project's Rust client) in the OpenMetrics text format.
//!
//! The hot paths (a record queued, a message received) are one relaxed atomic add on a
//! counter held directly; labelled families are only touched by rare events (forwards,
//! rejections). The process's own figures (resident memory, open file descriptors, CPU
//! time) are read from `/proc/self` at scrape time on Linux, and left out elsewhere.

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::protocol::negotiate::TransportKind;

/// Upper bounds of the forward-attempts histogram buckets.
const ATTEMPT_BUCKETS: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0];

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a forwarded request ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ForwardOutcome {
    /// An instance answered with something other than 404.
    Served,
    /// Every attempt got 404 (or the owner said the connection is gone).
    NotFound,
    /// A network error or timeout; the client got 502 or 504.
    Failed,
    /// A long poll missed an owner known to be alive; the client got an empty 200 and
    /// polls again.
    Retried,
}

impl ForwardOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Served => "served",
            Self::NotFound => "not_found",
            Self::Failed => "failed",
            Self::Retried => "retried",
        }
    }
}

/// Why a request for a connection was refused without forwarding (404, or 409 / 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// The token did not verify.
    BadToken,
    /// The token names this instance, which no longer holds the connection.
    Gone,
    /// An internal probe for a connection that is not here.
    ProbeMiss,
    /// Forwarding is off (no load balancer, no owner address, or a budget of 0).
    NoRoute,
    /// This instance drains, and the request would start a long-lived relay here (503).
    Draining,
    /// The token's connection ended (its claim is the closed marker): 404, as ASP.NET
    /// answers a token used again.
    Reused,
    /// Another instance serves the connection (holds its claim): 409, as ASP.NET answers a
    /// second transport for a live connection.
    InUse,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Self::BadToken => "bad_token",
            Self::Gone => "gone",
            Self::ProbeMiss => "probe_miss",
            Self::NoRoute => "no_route",
            Self::Draining => "draining",
            Self::Reused => "reused",
            Self::InUse => "in_use",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;
type Count = Counter<u64, AtomicU64>;

/// All of the server's counters, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: [Gauge; 3],
    connections_open: Gauge,
    connections_total: [Count; 3],
    negotiations: Count,
    pending_negotiations: Gauge,
    negotiations_refused: Count,
    messages_received: Count,
    messages_sent: Count,
    slow_consumers: Count,
    adopted: Count,
    stateful_resumed: Count,
    sessions_moved_in: Count,
    sessions_moved_out: Count,
    forward_requests_sent: Count,
    forwarded: Family<Labels, Count>,
    attempts: Histogram,
    rejections: Family<Labels, Count>,
    backplane_published: Count,
    backplane_publish_errors: Count,
    backplane_publish_batches: Count,
    backplane_received: Count,
    backplane_reconnects: Count,
    backplane_up: Gauge,
    cluster_instances: Gauge,
}

fn index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::WebSockets => 0,
        TransportKind::ServerSentEvents => 1,
        TransportKind::LongPolling => 2,
    }
}

/// A labelled family that is declared (`# HELP`, `# TYPE`) even before its first series,
/// as the hand-written exposition did: readers can tell "nothing counted yet" from "no
/// such metric".
#[derive(Debug, Clone, Default)]
struct Declared(Family<Labels, Count>);

impl EncodeMetric for Declared {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }
}

/// Registers a plain counter; the client appends `_total` to `name` when it renders.
fn counter(registry: &mut Registry, name: &str, help: &str) -> Count {
    let counter = Count::default();
    registry.register(name, help, counter.clone());
    counter
}

/// Registers a family by transport and returns its three members, in [`index`] order.
fn per_transport<M>(registry: &mut Registry, name: &str, help: &str) -> [M; 3]
where
    M: Default + Clone + prometheus_client::registry::Metric + EncodeMetric,
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let family = Family::<Labels, M>::default();
    registry.register(name, help, family.clone());
    TransportKind::ALL.map(|kind| family.get_or_create_owned(&vec![("transport", kind.name())]))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let connections = per_transport(
            &mut r,
            "stickless_connections",
            "Connections served by this instance, by transport",
        );
        let connections_total = per_transport(
            &mut r,
            "stickless_connections_started",
            "Connections started on this instance, by transport",
        );
        let connections_open = Gauge::default();
        r.register(
            "stickless_connections_open",
            "Connections served by this instance, all transports",
            connections_open.clone(),
        );
        let pending_negotiations = Gauge::default();
        r.register(
            "stickless_pending_negotiations",
            "Negotiated connections whose transport has not started yet",
            pending_negotiations.clone(),
        );
        let forwarded = Family::<Labels, Count>::default();
        r.register(
            "stickless_forwarded_requests",
            "Misrouted client requests forwarded, by request kind, mode and outcome",
            Declared(forwarded.clone()),
        );
        let attempts = Histogram::new(ATTEMPT_BUCKETS);
        r.register(
            "stickless_forward_attempts",
            "Attempts needed per forwarded request",
            attempts.clone(),
        );
        let rejections = Family::<Labels, Count>::default();
        r.register(
            "stickless_routing_rejections",
            "Requests answered 404 at once, without forwarding, by reason",
            Declared(rejections.clone()),
        );
        let backplane_up = Gauge::default();
        r.register(
            "stickless_backplane_up",
            "1 when the backplane is connected (always 1 in-process)",
            backplane_up.clone(),
        );
        let cluster_instances = Gauge::default();
        r.register(
            "stickless_cluster_instances",
            "Instances in the cluster (this one and those whose heartbeat was heard recently)",
            cluster_instances.clone(),
        );
        r.register_collector(Box::new(Process));
        Self {
            connections,
            connections_open,
            connections_total,
            negotiations: counter(
                &mut r,
                "stickless_negotiations",
                "Successful negotiate requests",
            ),
            pending_negotiations,
            negotiations_refused: counter(
                &mut r,
                "stickless_negotiations_refused",
                "Negotiate requests answered 503 because MAX_PENDING_NEGOTIATIONS were pending",
            ),
            messages_received: counter(
                &mut r,
                "stickless_messages_received",
                "Hub messages received from clients",
            ),
            messages_sent: counter(
                &mut r,
                "stickless_messages_sent",
                "Records queued for clients",
            ),
            slow_consumers: counter(
                &mut r,
                "stickless_slow_consumer_closes",
                "Connections closed because their outbound queue overflowed",
            ),
            adopted: counter(
                &mut r,
                "stickless_adopted_websockets",
                "WebSockets for another instance's token served here",
            ),
            stateful_resumed: counter(
                &mut r,
                "stickless_stateful_resumed",
                "Stateful-reconnect sessions resumed on a new WebSocket here",
            ),
            sessions_moved_in: counter(
                &mut r,
                "stickless_sessions_moved_in",
                "Stateful-reconnect sessions moved here from another instance",
            ),
            sessions_moved_out: counter(
                &mut r,
                "stickless_sessions_moved_out",
                "Stateful-reconnect sessions handed over to another instance",
            ),
            forward_requests_sent: counter(
                &mut r,
                "stickless_forward_requests_sent",
                "Requests sent to other instances or the load balancer (every attempt)",
            ),
            forwarded,
            attempts,
            rejections,
            backplane_published: counter(
                &mut r,
                "stickless_backplane_published",
                "Messages published to the backplane",
            ),
            backplane_publish_errors: counter(
                &mut r,
                "stickless_backplane_publish_errors",
                "Messages that could not be published to the backplane",
            ),
            backplane_publish_batches: counter(
                &mut r,
                "stickless_backplane_publish_batches",
                "Round trips (pipelines) the backplane publisher made",
            ),
            backplane_received: counter(
                &mut r,
                "stickless_backplane_received",
                "Messages received from other instances through the backplane",
            ),
            backplane_reconnects: counter(
                &mut r,
                "stickless_backplane_reconnects",
                "Times the backplane reconnected after losing Redis",
            ),
            backplane_up,
            cluster_instances,
            registry: r,
        }
    }
}

impl Metrics {
    /// A transport started serving a connection.
    pub fn connection_opened(&self, kind: TransportKind) {
        self.connections[index(kind)].inc();
        self.connections_open.inc();
        self.connections_total[index(kind)].inc();
    }

    /// A connection that had started ended.
    pub fn connection_closed(&self, kind: TransportKind) {
        self.connections[index(kind)].dec();
        self.connections_open.dec();
    }

    /// Live connections on this instance.
    pub fn live_connections(&self) -> i64 {
        self.connections_open.get()
    }

    /// A negotiate succeeded.
    pub fn negotiated(&self) {
        self.negotiations.inc();
    }

    /// A negotiated connection started waiting for its transport (`1`) or stopped
    /// waiting (`-1`: it started, or it was dropped).
    pub fn pending_negotiation(&self, delta: i64) {
        self.pending_negotiations.inc_by(delta);
    }

    /// Negotiated connections still waiting for their transport, on every hub.
    pub fn pending_negotiations(&self) -> i64 {
        self.pending_negotiations.get()
    }

    /// A negotiate was refused because too many were pending.
    pub fn negotiation_refused(&self) {
        self.negotiations_refused.inc();
    }

    /// A hub message arrived from a client.
    pub fn message_received(&self) {
        self.messages_received.inc();
    }

    /// A record was queued for a client.
    pub fn message_sent(&self) {
        self.messages_sent.inc();
    }

    /// A connection was closed because its outbound queue overflowed.
    pub fn slow_consumer(&self) {
        self.slow_consumers.inc();
    }

    /// A WebSocket for another instance's token was served here.
    pub fn adopted(&self) {
        self.adopted.inc();
    }

    /// A stateful-reconnect session resumed on a new WebSocket here.
    pub fn stateful_resumed(&self) {
        self.stateful_resumed.inc();
    }

    /// A stateful-reconnect session moved here from another instance.
    pub fn session_moved_in(&self) {
        self.sessions_moved_in.inc();
    }

    /// A stateful-reconnect session moved from here to another instance.
    pub fn session_moved_out(&self) {
        self.sessions_moved_out.inc();
    }

    /// One HTTP or WebSocket request was sent to another instance or the load balancer.
    pub fn forward_request_sent(&self) {
        self.forward_requests_sent.inc();
    }

    /// Requests sent to other instances so far.
    pub fn forward_requests_sent(&self) -> u64 {
        self.forward_requests_sent.get()
    }

    /// A misrouted client request finished forwarding.
    pub fn forwarded(
        &self,
        request: &'static str,
        mode: &'static str,
        outcome: ForwardOutcome,
        attempts: u64,
    ) {
        let labels = vec![
            ("request", request),
            ("mode", mode),
            ("outcome", outcome.label()),
        ];
        self.forwarded.get_or_create(&labels).inc();
        self.attempts.observe(attempts as f64);
    }

    /// A request was answered 404 without forwarding.
    pub fn rejected(&self, why: Rejection) {
        self.rejections
            .get_or_create(&vec![("reason", why.label())])
            .inc();
    }

    /// A message was published to the backplane (`ok`) or failed to be.
    pub fn backplane_published(&self, ok: bool) {
        if ok {
            self.backplane_published.inc();
        } else {
            self.backplane_publish_errors.inc();
        }
    }

    /// The backplane publisher sent `messages` in one round trip.
    pub fn backplane_batch(&self, messages: u64, ok: bool) {
        self.backplane_publish_batches.inc();
        if ok {
            self.backplane_published.inc_by(messages);
        } else {
            self.backplane_publish_errors.inc_by(messages);
        }
    }

    /// A message arrived from another instance through the backplane.
    pub fn backplane_received(&self) {
        self.backplane_received.inc();
    }

    /// The backplane lost its connection and reconnected.
    pub fn backplane_reconnected(&self) {
        self.backplane_reconnects.inc();
    }

    /// The OpenMetrics text exposition of every metric (see [`CONTENT_TYPE`]);
    /// `cluster_instances` is the cluster's size as heartbeats tell it.
    pub fn render(&self, backplane_up: bool, cluster_instances: usize) -> String {
        self.backplane_up.set(i64::from(backplane_up));
        self.cluster_instances
            .set(i64::try_from(cluster_instances).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's own figures, read from `/proc/self` at each scrape (Linux only), under
/// the names the Prometheus clients of other languages use.
#[derive(Debug)]
struct Process;

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, fixed at 100 in the
/// Linux user-space ABI (proc(5)).
#[cfg(target_os = "linux")]
const USER_HZ: f64 = 100.0;

/// A `kB` line of `/proc/self/status`, in bytes.
#[cfg(target_os = "linux")]
fn status_bytes(status: &str, key: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: i64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User plus system CPU seconds from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

impl Collector for Process {
    #[cfg(target_os = "linux")]
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                status_bytes(&status, "VmRSS:"),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                status_bytes(&status, "VmSize:"),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                std::fs::read_dir("/proc/self/fd")
                    .ok()
                    .map(|dir| dir.count() as i64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        if let Some(seconds) = cpu_seconds(&stat) {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn encode(&self, _encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempts_histogram_is_cumulative() {
        let metrics = Metrics::default();
        metrics.forwarded("long_polling", "load_balancer", ForwardOutcome::Served, 3);
        let text = metrics.render(true, 3);
        assert!(
            text.contains("stickless_forward_attempts_bucket{le=\"2.0\"} 0"),
            "{text}"
        );
        assert!(text.contains("stickless_forward_attempts_bucket{le=\"3.0\"} 1"));
        assert!(text.contains("stickless_forward_attempts_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains(
            "stickless_forwarded_requests_total{request=\"long_polling\",mode=\"load_balancer\",outcome=\"served\"} 1"
        ));
    }

    #[test]
    fn every_existing_name_is_rendered() {
        let metrics = Metrics::default();
        metrics.connection_opened(TransportKind::ServerSentEvents);
        metrics.rejected(Rejection::Gone);
        let text = metrics.render(false, 1);
        assert!(text.contains("# TYPE stickless_forwarded_requests counter\n"));
        for line in [
            "stickless_connections{transport=\"ServerSentEvents\"} 1\n",
            "stickless_connections{transport=\"WebSockets\"} 0\n",
            "stickless_connections_started_total{transport=\"ServerSentEvents\"} 1\n",
            "stickless_connections_open 1\n",
            "stickless_negotiations_total 0\n",
            "stickless_pending_negotiations 0\n",
            "stickless_messages_sent_total 0\n",
            "stickless_backplane_up 0\n",
            "stickless_cluster_instances 1\n",
            "stickless_routing_rejections_total{reason=\"gone\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_figures_come_from_proc() {
        let text = Metrics::default().render(true, 1);
        for name in [
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let rss: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(rss > 0);
    }
}
