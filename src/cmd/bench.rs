//! `fleetbus bench ingest`: publishes at a target rate (or as fast as acknowledgements
//! allow) and measures the rate at which messages come out the other end.
//!
//! - For a plain MQTT broker (`--broker URL`, or `--mosquitto` to start one): N publishers
//!   and one subscriber run here; "out" is messages received by the subscriber.
//! - For fleetbus (unless `--no-fleetbus`): an embedded server with the built-in archive
//!   rule and N simulated agents built on the agent library (disk outbox included); "out"
//!   is records written by the file sink.
//!
//! All targets run side by side in one invocation, so the figures are comparable.

mod checks;
mod console;
#[cfg(feature = "bench-sqlx")]
mod drivers;
mod fleetbus;
mod jobs;
mod relay;
mod sink;
mod upload;
mod wal;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetbus_mqtt::BrokerUrl;

/// `fleetbus bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput: fleetbus end to end vs plain broker relay.
    Ingest(IngestArgs),
    /// One large file from an agent into the file sink and the S3 sink (s3s-fs), beside a
    /// raw loopback TCP copy of the same bytes.
    Upload {
        /// File size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Targets (repeatable; default: file and s3).
        #[arg(long, value_enum)]
        target: Vec<upload::Target>,
        /// The agent's upload window (chunks sent and not yet answered); default: the
        /// agent's default.
        #[arg(long)]
        window: Option<usize>,
    },
    /// Thousands of simulated agents in one group, one job: time from the push until the
    /// ledger shows every target SUCCEEDED, and the server's memory per connected agent.
    Jobs(jobs::JobsBenchArgs),
    /// Records per second from the write-ahead log into one destination, beside the
    /// destination's own ceiling (psql COPY, a plain HTTP client, plain rusqlite).
    Sink {
        /// The destination.
        #[arg(long, value_enum)]
        sink: sink::SinkKind,
        /// Records to write.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Bytes per record (as JSON).
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// How the records are published.
        #[arg(long, value_enum, default_value_t = sink::Encoding::Msgpack)]
        encoding: sink::Encoding,
    },
    /// The PostgreSQL sink's statements (binary COPY, unnest insert) by tokio-postgres and
    /// by sqlx, side by side (built with `--features bench-sqlx`).
    #[cfg(feature = "bench-sqlx")]
    PgDrivers {
        /// Rows to write per run.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Rows per transaction.
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
        /// Rounds (each runs all four, one after the other).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// An agent process running N checks at an interval: its own CPU time per check run
    /// (the plugins left out) and its memory.
    Checks {
        /// How many checks.
        #[arg(long, default_value_t = 50)]
        checks: usize,
        /// Each check's interval.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// How long to measure (after one interval of warm-up).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Event console folding rate with many open rows, beside plain SQLite inserts.
    Console {
        /// Open rows the console holds before the measurement.
        #[arg(long, default_value_t = 100_000)]
        open: u64,
        /// Events folded (repeats of open rows).
        #[arg(long, default_value_t = 200_000)]
        events: u64,
    },
    /// Appends per second to the log under the outbox and the WAL, by fsync group size,
    /// beside two embedded stores.
    Wal {
        /// Stores to measure (repeatable; default: all).
        #[arg(long, value_enum)]
        store: Vec<wal::Store>,
        /// Record size in bytes.
        #[arg(long, default_value_t = 250)]
        payload: usize,
        /// Time per group size.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

/// `fleetbus bench ingest` options.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Publishing clients (simulated agents for fleetbus).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Messages per second per client; 0 = as fast as acknowledgements allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Payload bytes per message (for fleetbus: the encoded record's size).
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// QoS of the plain-broker publishers and subscriber (fleetbus agents always use 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Also measure relay through this plain MQTT broker (repeatable).
    #[arg(long)]
    pub broker: Vec<BrokerUrl>,
    /// Also start `mosquitto` (must be installed) on a free loopback port and measure it.
    #[arg(long)]
    pub mosquitto: bool,
    /// Records each simulated agent keeps sent and not yet acknowledged by the server
    /// (`connection.inflight`). Acknowledgements come after the server's fsync, so one
    /// agent's rate is at most this window per acknowledgement round trip.
    #[arg(long, default_value_t = 8000)]
    pub inflight: u16,
    /// Skip the fleetbus end-to-end measurement.
    #[arg(long)]
    pub no_fleetbus: bool,
    /// Broker security for the fleetbus measurement, one run per value, side by side
    /// (repeatable): `off`, `enforce` (tokens and the topic policy), `tls` (enforce, over
    /// mqtts:// with a throw-away CA).
    #[arg(long, value_enum, default_values_t = [BenchSecurity::Off])]
    pub security: Vec<BenchSecurity>,
    /// Run fleetbus with a generated rules file of this many rules (topic filters over
    /// many agents, conditions, transforms; one of them archives every record) instead of
    /// the built-in rules; repeatable, one run each, side by side (`--rules 1 --rules
    /// 1000`), and the routing cost per message of each printed after the table. A count
    /// given more than once is run again in turn (`--rules 1 --rules 1000 --rules 1
    /// --rules 1000`: alternated, as a noisy machine needs) and compared by its median.
    #[arg(long)]
    pub rules: Vec<usize>,
}

/// How the fleetbus end-to-end bench secures its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSecurity {
    /// No authentication, no policy, plain TCP.
    Off,
    /// Agents log in with tokens; every PUBLISH/SUBSCRIBE is checked.
    Enforce,
    /// `enforce` over TLS.
    Tls,
}

/// One measured target.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// What was measured.
    pub target: String,
    /// Messages published.
    pub sent: u64,
    /// Messages that came out the other end.
    pub received: u64,
    /// From the first publish to the last message out.
    pub elapsed: Duration,
}

impl Measurement {
    /// Messages out per second.
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs a `bench` subcommand.
pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    let args = match command {
        BenchCommand::Ingest(args) => args,
        BenchCommand::Upload {
            size_mib,
            target,
            window,
        } => {
            let targets = if target.is_empty() {
                vec![upload::Target::File, upload::Target::S3]
            } else {
                target
            };
            let rows = upload::run(size_mib * 1024 * 1024, &targets, window).await?;
            println!(
                "{:<46} {:>10} {:>9} {:>9} {:>16}",
                "path", "MiB", "seconds", "MB/s", "server peak MiB"
            );
            for r in rows {
                let secs = r.elapsed.as_secs_f64();
                println!(
                    "{:<46} {:>10} {:>9.2} {:>9.0} {:>16}",
                    r.what,
                    r.bytes / (1024 * 1024),
                    secs,
                    r.bytes as f64 / secs / 1e6,
                    r.server_peak_kib
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into())
                );
            }
            if let Some(kib) = upload::peak_kib(std::process::id()) {
                println!(
                    "bench process (agent, s3s-fs) peak memory: {:.1} MiB",
                    kib as f64 / 1024.0
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Checks {
            checks: n,
            interval,
            duration,
        } => {
            let f = checks::run(n, interval, duration).await?;
            let runs = f.runs.max(1);
            println!("agent binary                  {}", f.binary);
            println!(
                "check runs                    {} in {:.1} s ({n} checks every {})",
                f.runs,
                f.elapsed.as_secs_f64(),
                humantime::format_duration(interval)
            );
            println!(
                "agent CPU (plugins left out)  {:.3} s, {:.2} % of one core",
                f.cpu.as_secs_f64(),
                100.0 * f.cpu.as_secs_f64() / f.elapsed.as_secs_f64()
            );
            println!(
                "agent CPU per check run       {:.0} µs",
                f.cpu.as_secs_f64() * 1e6 / runs as f64
            );
            let mib = |k: Option<u64>| {
                k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "agent resident memory         {} (peak {})",
                mib(f.rss_kib),
                mib(f.peak_kib)
            );
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Console { open, events } => {
            let rows = console::run(open, events)?;
            println!(
                "{:<52} {:>9} {:>8} {:>10}",
                "path", "events", "seconds", "events/s"
            );
            for r in &rows {
                println!(
                    "{:<52} {:>9} {:>8.2} {:>10.0}",
                    r.what,
                    r.events,
                    r.elapsed.as_secs_f64(),
                    r.events as f64 / r.elapsed.as_secs_f64()
                );
            }
            if let [_, folded, plain] = rows.as_slice() {
                println!(
                    "folding / plain inserts: {:.0} %",
                    100.0 * plain.elapsed.as_secs_f64() / folded.elapsed.as_secs_f64()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Sink {
            sink,
            records,
            payload,
            encoding,
        } => {
            let rows = sink::run(sink, records, payload, encoding).await?;
            println!(
                "{:<70} {:>9} {:>8} {:>11} {:>12}",
                "path", "records", "seconds", "records/s", "peak MiB"
            );
            for r in &rows {
                println!(
                    "{:<70} {:>9} {:>8.2} {:>11.0} {:>12}",
                    r.what,
                    r.records,
                    r.elapsed.as_secs_f64(),
                    r.records as f64 / r.elapsed.as_secs_f64(),
                    r.peak_kib
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into())
                );
            }
            // the rows come in pairs: fleetbus, then its ceiling
            for pair in rows.chunks(2) {
                if let [ours, ceiling] = pair {
                    println!(
                        "fleetbus / ceiling: {:.0} % ({})",
                        100.0 * ceiling.elapsed.as_secs_f64() / ours.elapsed.as_secs_f64(),
                        ours.what
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        #[cfg(feature = "bench-sqlx")]
        BenchCommand::PgDrivers {
            records,
            batch,
            rounds,
        } => {
            println!(
                "{:<32} {:>9} {:>8} {:>11}",
                "driver, statement", "rows", "seconds", "rows/s"
            );
            for f in drivers::run(records, batch, rounds).await? {
                println!(
                    "{:<32} {:>9} {:>8.2} {:>11.0}",
                    f.what,
                    f.records,
                    f.elapsed.as_secs_f64(),
                    f.records as f64 / f.elapsed.as_secs_f64()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Jobs(args) => {
            let figures = jobs::run(&args).await?;
            jobs::print(&figures);
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Wal {
            store,
            payload,
            duration,
        } => {
            let stores = if store.is_empty() {
                vec![wal::Store::Seglog, wal::Store::Redb, wal::Store::Fjall]
            } else {
                store
            };
            println!(
                "{:<8} {:>14} {:>12} {:>14} {:>10}",
                "store", "appends/fsync", "appends", "appends/s", "MB/s"
            );
            for f in wal::measure(&stores, payload, duration, &[1, 10, 100, 1000])? {
                let secs = f.elapsed.as_secs_f64();
                println!(
                    "{:<8} {:>14} {:>12} {:>14.0} {:>10.1}",
                    format!("{:?}", f.store).to_lowercase(),
                    f.group,
                    f.appends,
                    f.appends as f64 / secs,
                    f.appends as f64 * (payload + 8) as f64 / secs / 1e6
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mut results = Vec::new();
    let mut mosquitto = None;
    if args.mosquitto {
        let m = relay::Mosquitto::start().await?;
        let url = m.url();
        mosquitto = Some(m);
        results.push(relay::measure(&args, &url, "mosquitto (relay)").await?);
    }
    for url in &args.broker {
        results.push(relay::measure(&args, url, &format!("{url} (relay)")).await?);
    }
    drop(mosquitto);
    if !args.no_fleetbus {
        let rule_counts: Vec<Option<usize>> = match args.rules.is_empty() {
            true => vec![None],
            false => args.rules.iter().map(|&n| Some(n.max(1))).collect(),
        };
        for security in &args.security {
            for rules in &rule_counts {
                results.push(fleetbus::measure(&args, *security, *rules).await?);
            }
        }
    }
    println!();
    println!(
        "clients={} payload={}B rate={} duration={:?} (plain brokers at QoS {}, fleetbus agents at QoS 1 with disk outbox, window {})",
        args.clients,
        args.payload,
        if args.rate == 0 { "max".to_string() } else { format!("{}/s/client", args.rate) },
        args.duration,
        args.qos,
        args.inflight
    );
    println!(
        "{:<52} {:>10} {:>10} {:>8} {:>12}",
        "target", "sent", "out", "secs", "msg/s out"
    );
    for r in &results {
        println!(
            "{:<52} {:>10} {:>10} {:>8.2} {:>12.0}",
            r.target,
            r.sent,
            r.received,
            r.elapsed.as_secs_f64(),
            r.rate()
        );
    }
    if let (Some(fb), Some(first)) = (
        results.iter().find(|r| r.target.starts_with("fleetbus")),
        results.first(),
    ) {
        if !first.target.starts_with("fleetbus") {
            println!(
                "fleetbus end to end / {}: {:.2}x",
                first.target,
                fb.rate() / first.rate()
            );
        }
    }
    if !args.rules.is_empty() {
        rules_summary(&results, &args.rules, args.payload)?;
    }
    let lost = results
        .iter()
        .any(|r| r.received < r.sent && (r.target.starts_with("fleetbus") || args.qos == 1));
    if lost {
        println!("WARNING: some messages did not come out within the drain time");
    }
    Ok(ExitCode::SUCCESS)
}

/// After `--rules` runs: each rule count's median rate (of its runs, alternated with the
/// others'), as a share of the single-rule median, and the routing cost per message.
fn rules_summary(results: &[Measurement], counts: &[usize], payload: usize) -> anyhow::Result<()> {
    let mut distinct: Vec<usize> = counts.iter().map(|&n| n.max(1)).collect();
    distinct.sort_unstable();
    distinct.dedup();
    // each count's runs: their median rate, and how many
    let median_of = |n: usize| -> Option<(f64, usize)> {
        let mut rates: Vec<f64> = results
            .iter()
            .filter(|r| r.target.contains(&format!(" {n} rules,")))
            .map(Measurement::rate)
            .collect();
        rates.sort_by(f64::total_cmp);
        let k = rates.len();
        let median = match k {
            0 => return None,
            k if k % 2 == 1 => rates[k / 2],
            k => (rates[k / 2 - 1] + rates[k / 2]) / 2.0,
        };
        Some((median, k))
    };
    let single = median_of(1).map(|(median, _)| median);
    for &n in &distinct {
        if let Some((median, runs)) = median_of(n) {
            print!("{n} rules: median {median:.0} msg/s of {runs} run(s)");
            match single {
                Some(single) if n != 1 => {
                    println!(
                        ", {:.0} % of the single-rule median",
                        100.0 * median / single
                    )
                }
                _ => println!(),
            }
        }
    }
    for &n in &distinct {
        let cost = fleetbus::routing_cost(n, payload)?;
        println!(
            "routing one message through {n} rules (route and settle, one thread): {:.0} ns",
            cost.as_nanos()
        );
    }
    Ok(())
}
