//! `fleetbus rules check`, `test`, `tap` and `run`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use fleetbus_mqtt::BrokerUrl;
use fleetbus_pipeline::{run_standalone, AckChannel, Engine, EngineOptions, StandaloneOptions};
use fleetbus_rules::{rule_tests, RuleSet};

/// `fleetbus rules ...`
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate a rules file: every problem is printed as file:line:col, and its
    /// `[[tests]]` are run; exit 1 if any problem or failure.
    Check {
        /// The rules file.
        file: PathBuf,
    },
    /// Run the `[[tests]]` of a rules file and of any test files through its rules; exit
    /// 1 with the differences of each failing test.
    Test {
        /// The rules file.
        file: PathBuf,
        /// Files of `[[tests]]` alone, run against the rules file.
        tests: Vec<PathBuf>,
    },
    /// Watch live what the server's rules do with the messages on some topics (through
    /// the admin endpoint, with an operator token).
    Tap(super::tap::TapArgs),
    /// Run the rules engine on its own against any MQTT broker.
    Run {
        /// The broker to subscribe to.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: BrokerUrl,
        /// The rules file.
        #[arg(long)]
        rules: PathBuf,
        /// Where file sinks write.
        #[arg(long, default_value = "fleetbus-data")]
        data_dir: PathBuf,
        /// MQTT client id.
        #[arg(long, default_value = "fleetbus-rules")]
        client_id: String,
        /// Share the load with other engines of this group ($share/GROUP/... subscriptions).
        #[arg(long)]
        group: Option<String>,
        /// The name its acknowledgements carry: agents remove a record only on an
        /// acknowledgement from the store they deliver to (`connection.store`). Default:
        /// the group, else the client id (never `server`, the name of `fleetbus serve`'s
        /// store, unless given on purpose).
        #[arg(long)]
        store: Option<String>,
        /// A file holding this client's token (`fleetbus agents enroll ID --role server`),
        /// for a broker that authenticates clients.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// CA certificates (PEM) to verify an mqtts:// or wss:// broker with (default: the
        /// system's roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

/// Runs a `rules` subcommand.
pub async fn run(command: RulesCommand) -> anyhow::Result<ExitCode> {
    match command {
        RulesCommand::Check { file } => match RuleSet::load(&file) {
            Ok(set) => {
                let (rules, sinks) = (set.rules.len(), set.own_sinks().count());
                let (passed, failed) = run_tests(set, Vec::new(), false);
                if failed > 0 {
                    eprintln!(
                        "{}: {failed} of {} tests failed",
                        file.display(),
                        passed + failed
                    );
                    return Ok(ExitCode::FAILURE);
                }
                println!(
                    "{}: ok ({rules} rules, {sinks} sinks, {passed} tests passed)",
                    file.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for p in &e.problems {
                    eprintln!("{p}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        RulesCommand::Tap(args) => {
            super::tap::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        RulesCommand::Test { file, tests } => {
            let set = match RuleSet::load(&file) {
                Ok(set) => set,
                Err(e) => {
                    for p in &e.problems {
                        eprintln!("{p}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            let names: Vec<String> = set.sinks.iter().map(|(n, _)| n.clone()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut more = Vec::new();
            let mut bad = false;
            for path in &tests {
                match rule_tests::load(path, &names) {
                    Ok(t) => more.extend(t),
                    Err(e) => {
                        bad = true;
                        for p in &e.problems {
                            eprintln!("{p}");
                        }
                    }
                }
            }
            if bad {
                return Ok(ExitCode::FAILURE);
            }
            let (passed, failed) = run_tests(set, more, true);
            println!("{passed} passed, {failed} failed");
            Ok(match failed {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            })
        }
        RulesCommand::Run {
            broker,
            rules,
            data_dir,
            client_id,
            group,
            store,
            token_file,
            ca_file,
        } => {
            let store = store
                .or_else(|| group.clone())
                .unwrap_or_else(|| client_id.clone());
            fleetbus_protocol::validate_id("--store", &store)?;
            let files = fleetbus_mqtt::TlsFiles {
                ca_file,
                ..Default::default()
            };
            let transport = fleetbus_mqtt::ClientTransport::for_url(&broker, &files, None)?;
            let token = match &token_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("--token-file {}", path.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let set = RuleSet::load(&rules)?;
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("--data-dir {}", data_dir.display()))?;
            let _data_lock = fleetbus_support::lock_dir(&data_dir, fleetbus_server::DATA_DIR_LOCK)?;
            let acks = AckChannel::default();
            let options = EngineOptions {
                store,
                ..EngineOptions::default()
            };
            let engine = std::sync::Arc::new(
                Engine::start(set, &data_dir, options, acks.publisher()).await?,
            );
            // SIGHUP: the rules file read, checked and tested again, then put in effect
            let reloading = engine.clone();
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot listen for SIGHUP")?;
            let file = rules.clone();
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    let outcome = match rule_tests::load_tested(&file) {
                        Ok(set) => reloading.reload(set).await,
                        Err(e) => {
                            reloading.reload_refused(&e);
                            Err(e)
                        }
                    };
                    match outcome {
                        Ok(r) => tracing::info!(generation = r.generation, "rules file reloaded"),
                        Err(e) => {
                            tracing::error!(error = %e, "rules file not reloaded: the rules in effect stay")
                        }
                    }
                }
            });
            let options = StandaloneOptions {
                broker: transport,
                client_id,
                token,
                group,
            };
            run_standalone(&engine, &acks, &options, super::shutdown_signal()).await;
            engine.shutdown(std::time::Duration::from_secs(10)).await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the tests of `set` and `more` through its rules, printing each failure with its
/// differences (and each pass when `verbose`): (passed, failed).
fn run_tests(set: RuleSet, more: Vec<rule_tests::RuleTest>, verbose: bool) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for (name, place, outcome) in rule_tests::run_set(set, &more) {
        match outcome {
            Ok(()) => {
                passed += 1;
                if verbose {
                    println!("ok    {name}");
                }
            }
            Err(diff) => {
                failed += 1;
                eprintln!("FAIL  {name} ({place})");
                for line in diff.lines() {
                    eprintln!("      {line}");
                }
            }
        }
    }
    (passed, failed)
}
