//! One secure round on the daemon: the [`SecAggServer`] of the round's session with what the
//! network adds around it — which device holds which SecAgg id, phase deadlines, the message
//! each device fetches when a phase closes, the public measurements that come with masked
//! inputs, and what the protocol cost. No I/O and no clock: the daemon passes `now`.
//!
//! Phase 1 (key advertisements) is closed by the round orchestrator, exactly as it closes a
//! plain round's reports (quorum, or the round deadline with at least `min_reports`); phases 2
//! to 4 close when every device still in the session has answered, or at their own deadline.
//! Nothing here is persisted: a daemon that restarts mid-session runs the round again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fedtune_shared::privacy::dp::DistributedNoise;
use fedtune_shared::privacy::secagg::{ClientId, SecAggConfig, SecAggError, SecAggServer};
use fedtune_shared::protocol::secure::{SecAggDownload, SecAggUpload, SecureRound, input_weight};
use fedtune_shared::protocol::{DeviceId, LocalStats};
use serde::{Deserialize, Serialize};

/// What secure aggregation cost in one round (kept in the round's summary and logged).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecureCost {
    /// Devices whose updates are in the sum.
    pub clients: usize,
    /// Devices that advertised keys but whose updates are not in the sum.
    pub dropped: usize,
    /// Mean SecAgg bytes a device in the sum sent (the four phases' messages, encoded).
    pub upload_bytes_per_client: f64,
    /// Mean SecAgg bytes such a device received.
    pub download_bytes_per_client: f64,
    /// Seconds the server spent in SecAgg+ (summing, building the graph, unmasking).
    pub server_s: f64,
}

/// A finished session: the sum of the weighted updates and who is in it.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureAggregate {
    /// `Σ_u (samples_u / max_samples) · update_u` over the devices in the sum (with
    /// distributed DP: `Σ_u (clip(update_u) + noise_u)`), then any unweighted statistics the
    /// algorithm appends (FedKSeed-Pro's).
    pub sum: Vec<f32>,
    /// `Σ_u samples_u / max_samples` (with distributed DP: the number of devices in the sum):
    /// the update part of the sum divided by it is the round's mean.
    pub weight: f64,
    /// The devices in the sum with the measurements they sent in the clear, by device id.
    pub stats: Vec<(DeviceId, LocalStats)>,
    /// What the session cost.
    pub cost: SecureCost,
    /// Devices the round sampled (given its plan): the DP accountant's sampled count, at
    /// least the devices in the sum.
    pub sampled: usize,
    /// With distributed DP: what each device added (the server refuses a sum of fewer than
    /// its `min_clients` devices).
    pub dp: Option<DistributedNoise>,
    /// The secure sum's clipping range: its values were in `[-clip, clip]` (scales statistics).
    pub clip: f32,
}

/// Why a message was refused. The session is unchanged by a refused message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionRefusal {
    /// The message names a SecAgg id that is not the device's own.
    #[error("device {device} speaks for SecAgg id {claimed}, its own is {own:?}")]
    ForeignId {
        /// The sender.
        device: DeviceId,
        /// The id in the message.
        claimed: ClientId,
        /// The device's id in this session, if any.
        own: Option<ClientId>,
    },
    /// The device is not part of the session (no plan, or it missed a phase).
    #[error("device {0} is not part of this session")]
    NotInSession(DeviceId),
    /// The measurements sent with a masked input are out of range.
    #[error("invalid measurements: {0}")]
    Stats(String),
    /// The SecAgg+ machine refused the message (out of phase, repeated, malformed).
    #[error(transparent)]
    Protocol(#[from] SecAggError),
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Devices train and advertise their keys; the orchestrator closes this phase.
    Advertise,
    /// Devices fetch their neighbours' keys and send their sealed shares.
    ShareKeys,
    /// Devices fetch their shares and send their masked inputs.
    MaskedInput,
    /// Devices fetch the unmask request and reveal shares.
    Unmask,
}

/// What a polling device gets.
#[derive(Debug, Clone, PartialEq)]
pub enum PollAnswer {
    /// The message of the phase that closed.
    Message(SecAggDownload),
    /// The current phase is still open: ask again.
    Wait(&'static str),
}

/// One round's secure-aggregation session.
#[derive(Debug)]
pub struct SecureSession {
    round: u64,
    config: SecAggConfig,
    max_samples: u64,
    dp: Option<DistributedNoise>,
    phase_timeout: Duration,
    server: SecAggServer,
    stage: Stage,
    deadline: Option<Instant>,
    ids: BTreeMap<DeviceId, ClientId>,
    devices: BTreeMap<ClientId, DeviceId>,
    /// This phase's message for each device still in the session.
    outbox: BTreeMap<ClientId, SecAggDownload>,
    /// Devices that answered this phase.
    answered: BTreeSet<ClientId>,
    stats: BTreeMap<ClientId, LocalStats>,
    advertised: usize,
    up: BTreeMap<ClientId, usize>,
    down: BTreeMap<ClientId, usize>,
    server_s: f64,
}

fn size<T: Serialize>(m: &T) -> usize {
    fedtune_shared::zo::round::wire_size(m)
}

impl SecureSession {
    /// The session of `round` for updates of `vector_len` values from at most `max_clients`
    /// devices, each trained on at most `max_samples` samples; with distributed DP, `dp` is what
    /// each device adds (its plan carries it).
    ///
    /// # Errors
    ///
    /// [`SecAggError::InvalidConfig`] for settings SecAgg+ refuses.
    pub fn new(
        round: u64,
        max_clients: usize,
        vector_len: usize,
        max_samples: u64,
        settings: &crate::config::SecAggSettings,
        dp: Option<DistributedNoise>,
    ) -> Result<Self, SecAggError> {
        let config = SecAggConfig::new(
            round,
            max_clients,
            vector_len,
            settings.clip,
            settings.degree,
            settings.max_dropout,
        )?;
        Ok(Self {
            round,
            config,
            max_samples,
            dp,
            phase_timeout: settings.phase_timeout(),
            server: SecAggServer::new(config),
            stage: Stage::Advertise,
            deadline: None,
            ids: BTreeMap::new(),
            devices: BTreeMap::new(),
            outbox: BTreeMap::new(),
            answered: BTreeSet::new(),
            stats: BTreeMap::new(),
            advertised: 0,
            up: BTreeMap::new(),
            down: BTreeMap::new(),
            server_s: 0.0,
        })
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// `device`'s part of its plan: the session's settings and its id (the same id when it
    /// is given the plan again).
    pub fn assign(&mut self, device: DeviceId) -> SecureRound {
        let next = self.ids.len() as ClientId;
        let id = *self.ids.entry(device).or_insert(next);
        self.devices.insert(id, device);
        SecureRound {
            config: self.config,
            id,
            max_samples: self.max_samples,
            dp: self.dp,
        }
    }

    fn own_id(&self, device: DeviceId, claimed: ClientId) -> Result<ClientId, SessionRefusal> {
        match self.ids.get(&device) {
            Some(&own) if own == claimed => Ok(own),
            own => Err(SessionRefusal::ForeignId {
                device,
                claimed,
                own: own.copied(),
            }),
        }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut SecAggServer) -> T) -> T {
        let t = Instant::now();
        let out = f(&mut self.server);
        self.server_s += t.elapsed().as_secs_f64();
        out
    }

    /// Takes `device`'s message. An advertisement must first pass the orchestrator (the
    /// daemon checks the device has this round's plan).
    ///
    /// # Errors
    ///
    /// [`SessionRefusal`] for a foreign id, a device not in the session, or a message the
    /// SecAgg+ machine refuses; the session is unchanged.
    pub fn handle(
        &mut self,
        device: DeviceId,
        message: SecAggUpload,
    ) -> Result<(), SessionRefusal> {
        let id = self.own_id(device, message.sender())?;
        let bytes = size(&message);
        match message {
            SecAggUpload::Advertise(advert) => {
                self.timed(|s| s.handle_advertisement(advert))?;
                self.advertised += 1;
            }
            SecAggUpload::Shares(bundle) => {
                self.expect_in_phase(device, id)?;
                self.timed(|s| s.handle_share_bundle(bundle))?;
            }
            SecAggUpload::Masked { input, stats } => {
                self.expect_in_phase(device, id)?;
                check_stats(&stats, self.max_samples)?;
                self.timed(|s| s.handle_masked_input(input))?;
                self.stats.insert(id, stats);
            }
            SecAggUpload::Unmask(response) => {
                self.expect_in_phase(device, id)?;
                self.timed(|s| s.handle_unmask_response(response))?;
            }
        }
        self.answered.insert(id);
        *self.up.entry(id).or_default() += bytes;
        Ok(())
    }

    fn expect_in_phase(&self, device: DeviceId, id: ClientId) -> Result<(), SessionRefusal> {
        if self.stage != Stage::Advertise && !self.outbox.contains_key(&id) {
            return Err(SessionRefusal::NotInSession(device));
        }
        Ok(())
    }

    /// What `device` gets when it polls.
    ///
    /// # Errors
    ///
    /// [`SessionRefusal::NotInSession`] for a device that has no id or missed a phase.
    pub fn poll(&mut self, device: DeviceId) -> Result<PollAnswer, SessionRefusal> {
        let Some(&id) = self.ids.get(&device) else {
            return Err(SessionRefusal::NotInSession(device));
        };
        if self.stage == Stage::Advertise {
            return Ok(PollAnswer::Wait("waiting for the other devices' keys"));
        }
        if self.answered.contains(&id) {
            return Ok(PollAnswer::Wait(
                "waiting for the other devices of this phase",
            ));
        }
        let Some(message) = self.outbox.get(&id).cloned() else {
            return Err(SessionRefusal::NotInSession(device));
        };
        *self.down.entry(id).or_default() += size(&message);
        Ok(PollAnswer::Message(message))
    }

    /// True when the current phase (2 to 4) may close: every device still in the session has
    /// answered, or the phase deadline passed.
    pub fn phase_done(&self, now: Instant) -> bool {
        if self.stage == Stage::Advertise {
            return false;
        }
        self.answered.len() >= self.outbox.len() || self.deadline.is_some_and(|d| now >= d)
    }

    fn open_phase(
        &mut self,
        stage: Stage,
        outbox: BTreeMap<ClientId, SecAggDownload>,
        now: Instant,
    ) {
        self.stage = stage;
        self.outbox = outbox;
        self.answered.clear();
        self.deadline = Some(now + self.phase_timeout);
    }

    /// Closes phase 1 (the orchestrator closed the round's reports): builds the neighbour graph
    /// over the devices that advertised.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] when too few devices advertised; the round must be run again.
    pub fn close_advertisements(&mut self, now: Instant) -> Result<(), SecAggError> {
        let keys = self.timed(SecAggServer::close_advertisements)?;
        let outbox = keys
            .into_iter()
            .map(|(id, m)| (id, SecAggDownload::NeighbourKeys(m)))
            .collect();
        self.open_phase(Stage::ShareKeys, outbox, now);
        Ok(())
    }

    /// Closes the current phase (2 to 4). Returns the aggregate when the last phase closed.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] when drop-outs leave a neighbourhood below its threshold, or the sum
    /// cannot be unmasked; the round must be run again.
    pub fn close_phase(&mut self, now: Instant) -> Result<Option<SecureAggregate>, SecAggError> {
        match self.stage {
            Stage::Advertise => Ok(None),
            Stage::ShareKeys => {
                let shares = self.timed(SecAggServer::close_share_bundles)?;
                let outbox = shares
                    .into_iter()
                    .map(|(id, m)| (id, SecAggDownload::ForwardedShares(m)))
                    .collect();
                self.open_phase(Stage::MaskedInput, outbox, now);
                Ok(None)
            }
            Stage::MaskedInput => {
                let requests = self.timed(SecAggServer::close_masked_inputs)?;
                let outbox = requests
                    .into_iter()
                    .map(|(id, m)| (id, SecAggDownload::UnmaskRequest(m)))
                    .collect();
                self.open_phase(Stage::Unmask, outbox, now);
                Ok(None)
            }
            Stage::Unmask => {
                let sum = self.timed(SecAggServer::finish)?;
                Ok(Some(self.aggregate(sum)))
            }
        }
    }

    fn aggregate(&self, sum: fedtune_shared::privacy::secagg::SecureSum) -> SecureAggregate {
        let mut stats: Vec<(DeviceId, LocalStats)> = sum
            .clients
            .iter()
            .filter_map(|id| Some((*self.devices.get(id)?, *self.stats.get(id)?)))
            .collect();
        stats.sort_by_key(|(d, _)| *d);
        // Under DP every device masks with weight 1 (see `secure_input`).
        let weight = match self.dp {
            Some(_) => sum.clients.len() as f64,
            None => sum
                .clients
                .iter()
                .filter_map(|id| self.stats.get(id))
                .map(|s| f64::from(input_weight(s.samples, self.max_samples)))
                .sum(),
        };
        let n = sum.clients.len().max(1) as f64;
        let total = |bytes: &BTreeMap<ClientId, usize>| -> f64 {
            sum.clients
                .iter()
                .map(|id| bytes.get(id).copied().unwrap_or(0) as f64)
                .sum::<f64>()
                / n
        };
        SecureAggregate {
            cost: SecureCost {
                clients: sum.clients.len(),
                dropped: self.advertised.saturating_sub(sum.clients.len()),
                upload_bytes_per_client: total(&self.up),
                download_bytes_per_client: total(&self.down),
                server_s: self.server_s,
            },
            sum: sum.sum,
            weight,
            stats,
            sampled: self.ids.len().max(sum.clients.len()),
            dp: self.dp,
            clip: self.config.quantizer.clip(),
        }
    }
}

/// The measurements a masked input comes with: samples within the round's maximum (they set
/// the device's weight), finite loss and time.
fn check_stats(stats: &LocalStats, max_samples: u64) -> Result<(), SessionRefusal> {
    if stats.samples == 0 || stats.samples > max_samples {
        return Err(SessionRefusal::Stats(format!(
            "{} samples, a round has 1..={max_samples}",
            stats.samples
        )));
    }
    if !(stats.mean_loss.is_finite() && stats.wall_s.is_finite() && stats.wall_s >= 0.0) {
        return Err(SessionRefusal::Stats("loss or time is not finite".into()));
    }
    Ok(())
}
