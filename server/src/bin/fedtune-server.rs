//! `fedtune-server`: the daemon's binary.
//!
//! ```text
//! fedtune-server --config server.toml                 # serve
//! fedtune-server --config server.toml token --uses 10 # issue an enrollment token (daemon stopped)
//! fedtune-server --config server.toml revoke DEVICE   # revoke a device (daemon stopped)
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedtune_server::ServerConfig;
use fedtune_shared::protocol::DeviceId;

#[derive(Parser)]
#[command(version, about = "fedtune's aggregation daemon")]
struct Args {
    /// The server configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Issue an enrollment token and print it.
    Token {
        /// Devices it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Revoke a device (its id as the server logged it).
    Revoke {
        /// The device id (32 hex digits).
        device: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = ServerConfig::load(&args.config)?;
    match args.command {
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(fedtune_server::run(config))?;
        }
        Some(Command::Token { uses }) => {
            let token = fedtune_server::issue_token(&config, uses)
                .context("issue a token (is the daemon running? stop it first)")?;
            println!("{token}");
        }
        Some(Command::Revoke { device }) => {
            let id = DeviceId::parse(&device).context("a device id is 32 hex digits")?;
            fedtune_server::revoke(&config, id)
                .context("revoke (is the daemon running? stop it first)")?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
