//! The `stickless-cluster` launcher's flags, and a process joining a cluster from outside
//! with `{hostname}` in its `ADVERTISE_URL`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};

use awc::http::StatusCode;
use serde_json::Value;

use crate::helpers::app::{static_dir, stickless_command, KillOnDrop};
use crate::helpers::metrics::{forwarded, rejections};
use crate::helpers::*;

#[actix_web::test]
async fn the_launcher_starts_what_its_flags_say_and_stops_at_the_end_of_its_input() {
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_stickless-cluster"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args([
            "--instances",
            "2",
            "--no-direct-routing",
            "--stop-on-stdin-eof",
        ])
        .args([
            "--env",
            "MAX_FORWARD_ATTEMPTS=0",
            "--env",
            "ROUTES=adopt,direct,load-balancer",
            "--env",
            "POLL_TIMEOUT=2s",
        ])
        .arg("--nginx-conf")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf"))
        .arg("--static-dir")
        .arg(static_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("stickless-cluster starts");
    let stdout = launcher.stdout.take().expect("piped stdout");
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = within(SETTLE_TIMEOUT * 3, "the ready line", read)
        .await
        .expect("the read task")
        .expect("stdout");
    let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let instances = ready["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "--instances 2: {ready}");
    assert!(ready["redis"]
        .as_str()
        .is_some_and(|r| r.starts_with("redis://")));
    let lb = Api::new(ready["url"].as_str().expect("url"));
    let nodes: Vec<Api> = instances
        .iter()
        .map(|i| Api::new(i["url"].as_str().expect("an instance url")))
        .collect();
    assert_eq!(lb.healthz().await["backplane"], "redis");
    assert_eq!(nodes[1].healthz().await["instance"], instances[1]["id"]);

    // --no-direct-routing, --env MAX_FORWARD_ATTEMPTS=0 and no bus route: a misrouted poll has no way
    // to its owner. The positive control: the owner itself serves it.
    let (_, token) = nodes[0].negotiate().await;
    let no_route = rejections("no_route");
    let before = nodes[1].metric(&no_route).await;
    assert_eq!(nodes[1].poll(&token).await.status, StatusCode::NOT_FOUND);
    assert_eq!(nodes[1].metric(&no_route).await - before, 1.0);
    assert_eq!(nodes[0].poll(&token).await.status, StatusCode::OK);

    // --stop-on-stdin-eof: closing its input stops it, and everything it started.
    drop(launcher.stdin.take());
    let exited = tokio::task::spawn_blocking(move || launcher.wait());
    let status = within(SETTLE_TIMEOUT, "the launcher to exit", exited)
        .await
        .expect("the wait task")
        .expect("wait");
    assert!(status.success(), "{status}");
    let host = nodes[0].base.trim_start_matches("http://").to_owned();
    assert!(
        std::net::TcpStream::connect(host).is_err(),
        "an instance outlived the launcher"
    );
}

#[actix_web::test]
async fn an_advertise_url_with_hostname_is_expanded_so_peers_reach_the_instance_directly() {
    let cluster = spawn_cluster(2, |options| {
        options
            .env
            .push(("MAX_FORWARD_ATTEMPTS".into(), "0".into()));
    })
    .await;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let _joining = KillOnDrop(
        stickless_command()
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("INSTANCE_ID", "node-x")
            .env("HOSTNAME", "127.0.0.1")
            .env("ADVERTISE_URL", format!("http://{{hostname}}:{port}"))
            .env("REDIS_URL", &cluster.cluster.redis_url)
            .env("CLUSTER_SECRET", cluster.cluster.secret())
            .env("MAX_FORWARD_ATTEMPTS", "0")
            .env("WORKERS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the joining instance starts"),
    );
    let node_x = Api::new(format!("http://127.0.0.1:{port}"));
    eventually(SETTLE_TIMEOUT, "node-x connected", || async {
        let health = node_x.healthz_if_up().await?;
        (health["status"] == "ok").then_some(())
    })
    .await;

    // node-1 can only reach node-x's connections directly, at the expanded URL.
    let direct = forwarded("long_polling", "direct", "served");
    let via = &cluster.nodes[0];
    eventually(
        SETTLE_TIMEOUT,
        "node-1 to reach node-x directly",
        || async {
            let (_, token) = node_x.negotiate().await;
            let reply = via.poll(&token).await;
            (reply.status == StatusCode::OK).then_some(())
        },
    )
    .await;
    assert!(via.metric(&direct).await >= 1.0);
}
