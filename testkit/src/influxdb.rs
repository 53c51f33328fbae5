//! A real InfluxDB 1.x (Debian's `influxdb` package) for tests and benchmarks: `influxd`
//! with a configuration of its own in a temp directory, its HTTP API and its RPC port on
//! free loopback ports, nothing else listening, killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts `influxd`, or None when it is not installed.
pub fn influxd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("influxd"))
        .find(|p| p.is_file())
}

/// A running `influxd`, killed on drop.
pub struct Influxd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Influxd {
    /// Starts `influxd` in a temp directory. None (after [`crate::skip_or_fail`]) when
    /// InfluxDB is not installed; an error (with its log) when it does not answer
    /// `/ping` within 30 s.
    pub fn start() -> std::io::Result<Option<Influxd>> {
        let Some(binary) = influxd_binary() else {
            crate::skip_or_fail("influxdb");
            return Ok(None);
        };
        let dir = tempfile::Builder::new()
            .prefix("fleetbus-influx")
            .tempdir()?;
        let d = dir.path().display();
        let port = fleetbus_support::free_port()?;
        let rpc = fleetbus_support::free_port()?;
        let config = dir.path().join("influxdb.conf");
        std::fs::write(
            &config,
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
                 [meta]\ndir = \"{d}/meta\"\n\
                 [data]\ndir = \"{d}/data\"\nwal-dir = \"{d}/wal\"\nquery-log-enabled = false\n\
                 [http]\nbind-address = \"127.0.0.1:{port}\"\nlog-enabled = false\n\
                 [monitor]\nstore-enabled = false\n\
                 [continuous_queries]\nenabled = false\n\
                 [subscriber]\nenabled = false\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("influxd.log"))?;
        let child = Command::new(binary)
            .arg("-config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut influx = Influxd { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = influx.request("GET", "/ping", "") {
                if status == 204 {
                    return Ok(Some(influx));
                }
            }
            if Instant::now() > deadline || influx.child.try_wait()?.is_some() {
                return Err(std::io::Error::other(format!(
                    "influxd not answering on 127.0.0.1:{port} after 30 s; its log:\n{}",
                    influx.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its HTTP API: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its directory (configuration, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What `influxd` has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// Runs InfluxQL `q` (in database `db` when given) and returns the JSON answer.
    pub fn query(&self, db: Option<&str>, q: &str) -> std::io::Result<String> {
        let mut path = format!("/query?q={}", encode(q));
        if let Some(db) = db {
            path.push_str(&format!("&db={}", encode(db)));
        }
        let (status, body) = self.request("POST", &path, "")?;
        match status {
            200 => Ok(body),
            _ => Err(std::io::Error::other(format!("{q}: HTTP {status}: {body}"))),
        }
    }

    /// Writes line protocol `lines` into `db` (nanosecond timestamps).
    pub fn write(&self, db: &str, lines: &str) -> std::io::Result<()> {
        let path = format!("/write?db={}&precision=ns", encode(db));
        let (status, body) = self.request("POST", &path, lines)?;
        match status {
            204 => Ok(()),
            _ => Err(std::io::Error::other(format!(
                "write: HTTP {status}: {body}"
            ))),
        }
    }

    /// One HTTP/1.0 request (the answer is read to its end): status and body.
    fn request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            conn,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not HTTP: {answer}")))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
