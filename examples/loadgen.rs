//! Load generator: N SignalR clients over WebSockets, Server-Sent Events or Long Polling
//! (JSON or MessagePack hub protocol) against one instance or a cluster, S of them
//! broadcasting at a rate through the chat hub's `Send` method.
//!
//! Records are encoded and MessagePack records decoded by the server's own
//! `stickless::protocol` module, so the generator speaks exactly what the server reads.
//! JSON broadcasts are recognised by their bytes instead of being parsed (see
//! [`on_record`]), which keeps the one-threaded generator ahead of the server.
//!
//! It prints a human table and one JSON line with the connect rate and latency
//! percentiles, deliveries per second, the delivery ratio, end-to-end latency
//! percentiles (each payload carries its send time) and the servers' resident memory per
//! connection, read from their `/metrics` before and after the clients connect.
//!
//! One thread and one event loop drive every client, so the generator leaves as much of
//! a small machine as it can to the server it measures.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/stickless &                   # listens on 127.0.0.1:8080
//! target/release/examples/loadgen --clients 500 --senders 4 --rate 100 --duration 10s
//! ```
//!
//! `--soak 2m` runs the soak instead: mixed transports, a steady broadcast, `--churn`
//! (1 %) of the clients reconnecting every second; it reports the messages lost by
//! clients that stayed connected (sequence numbers per sender), the servers' memory slope
//! after `--warmup`, and the ERROR/WARN lines of the server logs given with `--log`.
//! See README "Performance" for the exact commands and `ulimit -n`.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::rt;
use awc::ws;
use bytes::Bytes;
use bytestring::ByteString;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use stickless::protocol::framing::{frame, RECORD_SEPARATOR as RS};
use stickless::protocol::hub_protocol::{HubProtocol, MessageReader};
use stickless::protocol::message::HubMessage;

/// A client WebSocket.
type WsFramed = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

/// Largest record the generator accepts from a server.
const MAX_RECORD: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// WebSockets.
    Ws,
    /// Server-Sent Events (sends by POST).
    Sse,
    /// Long Polling (sends by POST).
    Lp,
    /// WebSockets, SSE and Long Polling in turn.
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// The JSON hub protocol.
    Json,
    /// The MessagePack hub protocol: binary WebSocket frames and binary Long Polling
    /// bodies (Server-Sent Events carry text only, so they cannot take part).
    Messagepack,
}

impl Protocol {
    fn hub(self) -> HubProtocol {
        match self {
            Self::Json => HubProtocol::Json,
            Self::Messagepack => HubProtocol::MessagePack,
        }
    }
}

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Load generator and soak for stickless")]
struct Args {
    /// Base URL of an instance or a load balancer; repeat it to spread clients over
    /// instances (client i uses URL i mod n).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    urls: Vec<String>,
    /// Instances whose `/metrics` to read for memory (default: the --url values).
    #[arg(long = "metrics-url")]
    metrics_urls: Vec<String>,
    /// The hub path; it must have a `Send(text)` method that broadcasts `Send(text)`.
    #[arg(long, default_value = "/chat")]
    hub: String,
    /// Clients to connect.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// Transport of every client.
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// Hub protocol.
    #[arg(long, value_enum, default_value = "json")]
    protocol: Protocol,
    /// Clients that also send (the first S).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Senders connect over WebSockets whatever --transport says, so that a slow POST
    /// round trip does not cap the offered load when measuring SSE or Long Polling fan-out.
    #[arg(long)]
    ws_senders: bool,
    /// Messages per second per sender.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long the senders send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Extra bytes in each message.
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Run the soak for this long instead of one measurement.
    #[arg(long, value_parser = parse_duration)]
    soak: Option<Duration>,
    /// Soak: the fraction of clients that reconnect every second.
    #[arg(long, default_value_t = 0.01)]
    churn: f64,
    /// Soak: memory samples before this are warm-up and not in the slope.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    warmup: Duration,
    /// Negotiate this many connections that never start, instead of running clients:
    /// reports the memory each pending negotiation holds, how many the server refused
    /// (503), and the memory left once the server dropped them.
    #[arg(long)]
    flood: Option<usize>,
    /// Server log files to count ERROR and WARN lines in (soak).
    #[arg(long = "log")]
    logs: Vec<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number.parse().map_err(|_| format!("bad duration {text}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {text}")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A log-linear histogram of microseconds: 16 buckets per power of two (about 4 %).
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    const SUB: u32 = 16;

    fn new() -> Self {
        Self {
            counts: vec![0; (64 * Self::SUB) as usize],
            total: 0,
        }
    }

    fn bucket(value: u64) -> usize {
        if value < u64::from(Self::SUB) {
            return value as usize;
        }
        let power = 63 - value.leading_zeros();
        let fraction = (value >> (power - 4)) & u64::from(Self::SUB - 1);
        (power * Self::SUB + fraction as u32) as usize - 3 * Self::SUB as usize
    }

    fn lower_bound(bucket: usize) -> u64 {
        if bucket < Self::SUB as usize {
            return bucket as u64;
        }
        let bucket = bucket + 3 * Self::SUB as usize;
        let power = bucket as u32 / Self::SUB;
        let fraction = bucket as u64 % u64::from(Self::SUB);
        (1u64 << power) | (fraction << (power - 4))
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::bucket(value)] += 1;
        self.total += 1;
    }

    /// The `q` quantile in milliseconds (`q` in 0..=1).
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::lower_bound(bucket) as f64 / 1000.0;
            }
        }
        0.0
    }

    fn summary(&self) -> Value {
        json!({
            "p50_ms": self.quantile_ms(0.50),
            "p90_ms": self.quantile_ms(0.90),
            "p99_ms": self.quantile_ms(0.99),
            "p999_ms": self.quantile_ms(0.999),
            "max_ms": self.quantile_ms(1.0),
            "count": self.total,
        })
    }
}

/// What one client slot saw.
#[derive(Debug)]
struct Slot {
    /// Messages received from each sender.
    received: RefCell<Vec<u64>>,
    /// The highest sequence number received from each sender.
    last_seq: RefCell<Vec<u64>>,
    /// The first sequence number received from each sender (0: none yet): where a
    /// client that connected during the run starts to owe every message.
    first_seq: RefCell<Vec<u64>>,
    /// Messages that arrived out of order or twice.
    disorder: Cell<u64>,
    /// False once the slot reconnected (its counts are then not a loss measure).
    stayed: Cell<bool>,
    /// The connection ended without the generator asking.
    dropped: Cell<bool>,
}

impl Slot {
    fn new(senders: usize) -> Self {
        Self {
            received: RefCell::new(vec![0; senders]),
            last_seq: RefCell::new(vec![0; senders]),
            first_seq: RefCell::new(vec![0; senders]),
            disorder: Cell::new(0),
            stayed: Cell::new(true),
            dropped: Cell::new(false),
        }
    }
}

/// Figures shared by every client task.
struct Stats {
    connect: RefCell<Histogram>,
    connect_failures: Cell<u64>,
    latency: RefCell<Histogram>,
    delivered: Cell<u64>,
    sent: RefCell<Vec<u64>>,
    send_failures: Cell<u64>,
    closes: Cell<u64>,
    /// Records from the server the generator could not read.
    protocol_errors: Cell<u64>,
    /// Deliveries are counted in the latency histogram only while this is set.
    measuring: Cell<bool>,
}

/// One generator run's settings, shared by its tasks.
struct Plan {
    args: Args,
    client: awc::Client,
    stats: Stats,
    limiter: tokio::sync::Semaphore,
    padding: String,
    /// The hub protocol every client speaks.
    protocol: HubProtocol,
    /// The handshake request for it (a JSON record whatever the protocol).
    handshake: Bytes,
}

impl Plan {
    fn transport_of(&self, slot: usize) -> Transport {
        if self.args.ws_senders && slot < self.args.senders {
            return Transport::Ws;
        }
        match self.args.transport {
            Transport::Mixed => [Transport::Ws, Transport::Sse, Transport::Lp][slot % 3],
            one => one,
        }
    }

    fn url_of(&self, slot: usize) -> &str {
        self.args.urls[slot % self.args.urls.len()].trim_end_matches('/')
    }
}

/// One client's inbound bytes between transport messages.
struct Inbox {
    /// JSON: the start of a record not yet complete. Before the handshake reply: the
    /// start of that reply.
    rest: Vec<u8>,
    /// MessagePack: the project's reader, which keeps partial records itself.
    reader: Option<MessageReader>,
    /// The handshake reply (`{}` and the record separator, JSON in both protocols)
    /// still comes first in this stream.
    handshake_pending: bool,
}

impl Inbox {
    fn new(plan: &Plan, handshake_pending: bool) -> Self {
        Self {
            rest: Vec::new(),
            reader: (plan.protocol == HubProtocol::MessagePack)
                .then(|| MessageReader::new(plan.protocol, MAX_RECORD)),
            handshake_pending,
        }
    }
}

/// Handles every complete record in `data`; keeps a partial one for the next call.
fn take_records(plan: &Plan, slot: &Slot, inbox: &mut Inbox, data: &[u8]) {
    let mut data = data;
    if inbox.handshake_pending {
        inbox.rest.extend_from_slice(data);
        let Some(end) = inbox.rest.iter().position(|&b| b == RS) else {
            return;
        };
        inbox.handshake_pending = false;
        let after = inbox.rest.split_off(end + 1);
        inbox.rest.clear();
        return take_records(plan, slot, inbox, &after);
    }
    if let Some(reader) = inbox.reader.as_mut() {
        reader.extend(data);
        loop {
            match reader.next_message() {
                Ok(Some(HubMessage::Invocation {
                    target, arguments, ..
                })) if target == "Send" => {
                    if let Some(Value::String(payload)) = arguments.first() {
                        on_payload(plan, slot, payload.as_bytes());
                    }
                }
                Ok(Some(HubMessage::Close { .. })) => {
                    plan.stats.closes.set(plan.stats.closes.get() + 1);
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(error) => {
                    // The reader cannot skip a bad record: count it and start afresh.
                    note_protocol_error(plan, &error.to_string());
                    *reader = MessageReader::new(plan.protocol, MAX_RECORD);
                    return;
                }
            }
        }
    }
    let rest = &mut inbox.rest;
    if !rest.is_empty() {
        match data.iter().position(|&b| b == RS) {
            Some(end) => {
                rest.extend_from_slice(&data[..end]);
                let record = std::mem::take(rest);
                on_record(plan, slot, &record);
                data = &data[end + 1..];
            }
            None => {
                rest.extend_from_slice(data);
                return;
            }
        }
    }
    let mut parts = data.split(|&b| b == RS).peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            rest.extend_from_slice(part);
        } else {
            on_record(plan, slot, part);
        }
    }
}

/// A record the generator could not read; the first few are printed.
fn note_protocol_error(plan: &Plan, error: &str) {
    let errors = plan.stats.protocol_errors.get() + 1;
    plan.stats.protocol_errors.set(errors);
    if errors <= 5 {
        eprintln!("unreadable record from the server: {error}");
    }
}

/// One JSON record from the server: a broadcast `Send` is counted, a Close noted.
///
/// The server writes JSON objects with sorted keys, so a broadcast is
/// `{"arguments":["…"],"target":"Send","type":1}`: both ends are checked without a search,
/// which keeps the generator cheap at hundreds of thousands of records a second.
fn on_record(plan: &Plan, slot: &Slot, record: &[u8]) {
    const HEAD: &[u8] = b"{\"arguments\":[\"";
    const TAIL: &[u8] = b"\"],\"target\":\"Send\",\"type\":1}";
    if !(record.starts_with(HEAD) && record.ends_with(TAIL)) {
        if record.ends_with(b"\"type\":7}") {
            plan.stats.closes.set(plan.stats.closes.get() + 1);
        }
        return;
    }
    on_payload(plan, slot, &record[HEAD.len()..record.len() - TAIL.len()]);
}

/// The argument of one broadcast, `sender:seq:micros:padding`: counted per sender, its
/// latency recorded.
fn on_payload(plan: &Plan, slot: &Slot, payload: &[u8]) {
    let mut fields = payload.split(|&b| b == b':');
    let mut next = || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
    let (Some(sender), Some(seq), Some(sent_at)) = (next(), next(), next()) else {
        return;
    };
    let sender = sender as usize;
    let stats = &plan.stats;
    stats.delivered.set(stats.delivered.get() + 1);
    if stats.measuring.get() {
        stats
            .latency
            .borrow_mut()
            .record(now_micros().saturating_sub(sent_at));
    }
    let mut received = slot.received.borrow_mut();
    let mut last = slot.last_seq.borrow_mut();
    if let (Some(count), Some(last)) = (received.get_mut(sender), last.get_mut(sender)) {
        *count += 1;
        if seq <= *last {
            slot.disorder.set(slot.disorder.get() + 1);
        }
        *last = (*last).max(seq);
    }
    if let Some(first) = slot.first_seq.borrow_mut().get_mut(sender) {
        if *first == 0 {
            *first = seq;
        }
    }
}

/// A negotiated connection's token.
async fn negotiate(plan: &Plan, base: &str) -> Result<String, String> {
    let url = format!("{base}{}/negotiate?negotiateVersion=1", plan.args.hub);
    let mut response = plan
        .client
        .post(url)
        .send()
        .await
        .map_err(|e| format!("negotiate: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("negotiate answered {}", response.status()));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("negotiate body: {e}"))?;
    body["connectionToken"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("negotiate without a token: {body}"))
}

/// The `Send` invocation of `sender`'s message number `seq`, one framed record of the
/// run's protocol.
fn invocation(plan: &Plan, sender: usize, seq: u64) -> Bytes {
    plan.protocol.encode(&HubMessage::Invocation {
        invocation_id: None,
        target: "Send".into(),
        arguments: vec![Value::String(format!(
            "{sender}:{seq}:{}:{}",
            now_micros(),
            plan.padding
        ))],
        stream_ids: Vec::new(),
    })
}

/// Where a connected client sends its records.
enum Outgoing {
    WebSocket(futures_util::stream::SplitSink<WsFramed, ws::Message>),
    Post(String),
}

impl Outgoing {
    /// Sends records: a Text frame or text body for JSON, Binary for MessagePack (the
    /// handshake, JSON in both protocols, goes in the protocol's frame type, as the
    /// official clients send it).
    async fn send(&mut self, plan: &Plan, records: Bytes) -> Result<(), String> {
        match self {
            Self::WebSocket(sink) => {
                let message = match plan.protocol {
                    HubProtocol::Json => {
                        ws::Message::Text(ByteString::try_from(records).map_err(|e| e.to_string())?)
                    }
                    HubProtocol::MessagePack => ws::Message::Binary(records),
                };
                sink.send(message).await.map_err(|e| e.to_string())
            }
            Self::Post(url) => {
                let content_type = match plan.protocol {
                    HubProtocol::Json => "text/plain;charset=UTF-8",
                    HubProtocol::MessagePack => "application/octet-stream",
                };
                let response = plan
                    .client
                    .post(url.as_str())
                    .insert_header(("Content-Type", content_type))
                    .send_body(records)
                    .await
                    .map_err(|e| e.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("POST answered {}", response.status()))
                }
            }
        }
    }
}

/// A connected client's receiving side, driven by [`receive`].
enum Incoming {
    WebSocket(futures_util::stream::SplitStream<WsFramed>),
    EventStream(awc::ClientResponse),
    Polls(String),
}

/// Connects slot `index`: negotiate, transport, handshake; returns once the server
/// answered the handshake, with both sides of the connection.
async fn connect(
    plan: &Plan,
    index: usize,
    slot: &Slot,
) -> Result<(Incoming, Outgoing, Inbox), String> {
    let base = plan.url_of(index);
    let token = negotiate(plan, base).await?;
    let endpoint = format!("{base}{}?id={token}", plan.args.hub);
    // The handshake reply comes first in every transport's stream; a WebSocket reads it
    // here, the others in `receive`.
    let mut inbox = Inbox::new(plan, true);
    match plan.transport_of(index) {
        Transport::Ws | Transport::Mixed => {
            let url = endpoint.replacen("http", "ws", 1);
            let (_, framed) = plan
                .client
                .ws(url)
                .max_frame_size(1 << 20)
                .connect()
                .await
                .map_err(|e| format!("WebSocket: {e}"))?;
            let (sink, mut stream) = framed.split();
            let mut outgoing = Outgoing::WebSocket(sink);
            outgoing
                .send(plan, plan.handshake.clone())
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            // The first frame holds the handshake reply.
            match stream.next().await {
                Some(Ok(ws::Frame::Text(bytes) | ws::Frame::Binary(bytes)))
                    if bytes.starts_with(b"{}") =>
                {
                    take_records(plan, slot, &mut inbox, &bytes);
                }
                other => return Err(format!("handshake reply: {other:?}")),
            }
            Ok((Incoming::WebSocket(stream), outgoing, inbox))
        }
        Transport::Sse => {
            let response = plan
                .client
                .get(endpoint.as_str())
                .insert_header(("Accept", "text/event-stream"))
                .send()
                .await
                .map_err(|e| format!("event stream: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("event stream answered {}", response.status()));
            }
            let mut outgoing = Outgoing::Post(endpoint);
            outgoing.send(plan, plan.handshake.clone()).await?;
            Ok((Incoming::EventStream(response), outgoing, inbox))
        }
        Transport::Lp => {
            // The first poll is answered at once; the handshake goes after it.
            poll(plan, &endpoint).await?;
            let mut outgoing = Outgoing::Post(endpoint.clone());
            outgoing.send(plan, plan.handshake.clone()).await?;
            Ok((Incoming::Polls(endpoint), outgoing, inbox))
        }
    }
}

/// One long poll: `Some(body)`, or `None` when the server says the connection is over.
async fn poll(plan: &Plan, endpoint: &str) -> Result<Option<Bytes>, String> {
    let mut response = plan
        .client
        .get(endpoint)
        .send()
        .await
        .map_err(|e| format!("poll: {e}"))?;
    match response.status().as_u16() {
        204 => Ok(None),
        200 => Ok(Some(
            response
                .body()
                .limit(64 << 20)
                .await
                .map_err(|e| format!("poll body: {e}"))?,
        )),
        status => Err(format!("poll answered {status}")),
    }
}

/// Receives until the connection ends.
async fn receive(plan: &Plan, slot: &Slot, incoming: Incoming, mut inbox: Inbox) {
    match incoming {
        Incoming::WebSocket(mut stream) => {
            while let Some(Ok(frame)) = stream.next().await {
                match frame {
                    ws::Frame::Text(bytes) | ws::Frame::Binary(bytes) => {
                        take_records(plan, slot, &mut inbox, &bytes)
                    }
                    ws::Frame::Close(_) => break,
                    _ => {}
                }
            }
        }
        Incoming::EventStream(mut response) => {
            // Lines of `data: …`; the records inside may span lines only in theory.
            let mut line = Vec::new();
            while let Some(Ok(chunk)) = response.next().await {
                for &byte in chunk.iter() {
                    if byte != b'\n' {
                        line.push(byte);
                        continue;
                    }
                    if let Some(data) = line.strip_prefix(b"data: ") {
                        let data = data.strip_suffix(b"\r").unwrap_or(data);
                        take_records(plan, slot, &mut inbox, data);
                    }
                    line.clear();
                }
            }
        }
        Incoming::Polls(endpoint) => {
            while let Ok(Some(body)) = poll(plan, &endpoint).await {
                take_records(plan, slot, &mut inbox, &body);
            }
        }
    }
}

/// Sends `sender`'s messages at the configured rate until `stop` is set.
async fn send_loop(plan: Rc<Plan>, sender: usize, mut outgoing: Outgoing, stop: Rc<Cell<bool>>) {
    let period = Duration::from_secs_f64(1.0 / plan.args.rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !stop.get() {
        tick.tick().await;
        if stop.get() {
            break;
        }
        let seq = plan.stats.sent.borrow()[sender] + 1;
        let text = invocation(&plan, sender, seq);
        match outgoing.send(&plan, text).await {
            Ok(()) => plan.stats.sent.borrow_mut()[sender] = seq,
            Err(error) => {
                plan.stats
                    .send_failures
                    .set(plan.stats.send_failures.get() + 1);
                eprintln!("sender {sender}: {error}");
                return;
            }
        }
    }
}

/// A running client: its receive task, and its outgoing side until a sender takes it.
struct Running {
    task: rt::task::JoinHandle<()>,
    outgoing: Option<Outgoing>,
}

/// Connects slot `index` and starts receiving; `None` if it could not connect.
async fn start_client(plan: Rc<Plan>, index: usize, slot: Rc<Slot>) -> Option<Running> {
    let started = Instant::now();
    let connected = {
        let _permit = plan.limiter.acquire().await.ok()?;
        connect(&plan, index, &slot).await
    };
    match connected {
        Ok((incoming, outgoing, inbox)) => {
            plan.stats
                .connect
                .borrow_mut()
                .record(started.elapsed().as_micros() as u64);
            let task_plan = plan.clone();
            let task = rt::spawn(async move {
                receive(&task_plan, &slot, incoming, inbox).await;
                slot.dropped.set(true);
            });
            Some(Running {
                task,
                outgoing: Some(outgoing),
            })
        }
        Err(error) => {
            let failures = plan.stats.connect_failures.get() + 1;
            plan.stats.connect_failures.set(failures);
            if failures <= 5 {
                eprintln!("client {index}: {error}");
            }
            None
        }
    }
}

/// The summed resident memory and open connections of the metrics URLs.
async fn server_memory(plan: &Plan) -> (i64, i64) {
    let figures = server_figures(
        plan,
        &[
            "process_resident_memory_bytes ",
            "stickless_connections_open ",
        ],
    )
    .await;
    (figures[0], figures[1])
}

/// The sums of the named metrics over the metrics URLs.
async fn server_figures(plan: &Plan, names: &[&str]) -> Vec<i64> {
    let mut sums = vec![0; names.len()];
    let urls = if plan.args.metrics_urls.is_empty() {
        &plan.args.urls
    } else {
        &plan.args.metrics_urls
    };
    for url in urls {
        let Ok(mut response) = plan
            .client
            .get(format!("{}/metrics", url.trim_end_matches('/')))
            .send()
            .await
        else {
            continue;
        };
        let Ok(body) = response.body().limit(1 << 20).await else {
            continue;
        };
        for line in String::from_utf8_lossy(&body).lines() {
            for (sum, name) in sums.iter_mut().zip(names) {
                if let Some(value) = line
                    .strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    *sum += value as i64;
                }
            }
        }
    }
    sums
}

/// Negotiates `count` connections that never start, `connect_concurrency` at a time.
async fn run_flood(plan: Rc<Plan>, count: usize) -> Value {
    const PENDING: &str = "stickless_pending_negotiations ";
    let (rss_before, _) = server_memory(&plan).await;
    let accepted = Rc::new(Cell::new(0u64));
    let refused = Rc::new(Cell::new(0u64));
    let started = Instant::now();
    let workers: Vec<_> = (0..plan.args.connect_concurrency.max(1))
        .map(|worker| {
            let (plan, accepted, refused) = (plan.clone(), accepted.clone(), refused.clone());
            rt::spawn(async move {
                let mut index = worker;
                while index < count {
                    let url = format!(
                        "{}{}/negotiate?negotiateVersion=1",
                        plan.url_of(index),
                        plan.args.hub
                    );
                    match plan
                        .client
                        .post(url)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                    {
                        Ok(200) => accepted.set(accepted.get() + 1),
                        Ok(503) => refused.set(refused.get() + 1),
                        _ => plan
                            .stats
                            .connect_failures
                            .set(plan.stats.connect_failures.get() + 1),
                    }
                    index += plan.args.connect_concurrency.max(1);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let flood_time = started.elapsed();
    let figures = server_figures(&plan, &["process_resident_memory_bytes ", PENDING]).await;
    let (rss_flooded, pending) = (figures[0], figures[1]);
    // The server drops them after its disconnect timeout (15 s by default).
    let mut left = pending;
    let deadline = Instant::now() + Duration::from_secs(120);
    while left > 0 && Instant::now() < deadline {
        rt::time::sleep(Duration::from_millis(500)).await;
        left = server_figures(&plan, &[PENDING]).await[0];
    }
    // Allocators that return memory lazily (jemalloc decays over about 10 s) get time.
    rt::time::sleep(Duration::from_secs(12)).await;
    let (rss_expired, _) = server_memory(&plan).await;
    let per_pending = (rss_flooded - rss_before) as f64 / pending.max(1) as f64;
    let result = json!({
        "mode": "flood",
        "negotiations": count,
        "accepted": accepted.get(),
        "refused_503": refused.get(),
        "failed": plan.stats.connect_failures.get(),
        "per_s": count as f64 / flood_time.as_secs_f64(),
        "pending_at_end": pending,
        "rss_before_bytes": rss_before,
        "rss_flooded_bytes": rss_flooded,
        "rss_after_expiry_bytes": rss_expired,
        "rss_per_pending_bytes": per_pending.round(),
    });
    print_table(&[
        (
            "negotiations",
            format!(
                "{count} in {:.1} s: {} accepted, {} refused (503), {pending} pending",
                flood_time.as_secs_f64(),
                accepted.get(),
                refused.get()
            ),
        ),
        (
            "server memory",
            format!(
                "{} before, {} flooded ({:.0} B per pending), {} after they expired",
                mib(rss_before),
                mib(rss_flooded),
                per_pending,
                mib(rss_expired)
            ),
        ),
    ]);
    result
}

/// Waits until `done` holds or `deadline` passes, checking every 50 ms.
async fn until(deadline: Duration, done: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !done() && Instant::now() < end {
        rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The length of each log now, so that only what the servers write later is read.
fn log_offsets(logs: &[PathBuf]) -> Vec<u64> {
    logs.iter()
        .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .collect()
}

/// Counts the ERROR and WARN lines written to each log since `offsets` (env_logger's
/// `[time LEVEL module] text` lines), grouped by level and module with the first line of
/// each group as an example, so a report says what the warnings were, not only how many.
fn count_log_lines(logs: &[PathBuf], offsets: &[u64]) -> Value {
    use std::collections::BTreeMap;
    use std::io::{Read, Seek, SeekFrom};
    let mut groups: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let (mut errors, mut warnings, mut unreadable) = (0u64, 0u64, 0u64);
    for (path, offset) in logs.iter().zip(offsets) {
        let mut text = String::new();
        let read = std::fs::File::open(path).and_then(|mut file| {
            file.seek(SeekFrom::Start(*offset))?;
            file.read_to_string(&mut text)
        });
        if read.is_err() {
            unreadable += 1;
            continue;
        }
        for line in text.lines() {
            let Some(head) = line.strip_prefix('[').and_then(|l| l.split(']').next()) else {
                continue;
            };
            let mut words = head.split_whitespace().skip(1);
            let (Some(level), module) = (words.next(), words.next().unwrap_or("")) else {
                continue;
            };
            match level {
                "ERROR" => errors += 1,
                "WARN" => warnings += 1,
                _ => continue,
            }
            let group = groups
                .entry(format!("{level} {module}"))
                .or_insert_with(|| (0, line.chars().take(200).collect()));
            group.0 += 1;
        }
    }
    let by_module: Vec<Value> = groups
        .into_iter()
        .map(|(key, (count, example))| json!({ "what": key, "lines": count, "example": example }))
        .collect();
    json!({
        "errors": errors,
        "warnings": warnings,
        "files": logs.len(),
        "unreadable_files": unreadable,
        "by_module": by_module,
    })
}

/// Least-squares slope of `(seconds, bytes)` samples, in bytes per minute.
fn slope_per_minute(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_x = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_y = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let covariance: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_x) * (s.1 - mean_y))
        .sum();
    let variance: f64 = samples.iter().map(|s| (s.0 - mean_x).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance * 60.0
    }
}

/// Connects every slot; returns the running clients and how long it took.
async fn connect_all(plan: &Rc<Plan>, slots: &[Rc<Slot>]) -> (Vec<Option<Running>>, Duration) {
    let started = Instant::now();
    let pending: Vec<_> = slots
        .iter()
        .enumerate()
        .map(|(index, slot)| rt::spawn(start_client(plan.clone(), index, slot.clone())))
        .collect();
    let mut running = Vec::with_capacity(slots.len());
    for handle in pending {
        running.push(handle.await.ok().flatten());
    }
    (running, started.elapsed())
}

/// Starts the senders (the first `senders` running clients).
fn start_senders(plan: &Rc<Plan>, running: &mut [Option<Running>], stop: &Rc<Cell<bool>>) {
    for (sender, client) in running.iter_mut().take(plan.args.senders).enumerate() {
        if let Some(outgoing) = client.as_mut().and_then(|c| c.outgoing.take()) {
            rt::spawn(send_loop(plan.clone(), sender, outgoing, stop.clone()));
        }
    }
}

fn total_sent(plan: &Plan) -> u64 {
    plan.stats.sent.borrow().iter().sum()
}

/// Messages lost by clients that stayed: for each sender, what it sent minus what
/// the client received.
fn losses(plan: &Plan, slots: &[Rc<Slot>]) -> (u64, u64, u64) {
    let sent = plan.stats.sent.borrow();
    let mut lost = 0;
    let mut stayed = 0;
    let mut disorder = 0;
    for slot in slots.iter().filter(|s| s.stayed.get() && !s.dropped.get()) {
        stayed += 1;
        disorder += slot.disorder.get();
        for (sent, received) in sent.iter().zip(slot.received.borrow().iter()) {
            lost += sent.saturating_sub(*received);
        }
    }
    (lost, stayed, disorder)
}

/// Messages lost by clients that reconnected during a soak and are connected at its end:
/// from the first message each got from a sender, every later one is owed (what came
/// before that is the connection's start, where a message may rightly be missed).
/// Returns the messages lost and the clients counted.
fn losses_since_reconnect(plan: &Plan, slots: &[Rc<Slot>]) -> (u64, u64) {
    let sent = plan.stats.sent.borrow();
    let mut lost = 0;
    let mut counted = 0;
    for slot in slots.iter().filter(|s| !s.stayed.get() && !s.dropped.get()) {
        counted += 1;
        let received = slot.received.borrow();
        for ((sent, first), received) in sent
            .iter()
            .zip(slot.first_seq.borrow().iter())
            .zip(received.iter())
        {
            if *first > 0 {
                lost += (sent + 1).saturating_sub(*first).saturating_sub(*received);
            }
        }
    }
    (lost, counted)
}

fn print_table(rows: &[(&str, String)]) {
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    for (name, value) in rows {
        println!("{name:<width$}  {value}");
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

async fn run_once(plan: Rc<Plan>) -> Value {
    let args = &plan.args;
    let slots: Vec<Rc<Slot>> = (0..args.clients)
        .map(|_| Rc::new(Slot::new(args.senders)))
        .collect();
    let (rss_before, _) = server_memory(&plan).await;
    let (mut running, connect_time) = connect_all(&plan, &slots).await;
    let connected = running.iter().filter(|r| r.is_some()).count();
    // Let the servers settle (presence messages of the connect storm) before reading.
    let settled = Rc::new(Cell::new(plan.stats.delivered.get()));
    rt::time::sleep(Duration::from_secs(2)).await;
    let (rss_connected, open) = server_memory(&plan).await;
    let per_connection = (rss_connected - rss_before) as f64 / connected.max(1) as f64;

    let stop = Rc::new(Cell::new(false));
    settled.set(plan.stats.delivered.get());
    let delivered_before = plan.stats.delivered.get();
    plan.stats.measuring.set(true);
    let send_started = Instant::now();
    start_senders(&plan, &mut running, &stop);
    rt::time::sleep(args.duration).await;
    stop.set(true);
    let send_time = send_started.elapsed();
    let sent = total_sent(&plan);
    let expected = sent * connected as u64;
    until(Duration::from_secs(10), || {
        plan.stats.delivered.get() - delivered_before >= expected
    })
    .await;
    let drained = send_started.elapsed();
    plan.stats.measuring.set(false);
    let delivered = plan.stats.delivered.get() - delivered_before;
    let (rss_after, _) = server_memory(&plan).await;
    let (lost, stayed, disorder) = losses(&plan, &slots);
    for client in running.into_iter().flatten() {
        client.task.abort();
    }

    let connect = plan.stats.connect.borrow().summary();
    let latency = plan.stats.latency.borrow().summary();
    let result = json!({
        "mode": "run",
        "transport": format!("{:?}", args.transport).to_lowercase(),
        "protocol": plan.protocol.name(),
        "urls": args.urls,
        "clients": args.clients,
        "connected": connected,
        "connect_failures": plan.stats.connect_failures.get(),
        "connect_per_s": connected as f64 / connect_time.as_secs_f64(),
        "connect_ms": connect,
        "senders": args.senders,
        "rate_per_sender": args.rate,
        "offered_deliveries_per_s": (args.senders as f64) * args.rate * connected as f64,
        "sent": sent,
        "send_failures": plan.stats.send_failures.get(),
        "delivered": delivered,
        "delivered_per_s": delivered as f64 / send_time.as_secs_f64(),
        "delivery_ratio": if expected == 0 { 0.0 } else { delivered as f64 / expected as f64 },
        "drain_s": (drained - send_time).as_secs_f64(),
        "lost": lost,
        "out_of_order": disorder,
        "clients_intact": stayed,
        "close_messages": plan.stats.closes.get(),
        "protocol_errors": plan.stats.protocol_errors.get(),
        "latency_ms": latency,
        "server_connections_open": open,
        "rss_before_bytes": rss_before,
        "rss_connected_bytes": rss_connected,
        "rss_after_bytes": rss_after,
        "rss_per_connection_bytes": per_connection.round(),
    });
    print_table(&[
        (
            "transport",
            format!("{}, {}", result["transport"], result["protocol"]),
        ),
        (
            "clients",
            format!(
                "{connected}/{} connected in {:.2} s ({:.0}/s), connect p50 {} ms p99 {} ms",
                args.clients,
                connect_time.as_secs_f64(),
                result["connect_per_s"].as_f64().unwrap_or(0.0),
                connect["p50_ms"],
                connect["p99_ms"]
            ),
        ),
        (
            "offered",
            format!(
                "{} senders x {}/s -> {:.0} deliveries/s",
                args.senders, args.rate, result["offered_deliveries_per_s"]
            ),
        ),
        (
            "delivered",
            format!(
                "{delivered} ({:.0}/s), ratio {:.4}, lost by intact clients {lost}",
                result["delivered_per_s"].as_f64().unwrap_or(0.0),
                result["delivery_ratio"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "latency",
            format!(
                "p50 {} ms  p90 {} ms  p99 {} ms  max {} ms",
                latency["p50_ms"], latency["p90_ms"], latency["p99_ms"], latency["max_ms"]
            ),
        ),
        (
            "server memory",
            format!(
                "{} before, {} connected, {} after: {:.1} KiB per connection",
                mib(rss_before),
                mib(rss_connected),
                mib(rss_after),
                per_connection / 1024.0
            ),
        ),
    ]);
    result
}

async fn run_soak(plan: Rc<Plan>, length: Duration) -> Value {
    let args = &plan.args;
    let slots: RefCell<Vec<Rc<Slot>>> = RefCell::new(
        (0..args.clients)
            .map(|_| Rc::new(Slot::new(args.senders)))
            .collect(),
    );
    let offsets = log_offsets(&args.logs);
    let (rss_before, _) = server_memory(&plan).await;
    let initial: Vec<Rc<Slot>> = slots.borrow().clone();
    let (mut running, connect_time) = connect_all(&plan, &initial).await;
    let connect_failures = plan.stats.connect_failures.get();
    let connected = running.iter().filter(|r| r.is_some()).count();
    let stop = Rc::new(Cell::new(false));
    start_senders(&plan, &mut running, &stop);
    let running = Rc::new(RefCell::new(running));
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut reconnects = 0u64;
    let mut churn_due = 0.0;
    let mut next_sample = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut rng_state = 0x9e37_79b9_7f4a_7c15_u64;
    while started.elapsed() < length {
        tick.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= next_sample {
            let (rss, _) = server_memory(&plan).await;
            samples.push((elapsed.as_secs_f64(), rss as f64));
            next_sample += Duration::from_secs(5);
        }
        // Reconnect `churn` of the clients (never the senders): drop the connection
        // without a goodbye, as a network change would, and connect a fresh one.
        churn_due += args.churn * args.clients as f64;
        while churn_due >= 1.0 && args.clients > args.senders {
            churn_due -= 1.0;
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let index = args.senders + (rng_state as usize) % (args.clients - args.senders);
            if let Some(client) = running.borrow_mut()[index].take() {
                client.task.abort();
            }
            let fresh = Rc::new(Slot::new(args.senders));
            fresh.stayed.set(false);
            slots.borrow()[index].stayed.set(false);
            slots.borrow_mut()[index] = fresh.clone();
            reconnects += 1;
            // Reconnections run concurrently; a failed one is counted by the connect
            // statistics.
            let (plan, running) = (plan.clone(), running.clone());
            rt::spawn(async move {
                let client = start_client(plan, index, fresh).await;
                // The slot may have been picked again while this one connected: the
                // client it held is stopped, never left running unseen.
                let old = std::mem::replace(&mut running.borrow_mut()[index], client);
                if let Some(old) = old {
                    old.task.abort();
                }
            });
        }
    }
    stop.set(true);
    let sent = total_sent(&plan);
    // Every counted client has everything (or the deadline passed).
    let all_in = || {
        let slots = slots.borrow();
        losses(&plan, &slots).0 == 0 && losses_since_reconnect(&plan, &slots).0 == 0
    };
    until(Duration::from_secs(15), all_in).await;
    let (lost, stayed, disorder) = losses(&plan, &slots.borrow());
    let (lost_reconnected, reconnected) = losses_since_reconnect(&plan, &slots.borrow());
    let dropped = slots.borrow().iter().filter(|s| s.dropped.get()).count();
    let warm: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|s| s.0 >= args.warmup.as_secs_f64())
        .collect();
    let slope = slope_per_minute(&warm);
    let (rss_end, open) = server_memory(&plan).await;
    let logs = count_log_lines(&args.logs, &offsets);
    let result = json!({
        "mode": "soak",
        "transport": format!("{:?}", args.transport).to_lowercase(),
        "protocol": plan.protocol.name(),
        "urls": args.urls,
        "clients": args.clients,
        "connected": connected,
        "connect_s": connect_time.as_secs_f64(),
        "connect_failures": connect_failures,
        "reconnect_failures": plan.stats.connect_failures.get() - connect_failures,
        "duration_s": length.as_secs_f64(),
        "senders": args.senders,
        "rate_per_sender": args.rate,
        "sent": sent,
        "send_failures": plan.stats.send_failures.get(),
        "reconnects": reconnects,
        "clients_intact": stayed,
        "clients_dropped_by_server": dropped,
        "lost_by_intact_clients": lost,
        "clients_reconnected_at_end": reconnected,
        "lost_by_reconnected_clients_since_their_first_message": lost_reconnected,
        "out_of_order": disorder,
        "delivered": plan.stats.delivered.get(),
        "protocol_errors": plan.stats.protocol_errors.get(),
        "rss_before_bytes": rss_before,
        "rss_end_bytes": rss_end,
        "server_connections_open": open,
        "rss_slope_after_warmup_bytes_per_min": slope.round(),
        "rss_samples": samples.len(),
        // Every sample, `[seconds, MiB]`, so a slope can be judged by eye.
        "rss_mib_by_time": samples
            .iter()
            .map(|(at, rss)| json!([at.round(), (rss / 1048576.0 * 10.0).round() / 10.0]))
            .collect::<Vec<_>>(),
        "logs": logs,
    });
    print_table(&[
        ("soak", format!("{:.0} s, {}", length.as_secs_f64(), result["transport"])),
        (
            "clients",
            format!(
                "{connected}/{} connected in {:.1} s; {reconnects} reconnects",
                args.clients,
                connect_time.as_secs_f64()
            ),
        ),
        (
            "sent",
            format!("{sent} by {} senders at {}/s", args.senders, args.rate),
        ),
        (
            "lost",
            format!(
                "{lost} by {stayed} clients that stayed ({dropped} dropped by the server, {disorder} out of order); \
                 {lost_reconnected} by {reconnected} reconnected clients since their first message"
            ),
        ),
        (
            "memory",
            format!(
                "{} before, {} at the end; slope after warm-up {:.1} KiB/min",
                mib(rss_before),
                mib(rss_end),
                slope / 1024.0
            ),
        ),
        (
            "logs",
            format!(
                "{} ERROR, {} WARN lines since the start, in {} files ({} unreadable)",
                logs["errors"], logs["warnings"], logs["files"], logs["unreadable_files"]
            ),
        ),
    ]);
    for group in logs["by_module"].as_array().into_iter().flatten() {
        println!(
            "  {} x{}: {}",
            group["what"].as_str().unwrap_or(""),
            group["lines"],
            group["example"].as_str().unwrap_or("")
        );
    }
    result
}

fn main() {
    let args = Args::parse();
    let sse_in_run = matches!(args.transport, Transport::Sse | Transport::Mixed);
    if args.protocol == Protocol::Messagepack && sse_in_run && args.flood.is_none() {
        // TransportProtocols.md: Server-Sent Events carry text only, and the server
        // refuses a binary protocol on them at the handshake.
        let which = match args.transport {
            Transport::Mixed => "--transport mixed includes them",
            _ => "--transport sse",
        };
        eprintln!(
            "--protocol messagepack cannot run over Server-Sent Events ({which}): they carry \
             text only (TransportProtocols.md), so the server refuses a binary protocol on \
             them; use --transport ws or lp"
        );
        std::process::exit(2);
    }
    if args.senders > args.clients {
        eprintln!("--senders must not exceed --clients");
        std::process::exit(2);
    }
    rt::System::new().block_on(async move {
        let client = awc::Client::builder()
            .connector(awc::Connector::new().limit(0))
            .disable_timeout()
            .finish();
        let plan = Rc::new(Plan {
            stats: Stats {
                connect: RefCell::new(Histogram::new()),
                connect_failures: Cell::new(0),
                latency: RefCell::new(Histogram::new()),
                delivered: Cell::new(0),
                sent: RefCell::new(vec![0; args.senders]),
                send_failures: Cell::new(0),
                closes: Cell::new(0),
                protocol_errors: Cell::new(0),
                measuring: Cell::new(false),
            },
            limiter: tokio::sync::Semaphore::new(args.connect_concurrency.max(1)),
            padding: "x".repeat(args.payload),
            protocol: args.protocol.hub(),
            handshake: frame(
                &json!({ "protocol": args.protocol.hub().name(), "version": 1 }).to_string(),
            ),
            client,
            args,
        });
        let result = match (plan.args.flood, plan.args.soak) {
            (Some(count), _) => run_flood(plan.clone(), count).await,
            (None, Some(length)) => run_soak(plan.clone(), length).await,
            (None, None) => run_once(plan.clone()).await,
        };
        println!("{result}");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for value in [0u64, 1, 15, 16, 17, 100, 1000, 123_456, 10_000_000] {
            let bucket = Histogram::bucket(value);
            assert!(bucket >= last);
            last = bucket;
            let low = Histogram::lower_bound(bucket);
            assert!(
                low <= value && value - low <= value / 16 + 1,
                "{value} {low}"
            );
        }
    }

    #[test]
    fn the_slope_of_a_line_is_found() {
        let samples: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, 100.0 + 2.0 * i as f64))
            .collect();
        assert!((slope_per_minute(&samples) - 120.0).abs() < 1e-9);
    }
}
