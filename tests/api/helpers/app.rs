//! The real application: in-process ([`spawn_app`]) with settings built here from
//! [`Settings::default`], never from the shell's environment; or the real `stickless`
//! binary as a child process with a cleared environment ([`stickless_command`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stickless::config::Settings;
use stickless::startup::AppHandle;

use super::http::Api;

/// The long-poll timeout of test apps, so that idle polls come back soon.
pub const TEST_POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// A running in-process instance.
pub struct TestApp {
    /// The bound port.
    pub port: u16,
    /// Stops the instance.
    pub handle: AppHandle,
    /// Its instance id, as `/healthz` reports it.
    pub instance: String,
    /// The endpoints.
    pub api: Api,
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The chat page's folder in this repository.
pub fn static_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/static"))
}

/// The settings every in-process test app starts from: the defaults, a free loopback
/// port, short timeouts. Nothing is read from the environment.
pub fn test_settings() -> Settings {
    Settings {
        listen_addr: "127.0.0.1:0".parse().expect("an address"),
        static_dir: static_dir(),
        poll_timeout: TEST_POLL_TIMEOUT,
        shutdown_timeout: Duration::from_secs(2),
        workers: Some(2),
        ..Settings::default()
    }
}

/// Starts the chat demo on a free port with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the chat demo with the test settings changed by `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    configure(&mut settings);
    start(stickless::demo::app(settings)).await
}

/// Builds `app`, runs it in the background, and names it by what `/healthz` says.
pub async fn start(app: stickless::App) -> TestApp {
    let application = app.build().await.expect("the application builds");
    let port = application.port();
    let handle = application.handle();
    actix_web::rt::spawn(application.run_until_stopped());
    let api = Api::new(format!("http://127.0.0.1:{port}"));
    let health = api.healthz().await;
    let instance = health["instance"]
        .as_str()
        .expect("healthz names the instance")
        .to_owned();
    TestApp {
        port,
        handle,
        instance,
        api,
    }
}

/// The real `stickless` binary with an empty environment (only `PATH`), its output piped:
/// add the settings a test means with `.env(…)` or `.arg(…)`.
pub fn stickless_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stickless"));
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A child process killed when the test ends, passed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
