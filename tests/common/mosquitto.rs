//! A Mosquitto (Debian package) started by a test in its own directory on a free loopback
//! port, killed on drop. When it does not come up, the failure shows Mosquitto's own log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `name` on PATH or in /usr/sbin (where Debian puts the broker).
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A running Mosquitto, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl Mosquitto {
    /// Starts `mosquitto` in `dir` listening on a free loopback port, with `extra` lines
    /// appended to its configuration. None (after [`super::skip_or_fail`]) when Mosquitto
    /// is not installed. Panics with Mosquitto's log when it is not listening within 10 s.
    pub fn start(dir: &Path, extra: &str) -> Option<Mosquitto> {
        let Some(binary) = find("mosquitto") else {
            super::skip_or_fail("mosquitto");
            return None;
        };
        let port = super::free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\npersistence false\n{extra}\n"),
        )
        .unwrap();
        let child = Command::new(binary)
            .args(["-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut broker = Mosquitto { child, port, log };
        let up = super::poll_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            let status = broker.child.try_wait().ok().flatten();
            panic!(
                "mosquitto not listening on 127.0.0.1:{port} after 10 s (exit: {status:?}); its log:\n{}",
                broker.log_text()
            );
        }
        Some(broker)
    }

    /// Its process id (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What Mosquitto has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
