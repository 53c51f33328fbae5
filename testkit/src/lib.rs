//! In-process servers for tests and benchmarks, listening on 127.0.0.1 only and stopped
//! when dropped:
//! - [`S3Server`]: a real S3-protocol server (s3s-fs: files on disk, SigV4 checked);
//! - [`CutProxy`]: a TCP proxy whose connections can be cut on demand;
//! - [`ConnectProxy`]: an HTTP CONNECT proxy;
//! - [`tls::TestCa`]: a throw-away CA issuing server and client certificates;
//! - [`postgres::Postgres`]: a real PostgreSQL server (a child process, not in-process);
//! - [`influxdb::Influxd`]: a real InfluxDB 1.x server (a child process too);
//! - [`cloud::serve`]: the metadata services of AWS, GCP and Azure, as an agent meets them.

pub mod cloud;
pub mod influxdb;
pub mod postgres;
pub mod tls;

/// A test's server program is missing: fails under `FLEETBUS_TEST_REQUIRE=1` (CI installs
/// it), else says `skipped: WHAT not installed` (the caller then returns).
pub fn skip_or_fail(what: &str) {
    if std::env::var("FLEETBUS_TEST_REQUIRE").is_ok_and(|v| v == "1") {
        panic!("{what} not installed (FLEETBUS_TEST_REQUIRE=1)");
    }
    eprintln!("skipped: {what} not installed");
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Access key of [`S3Server`].
pub const S3_ACCESS_KEY: &str = "fleetbus-test";
/// Secret key of [`S3Server`].
pub const S3_SECRET_KEY: &str = "fleetbus-test-secret";

/// A running S3-protocol server storing buckets as directories under `root`.
pub struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Starts the server with the given buckets (created as directories).
    pub async fn start(root: &Path, buckets: &[&str]) -> std::io::Result<S3Server> {
        for b in buckets {
            std::fs::create_dir_all(root.join(b))?;
        }
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
            b.build()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(S3Server {
            addr,
            root: root.to_path_buf(),
            task,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where object `key` of `bucket` is stored on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy to `target` that forwards until [`CutProxy::cut`] drops every connection
/// it carries (new connections are accepted again afterwards).
pub struct CutProxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    forwarded: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Starts the proxy on 127.0.0.1.
    pub async fn start(target: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let forwarded = Arc::new(AtomicU64::new(0));
        let (cut_tx, counter) = (cut.clone(), forwarded.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut_rx = cut_tx.subscribe();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {
                            if let Ok((up, _)) = r {
                                counter.fetch_add(up, Ordering::Relaxed);
                            }
                        }
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(CutProxy {
            addr,
            cut,
            forwarded,
            task,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection open right now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Bytes forwarded client → server on connections that ended normally.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP CONNECT proxy (what agents behind a corporate proxy go through): it answers
/// `CONNECT host:port` by opening that connection and relaying bytes both ways.
pub struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    /// Starts the proxy on 127.0.0.1; it tunnels only to loopback addresses.
    pub async fn start() -> std::io::Result<ConnectProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tunnels = Arc::new(AtomicU64::new(0));
        let counter = tunnels.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let _ = tunnel(inbound, &counter).await;
                });
            }
        });
        Ok(ConnectProxy {
            addr,
            tunnels,
            task,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tunnel(mut inbound: TcpStream, tunnels: &AtomicU64) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // the request head, up to the blank line
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if inbound.read(&mut byte).await? == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("CONNECT "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| {
            t.parse::<SocketAddr>().ok().or_else(|| {
                let (host, port) = t.rsplit_once(':')?;
                let port: u16 = port.parse().ok()?;
                (host == "localhost").then_some(SocketAddr::from(([127, 0, 0, 1], port)))
            })
        });
    let Some(target) = target.filter(|t| t.ip().is_loopback()) else {
        inbound.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await?;
        return Ok(());
    };
    let mut outbound = TcpStream::connect(target).await?;
    inbound
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tunnels.fetch_add(1, Ordering::Relaxed);
    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
    Ok(())
}
