//! `stickless-cluster`: a cluster on this machine without Docker — `redis-server`, N
//! `stickless` instances and `nginx` (the repo's `nginx.conf`) on free loopback ports.
//!
//! Prints one JSON line on stdout when ready (`{"url":…,"redis":…,"instances":[…]}`),
//! then waits; Ctrl-C or SIGTERM (or, with `--stop-on-stdin-eof`, the end of its standard
//! input) stops everything. With `--stop-on-stdin-eof`, a line `restart N` on standard
//! input restarts instance N (from 0) on its port, as a deployment would, and is answered
//! with `{"restarted":N}` once the instance is ready again (tests of clients'
//! automatic reconnect use it).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
// Some of the launcher's API is there for the integration tests, which include the same file.
#[allow(dead_code)]
mod devcluster;

use devcluster::{Cluster, ClusterOptions};

#[derive(Parser)]
#[command(
    name = "stickless-cluster",
    about = "Run redis-server, N stickless instances and nginx on loopback"
)]
struct Cli {
    /// Number of instances.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    instances: u16,
    /// The stickless binary; default: the one beside this program.
    #[arg(long)]
    bin: Option<PathBuf>,
    /// The nginx.conf template.
    #[arg(long, default_value = "nginx.conf")]
    nginx_conf: PathBuf,
    /// The chat page's folder.
    #[arg(long, default_value = "static")]
    static_dir: PathBuf,
    /// Do not announce direct URLs: misrouted requests take the bus or go back through
    /// nginx (`--env ROUTES=…` picks which).
    #[arg(long)]
    no_direct_routing: bool,
    /// Also stop when standard input reaches its end (for a parent process that pipes it),
    /// and take `restart N` lines from it.
    #[arg(long)]
    stop_on_stdin_eof: bool,
    /// Extra environment for every instance, as NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{raw:?} is not NAME=VALUE"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = match cli.bin {
        Some(bin) => bin,
        None => std::env::current_exe()?
            .parent()
            .context("no folder beside this program")?
            .join("stickless"),
    };
    let stop_on_stdin_eof = cli.stop_on_stdin_eof;
    let mut options = ClusterOptions::new(cli.instances.into(), bin);
    options.nginx_conf = cli.nginx_conf;
    options.static_dir = cli.static_dir;
    options.direct_routing = !cli.no_direct_routing;
    options.env = cli.env;
    let cluster = Cluster::start(options).context("starting the cluster")?;
    let ready = json!({
        "url": cluster.url,
        "redis": cluster.redis_url,
        "instances": cluster.instances.iter().map(|i| json!({"id": i.id, "url": i.url})).collect::<Vec<_>>(),
    });
    println!("{ready}");
    std::io::stdout().flush()?;
    eprintln!(
        "stickless cluster ready: open {} (logs in {})",
        cluster.url,
        cluster.dir.display()
    );
    eprintln!("stop with Ctrl-C");

    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<Command>();
    let on_signal = stop_tx.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(term) => term,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            });
            let _ = on_signal.send(Command::Stop("signal"));
        }
    });
    if stop_on_stdin_eof {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let restart = line
                    .trim()
                    .strip_prefix("restart ")
                    .and_then(|n| n.trim().parse().ok());
                match restart {
                    Some(index) => {
                        let _ = stop_tx.send(Command::Restart(index));
                    }
                    None => eprintln!("unknown command {line:?} (expected `restart N`)"),
                }
            }
            let _ = stop_tx.send(Command::Stop("end of standard input"));
        });
    }
    let mut cluster = cluster;
    let why = loop {
        match stop_rx.recv() {
            Ok(Command::Restart(index)) if index < cluster.instances.len() => {
                cluster.stop_instance(index);
                match cluster.start_instance(index) {
                    Ok(()) => println!("{}", json!({ "restarted": index })),
                    Err(error) => println!(
                        "{}",
                        json!({ "restarted": index, "error": error.to_string() })
                    ),
                }
                std::io::stdout().flush()?;
            }
            Ok(Command::Restart(index)) => {
                println!(
                    "{}",
                    json!({ "restarted": index, "error": "no such instance" })
                );
                std::io::stdout().flush()?;
            }
            Ok(Command::Stop(why)) => break why,
            Err(_) => break "channel closed",
        }
    };
    eprintln!("stopping the cluster ({why})");
    drop(cluster);
    Ok(())
}

/// What the main thread is asked to do.
enum Command {
    /// Restart one instance.
    Restart(usize),
    /// Stop everything, for this reason.
    Stop(&'static str),
}
