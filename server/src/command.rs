//! The daemon's command line, shared by the `fedtune-server` binary and `fedtune server`:
//! serve, issue an enrollment token, revoke a device.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedtune_shared::protocol::DeviceId;

use crate::config::{ConfigError, ServerConfig};
use crate::daemon::DaemonError;

/// Arguments of the daemon's command line.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server configuration (TOML; see examples/configs/server.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
}

/// Operator actions besides serving.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Issue an enrollment token and print it (through the running daemon, or with it stopped).
    Token {
        /// Devices it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Revoke a device by its id (at once when the daemon runs).
    Revoke {
        /// The device id (32 hex digits, as the daemon logs it).
        device: String,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon failed, or refused a token or revoke command.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// A device id is not 32 hex digits.
    #[error("`{0}` is not a device id (32 hex digits)")]
    DeviceId(String),
}

/// Runs the command; `token` prints the token on stdout.
pub fn execute(args: ServerArgs) -> Result<(), CommandError> {
    let config = ServerConfig::load(&args.config)?;
    match args.command {
        None => {
            let runtime = crate::runtime().map_err(CommandError::Runtime)?;
            runtime.block_on(crate::run(config))?;
        }
        Some(ServerCommand::Token { uses }) => println!("{}", crate::issue_token(&config, uses)?),
        Some(ServerCommand::Revoke { device }) => {
            let id = DeviceId::parse(&device).ok_or(CommandError::DeviceId(device))?;
            crate::revoke(&config, id)?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
