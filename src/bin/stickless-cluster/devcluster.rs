//! A whole cluster on loopback, from real parts: `redis-server`, N `stickless`
//! instances and `nginx` with the repo's own `nginx.conf`, each on a free port.
//!
//! The `stickless-cluster` command and the integration tests both use this, so the
//! `nginx.conf` that ships is the one that is tested. The only changes made to it are
//! the `listen` port, what lies between its `BEGIN`/`END upstream servers` markers (the
//! shipped file finds Docker Compose replicas through Docker's DNS there; here it becomes
//! a plain round-robin `upstream` group of the loopback instances, which the shipped
//! `proxy_pass http://$stickless_upstream` then names), and file locations for an
//! unprivileged prefix (temp paths, logs, pid).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A program could not be run (not installed?).
    #[error(
        "cannot run {program}: {source} (is it installed? the README's test command installs it)"
    )]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process did not become ready in time.
    #[error("{0} did not become ready within {READY_TIMEOUT:?}; see its log in {1}")]
    NotReady(String, PathBuf),
    /// A process exited while it was starting.
    #[error("{0} exited while starting ({1}); see its log in {2}")]
    Exited(String, std::process::ExitStatus, PathBuf),
    /// `nginx.conf` lacks what the launcher replaces.
    #[error("nginx.conf has no {0}")]
    Template(&'static str),
    /// File or socket trouble.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of instances.
    pub instances: usize,
    /// The `stickless` binary.
    pub bin: PathBuf,
    /// The nginx.conf template.
    pub nginx_conf: PathBuf,
    /// The chat page's folder.
    pub static_dir: PathBuf,
    /// Announce each instance's direct URL (owner-directed routing).
    pub direct_routing: bool,
    /// Extra environment for every instance, e.g. `MAX_FORWARD_ATTEMPTS`; it is applied
    /// last, so it can override any setting the launcher gives.
    pub env: Vec<(String, String)>,
    /// The instances' `RUST_LOG`.
    pub log_filter: String,
}

impl ClusterOptions {
    /// `instances` instances of `bin`, with the repo's nginx.conf and static folder
    /// found from the current directory.
    pub fn new(instances: usize, bin: impl Into<PathBuf>) -> Self {
        Self {
            instances,
            bin: bin.into(),
            nginx_conf: PathBuf::from("nginx.conf"),
            static_dir: PathBuf::from("static"),
            direct_routing: true,
            env: Vec::new(),
            log_filter: "info".into(),
        }
    }
}

/// A running instance.
#[derive(Debug)]
pub struct Instance {
    /// Its id (`INSTANCE_ID`).
    pub id: String,
    /// Its direct URL.
    pub url: String,
    port: u16,
    child: Option<Child>,
}

impl Instance {
    /// The process id, while it runs (tests pause an instance with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running cluster; everything is stopped when it is dropped.
#[derive(Debug)]
pub struct Cluster {
    /// The load balancer's URL: what clients use.
    pub url: String,
    /// The Redis URL.
    pub redis_url: String,
    /// The instances.
    pub instances: Vec<Instance>,
    /// Where configuration and logs are.
    pub dir: PathBuf,
    options: ClusterOptions,
    secret: String,
    lb_port: u16,
    redis_port: u16,
    redis: Option<Child>,
    nginx: Option<Child>,
}

/// A free TCP port on loopback for a process the launcher starts later.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), picked at
/// random and checked bindable: a port asked of the kernel with `bind(:0)` lies in that
/// range, and so does the local port of every outgoing connection, so in the moments
/// between this check and the process's own bind (a whole cluster's start-up, or an
/// instance's restart) another process's connection to Redis or a test's client could take
/// it. Below the range only another launcher's random pick can, which the set of ports
/// this process handed out and the readiness checks (the right instance id, a live child)
/// catch. Falls back to `bind(:0)` where the range leaves no room below it.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let floor = ephemeral_floor().unwrap_or(32768);
    const LOWEST: u16 = 10000;
    if floor > LOWEST + 1000 {
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..200 {
            let port = rand::random_range(LOWEST..floor);
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.push(port);
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lowest port of the kernel's ephemeral range, where the kernel says.
fn ephemeral_floor() -> Option<u16> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A minimal HTTP/1.1 GET, for health checks without an HTTP client: the status code
/// and the body.
pub fn http_get(
    address: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn wait_until(what: &str, log: &Path, mut ready: impl FnMut() -> bool) -> Result<(), ClusterError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(ClusterError::NotReady(what.to_owned(), log.to_owned()))
}

/// Like [`wait_until`] for a child the launcher started: fails at once, with its log, if
/// the child exits first (e.g. its port was taken), rather than waiting out the deadline
/// or taking another process's answer on that port for its own.
fn wait_for_child(
    what: &str,
    log: &Path,
    child: &mut Option<Child>,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ClusterError> {
    let mut exited = None;
    let result = wait_until(what, log, || {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            exited = Some(status);
            return true;
        }
        ready()
    });
    match exited {
        Some(status) => Err(ClusterError::Exited(
            what.to_owned(),
            status,
            log.to_owned(),
        )),
        None => result,
    }
}

/// A log file in the cluster's folder, appended to: a restarted instance keeps the lines
/// of its previous run above its new ones.
fn log_file(dir: &Path, name: &str) -> Result<(fs::File, PathBuf), ClusterError> {
    let path = dir.join(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    Ok((file, path))
}

/// Clears the environment a child would inherit, keeping only `PATH` (to find programs)
/// and `HOME`: children get the settings the launcher gives them and nothing else.
fn controlled_environment(command: &mut Command) -> &mut Command {
    command.env_clear();
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

fn spawn(command: &mut Command, program: &str) -> Result<Child, ClusterError> {
    command.spawn().map_err(|source| ClusterError::Spawn {
        program: program.to_owned(),
        source,
    })
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // SIGTERM first, so instances close their clients and nginx exits cleanly.
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Renders the nginx.conf template for a loopback cluster.
pub fn render_nginx_conf(
    template: &str,
    listen_port: u16,
    upstreams: &[u16],
    dir: &Path,
) -> Result<String, ClusterError> {
    const BEGIN: &str = "# BEGIN upstream servers";
    const END: &str = "# END upstream servers";
    let (head, rest) = template
        .split_once(BEGIN)
        .ok_or(ClusterError::Template(BEGIN))?;
    let (_, tail) = rest.split_once(END).ok_or(ClusterError::Template(END))?;
    if !tail.contains("proxy_pass http://$stickless_upstream;") {
        return Err(ClusterError::Template(
            "`proxy_pass http://$stickless_upstream;`",
        ));
    }
    let servers: String = upstreams
        .iter()
        .map(|port| format!("        server 127.0.0.1:{port} max_fails=0;\n"))
        .collect();
    // A proxy_pass variable whose value names an `upstream` group uses that group (round
    // robin, keep-alive) instead of the resolver. The `zone` shares one rotation among all
    // nginx workers (`worker_processes auto`): without it each worker rotates on its own,
    // and a client whose requests all reach one worker in a multiple of N (an SSE client's
    // negotiate, handshake and first invocation, with its event stream on another worker)
    // negotiates on the same instance every time. `keepalive_timeout` stays below the
    // instances' own keep-alive (actix-web closes an idle connection after 5 s): otherwise
    // nginx reuses a connection the instance is closing, counts the error against that
    // instance and stops sending it anything for `fail_timeout` (10 s), which funnels a
    // loaded cluster's clients onto a few instances. `max_fails=0` turns that marking off
    // altogether: nginx.conf retries a draining instance's 503 on the next instance, and
    // such a retry counts as a failure, which would keep a restarted instance out for
    // 10 s — during a rolling restart, until no instance was left ("no live upstreams",
    // 502, and a stateful client whose one resume attempt gets that 502 loses its
    // session). A stopped instance costs only a refused connection on loopback, then the
    // next one is tried.
    let group = format!(
        "\n    upstream stickless {{\n        zone stickless 64k;\n{servers}        keepalive 32;\n        keepalive_timeout 4s;\n    }}\n    map $host $stickless_upstream {{\n        default stickless;\n    }}\n"
    );
    let conf = format!("{head}{BEGIN}{group}    {END}{tail}");
    if !conf.contains("listen 8080;") {
        return Err(ClusterError::Template("`listen 8080;`"));
    }
    let conf = conf.replacen(
        "listen 8080;",
        &format!("listen 127.0.0.1:{listen_port};"),
        1,
    );
    let d = dir.display();
    let locations = format!(
        "http {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
    );
    if !conf.contains("http {\n") {
        return Err(ClusterError::Template("`http {` block"));
    }
    Ok(conf.replacen("http {\n", &locations, 1))
}

impl Cluster {
    /// Starts Redis, the instances and nginx, and waits until all are ready.
    pub fn start(options: ClusterOptions) -> Result<Self, ClusterError> {
        let dir = std::env::temp_dir().join(format!(
            "stickless-cluster-{}-{}",
            std::process::id(),
            free_port()?
        ));
        fs::create_dir_all(&dir)?;
        let secret = format!("{:032x}", rand::random::<u128>());
        let lb_port = free_port()?;
        let redis_port = free_port()?;
        let mut cluster = Self {
            url: format!("http://127.0.0.1:{lb_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}"),
            instances: Vec::new(),
            dir,
            options,
            secret,
            lb_port,
            redis_port,
            redis: None,
            nginx: None,
        };
        cluster.start_redis()?;
        for index in 0..cluster.options.instances {
            let port = free_port()?;
            cluster.instances.push(Instance {
                id: format!("node-{}", index + 1),
                url: format!("http://127.0.0.1:{port}"),
                port,
                child: None,
            });
            cluster.start_instance(index)?;
        }
        cluster.start_nginx()?;
        Ok(cluster)
    }

    /// Starts (or restarts) `redis-server` on the cluster's Redis port.
    pub fn start_redis(&mut self) -> Result<(), ClusterError> {
        let (log, path) = log_file(&self.dir, "redis.log")?;
        let mut command = Command::new("redis-server");
        controlled_environment(&mut command)
            .args([
                "--port",
                &self.redis_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.redis = Some(spawn(&mut command, "redis-server")?);
        let address = SocketAddr::from(([127, 0, 0, 1], self.redis_port));
        wait_for_child("redis-server", &path, &mut self.redis, || {
            let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200))
            else {
                return false;
            };
            let mut reply = [0u8; 7];
            stream.write_all(b"PING\r\n").is_ok()
                && stream.read_exact(&mut reply).is_ok()
                && &reply == b"+PONG\r\n"
        })
    }

    /// The cluster secret, for starting one more instance that joins this cluster.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Stops Redis (the instances keep running, degraded).
    pub fn stop_redis(&mut self) {
        kill(&mut self.redis);
    }

    /// Starts (or restarts) instance `index`.
    pub fn start_instance(&mut self, index: usize) -> Result<(), ClusterError> {
        let instance = &self.instances[index];
        let (log, path) = log_file(&self.dir, &format!("{}.log", instance.id))?;
        let mut command = Command::new(&self.options.bin);
        // Every setting is given here: nothing leaks in from the shell that started the
        // cluster (an exported POLL_TIMEOUT or REDIS_URL would change what runs).
        controlled_environment(&mut command)
            .env("LISTEN_ADDR", format!("127.0.0.1:{}", instance.port))
            .env("INSTANCE_ID", &instance.id)
            .env("STATIC_DIR", &self.options.static_dir)
            .env("REDIS_URL", &self.redis_url)
            .env("LOAD_BALANCER_URL", &self.url)
            .env("CLUSTER_SECRET", &self.secret)
            .env("RUST_LOG", &self.options.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.options.direct_routing {
            command.env("ADVERTISE_URL", &instance.url);
        }
        for (key, value) in &self.options.env {
            command.env(key, value);
        }
        let child = spawn(&mut command, &self.options.bin.display().to_string())?;
        self.instances[index].child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.instances[index].port));
        let instance = &mut self.instances[index];
        // The answer must name this instance: on a port taken by another process, a
        // `/healthz` answer from someone else's instance must not count as ready.
        let named = format!("\"instance\":\"{}\"", instance.id);
        wait_for_child(&instance.id, &path, &mut instance.child, || {
            http_get(address, "/healthz", Duration::from_millis(500))
                .is_ok_and(|(status, body)| status == 200 && body.contains(&named))
        })
    }

    /// Stops instance `index` with SIGTERM.
    pub fn stop_instance(&mut self, index: usize) {
        kill(&mut self.instances[index].child);
    }

    fn start_nginx(&mut self) -> Result<(), ClusterError> {
        let template = fs::read_to_string(&self.options.nginx_conf)?;
        let ports: Vec<u16> = self.instances.iter().map(|i| i.port).collect();
        let conf = render_nginx_conf(&template, self.lb_port, &ports, &self.dir)?;
        let conf_path = self.dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let (log, path) = log_file(&self.dir, "nginx.log")?;
        let mut command = Command::new(nginx_program());
        controlled_environment(&mut command)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(self.dir.join("nginx-error.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {}/nginx.pid;", self.dir.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.nginx = Some(spawn(&mut command, "nginx")?);
        let address = SocketAddr::from(([127, 0, 0, 1], self.lb_port));
        wait_for_child("nginx", &path, &mut self.nginx, || {
            http_get(address, "/healthz", Duration::from_millis(500))
                .is_ok_and(|(status, _)| status == 200)
        })
    }

    /// Stops everything.
    pub fn stop(&mut self) {
        kill(&mut self.nginx);
        for instance in &mut self.instances {
            kill(&mut instance.child);
        }
        kill(&mut self.redis);
    }
}

/// `nginx`, also where Debian puts it when `/usr/sbin` is not on the PATH.
fn nginx_program() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("nginx").is_file()))
        .unwrap_or(false);
    if !on_path && Path::new("/usr/sbin/nginx").is_file() {
        PathBuf::from("/usr/sbin/nginx")
    } else {
        PathBuf::from("nginx")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_nginx_conf_renders_for_loopback() {
        let template =
            fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf")).unwrap();
        let conf = render_nginx_conf(&template, 9000, &[9001, 9002], Path::new("/tmp/x")).unwrap();
        assert!(conf.contains("listen 127.0.0.1:9000;"));
        assert!(conf.contains(
            "upstream stickless {\n        zone stickless 64k;\n        server 127.0.0.1:9001 max_fails=0;\n        server 127.0.0.1:9002 max_fails=0;\n        keepalive 32;\n        keepalive_timeout 4s;\n    }"
        ));
        assert!(conf.contains("default stickless;"));
        // Docker's DNS is not there outside a container.
        assert!(!conf.contains("resolver"));
        assert!(!conf.contains("default app:8080;"));
        assert!(conf.contains("proxy_pass http://$stickless_upstream;"));
        assert!(conf.contains("client_body_temp_path /tmp/x/body;"));
        let directives: String = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(!directives.contains("ip_hash") && !directives.contains("sticky"));
    }
}
