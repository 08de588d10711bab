//! `/metrics` as tests read it. A read fails loudly when the metric is not exposed, so a
//! renamed or removed counter turns every check on it red instead of reading as 0.

use super::http::Api;
use super::TestCluster;

/// Label values the README documents for the counters that appear once they count
/// something; a sample with only these values that is not (yet) exposed has counted
/// nothing, which reads as 0. Anything else (a typo, a rename, a `transport` sample,
/// which is always exposed) fails.
const DOCUMENTED_LABELS: &[(&str, &[&str])] = &[
    (
        "request",
        &[
            "websockets",
            "server_sent_events",
            "long_polling",
            "send",
            "delete",
        ],
    ),
    ("mode", &["direct", "bus", "load_balancer"]),
    ("outcome", &["served", "not_found", "failed", "retried"]),
    (
        "reason",
        &[
            "bad_token",
            "gone",
            "probe_miss",
            "no_route",
            "draining",
            "reused",
            "in_use",
        ],
    ),
    (
        "transport",
        &["websockets", "server_sent_events", "long_polling"],
    ),
];

/// Every metric family the README's table names, each of which `/metrics` must declare.
pub const DOCUMENTED_FAMILIES: &[&str] = &[
    "stickless_connections",
    "stickless_connections_started_total",
    "stickless_negotiations_total",
    "stickless_messages_received_total",
    "stickless_messages_sent_total",
    "stickless_forwarded_requests_total",
    "stickless_forward_attempts",
    "stickless_forward_requests_sent_total",
    "stickless_routing_rejections_total",
    "stickless_adopted_websockets_total",
    "stickless_backplane_published_total",
    "stickless_backplane_publish_errors_total",
    "stickless_backplane_received_total",
    "stickless_backplane_reconnects_total",
    "stickless_backplane_up",
    "stickless_slow_consumer_closes_total",
];

/// Every request sent to another instance or the load balancer.
pub const SENT: &str = "stickless_forward_requests_sent_total";

/// `stickless_forwarded_requests_total{request,mode,outcome}`.
pub fn forwarded(request: &str, mode: &str, outcome: &str) -> String {
    format!(
        "stickless_forwarded_requests_total{{request=\"{request}\",mode=\"{mode}\",outcome=\"{outcome}\"}}"
    )
}

/// `stickless_routing_rejections_total{reason}`.
pub fn rejections(reason: &str) -> String {
    format!("stickless_routing_rejections_total{{reason=\"{reason}\"}}")
}

/// The families a Prometheus text exposition declares (`# TYPE name kind`).
pub fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .flat_map(|(name, kind)| {
            // OpenMetrics names a counter's family without the `_total` its samples carry
            // (`# TYPE x counter`, then `x_total 3`): the family answers to both names.
            let total = (kind.trim() == "counter").then(|| format!("{name}_total"));
            std::iter::once(name.to_owned()).chain(total)
        })
        .collect()
}

/// Reads one sample, e.g. `stickless_routing_rejections_total{reason="bad_token"}`.
/// Panics if its family is not declared, or if a labelled sample is absent and its labels
/// are not documented ones.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    let found = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse::<f64>().ok())?
        });
    if let Some(value) = found {
        return value;
    }
    let (family, labels) = sample.split_once('{').unwrap_or((sample, ""));
    let family = family
        .trim_end_matches("_bucket")
        .trim_end_matches("_sum")
        .trim_end_matches("_count");
    assert!(
        families(text).iter().any(|f| f == family),
        "/metrics does not declare {family} (reading {sample}):\n{text}"
    );
    assert!(
        !labels.is_empty(),
        "/metrics declares {family} but has no sample {sample}:\n{text}"
    );
    for pair in labels.trim_end_matches('}').split(',') {
        let (label, value) = pair
            .split_once('=')
            .unwrap_or_else(|| panic!("bad label {pair:?} in {sample}"));
        let value = value.trim_matches('"');
        let documented = DOCUMENTED_LABELS
            .iter()
            .any(|(name, values)| *name == label && values.contains(&value));
        assert!(
            documented,
            "{label}={value} is not a documented label of {family}"
        );
    }
    0.0
}

impl Api {
    /// One sample of `/metrics` (see [`metric_value`]).
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }
}

impl TestCluster {
    /// The sum of one sample over every running instance.
    pub async fn sum_metric(&self, sample: &str) -> f64 {
        let mut sum = 0.0;
        for (index, node) in self.nodes.iter().enumerate() {
            if self.running[index] {
                sum += node.metric(sample).await;
            }
        }
        sum
    }
}

#[test]
fn a_missing_metric_fails_loudly_and_an_uncounted_documented_sample_reads_zero() {
    let text = "# TYPE stickless_x_total counter\nstickless_x_total 3\n# TYPE stickless_routing_rejections_total counter\n";
    assert_eq!(metric_value(text, "stickless_x_total"), 3.0);
    assert_eq!(metric_value(text, &rejections("gone")), 0.0);
    for missing in [
        "stickless_y_total",
        "stickless_routing_rejections_total{reason=\"typo\"}",
    ] {
        let read = std::panic::catch_unwind(|| metric_value(text, missing));
        assert!(read.is_err(), "{missing} must not read as 0");
    }
}

/// The forwarding counters of a whole cluster (summed over running instances) at one
/// moment; subtract two to see what happened in between.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Forwarding {
    /// Requests sent to another instance or the balancer (every attempt).
    pub sent: f64,
    /// Forwarded client requests (the attempts histogram's count).
    pub forwards: f64,
    /// Attempts over all forwarded client requests (the histogram's sum).
    pub attempts: f64,
    /// Probes that reached an instance without the connection.
    pub probe_miss: f64,
    /// Requests for a connection its owner no longer holds (`gone`, or `reused` when its
    /// claim says it ended).
    pub gone: f64,
    /// Tokens that did not verify.
    pub bad_token: f64,
    /// Misrouted requests with no way to forward them.
    pub no_route: f64,
}

impl Forwarding {
    /// Reads the counters from one exposition.
    pub fn read(text: &str) -> Self {
        Self {
            sent: metric_value(text, SENT),
            forwards: metric_value(text, "stickless_forward_attempts_count"),
            attempts: metric_value(text, "stickless_forward_attempts_sum"),
            probe_miss: metric_value(text, &rejections("probe_miss")),
            gone: metric_value(text, &rejections("gone"))
                + metric_value(text, &rejections("reused")),
            bad_token: metric_value(text, &rejections("bad_token")),
            no_route: metric_value(text, &rejections("no_route")),
        }
    }
}

impl std::ops::Add for Forwarding {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            sent: self.sent + other.sent,
            forwards: self.forwards + other.forwards,
            attempts: self.attempts + other.attempts,
            probe_miss: self.probe_miss + other.probe_miss,
            gone: self.gone + other.gone,
            bad_token: self.bad_token + other.bad_token,
            no_route: self.no_route + other.no_route,
        }
    }
}

impl std::ops::Sub for Forwarding {
    type Output = Self;

    fn sub(self, other: Self) -> Self {
        Self {
            sent: self.sent - other.sent,
            forwards: self.forwards - other.forwards,
            attempts: self.attempts - other.attempts,
            probe_miss: self.probe_miss - other.probe_miss,
            gone: self.gone - other.gone,
            bad_token: self.bad_token - other.bad_token,
            no_route: self.no_route - other.no_route,
        }
    }
}

impl TestCluster {
    /// The forwarding counters of every running instance, summed.
    pub async fn forwarding(&self) -> Forwarding {
        let mut total = Forwarding::default();
        for (index, node) in self.nodes.iter().enumerate() {
            if self.running[index] {
                total = total + Forwarding::read(&node.metrics().await);
            }
        }
        total
    }
}
