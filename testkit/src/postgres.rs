//! A real PostgreSQL server (Debian's package) for tests and benchmarks: a fresh cluster made
//! by `initdb` in a temp directory, its postmaster a child process listening on a free
//! loopback port (no Unix socket), with password authentication (SCRAM) for the one user.
//!
//! The postmaster is started directly rather than through `pg_ctl`, so the test holds its
//! process: [`Postgres::kill`] is a real `kill -9` of the server, [`Postgres::restart`]
//! brings the same cluster back on the same port (crash recovery included), and dropping
//! the value stops it (immediate shutdown) and removes the directory.
//!
//! PostgreSQL refuses to run as root. When the test runs as root (CI containers do), the
//! cluster belongs to the package's `postgres` account (else `nobody`) and the server
//! runs as that user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user the cluster is made for.
pub const PG_USER: &str = "fleetbus";
/// Its password.
pub const PG_PASSWORD: &str = "fleetbus-test-password";
/// The database the tests use (the cluster's default one).
pub const PG_DATABASE: &str = "postgres";

/// The directory holding `initdb`, `postgres`, `pg_isready` and `psql`: from `PATH` when
/// `initdb` is there, else the newest `/usr/lib/postgresql/N/bin` (Debian's place).
pub fn bin_dir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| d.join("initdb").is_file()) {
        // Debian links only some programs onto PATH: prefer the real directory
        let real = std::fs::canonicalize(dir.join("initdb")).ok();
        return Some(
            real.and_then(|r| r.parent().map(Path::to_path_buf))
                .unwrap_or(dir),
        );
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            Some((n, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A running PostgreSQL cluster in its own temp directory, stopped and removed on drop.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The loopback port it listens on.
    pub port: u16,
    run_as: Option<(u32, u32)>,
    /// `-c name=value` settings beyond the defaults.
    settings: Vec<String>,
    child: Option<Child>,
}

impl Postgres {
    /// Makes a cluster and starts it. None (after [`crate::skip_or_fail`]) when
    /// PostgreSQL is not installed; an error (with the server's own log) when it does not
    /// come up within 60 s.
    pub fn start() -> std::io::Result<Option<Postgres>> {
        let Some(bin) = bin_dir() else {
            crate::skip_or_fail("postgresql");
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("fleetbus-pg").tempdir()?;
        let run_as = run_as()?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into()))
                .map_err(std::io::Error::from)?;
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_PASSWORD)?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(&pwfile, Some(uid.into()), Some(gid.into()))
                .map_err(std::io::Error::from)?;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", PG_USER, "--auth=scram-sha-256", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C"])
            .stdin(Stdio::null());
        as_user(&mut initdb, run_as);
        let out = initdb.output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let port = fleetbus_support::free_port()?;
        let mut pg = Postgres {
            bin,
            dir,
            port,
            run_as,
            settings: Vec::new(),
            child: None,
        };
        pg.restart()?;
        Ok(Some(pg))
    }

    /// A connection string for [`PG_USER`] (the password is given apart).
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{PG_DATABASE}", self.port)
    }

    /// The same with the password in it, for tools such as `psql`.
    pub fn url_with_password(&self) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{}/{PG_DATABASE}",
            self.port
        )
    }

    /// A plain client session (no TLS) for the test's own queries; its connection runs
    /// on a task of its own.
    pub async fn client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url_with_password(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The directory of the server's programs (`psql` among them).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// What the server has logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Turns TLS on with this certificate and key (PEM) and restarts: clients may then
    /// ask for TLS (`sslmode=require`); plain connections are still taken.
    pub fn enable_tls(&mut self, cert: &Path, key: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.path().join("data");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to)?;
            // the server refuses a key others may read
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = self.run_as {
                nix::unistd::chown(&to, Some(uid.into()), Some(gid.into()))
                    .map_err(std::io::Error::from)?;
            }
        }
        self.settings.push("ssl=on".into());
        self.restart()
    }

    /// `kill -9` of the postmaster, waited for. Its backends notice and exit on their own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server cleanly (fast shutdown: sessions end, everything committed stays).
    pub fn stop(&mut self) {
        self.shut_down(nix::sys::signal::Signal::SIGINT, Duration::from_secs(30));
    }

    /// Sends the postmaster `how` and waits up to `patience` for it to exit; then kills it.
    fn shut_down(&mut self, how: nix::sys::signal::Signal, patience: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), how);
            let deadline = Instant::now() + patience;
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

    /// Starts the server (again) on the same cluster and port, and waits until it takes
    /// connections. After a [`Postgres::kill`] it first waits for the old backends to be
    /// gone, then runs crash recovery.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("postgres.log"))?;
            let mut cmd = Command::new(self.bin.join("postgres"));
            cmd.arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-p", &self.port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "max_connections=50"])
                .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            as_user(&mut cmd, self.run_as);
            let mut child = cmd.spawn()?;
            // up when pg_isready says so; a postmaster that exits (old backends still
            // hold the shared memory after a kill -9) is started again
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if self.ready() {
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other(format!(
                        "postgres not ready on 127.0.0.1:{} after 60 s; its log:\n{}",
                        self.port,
                        self.log_text()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "postgres keeps exiting at start; its log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", PG_USER, "-d", PG_DATABASE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // immediate shutdown: nothing of a test's cluster needs keeping
        self.shut_down(nix::sys::signal::Signal::SIGQUIT, Duration::from_secs(10));
    }
}

/// The user and group to run PostgreSQL as: None unless we are root.
fn run_as() -> std::io::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
            return Ok(Some((user.uid.as_raw(), user.gid.as_raw())));
        }
    }
    Err(std::io::Error::other(
        "running as root, and neither a `postgres` nor a `nobody` account exists to run PostgreSQL as",
    ))
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        // std drops root's supplementary groups when it changes the user
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
}
