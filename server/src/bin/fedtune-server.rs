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
use fedtune_server::registry::Registry;
use fedtune_server::store::Store;
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
            let store = Store::open(&config.state_dir.join("store"))
                .context("open the store (is the daemon running?)")?;
            let token = fedtune_shared::protocol::auth::hex_encode(&rand::random::<[u8; 16]>());
            Registry::new(&store).add_token(&token, uses)?;
            println!("{token}");
        }
        Some(Command::Revoke { device }) => {
            let id = DeviceId::parse(&device).context("a device id is 32 hex digits")?;
            let store = Store::open(&config.state_dir.join("store"))
                .context("open the store (is the daemon running?)")?;
            Registry::new(&store).revoke(id)?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
