//! The device's side of a secure round: after training, the four SecAgg+ phases of
//! `fedtune_shared::privacy::secagg`, driven by polling the server (see
//! `fedtune_shared::protocol::secure` for the message flow). The secrets are drawn fresh from
//! the operating system every round and never leave memory: a device that restarts mid-session
//! is a drop-out, and its next round starts a new session.
//!
//! With distributed differential privacy (the plan's `dp`), the device clips its update and
//! adds its share of the noise before masking it, from OS randomness of its own: a seed the
//! server knew would let it subtract the noise.

use std::time::Duration;

use fedtune_shared::privacy::secagg::{SecAggClient, os_seed};
use fedtune_shared::protocol::secure::{SecAggDownload, SecAggUpload, SecureRound, secure_input};
use fedtune_shared::protocol::{ErrorCode, LocalStats, Request, Response};
use fedtune_shared::transport::TransportError;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::connection::Connection;

/// How a device's secure round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureOutcome {
    /// The device revealed its shares: its update is in the round's sum.
    Done,
    /// The server or the session refused to go on (the round was restarted, the device missed
    /// a phase, …): the device drops this round and polls for work again.
    Abandoned(String),
}

/// Why a secure round could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// The network failed (transient: the device reconnects, and is a drop-out of this session).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The operating system's random source failed.
    #[error("secure aggregation: {0}")]
    Random(String),
}

/// The longest a device waits between two polls of a session.
const MAX_POLL_WAIT: Duration = Duration::from_secs(5);

/// Runs the four phases of `round`'s session for `update` (the device's flat update: FedKSeed's
/// dense K-vector, LoRA's adapter minus the global adapter), weighted by `stats.samples` (or
/// clipped and noised with weight 1 under the plan's distributed DP), followed by `statistics`
/// (FedKSeed-Pro's, empty otherwise), on `connection`.
///
/// # Errors
///
/// [`SecureError`] when the network or the random source fails; a refusal by the server, or
/// DP settings a device cannot follow, are an [`SecureOutcome::Abandoned`].
pub async fn run_secure_round(
    connection: &Connection,
    round: u64,
    secure: SecureRound,
    update: &[f32],
    statistics: &[f32],
    stats: LocalStats,
) -> Result<SecureOutcome, SecureError> {
    if let Some(noise) = &secure.dp
        && let Err(e) = noise.validate()
    {
        // Without valid noise the update would leave the device less private than promised.
        return Ok(SecureOutcome::Abandoned(e.to_string()));
    }
    let noise_seed = os_seed().map_err(|e| SecureError::Random(e.to_string()))?;
    let (input, norm) = secure_input(
        update,
        statistics,
        stats.samples,
        secure.max_samples,
        secure.dp.as_ref(),
        &mut ChaCha20Rng::from_seed(noise_seed),
    );
    if let (Some(norm), Some(noise)) = (norm, &secure.dp) {
        tracing::debug!(
            round,
            norm,
            clip_norm = noise.clip_norm,
            clipped = norm > noise.clip_norm,
            noise_std = noise.noise_std,
            "update clipped and noised for differential privacy"
        );
    }
    if input.len() != secure.config.vector_len {
        return Ok(SecureOutcome::Abandoned(format!(
            "the update has {} values, the session sums {}",
            input.len(),
            secure.config.vector_len
        )));
    }
    let clip = secure.config.quantizer.clip();
    let clipped = input.iter().filter(|v| v.abs() > clip).count();
    if clipped > 0 {
        tracing::warn!(
            round,
            clipped,
            clip,
            "update values beyond the secure aggregation clipping range are clipped"
        );
    }
    let seed = os_seed().map_err(|e| SecureError::Random(e.to_string()))?;
    let (mut machine, advert) = SecAggClient::new(secure.config, secure.id, seed);
    let mut next = Some(SecAggUpload::Advertise(advert));
    loop {
        if let Some(message) = next.take() {
            let last = matches!(message, SecAggUpload::Unmask(_));
            match connection
                .request(&Request::SecAgg { round, message })
                .await
            {
                Ok(Response::SecAggAccepted { .. }) => {}
                Ok(other) => {
                    return Ok(SecureOutcome::Abandoned(format!(
                        "unexpected answer {other:?}"
                    )));
                }
                Err(e) => return refused(e),
            }
            if last {
                return Ok(SecureOutcome::Done);
            }
        }
        let download = match connection.request(&Request::SecAggPoll { round }).await {
            Ok(Response::SecAgg(download)) => download,
            Ok(Response::Wait { retry_after_ms, .. }) => {
                tokio::time::sleep(
                    Duration::from_millis(retry_after_ms)
                        .clamp(Duration::from_millis(10), MAX_POLL_WAIT),
                )
                .await;
                continue;
            }
            Ok(other) => {
                return Ok(SecureOutcome::Abandoned(format!(
                    "unexpected answer {other:?}"
                )));
            }
            Err(e) => return refused(e),
        };
        // A message the machine refuses means the server misbehaves: leave the session.
        let step = match download {
            SecAggDownload::NeighbourKeys(m) => {
                machine.handle_neighbour_keys(m).map(SecAggUpload::Shares)
            }
            SecAggDownload::ForwardedShares(m) => machine
                .handle_forwarded_shares(m, &input)
                .map(|input| SecAggUpload::Masked { input, stats }),
            SecAggDownload::UnmaskRequest(m) => {
                machine.handle_unmask_request(m).map(SecAggUpload::Unmask)
            }
            SecAggDownload::Done => return Ok(SecureOutcome::Done),
        };
        match step {
            Ok(message) => next = Some(message),
            Err(e) => return Ok(SecureOutcome::Abandoned(e.to_string())),
        }
    }
}

/// A refusal ends the session for this device; other failures are the network's.
fn refused(e: TransportError) -> Result<SecureOutcome, SecureError> {
    match e {
        TransportError::Refused(w)
            if !matches!(
                w.code,
                ErrorCode::Unauthenticated | ErrorCode::Revoked | ErrorCode::VersionMismatch
            ) =>
        {
            Ok(SecureOutcome::Abandoned(w.to_string()))
        }
        e => Err(SecureError::Transport(e)),
    }
}
