//! The `stickless` server: the demo's hubs on one instance by default, or one instance of
//! a cluster when `REDIS_URL`, `LOAD_BALANCER_URL` and `CLUSTER_SECRET` are set.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use stickless::{demo, App, Settings};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command line: the settings, plus the container health check.
#[derive(Parser)]
#[command(
    name = "stickless",
    version,
    about = "SignalR-compatible real-time server that needs no sticky sessions"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    /// Check `/healthz` of the instance at LISTEN_ADDR and exit 0 if it answers 200
    /// (for container health checks: no curl needed).
    #[arg(long)]
    healthcheck: bool,
}

/// The address to reach this instance on from the same host.
fn local_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    }
}

fn healthcheck(listen: SocketAddr) -> anyhow::Result<()> {
    let address = local_address(listen);
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "unhealthy: {}",
            response.lines().next().unwrap_or("no response")
        )
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    log::warn!("cannot listen for SIGTERM: {error}");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = cli.settings;
    if cli.healthcheck {
        return healthcheck(settings.listen_addr);
    }
    env_logger::Builder::new()
        .parse_filters(&settings.log_filter)
        .format_timestamp_millis()
        .init();
    let listen = settings.listen_addr;
    // The application is chosen here: mount your own hubs (see the README).
    let chat = demo::chat::hub(&settings);
    let app = App::new(settings)
        .hub("/chat", chat)
        .hub("/notifications", demo::notifications::hub())
        .user_id(demo::user_id)
        .build()
        .await
        .context("stickless could not start")?;
    let address = local_address(SocketAddr::new(listen.ip(), app.port()));
    println!("stickless listening on http://{address}");
    std::io::stdout().flush()?;
    let handle = app.handle();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        handle.shutdown().await;
    });
    app.run_until_stopped().await?;
    log::info!("stopped");
    Ok(())
}
