//! Shared helpers for end-to-end tests: real `fleetbus` processes on loopback ports.

#![allow(dead_code)]

pub mod mosquitto;
pub mod secured;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use fleetbus_pipeline::inventory::{scan, StreamSummary};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fleetbus")
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `fleetbus ARGS --data-dir DATA` (credential store commands), which must succeed; its
/// stdout.
pub fn fleetbus_with_data(data: &Path, args: &[&str]) -> String {
    run_ok(
        std::process::Command::new(bin())
            .args(args)
            .args(["--data-dir", data.to_str().unwrap()]),
    )
}

/// Enrolls an operator credential `ops` in the server data directory `data`, its token
/// written to `out` (for `--admin-token-file`).
pub fn enroll_operator(data: &Path, out: &Path) {
    fleetbus_with_data(
        data,
        &[
            "agents",
            "enroll",
            "ops",
            "--role",
            "operator",
            "--out",
            out.to_str().unwrap(),
        ],
    );
}

/// Resident memory of process `pid`, in KiB (VmRSS).
pub fn resident_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// File descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Starts `fleetbus serve --config CONFIG` with at most `nofile` file descriptors
/// (`prlimit`), logging to `log`. None when prlimit is missing (after [`skip_or_fail`]).
pub fn serve_with_nofile(config: &Path, log: &Path, nofile: u32) -> Option<Proc> {
    if Command::new("prlimit").arg("--version").output().is_err() {
        skip_or_fail("prlimit (util-linux)");
        return None;
    }
    let out = fs::File::create(log).unwrap();
    let child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .args(["--", bin(), "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Some(Proc {
        child,
        log: log.to_path_buf(),
    })
}

pub use fleetbus_testkit::skip_or_fail;

/// A child process that is SIGKILLed when dropped (so a failing test leaves nothing behind).
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `fleetbus ARGS`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("FLEETBUS_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the process to exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit after SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, cond),
        "timed out after {timeout:?} waiting for: {what}"
    );
}

/// Polls `cond` every 50 ms until it holds (true) or `timeout` passes (false).
#[allow(dead_code)]
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A free loopback port.
pub fn free_port() -> u16 {
    fleetbus_broker::free_port().unwrap()
}

/// The `[admin]` table of a test server: a free port, never the default 7070 (two test
/// runs, or a test beside a real server, must not collide).
pub fn admin_table() -> String {
    format!("[admin]\nlisten = \"127.0.0.1:{}\"\n", free_port())
}

/// Writes a server config in `dir` listening on `port`, with `rules` (TOML text) if given.
pub fn server_config(dir: &Path, port: u16, rules: Option<&str>) -> PathBuf {
    let mut text = format!(
        "data_dir = \"data\"\n{}[broker]\nlisten = \"127.0.0.1:{port}\"\n",
        admin_table()
    );
    if let Some(rules) = rules {
        fs::write(dir.join("rules.toml"), rules).unwrap();
        text.push_str("[rules]\nfile = \"rules.toml\"\n");
    }
    let path = dir.join("server.toml");
    fs::write(&path, text).unwrap();
    path
}

/// How a test agent is configured.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// Fixed id (None: generated and kept in the state dir).
    pub id: Option<String>,
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Stop after this many heartbeats (0 = never).
    pub limit: u64,
    /// Collect system metrics every second.
    pub metrics: bool,
    /// Outbox bound.
    pub outbox_max_bytes: Option<u64>,
    /// Connect to this port instead of the server's (e.g. a proxy).
    pub port: Option<u16>,
    /// Re-send unacknowledged records after this long.
    pub ack_timeout_ms: u64,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            id: None,
            heartbeat_ms: 50,
            limit: 0,
            metrics: true,
            outbox_max_bytes: None,
            port: None,
            ack_timeout_ms: 2000,
        }
    }
}

/// An agent with a fixed id sending only heartbeats, every `interval_ms`, `limit` of them.
pub fn heartbeat_agent(id: &str, interval_ms: u64, limit: u64) -> AgentOpts {
    AgentOpts {
        id: Some(id.to_string()),
        heartbeat_ms: interval_ms,
        limit,
        metrics: false,
        ..AgentOpts::default()
    }
}

/// Writes an agent config `NAME.toml` in `dir` for a server on `port`.
pub fn agent_config_opts(dir: &Path, name: &str, port: u16, o: &AgentOpts) -> PathBuf {
    let id_line =
        o.id.as_ref()
            .map(|i| format!("id = \"{i}\"\n"))
            .unwrap_or_default();
    let port = o.port.unwrap_or(port);
    let mut text = format!(
        "server = \"mqtt://127.0.0.1:{port}\"\nstate_dir = \"state-{name}\"\n{id_line}groups = [\"{name}-group\"]\n\
         [metrics]\nenabled = {}\ninterval = \"1s\"\n[heartbeat]\nenabled = true\ninterval = \"{}ms\"\nlimit = {}\n\
         [connection]\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\nack_timeout = \"{}ms\"\n",
        o.metrics, o.heartbeat_ms, o.limit, o.ack_timeout_ms
    );
    if let Some(max) = o.outbox_max_bytes {
        text.push_str(&format!("[outbox]\nmax_bytes = {max}\n"));
    }
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).unwrap();
    path
}

/// Writes an agent config `NAME.toml` in `dir`: heartbeat every `heartbeat_ms`, quick
/// reconnects, metrics every second. `id` None means "generate one".
pub fn agent_config(
    dir: &Path,
    name: &str,
    port: u16,
    id: Option<&str>,
    heartbeat_ms: u64,
) -> PathBuf {
    let opts = AgentOpts {
        id: id.map(str::to_string),
        heartbeat_ms,
        ..AgentOpts::default()
    };
    agent_config_opts(dir, name, port, &opts)
}

/// The delivery summary of (agent, stream) in the server's data dir, if anything arrived.
pub fn summary(data: &Path, agent: &str, stream: &str) -> Option<StreamSummary> {
    scan(data)
        .ok()?
        .streams
        .get(&(agent.to_string(), stream.to_string()))
        .cloned()
}

/// Every record line of every `.jsonl` file under `dir`, parsed.
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (path, _, _) in scan(dir).unwrap().files {
        for line in fs::read_to_string(path).unwrap().lines() {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

/// A test's temporary directory, its server port and data directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub data: PathBuf,
}

impl Fixture {
    /// A fresh directory and a free port.
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        Fixture {
            dir,
            port: free_port(),
            data,
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `fleetbus serve` on the fixture's port (with `rules` if given), logging to
    /// `LOG.log`.
    pub fn serve(&self, rules: Option<&str>, log: &str) -> Proc {
        let cfg = server_config(self.path(), self.port, rules);
        Proc::start(
            &["serve", "--config", cfg.to_str().unwrap()],
            &self.path().join(format!("{log}.log")),
        )
    }

    /// [`Fixture::serve`] with `extra` appended to the server's configuration (tables such
    /// as `[metrics]`).
    pub fn serve_with(&self, rules: Option<&str>, log: &str, extra: &str) -> Proc {
        let cfg = server_config(self.path(), self.port, rules);
        let mut text = fs::read_to_string(&cfg).unwrap();
        text.push_str(extra);
        fs::write(&cfg, text).unwrap();
        Proc::start(
            &["serve", "--config", cfg.to_str().unwrap()],
            &self.path().join(format!("{log}.log")),
        )
    }

    /// Starts `fleetbus agent` `name` (see [`agent_config`]), logging to `NAME.log`.
    pub fn agent(&self, name: &str, id: Option<&str>, heartbeat_ms: u64) -> Proc {
        let cfg = agent_config(self.path(), name, self.port, id, heartbeat_ms);
        Proc::start(
            &["agent", "--config", cfg.to_str().unwrap()],
            &self.path().join(format!("{name}.log")),
        )
    }

    /// Starts `fleetbus agent` `name` configured by `opts`, logging to `NAME.log`.
    pub fn agent_with(&self, name: &str, opts: &AgentOpts) -> Proc {
        let cfg = agent_config_opts(self.path(), name, self.port, opts);
        Proc::start(
            &["agent", "--config", cfg.to_str().unwrap()],
            &self.path().join(format!("{name}.log")),
        )
    }

    /// Waits until the server's port accepts connections.
    pub fn wait_listening(&self) {
        wait_until(Duration::from_secs(10), "server listening", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }
}

/// A record's `ts`.
pub fn ts(record: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    record["ts"].as_str().unwrap().parse().unwrap()
}

/// A TCP proxy on 127.0.0.1 that forwards to `upstream` and, while chaos is on, cuts every
/// open connection at random intervals.
pub struct ChaosProxy {
    pub port: u16,
    chaos: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ChaosProxy {
    /// Starts forwarding to 127.0.0.1:`upstream`, with chaos on.
    pub fn start(upstream: u16, min_ms: u64, max_ms: u64) -> ChaosProxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let chaos = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        continue;
                    };
                    let mut guard = open.lock().unwrap();
                    guard.push(client.try_clone().unwrap());
                    guard.push(server.try_clone().unwrap());
                    drop(guard);
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                        });
                    }
                }
            });
        }
        {
            let (chaos, stop, open, cuts) =
                (chaos.clone(), stop.clone(), open.clone(), cuts.clone());
            std::thread::spawn(move || {
                use rand::Rng;
                let mut rng = rand::rng();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(rng.random_range(min_ms..=max_ms)));
                    if chaos.load(Ordering::Relaxed) {
                        for s in open.lock().unwrap().drain(..) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        cuts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        ChaosProxy {
            port,
            chaos,
            stop,
            cuts,
        }
    }

    /// Stops cutting connections (forwarding goes on).
    pub fn calm(&self) {
        self.chaos
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A `fleetbus serve` process on a configuration file in `dir` (logging to
/// `dir/server.log`), which can be killed, stopped and started again on the same config.
pub struct ServeProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    proc: Option<Proc>,
    ready: Box<dyn Fn() -> bool + Send>,
}

impl ServeProc {
    /// Writes `config_text` to `dir/server.toml` and starts the server; `ready` says when
    /// it is up (e.g. its metrics or admin endpoint answers).
    pub fn start(
        dir: &Path,
        config_text: &str,
        ready: impl Fn() -> bool + Send + 'static,
    ) -> ServeProc {
        let config = dir.join("server.toml");
        fs::write(&config, config_text).unwrap();
        let mut s = ServeProc {
            dir: dir.to_path_buf(),
            config,
            proc: None,
            ready: Box::new(ready),
        };
        s.launch();
        s
    }

    /// Starts the process (again) and waits until it is ready.
    pub fn launch(&mut self) {
        self.proc = Some(Proc::start(
            &["serve", "--config", self.config.to_str().unwrap()],
            &self.dir.join("server.log"),
        ));
        assert!(
            poll_until(Duration::from_secs(30), &self.ready),
            "server did not start:\n{}",
            self.log()
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait (a graceful stop).
    pub fn terminate(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

/// The first outcome of connecting with `options`: Ok on a CONNACK, else the error (a
/// refusal code, a TLS failure...). Panics when nothing answers within 10 s.
pub async fn first_connect_outcome(
    options: rumqttc::MqttOptions,
) -> Result<(), rumqttc::ConnectionError> {
    use rumqttc::{Event, Packet};
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 8);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no answer to CONNECT"),
        }
    }
}

/// `GET /metrics` of a server's metrics endpoint on `port`: the whole answer (empty when
/// it does not answer).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ =
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = conn.read_to_string(&mut body);
    body
}

/// The value of the metric line that starts with `name` (labels included, e.g.
/// `fleetbus_sink_written_total{sink="pg"}`) in a scrape; 0 when absent.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends SIGHUP to process `pid` (a server reloads its rules, policy and certificate).
pub fn sighup(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// The `[admin] listen` address of the server configured in `dir/server.toml` (by
/// [`server_config`]: the first `listen` of the file).
pub fn admin_addr(dir: &Path) -> String {
    fs::read_to_string(dir.join("server.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("listen = \"")
                .map(|a| a.trim_end_matches('"').to_string())
        })
        .unwrap()
}
