//! Secrets stay out of the logs: a real cluster at the default `info` level is driven on
//! every transport, with negotiate versions 1 and 0 (whose connection id is the token),
//! an `access_token` in the query and requests sent to the wrong instance (forwarded);
//! then every instance's log is read and must contain neither a connection token nor the
//! access token, while it does show the (redacted) access and forwarding lines. nginx's
//! access log, written with the repo's nginx.conf, must contain neither either.

use std::time::Duration;

use actix_web::http::Method;
use serde_json::json;

use crate::helpers::*;

const ACCESS_TOKEN: &str = "not-for-logs-7f3a9c";

#[actix_web::test]
async fn logs_redact_connection_tokens_v0_ids_and_access_tokens() {
    let cluster = spawn_cluster(3, |options| {
        options.env.push(("RUST_LOG".into(), "info".into()));
    })
    .await;
    let (home, away) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut secrets = vec![ACCESS_TOKEN.to_owned()];

    // Long polling, negotiated on one instance and served through another (forwarded).
    let mut lp = LpClient::negotiate(home).await;
    lp.api = away.clone();
    lp.start().await;
    assert_eq!(
        lp.call("WhoAmI", json!([])).await["transport"],
        "LongPolling"
    );
    secrets.push(lp.token.clone());
    let poll = away
        .request(
            Method::GET,
            &format!("/chat?id={}&access_token={ACCESS_TOKEN}", lp.token),
            &[],
            "",
            Duration::from_secs(10),
        )
        .await;
    assert!(poll.status.is_success(), "{}", poll.status);
    assert!(away.delete(&lp.token).await.status.is_success());

    // Negotiate version 0: the connection id is the token.
    let v0 = home.negotiate_raw("", &[]).await.json();
    let id = v0["connectionId"]
        .as_str()
        .expect("connectionId")
        .to_owned();
    let mut old = LpClient::resume(away, &id, &id);
    old.start().await;
    assert_eq!(old.call("WhoAmI", json!([])).await["connectionId"], id);
    secrets.push(id);

    // Server-Sent Events, forwarded.
    let mut sse = SseClient::connect_via(home, away).await;
    assert_eq!(
        sse.call("WhoAmI", json!([])).await["transport"],
        "ServerSentEvents"
    );
    secrets.push(sse.token.clone());

    // WebSockets with the access token in the query, as browsers send it.
    let (_, token) = home.negotiate().await;
    let mut ws = away
        .ws_raw(&format!("id={token}&access_token={ACCESS_TOKEN}"), &[])
        .await
        .expect("ws");
    ws.handshake().await;
    assert_eq!(
        ws.call("WhoAmI", json!([])).await["transport"],
        "WebSockets"
    );
    secrets.push(token);

    // Through the load balancer: nginx's own access log (the repo's nginx.conf) must keep
    // query strings out too.
    let (_, token) = home.negotiate().await;
    let through = cluster
        .lb
        .request(
            Method::GET,
            &format!("/chat?id={token}&access_token={ACCESS_TOKEN}"),
            &[],
            "",
            Duration::from_secs(10),
        )
        .await;
    assert!(through.status.is_success(), "{}", through.status);
    secrets.push(token);
    // nginx writes a request's line once it has answered: wait for it.
    let nginx_log = cluster.cluster.dir.join("nginx.log");
    let mut balancer_log = String::new();
    for _ in 0..50 {
        balancer_log = std::fs::read_to_string(&nginx_log).unwrap_or_default();
        if balancer_log.contains("\"GET /chat HTTP/1.1\" 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        balancer_log.contains("\"GET /chat HTTP/1.1\" 200"),
        "no access log line for the poll in {}:\n{balancer_log}",
        nginx_log.display()
    );
    for secret in &secrets {
        assert!(
            !balancer_log.contains(secret.as_str()),
            "nginx's access log contains the secret {secret}:\n{balancer_log}"
        );
    }

    let mut logs = String::new();
    for id in &cluster.ids {
        let path = cluster.cluster.dir.join(format!("{id}.log"));
        logs += &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    }
    // The lines that would carry the secrets are there, redacted.
    assert!(
        logs.contains("id=[redacted]"),
        "no access log lines:\n{logs}"
    );
    assert!(
        logs.contains("access_token=[redacted]"),
        "no access log line with an access token:\n{logs}"
    );
    assert!(logs.contains("forwarded "), "no forwarding lines:\n{logs}");
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "the logs contain the secret {secret}:\n{logs}"
        );
    }
}
