//! `fleetbus rules check` and `fleetbus rules run`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use fleetbus_mqtt::BrokerUrl;
use fleetbus_pipeline::{run_standalone, AckChannel, Engine, EngineOptions, StandaloneOptions};
use fleetbus_rules::RuleSet;

/// `fleetbus rules ...`
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate a rules file: every problem is printed as file:line:col; exit 1 if any.
    Check {
        /// The rules file.
        file: PathBuf,
    },
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
                println!(
                    "{}: ok ({} rules, {} sinks)",
                    file.display(),
                    set.rules.len(),
                    set.own_sinks().count()
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
            let engine = Engine::start(set, &data_dir, options, acks.publisher()).await?;
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
