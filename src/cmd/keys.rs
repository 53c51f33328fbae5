//! `fleetbus keys generate`: the Ed25519 key pair that signs jobs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use rand::RngCore;

/// `fleetbus keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Writes a new job signing key pair: DIR/job-signing.key (secret, mode 0600: the
    /// server's jobs.signing_key) and DIR/job-signing.pub (agents' jobs.public_key_file).
    Generate {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "keys")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `fleetbus keys ...`.
pub fn run(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Generate { out, force } => generate(&out, force),
    }
}

fn generate(dir: &Path, force: bool) -> anyhow::Result<ExitCode> {
    let pair = write_pair(dir, force)?;
    println!(
        "secret key: {} (server: [jobs] signing_key)",
        pair.secret.display()
    );
    println!(
        "public key: {} (agents: [jobs] public_key_file, or public_key = \"{}\")",
        pair.public.display(),
        pair.public_hex
    );
    Ok(ExitCode::SUCCESS)
}

/// Files of a job signing key pair.
pub struct KeyPairFiles {
    /// DIR/job-signing.key (hex secret, mode 0600).
    pub secret: PathBuf,
    /// DIR/job-signing.pub (hex public key).
    pub public: PathBuf,
    /// The public key in hex.
    pub public_hex: String,
}

/// Writes a new key pair into `dir` (refusing to replace existing files unless `force`).
pub fn write_pair(dir: &Path, force: bool) -> anyhow::Result<KeyPairFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret_path = dir.join("job-signing.key");
    let public_path = dir.join("job-signing.pub");
    for p in [&secret_path, &public_path] {
        if p.exists() && !force {
            anyhow::bail!("{} exists (use --force to replace it; agents trusting the old key will reject new jobs)", p.display());
        }
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public = hex::encode(key.verifying_key().to_bytes());
    write_secret(&secret_path, &hex::encode(secret))?;
    fleetbus_support::replace_file(&public_path, format!("{public}\n").as_bytes())
        .with_context(|| format!("writing {}", public_path.display()))?;
    Ok(KeyPairFiles {
        secret: secret_path,
        public: public_path,
        public_hex: public,
    })
}

/// Writes `text` to a file only its owner can read (replacing an old one durably).
pub(crate) fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let bytes = format!("{text}\n");
    fleetbus_support::durable::replace_file_with_mode(path, bytes.as_bytes(), Some(0o600))
        .with_context(|| format!("writing {}", path.display()))
}
