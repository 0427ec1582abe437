//! `fedtune-server`: the daemon's binary (the same as `fedtune server`).
//!
//! ```text
//! fedtune-server --config server.toml                 # serve
//! fedtune-server --config server.toml token --uses 10 # issue an enrollment token (daemon stopped)
//! fedtune-server --config server.toml revoke DEVICE   # revoke a device (daemon stopped)
//! ```

use clap::Parser;
use fedtune_server::command::{ServerArgs, execute};

#[derive(Parser)]
#[command(version, about = "fedtune's aggregation daemon")]
struct Cli {
    #[command(flatten)]
    args: ServerArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    execute(Cli::parse().args)?;
    Ok(())
}
