//! Connect storm: how fast one instance takes in thousands of chat clients.
//!
//! Each client does what the chat page does when it opens: negotiate, open a WebSocket,
//! complete the SignalR handshake and come online with `SetName(name)` (or only the
//! handshake with `--connect-only`, which is what a bare broadcaster would cost). Clients
//! stay connected and keep reading until all of them are in, so the presence traffic the
//! joins cause is part of the cost. Prints connects per second and the p50/p99/max time
//! from the first request to the completion of `SetName`.
//!
//! Start a server on its own, then storm it (both need many file descriptors):
//!
//! ```sh
//! ulimit -n 65536
//! cargo build --release --bins --examples
//! target/release/stickless --listen-addr 127.0.0.1:8080 &
//! target/release/examples/connect_storm http://127.0.0.1:8080 5000 100
//! ```
//!
//! Arguments: base URL (default `http://127.0.0.1:8080`), clients (default 5000),
//! connects in flight at once (default 100); `--connect-only` skips `SetName`.

use std::time::{Duration, Instant};

use awc::ws::{Frame, Message};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

const RS: char = '\u{1e}';
/// Longest any one step may take before the client counts as failed (a hang, not a
/// measurement).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

struct Options {
    base: String,
    clients: usize,
    in_flight: usize,
    connect_only: bool,
}

fn options() -> Options {
    let mut positional = Vec::new();
    let mut connect_only = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--connect-only" => connect_only = true,
            _ => positional.push(arg),
        }
    }
    let number = |i: usize, default: usize| {
        positional
            .get(i)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(default)
    };
    Options {
        base: positional
            .first()
            .cloned()
            .unwrap_or_else(|| "http://127.0.0.1:8080".into())
            .trim_end_matches('/')
            .to_owned(),
        clients: number(1, 5000),
        in_flight: number(2, 100).max(1),
        connect_only,
    }
}

/// Reads text frames until one holds a record `wanted` accepts.
async fn read_until(socket: &mut Socket, wanted: impl Fn(&Value) -> bool) -> Result<(), String> {
    loop {
        let frame = tokio::time::timeout(STEP_TIMEOUT, socket.next())
            .await
            .map_err(|_| "timed out".to_owned())?
            .ok_or("socket closed")?
            .map_err(|e| e.to_string())?;
        let text = match frame {
            Frame::Text(bytes) | Frame::Binary(bytes) => bytes,
            Frame::Close(reason) => return Err(format!("closed: {reason:?}")),
            _ => continue,
        };
        let text = String::from_utf8_lossy(&text);
        for record in text.split(RS).filter(|r| !r.is_empty()) {
            let value: Value = serde_json::from_str(record).map_err(|e| e.to_string())?;
            if wanted(&value) {
                return Ok(());
            }
        }
    }
}

/// One client's way in; returns its socket once it is online.
async fn connect(client: &awc::Client, options: &Options, n: usize) -> Result<Socket, String> {
    let mut negotiated = client
        .post(format!(
            "{}/chat/negotiate?negotiateVersion=1",
            options.base
        ))
        .send()
        .await
        .map_err(|e| format!("negotiate: {e}"))?;
    let body: Value = negotiated
        .json()
        .await
        .map_err(|e| format!("negotiate body: {e}"))?;
    let token = body["connectionToken"]
        .as_str()
        .ok_or("negotiate: no connectionToken")?;
    let ws_base = options.base.replacen("http", "ws", 1);
    let (_, mut socket) = client
        .ws(format!("{ws_base}/chat?id={token}"))
        .max_frame_size(1 << 20)
        .connect()
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    let send = |text: String| Message::Text(text.into());
    socket
        .send(send(format!(r#"{{"protocol":"json","version":1}}{RS}"#)))
        .await
        .map_err(|e| e.to_string())?;
    read_until(&mut socket, |v| v.as_object().is_some_and(|o| o.is_empty())).await?;
    if !options.connect_only {
        let invocation = serde_json::json!({
            "type": 1, "invocationId": "1", "target": "SetName", "arguments": [format!("bot-{n}")]
        });
        socket
            .send(send(format!("{invocation}{RS}")))
            .await
            .map_err(|e| e.to_string())?;
        read_until(&mut socket, |v| v["type"] == 3 && v["invocationId"] == "1").await?;
    }
    Ok(socket)
}

/// Keeps reading (and dropping) what the server sends, as a live page would.
async fn drain(mut socket: Socket) {
    while let Some(Ok(frame)) = socket.next().await {
        if let Frame::Ping(bytes) = frame {
            let _ = socket.send(Message::Pong(bytes)).await;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[actix_web::main]
async fn main() {
    let options = std::rc::Rc::new(options());
    // Every client keeps its socket: no pool limit (0 = none), or connects would queue.
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(STEP_TIMEOUT)
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
    let gate = std::rc::Rc::new(tokio::sync::Semaphore::new(options.in_flight));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    for n in 0..options.clients {
        let (client, options, gate, done) = (
            client.clone(),
            options.clone(),
            gate.clone(),
            done_tx.clone(),
        );
        actix_web::rt::spawn(async move {
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            let began = Instant::now();
            let result = connect(&client, &options, n).await;
            drop(_permit);
            match result {
                Ok(socket) => {
                    let _ = done.send(Ok(began.elapsed()));
                    drain(socket).await;
                }
                Err(error) => {
                    let _ = done.send(Err(error));
                }
            }
        });
    }
    drop(done_tx);
    let mut times = Vec::with_capacity(options.clients);
    let mut failures = Vec::new();
    while times.len() + failures.len() < options.clients {
        match done_rx.recv().await {
            Some(Ok(time)) => times.push(time),
            Some(Err(error)) => failures.push(error),
            None => break,
        }
    }
    let total = started.elapsed();
    times.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{} clients ({} in flight, {}) against {}",
        options.clients,
        options.in_flight,
        if options.connect_only {
            "handshake only"
        } else {
            "handshake + SetName"
        },
        options.base
    );
    println!(
        "connected {} in {:.2} s: {:.0} connects/s; connect time p50 {} p99 {} max {}",
        times.len(),
        total.as_secs_f64(),
        times.len() as f64 / total.as_secs_f64(),
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99)),
        ms(times.last().copied().unwrap_or_default()),
    );
    if !failures.is_empty() {
        println!("{} failed; first: {}", failures.len(), failures[0]);
        std::process::exit(1);
    }
}
