//! `fleetbus bench upload`: one large file from an agent through the embedded broker into
//! the file sink and into the S3 sink (an in-process s3s-fs server), beside a raw loopback
//! TCP copy of the same number of bytes (the ceiling), all in one run.
//!
//! The server runs as a child process (`fleetbus serve`), so its peak memory (VmHWM) is
//! its own; the agent runs in this process (with the S3 server, for the S3 target).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetbus_agent::{AfterUpload, Agent, AgentConfig, UploadOutcome, UploadQueue};
use fleetbus_config::Valid;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Where the file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The file sink (a copy under the server's data directory).
    File,
    /// The S3 sink, into an in-process s3s-fs server.
    S3,
}

/// One measured row.
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Bytes moved.
    pub bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// Peak resident memory of the server process, KiB (when it is one).
    pub server_peak_kib: Option<u64>,
}

/// Runs the benchmark: `size` bytes, for each of `targets`.
pub async fn run(size: u64, targets: &[Target], window: Option<usize>) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let file = dir.path().join("payload.bin");
    write_random(&file, size)?;
    let mut rows = vec![tcp_copy(size).await?];
    for (n, target) in targets.iter().enumerate() {
        rows.push(upload(dir.path(), &file, size, *target, n, window).await?);
    }
    Ok(rows)
}

fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        rand::rng().fill_bytes(&mut buf);
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// The same bytes over one loopback TCP connection, 128 KiB writes.
async fn tcp_copy(size: u64) -> anyhow::Result<Row> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 128 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(total);
            }
            total += n as u64;
        }
    });
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let buf = vec![7u8; 128 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let got = reader.await??;
    anyhow::ensure!(got == size, "raw copy moved {got} of {size} bytes");
    Ok(Row {
        what: "raw loopback TCP copy".into(),
        bytes: size,
        elapsed: started.elapsed(),
        server_peak_kib: None,
    })
}

async fn upload(
    dir: &Path,
    file: &Path,
    size: u64,
    target: Target,
    n: usize,
    window: Option<usize>,
) -> anyhow::Result<Row> {
    let work = dir.join(format!("run-{n}"));
    std::fs::create_dir_all(&work)?;
    let s3 = match target {
        Target::S3 => Some(fleetbus_testkit::S3Server::start(&work.join("s3"), &["bench"]).await?),
        Target::File => None,
    };
    let sink = match &s3 {
        Some(s3) => format!(
            "type = \"s3\"\nbucket = \"bench\"\nendpoint = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nkey = \"{{file.name}}\"\n",
            s3.endpoint(),
            fleetbus_testkit::S3_ACCESS_KEY,
            fleetbus_testkit::S3_SECRET_KEY
        ),
        None => "type = \"file\"\npath = \"received/{file.name}\"\n".into(),
    };
    std::fs::write(
        work.join("rules.toml"),
        format!("[sinks.out]\n{sink}\n[[rules]]\nname = \"files\"\nfrom = [\"fleet/+/files/+/complete\"]\nto = [\"out\"]\n"),
    )?;
    let port = fleetbus_broker::free_port()?;
    let metrics = fleetbus_broker::free_port()?;
    let admin = fleetbus_broker::free_port()?;
    std::fs::write(
        work.join("server.toml"),
        format!("data_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n[rules]\nfile = \"rules.toml\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
    )?;
    let (mut server, server_pid) = start_server(&work.join("server.toml"))?;
    wait_for_port(port).await?;

    let mut config = AgentConfig {
        server: format!("mqtt://127.0.0.1:{port}").parse()?,
        state_dir: work.join("agent"),
        id: Some("bench-agent".into()),
        ..AgentConfig::default()
    };
    config.metrics.enabled = false;
    if let Some(w) = window {
        config.uploads.window = w;
    }
    let agent = Agent::open(Valid::new(config)?)?;
    let uploads = agent.uploads().clone();
    let job = {
        let file = file.to_path_buf();
        let chunk = uploads.chunk_size();
        tokio::task::spawn_blocking(move || {
            UploadQueue::prepare(&file, chunk, Default::default(), AfterUpload::Keep)
        })
        .await??
    };
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(agent.run(stopped));
    let started = Instant::now();
    uploads.submit(&job)?;
    let outcome = uploads.wait(&job.manifest.file_id).await;
    if let UploadOutcome::Failed { reason, .. } = outcome {
        anyhow::bail!("upload failed: {reason}");
    }
    // delivered: the sink reports it written
    let delivered = wait_written(metrics).await;
    let elapsed = started.elapsed();
    delivered?;
    let server_peak_kib = peak_kib(server_pid);
    let _ = stop.send(true);
    let _ = running.await;
    let _ = server.kill().await;
    let check = match &s3 {
        Some(s3) => s3.object_path("bench", "payload.bin"),
        None => work.join("data/received/payload.bin"),
    };
    let written = std::fs::metadata(&check)
        .with_context(|| format!("{}", check.display()))?
        .len();
    anyhow::ensure!(
        written == size,
        "{} has {written} of {size} bytes",
        check.display()
    );
    Ok(Row {
        what: match target {
            Target::File => "fleetbus: agent -> broker -> file sink".into(),
            Target::S3 => "fleetbus: agent -> broker -> S3 sink (s3s-fs)".into(),
        },
        bytes: size,
        elapsed,
        server_peak_kib,
    })
}

/// Starts `fleetbus serve --config CONFIG` (the product binary, installed beside this one)
/// as a child process (killed when dropped, logging warnings only); answers it and its pid.
pub fn start_server(config: &Path) -> anyhow::Result<(tokio::process::Child, u32)> {
    let me = std::env::current_exe()?;
    let product = me.with_file_name("fleetbus");
    let server = tokio::process::Command::new(&product)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,rumqttd=off")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the server {}", product.display()))?;
    let pid = server.id().unwrap_or(0);
    Ok((server, pid))
}

/// Waits until something accepts connections on 127.0.0.1:`port` (30 s at most).
pub async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "server did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until the server's metrics say sink `out` wrote one message.
async fn wait_written(metrics_port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut body = String::new();
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port)).await {
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let _ = s.read_to_string(&mut body).await;
        }
        if body.contains("fleetbus_sink_written_total{sink=\"out\"} 1\n") {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "file not written within 10 min");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Peak resident set (VmHWM) of process `pid` in KiB; `None` off Linux.
pub fn peak_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Current resident set (VmRSS) of process `pid` in KiB; `None` off Linux.
pub fn resident_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `... kB` line of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
