//! Counters for `GET /metrics`, rendered in the Prometheus text exposition format.
//!
//! A handful of atomics and small labelled maps: this is all the server needs, and it
//! keeps the hot path to one relaxed atomic add.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::protocol::negotiate::TransportKind;

/// Upper bounds of the forward-attempts histogram buckets.
const ATTEMPT_BUCKETS: [u64; 9] = [1, 2, 3, 4, 5, 6, 8, 10, 20];

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

/// Why a request for a connection was answered 404 without forwarding.
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
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Self::BadToken => "bad_token",
            Self::Gone => "gone",
            Self::ProbeMiss => "probe_miss",
            Self::NoRoute => "no_route",
        }
    }
}

/// All of the server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connections: [AtomicI64; 3],
    connections_total: [AtomicU64; 3],
    negotiations: AtomicU64,
    messages_received: AtomicU64,
    messages_sent: AtomicU64,
    slow_consumers: AtomicU64,
    adopted: AtomicU64,
    forward_requests_sent: AtomicU64,
    forwarded: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    attempts_buckets: [AtomicU64; ATTEMPT_BUCKETS.len()],
    attempts_count: AtomicU64,
    attempts_sum: AtomicU64,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    backplane_published: AtomicU64,
    backplane_publish_errors: AtomicU64,
    backplane_received: AtomicU64,
    backplane_reconnects: AtomicU64,
}

fn index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::WebSockets => 0,
        TransportKind::ServerSentEvents => 1,
        TransportKind::LongPolling => 2,
    }
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// A transport started serving a connection.
    pub fn connection_opened(&self, kind: TransportKind) {
        self.connections[index(kind)].fetch_add(1, Ordering::Relaxed);
        add(&self.connections_total[index(kind)]);
    }

    /// A connection that had started ended.
    pub fn connection_closed(&self, kind: TransportKind) {
        self.connections[index(kind)].fetch_sub(1, Ordering::Relaxed);
    }

    /// Live connections on this instance.
    pub fn live_connections(&self) -> i64 {
        self.connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// A negotiate succeeded.
    pub fn negotiated(&self) {
        add(&self.negotiations);
    }

    /// A hub message arrived from a client.
    pub fn message_received(&self) {
        add(&self.messages_received);
    }

    /// A record was queued for a client.
    pub fn message_sent(&self) {
        add(&self.messages_sent);
    }

    /// A connection was closed because its outbound queue overflowed.
    pub fn slow_consumer(&self) {
        add(&self.slow_consumers);
    }

    /// A WebSocket for another instance's token was served here.
    pub fn adopted(&self) {
        add(&self.adopted);
    }

    /// One HTTP or WebSocket request was sent to another instance or the load balancer.
    pub fn forward_request_sent(&self) {
        add(&self.forward_requests_sent);
    }

    /// Requests sent to other instances so far.
    pub fn forward_requests_sent(&self) -> u64 {
        self.forward_requests_sent.load(Ordering::Relaxed)
    }

    /// A misrouted client request finished forwarding.
    pub fn forwarded(
        &self,
        request: &'static str,
        mode: &'static str,
        outcome: ForwardOutcome,
        attempts: u64,
    ) {
        if let Ok(mut map) = self.forwarded.lock() {
            *map.entry((request, mode, outcome.label())).or_default() += 1;
        }
        for (bucket, bound) in self.attempts_buckets.iter().zip(ATTEMPT_BUCKETS) {
            if attempts <= bound {
                add(bucket);
            }
        }
        add(&self.attempts_count);
        self.attempts_sum.fetch_add(attempts, Ordering::Relaxed);
    }

    /// A request was answered 404 without forwarding.
    pub fn rejected(&self, why: Rejection) {
        if let Ok(mut map) = self.rejections.lock() {
            *map.entry(why.label()).or_default() += 1;
        }
    }

    /// A message was published to the backplane (`ok`) or failed to be.
    pub fn backplane_published(&self, ok: bool) {
        add(if ok {
            &self.backplane_published
        } else {
            &self.backplane_publish_errors
        });
    }

    /// A message arrived from another instance through the backplane.
    pub fn backplane_received(&self) {
        add(&self.backplane_received);
    }

    /// The backplane lost its connection and reconnected.
    pub fn backplane_reconnected(&self) {
        add(&self.backplane_reconnects);
    }

    /// The Prometheus text exposition of every counter; `cluster_instances` is the
    /// cluster's size as heartbeats tell it.
    pub fn render(&self, backplane_up: bool, cluster_instances: usize) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        family(
            &mut out,
            "stickless_connections",
            "gauge",
            "Connections served by this instance, by transport.",
        );
        for kind in TransportKind::ALL {
            let value = self.connections[index(kind)].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "stickless_connections{{transport=\"{}\"}} {value}",
                kind.name()
            );
        }
        family(
            &mut out,
            "stickless_connections_started_total",
            "counter",
            "Connections started on this instance, by transport.",
        );
        for kind in TransportKind::ALL {
            let value = load(&self.connections_total[index(kind)]);
            let _ = writeln!(
                out,
                "stickless_connections_started_total{{transport=\"{}\"}} {value}",
                kind.name()
            );
        }
        let simple = [
            (
                "stickless_negotiations_total",
                "Successful negotiate requests.",
                &self.negotiations,
            ),
            (
                "stickless_messages_received_total",
                "Hub messages received from clients.",
                &self.messages_received,
            ),
            (
                "stickless_messages_sent_total",
                "Records queued for clients.",
                &self.messages_sent,
            ),
            (
                "stickless_slow_consumer_closes_total",
                "Connections closed because their outbound queue overflowed.",
                &self.slow_consumers,
            ),
            (
                "stickless_adopted_websockets_total",
                "WebSockets for another instance's token served here.",
                &self.adopted,
            ),
            (
                "stickless_forward_requests_sent_total",
                "Requests sent to other instances or the load balancer (every attempt).",
                &self.forward_requests_sent,
            ),
            (
                "stickless_backplane_published_total",
                "Messages published to the backplane.",
                &self.backplane_published,
            ),
            (
                "stickless_backplane_publish_errors_total",
                "Messages that could not be published to the backplane.",
                &self.backplane_publish_errors,
            ),
            (
                "stickless_backplane_received_total",
                "Messages received from other instances through the backplane.",
                &self.backplane_received,
            ),
            (
                "stickless_backplane_reconnects_total",
                "Times the backplane reconnected after losing Redis.",
                &self.backplane_reconnects,
            ),
        ];
        for (name, help, counter) in simple {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", load(counter));
        }
        family(
            &mut out,
            "stickless_backplane_up",
            "gauge",
            "1 when the backplane is connected (always 1 in-process).",
        );
        let _ = writeln!(out, "stickless_backplane_up {}", u8::from(backplane_up));
        family(
            &mut out,
            "stickless_cluster_instances",
            "gauge",
            "Instances in the cluster (this one and those whose heartbeat was heard recently).",
        );
        let _ = writeln!(out, "stickless_cluster_instances {cluster_instances}");

        family(
            &mut out,
            "stickless_forwarded_requests_total",
            "counter",
            "Misrouted client requests forwarded, by request kind, mode and outcome.",
        );
        if let Ok(map) = self.forwarded.lock() {
            for ((request, mode, outcome), value) in map.iter() {
                let _ = writeln!(
                    out,
                    "stickless_forwarded_requests_total{{request=\"{request}\",mode=\"{mode}\",outcome=\"{outcome}\"}} {value}"
                );
            }
        }
        family(
            &mut out,
            "stickless_forward_attempts",
            "histogram",
            "Attempts needed per forwarded request.",
        );
        for (bucket, bound) in self.attempts_buckets.iter().zip(ATTEMPT_BUCKETS) {
            let _ = writeln!(
                out,
                "stickless_forward_attempts_bucket{{le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.attempts_count);
        let _ = writeln!(
            out,
            "stickless_forward_attempts_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "stickless_forward_attempts_sum {}",
            load(&self.attempts_sum)
        );
        let _ = writeln!(out, "stickless_forward_attempts_count {count}");

        family(
            &mut out,
            "stickless_routing_rejections_total",
            "counter",
            "Requests answered 404 at once, without forwarding, by reason.",
        );
        if let Ok(map) = self.rejections.lock() {
            for (why, value) in map.iter() {
                let _ = writeln!(
                    out,
                    "stickless_routing_rejections_total{{reason=\"{why}\"}} {value}"
                );
            }
        }
        out
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
        assert!(text.contains("stickless_cluster_instances 3"));
        assert!(text.contains("stickless_forward_attempts_bucket{le=\"2\"} 0"));
        assert!(text.contains("stickless_forward_attempts_bucket{le=\"3\"} 1"));
        assert!(text.contains("stickless_forward_attempts_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains(
            "stickless_forwarded_requests_total{request=\"long_polling\",mode=\"load_balancer\",outcome=\"served\"} 1"
        ));
    }
}
