//! `fedtune server` and `fedtune client`: the daemon and a Linux device, as thin wrappers over
//! `fedtune-server` and `fedtune-client`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_client::trainer::TrainingData;
use fedtune_client::{Always, Client, ClientConfig, Event, Outcome};
use fedtune_shared::protocol::Capabilities;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::transport::identity::ServerIdentity;

use crate::ModelArgs;

/// Runs `fedtune server`.
pub fn server(args: fedtune_server::command::ServerArgs) -> anyhow::Result<()> {
    fedtune_server::command::execute(args)?;
    Ok(())
}

/// `fedtune client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The server's identity file (`server-identity.json`, written by the daemon into its state
    /// folder): address, pinned certificate, plan-signing key.
    #[arg(long)]
    server: PathBuf,
    /// Connect here instead of the identity file's address.
    #[arg(long)]
    address: Option<std::net::SocketAddr>,
    /// Training text (UTF-8), cut into sequences of --seq-len tokens.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// The device's state folder (key, enrollment, history, unsent reports).
    #[arg(long, default_value = "fedtune-device")]
    state: PathBuf,
    /// Enrollment token from the operator (needed once).
    #[arg(long)]
    token: Option<String>,
}

/// Runs `fedtune client` until the server's run is over.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    let mut identity = ServerIdentity::load(&args.server)?;
    if let Some(address) = args.address {
        identity.address = address;
    }
    let model_path = args.model.path()?;
    let pretrained = args.model.load(false)?;
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("read training data {}", args.data.display()))?;
    let sequences = sequences_of(&pretrained.tokenizer.encode(&text)?, args.seq_len);
    if sequences.is_empty() {
        bail!("{} holds fewer than two tokens", args.data.display());
    }
    let base_model = model_digest(&model_path)?;
    let config = ClientConfig {
        server: identity,
        state_dir: args.state.clone(),
        base_model,
        capabilities: Capabilities {
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            backend: args.model.backend.clone(),
            memory_bytes: 0,
            base_model,
        },
        policy: Arc::new(Always),
        listener: Arc::new(print_event),
        max_backoff: Duration::from_secs(30),
    };
    let data = TrainingData {
        sequences,
        pad_id: pretrained.tokenizer.pad_id().unwrap_or(0),
        ..TrainingData::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (mut client, _handle) = Client::new(config, pretrained.model, data)?;
        if client.device().is_none() {
            let Some(token) = args.token.as_deref() else {
                bail!("this device is not enrolled: pass --token from the operator");
            };
            client.enroll(token).await?;
        }
        match client.run().await? {
            Outcome::Finished { last_round } => println!("run finished after round {last_round}"),
            Outcome::Stopped => println!("stopped"),
        }
        Ok(())
    })
}

fn sequences_of(ids: &[u32], len: usize) -> Vec<Vec<u32>> {
    ids.chunks(len.max(2))
        .filter(|c| c.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}

fn print_event(event: Event) {
    match event {
        Event::Enrolled { device } => println!("enrolled as {device}"),
        Event::PlanReceived { round } => println!("round {round}: training"),
        Event::Reported { round, duplicate } => {
            println!(
                "round {round}: report accepted{}",
                if duplicate { " (resent)" } else { "" }
            )
        }
        Event::Problem { message } => eprintln!("warning: {message}"),
        Event::Deferred { reason } => println!("waiting: {reason}"),
        _ => tracing::debug!(?event, "client event"),
    }
}
