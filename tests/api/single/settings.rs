//! Settings, through the real binary with a cleared environment: an invalid value stops
//! the process with a message naming the setting, `POLL_TIMEOUT`'s range, `--healthcheck`.

use std::io::{BufRead, BufReader};
use std::process::Output;
use std::time::Duration;

use stickless::config::Settings;

use crate::helpers::app::{stickless_command, KillOnDrop};
use crate::helpers::*;

/// Runs the binary with `env` and waits for it to exit (it must, being misconfigured);
/// one that keeps running is killed when the test gives up on it.
async fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = stickless_command();
    command
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .args(args);
    let child = command.spawn().expect("stickless runs");
    let pid = child.id();
    let run = tokio::task::spawn_blocking(move || child.wait_with_output().expect("output"));
    match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
        Ok(output) => output.expect("the run task"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            panic!("{env:?} {args:?}: the process did not exit");
        }
    }
}

/// A running binary, killed on drop.
struct Running {
    _child: KillOnDrop,
    /// `http://127.0.0.1:PORT`, from the line it prints when listening.
    url: String,
}

/// Starts the binary on a free port and waits for its "listening on" line.
async fn start(env: &[(&str, &str)]) -> Running {
    let mut command = stickless_command();
    command
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("WORKERS", "1")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("stickless starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = within(REQUEST_TIMEOUT, "the listening line", read)
        .await
        .expect("the read task")
        .expect("stdout");
    let url = line
        .trim()
        .strip_prefix("stickless listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Running {
        _child: KillOnDrop(child),
        url,
    }
}

#[actix_web::test]
async fn an_invalid_setting_stops_the_process_with_a_message_naming_it() {
    // The positive control: the same binary, environment cleared, starts and serves.
    let running = start(&[]).await;
    assert_eq!(Api::new(&running.url).healthz().await["status"], "ok");

    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("POLL_TIMEOUT", "96s")], "POLL_TIMEOUT"),
        (&[("POLL_TIMEOUT", "500ms")], "POLL_TIMEOUT"),
        (&[("KEEP_ALIVE_INTERVAL", "30s")], "KEEP_ALIVE_INTERVAL"),
        (&[("MAX_FORWARD_ATTEMPTS", "lots")], "MAX_FORWARD_ATTEMPTS"),
        (&[("HANDSHAKE_TIMEOUT", "soon")], "HANDSHAKE_TIMEOUT"),
        (&[("REDIS_URL", "redis://127.0.0.1:1")], "CLUSTER_SECRET"),
        (
            &[
                ("LOAD_BALANCER_URL", "http://lb"),
                ("CLUSTER_SECRET", "short"),
            ],
            "CLUSTER_SECRET",
        ),
    ];
    for (env, named) in cases {
        let output = run_to_exit(env, &[]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} started");
        assert!(
            stderr
                .to_ascii_uppercase()
                .replace('-', "_")
                .contains(named),
            "{env:?}: the message does not name {named}: {stderr}"
        );
    }
}

#[test]
fn poll_timeout_must_be_between_one_and_ninety_five_seconds() {
    let with = |poll_timeout| Settings {
        poll_timeout,
        ..Settings::default()
    };
    for ok in [1_000, 95_000] {
        assert!(
            with(Duration::from_millis(ok)).validate().is_ok(),
            "{ok} ms"
        );
    }
    for bad in [999, 95_001, 100_000] {
        let error = with(Duration::from_millis(bad))
            .validate()
            .expect_err("out of range");
        assert!(error.to_string().contains("POLL_TIMEOUT"), "{error}");
    }
}

#[actix_web::test]
async fn healthcheck_exits_0_for_a_healthy_instance_and_non_zero_otherwise() {
    let running = start(&[]).await;
    let address = running.url.trim_start_matches("http://").to_owned();

    let healthy = run_to_exit(&[("LISTEN_ADDR", &address)], &["--healthcheck"]).await;
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );

    drop(running);
    let gone = run_to_exit(&[("LISTEN_ADDR", &address)], &["--healthcheck"]).await;
    assert!(!gone.status.success(), "healthy with nothing listening");
}
