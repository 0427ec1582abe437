//! SecAgg+ (Bonawitz et al. 2017, with the sparse neighbour graph of Bell et al. 2020) as
//! I/O-free state machines: one [`SecAggClient`] per device and one [`SecAggServer`]. A driver
//! moves the messages (see [`super::secure_sum`] for the in-process one); nothing here touches
//! a socket or a clock.
//!
//! One round, four phases:
//!
//! 1. **Advertise keys.** Each client makes two X25519 key pairs, one to encrypt shares and one
//!    to agree pairwise masks, and sends the public keys ([`KeyAdvertisement`]).
//! 2. **Share keys.** The server builds the neighbour graph over the clients that advertised
//!    (`U1`): a ring in a session-seeded random order, each client joined to `degree / 2`
//!    clients on either side (a Harary graph; the full graph when `degree ≥ |U1| − 1`), and
//!    sends each client its neighbours' keys and the threshold `t` ([`NeighbourKeys`]). Each
//!    client Shamir-shares its self-mask seed `b_u` and its masking secret key among itself and
//!    its neighbours, encrypts each neighbour's pair of shares with ChaCha20-Poly1305 under a
//!    key agreed with that neighbour, and sends them through the server ([`ShareBundle`]).
//! 3. **Masked input.** The server forwards the sealed shares of the clients that sent theirs
//!    (`U2`). Each client quantizes its update, adds `PRG(b_u)` and, for every neighbour `v` in
//!    `U2`, `± PRG(s_uv)` (the smaller id adds), and sends the result ([`MaskedInput`]).
//! 4. **Unmask.** The server tells each client which of its neighbours sent a masked input
//!    (`U3`) and which did not ([`UnmaskRequest`]); each client reveals its share of `b_v` for
//!    the former and of `v`'s masking secret for the latter, never both for one client
//!    ([`UnmaskResponse`]). With `t` shares per neighbourhood the server removes every self
//!    mask and every dropped client's pairwise masks, and dequantizes the sum.
//!
//! The server sums masked inputs as they arrive and learns only the sum of `U3`'s updates. The
//! threat model is an honest-but-curious server (Bonawitz et al.'s semi-honest setting):
//! clients do not sign their messages and the server is trusted to forward them faithfully;
//! a client refuses an unmask request that asks for both secrets of one neighbour.
//! Up to `⌊max_dropout · m⌋` of a neighbourhood of `m` clients may drop out after sharing keys.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::aead;
use serde::{Deserialize, Serialize};

use super::pairwise_mask::{KeyPair, MaskSeed, MaskSign, apply_mask};
use super::quantize::{QuantizeError, Quantizer};
use super::shamir::{self, ShamirError, Share};

/// HKDF purpose of the pairwise masks.
const MASK_PURPOSE: &[u8] = b"pairwise mask";
/// HKDF purpose of the share-encryption keys.
const CIPHER_PURPOSE: &[u8] = b"share encryption";
/// Additional data of every sealed share.
const SHARE_AAD: &[u8] = b"fedtune secagg share";
/// Bytes of a sealed pair of shares: two shares and the Poly1305 tag.
pub const SEALED_SHARE_BYTES: usize = 2 * Share::BYTES + 16;

/// A client's id within one secure-aggregation session (its Shamir point is `id + 1`).
pub type ClientId = u32;

/// Settings every party of a session shares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecAggConfig {
    /// Distinguishes sessions (rounds): salts every derived key and seeds the neighbour graph.
    pub session: u64,
    /// Length of the summed vectors.
    pub vector_len: usize,
    /// Clipping range and levels; its `max_clients` bounds the clients of the session.
    pub quantizer: Quantizer,
    /// Neighbours per client (rounded down to even); the full graph when ≥ clients − 1.
    pub degree: usize,
    /// The largest fraction of a neighbourhood that may drop out after sharing keys, below 0.5.
    pub max_dropout: f64,
}

impl SecAggConfig {
    /// A session of at most `max_clients` clients summing vectors of `vector_len` values
    /// clipped to `[-clip, clip]`.
    ///
    /// # Errors
    ///
    /// [`SecAggError::InvalidConfig`] for a drop-out fraction outside `[0, 0.5)`, a zero degree
    /// or length, or a bad clipping range.
    pub fn new(
        session: u64,
        max_clients: usize,
        vector_len: usize,
        clip: f32,
        degree: usize,
        max_dropout: f64,
    ) -> Result<Self, SecAggError> {
        // Below one half, so the shares revealed for survivors and for drop-outs can never
        // both reach the threshold for one client.
        if !(0.0..0.5).contains(&max_dropout) {
            return Err(SecAggError::InvalidConfig(format!(
                "drop-out fraction {max_dropout} is not in [0, 0.5)"
            )));
        }
        if degree < 2 || vector_len == 0 {
            return Err(SecAggError::InvalidConfig(
                "degree must be at least 2 and vectors non-empty".into(),
            ));
        }
        Ok(Self {
            session,
            vector_len,
            quantizer: Quantizer::for_sum(clip, max_clients)?,
            degree,
            max_dropout,
        })
    }

    /// The threshold of a neighbourhood of `m` clients (a client and its neighbours).
    pub fn threshold(&self, m: usize) -> usize {
        m - (self.max_dropout * m as f64).floor() as usize
    }

    /// The fewest clients whose inputs are in any sum the server can unmask once at least
    /// `min_advertised` clients advertised keys: see [`min_survivors`].
    pub fn min_survivors(&self, min_advertised: usize) -> usize {
        min_survivors(self.degree, self.max_dropout, min_advertised)
    }
}

/// The fewest clients whose inputs are in any sum a session can unmask, when at least
/// `min_advertised` clients advertised keys, for a graph of `degree` and a drop-out fraction
/// `max_dropout`. Distributed DP noise calibrated to it holds whenever the server can unmask
/// at all.
///
/// The server unmasks only if every client in the sum keeps at least the threshold
/// `t(m) = m − ⌊δ·m⌋` of its neighbourhood in the sum ([`SecAggServer::close_masked_inputs`]),
/// so any sum holds at least `t(m)` inputs. `t` grows with `m`, the neighbourhood's size: the
/// whole session `n ≥ max(min_advertised, 3)` in the full graph, `2⌊degree/2⌋ + 1` in the sparse
/// one. The least is `t(min(max(min_advertised, 3), 2⌊degree/2⌋ + 1))`.
pub fn min_survivors(degree: usize, max_dropout: f64, min_advertised: usize) -> usize {
    let m = min_advertised.max(3).min(2 * (degree / 2) + 1);
    m - (max_dropout.clamp(0.0, 0.5) * m as f64).floor() as usize
}

/// What went wrong in a session. Errors from a peer's message leave the machine as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// Settings that cannot work.
    #[error("invalid secure aggregation settings: {0}")]
    InvalidConfig(String),
    /// A message that does not belong in the current phase.
    #[error("message for phase {got}, the session is in phase {expected}")]
    WrongPhase {
        /// The phase the machine is in.
        expected: &'static str,
        /// The phase the message belongs to.
        got: &'static str,
    },
    /// A client id that is not part of this session or not allowed here.
    #[error("client {0} is unknown or not expected here")]
    UnknownClient(ClientId),
    /// A second message from the same client in one phase.
    #[error("client {0} already sent this message")]
    Duplicate(ClientId),
    /// A message whose content is malformed.
    #[error("malformed message from client {client}: {reason}")]
    Malformed {
        /// The sender.
        client: ClientId,
        /// What is wrong.
        reason: String,
    },
    /// A sealed share that does not open.
    #[error("the share from client {0} does not decrypt")]
    Decrypt(ClientId),
    /// A peer's public key is a low-order point.
    #[error("client {0}'s public key is unusable")]
    BadKey(ClientId),
    /// Too few clients left to go on.
    #[error("{got} clients, at least {needed} needed")]
    TooFewClients {
        /// Clients present.
        got: usize,
        /// Clients needed.
        needed: usize,
    },
    /// Secret sharing failed, or a rebuilt secret does not match its public key.
    #[error("cannot rebuild the secrets of client {client}: {reason}")]
    Reconstruction {
        /// The client whose secret was rebuilt.
        client: ClientId,
        /// Why.
        reason: String,
    },
    /// An input of the wrong length.
    #[error("input has {got} values, the session sums {expected}")]
    InputLength {
        /// The session's length.
        expected: usize,
        /// The input's.
        got: usize,
    },
    /// The quantizer refused its settings.
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// Secret sharing refused its settings.
    #[error(transparent)]
    Shamir(#[from] ShamirError),
}

/// Phase 1, client → server: the public keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAdvertisement {
    /// The client.
    pub id: ClientId,
    /// Public key of share encryption.
    pub cipher_public: [u8; 32],
    /// Public key of pairwise masks.
    pub mask_public: [u8; 32],
}

/// Phase 2, server → client: its neighbours' keys and the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// Shares needed to rebuild a secret of this client's neighbourhood.
    pub threshold: u32,
    /// The neighbours' advertisements.
    pub neighbours: Vec<KeyAdvertisement>,
}

/// A pair of shares (of `b_from` and of `from`'s masking secret) sealed for `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedShare {
    /// The secrets' owner.
    pub from: ClientId,
    /// The recipient.
    pub to: ClientId,
    /// ChaCha20-Poly1305 ciphertext and tag ([`SEALED_SHARE_BYTES`]).
    pub sealed: Vec<u8>,
}

/// Phase 2, client → server: one sealed share pair per neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareBundle {
    /// The sender.
    pub from: ClientId,
    /// The sealed shares.
    pub shares: Vec<SealedShare>,
}

/// Phase 3, server → client: the sealed shares addressed to it by neighbours in `U2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedShares {
    /// The sealed shares.
    pub shares: Vec<SealedShare>,
}

/// Phase 3, client → server: the masked, quantized update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The sender.
    pub from: ClientId,
    /// `vector_len` little-endian `u32`s (bytes, so the wire format stores 4 bytes a value).
    pub masked: Vec<u8>,
}

/// Phase 4, server → client: which neighbours sent masked inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Neighbours (and the client itself) whose masked input arrived: reveal `b` shares.
    pub survivors: Vec<ClientId>,
    /// Neighbours that shared keys but sent no input: reveal masking-secret shares.
    pub dropped: Vec<ClientId>,
}

/// Phase 4, client → server: the revealed shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// The sender.
    pub from: ClientId,
    /// `(owner, share of b_owner)` for each survivor.
    pub self_mask_shares: Vec<(ClientId, Share)>,
    /// `(owner, share of owner's masking secret)` for each drop-out.
    pub key_shares: Vec<(ClientId, Share)>,
}

fn nonce(from: ClientId, to: ClientId) -> aead::Nonce {
    // Each key is used once per direction, and the direction is in the nonce.
    let mut n = [0u8; aead::NONCE_LEN];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn share_key(key: &[u8; 32]) -> Option<aead::LessSafeKey> {
    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
        .ok()
        .map(aead::LessSafeKey::new)
}

/// The phases of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientPhase {
    AwaitingNeighbours,
    AwaitingShares,
    AwaitingUnmask,
    Done,
}

impl ClientPhase {
    fn name(self) -> &'static str {
        match self {
            Self::AwaitingNeighbours => "share keys",
            Self::AwaitingShares => "masked input",
            Self::AwaitingUnmask => "unmask",
            Self::Done => "done",
        }
    }
}

/// A device's side of one session.
#[derive(Debug)]
pub struct SecAggClient {
    id: ClientId,
    config: SecAggConfig,
    rng: ChaCha20Rng,
    cipher_keys: KeyPair,
    mask_keys: KeyPair,
    self_seed: MaskSeed,
    phase: ClientPhase,
    threshold: usize,
    neighbours: BTreeMap<ClientId, KeyAdvertisement>,
    /// This client's shares of its own two secrets.
    own_shares: Option<(Share, Share)>,
    /// `(b share, key share)` of every neighbour in `U2`, and of itself.
    held: BTreeMap<ClientId, (Share, Share)>,
}

/// A fresh 32-byte seed from the operating system, for [`SecAggClient::new`].
///
/// # Errors
///
/// When the operating system's random source fails.
pub fn os_seed() -> Result<[u8; 32], SecAggError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| SecAggError::InvalidConfig("the system random source failed".into()))?;
    Ok(seed)
}

impl SecAggClient {
    /// Client `id` of a session, with its secrets drawn from `seed` (use [`os_seed`]; tests
    /// pass fixed seeds), and its first message.
    pub fn new(config: SecAggConfig, id: ClientId, seed: [u8; 32]) -> (Self, KeyAdvertisement) {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let cipher_keys = KeyPair::generate(&mut rng);
        let mask_keys = KeyPair::generate(&mut rng);
        let mut self_seed = [0u8; 32];
        rng.fill_bytes(&mut self_seed);
        let advert = KeyAdvertisement {
            id,
            cipher_public: cipher_keys.public(),
            mask_public: mask_keys.public(),
        };
        let client = Self {
            id,
            config,
            rng,
            cipher_keys,
            mask_keys,
            self_seed,
            phase: ClientPhase::AwaitingNeighbours,
            threshold: 0,
            neighbours: BTreeMap::new(),
            own_shares: None,
            held: BTreeMap::new(),
        };
        (client, advert)
    }

    /// This client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    fn expect(&self, phase: ClientPhase) -> Result<(), SecAggError> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(SecAggError::WrongPhase {
                expected: self.phase.name(),
                got: phase.name(),
            })
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> SecAggError {
        SecAggError::Malformed {
            client: self.id,
            reason: reason.into(),
        }
    }

    /// Phase 2: shares this client's secrets among `msg`'s neighbours.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] for a message out of phase, a neighbour list with this client, repeats
    /// or unusable keys, or a threshold that is not a majority of the neighbourhood.
    pub fn handle_neighbour_keys(
        &mut self,
        msg: NeighbourKeys,
    ) -> Result<ShareBundle, SecAggError> {
        self.expect(ClientPhase::AwaitingNeighbours)?;
        let mut neighbours = BTreeMap::new();
        for n in msg.neighbours {
            if n.id == self.id || neighbours.contains_key(&n.id) {
                return Err(self.malformed("neighbour list repeats a client or names this one"));
            }
            neighbours.insert(n.id, n);
        }
        let m = neighbours.len() + 1;
        let t = msg.threshold as usize;
        if t * 2 <= m || t > m {
            return Err(self.malformed(format!("threshold {t} for a neighbourhood of {m}")));
        }
        let points: Vec<u64> = std::iter::once(self.id)
            .chain(neighbours.keys().copied())
            .map(|id| u64::from(id) + 1)
            .collect();
        let b_shares = shamir::split(&self.self_seed, t, &points, &mut self.rng)?;
        let key_shares = shamir::split(&self.mask_keys.secret_bytes(), t, &points, &mut self.rng)?;
        let mut shares = Vec::with_capacity(neighbours.len());
        for ((n, b), k) in neighbours
            .values()
            .zip(&b_shares[1..])
            .zip(&key_shares[1..])
        {
            let key = self
                .cipher_keys
                .agree(
                    &n.cipher_public,
                    self.config.session,
                    CIPHER_PURPOSE,
                    self.id,
                    n.id,
                )
                .and_then(|k| share_key(&k))
                .ok_or(SecAggError::BadKey(n.id))?;
            let mut sealed = Vec::with_capacity(SEALED_SHARE_BYTES);
            sealed.extend_from_slice(&b.to_bytes());
            sealed.extend_from_slice(&k.to_bytes());
            key.seal_in_place_append_tag(
                nonce(self.id, n.id),
                aead::Aad::from(SHARE_AAD),
                &mut sealed,
            )
            .map_err(|_| SecAggError::BadKey(n.id))?;
            shares.push(SealedShare {
                from: self.id,
                to: n.id,
                sealed,
            });
        }
        self.own_shares = Some((b_shares[0], key_shares[0]));
        self.neighbours = neighbours;
        self.threshold = t;
        self.phase = ClientPhase::AwaitingShares;
        Ok(ShareBundle {
            from: self.id,
            shares,
        })
    }

    /// Phase 3: opens the neighbours' shares and masks `input`.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] for a message out of phase, an input of the wrong length, a share that
    /// is not for this client, does not decrypt or repeats, or fewer than `t` clients left in
    /// the neighbourhood.
    pub fn handle_forwarded_shares(
        &mut self,
        msg: ForwardedShares,
        input: &[f32],
    ) -> Result<MaskedInput, SecAggError> {
        self.expect(ClientPhase::AwaitingShares)?;
        if input.len() != self.config.vector_len {
            return Err(SecAggError::InputLength {
                expected: self.config.vector_len,
                got: input.len(),
            });
        }
        let mut held = BTreeMap::new();
        for s in &msg.shares {
            let Some(n) = self.neighbours.get(&s.from) else {
                return Err(SecAggError::UnknownClient(s.from));
            };
            if s.to != self.id || held.contains_key(&s.from) || s.sealed.len() != SEALED_SHARE_BYTES
            {
                return Err(
                    self.malformed("forwarded share is misaddressed, repeated or truncated")
                );
            }
            let key = self
                .cipher_keys
                .agree(
                    &n.cipher_public,
                    self.config.session,
                    CIPHER_PURPOSE,
                    self.id,
                    n.id,
                )
                .and_then(|k| share_key(&k))
                .ok_or(SecAggError::BadKey(n.id))?;
            let mut buf = s.sealed.clone();
            let plain = key
                .open_in_place(nonce(s.from, self.id), aead::Aad::from(SHARE_AAD), &mut buf)
                .map_err(|_| SecAggError::Decrypt(s.from))?;
            let me = u64::from(self.id) + 1;
            let pair = Share::from_bytes(&plain[..Share::BYTES])
                .zip(Share::from_bytes(&plain[Share::BYTES..]))
                .filter(|(b, k)| b.x == me && k.x == me)
                .ok_or(SecAggError::Decrypt(s.from))?;
            held.insert(s.from, pair);
        }
        let own = self
            .own_shares
            .ok_or_else(|| self.malformed("no own shares"))?;
        held.insert(self.id, own);
        if held.len() < self.threshold {
            return Err(SecAggError::TooFewClients {
                got: held.len(),
                needed: self.threshold,
            });
        }
        let mut masked = self.config.quantizer.quantize(input);
        apply_mask(&mut masked, &self.self_seed, MaskSign::Add);
        for &v in held.keys().filter(|&&v| v != self.id) {
            let peer = &self.neighbours[&v];
            let seed = self
                .mask_keys
                .agree(
                    &peer.mask_public,
                    self.config.session,
                    MASK_PURPOSE,
                    self.id,
                    v,
                )
                .ok_or(SecAggError::BadKey(v))?;
            apply_mask(&mut masked, &seed, MaskSign::pairwise(self.id, v));
        }
        self.held = held;
        self.phase = ClientPhase::AwaitingUnmask;
        Ok(MaskedInput {
            from: self.id,
            masked: masked.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    }

    /// Phase 4: reveals the shares the server needs, after checking it does not ask for both
    /// secrets of any client.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] for a message out of phase, a client named twice or not in this
    /// client's neighbourhood, this client not among the survivors, or fewer than `t`
    /// survivors.
    pub fn handle_unmask_request(
        &mut self,
        msg: UnmaskRequest,
    ) -> Result<UnmaskResponse, SecAggError> {
        self.expect(ClientPhase::AwaitingUnmask)?;
        let survivors: BTreeSet<ClientId> = msg.survivors.iter().copied().collect();
        let dropped: BTreeSet<ClientId> = msg.dropped.iter().copied().collect();
        let named = survivors.len() + dropped.len();
        if named != msg.survivors.len() + msg.dropped.len()
            || survivors.union(&dropped).count() != named
        {
            return Err(self.malformed("a client is named twice in the unmask request"));
        }
        if let Some(&stranger) = survivors
            .iter()
            .chain(&dropped)
            .find(|c| !self.held.contains_key(c))
        {
            return Err(SecAggError::UnknownClient(stranger));
        }
        if !survivors.contains(&self.id) || survivors.len() < self.threshold {
            return Err(SecAggError::TooFewClients {
                got: survivors.len(),
                needed: self.threshold,
            });
        }
        self.phase = ClientPhase::Done;
        Ok(UnmaskResponse {
            from: self.id,
            self_mask_shares: survivors.iter().map(|c| (*c, self.held[c].0)).collect(),
            key_shares: dropped.iter().map(|c| (*c, self.held[c].1)).collect(),
        })
    }
}

/// The phases of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerPhase {
    Advertise,
    ShareKeys,
    MaskedInput,
    Unmask,
    Finished,
}

impl ServerPhase {
    fn name(self) -> &'static str {
        match self {
            Self::Advertise => "advertise keys",
            Self::ShareKeys => "share keys",
            Self::MaskedInput => "masked input",
            Self::Unmask => "unmask",
            Self::Finished => "finished",
        }
    }
}

/// The outcome of a session: the sum of the surviving clients' updates.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSum {
    /// The dequantized sum, `vector_len` values.
    pub sum: Vec<f32>,
    /// The clients whose updates are in the sum (`U3`), ascending.
    pub clients: Vec<ClientId>,
}

/// The server's side of one session.
#[derive(Debug)]
pub struct SecAggServer {
    config: SecAggConfig,
    phase: ServerPhase,
    keys: BTreeMap<ClientId, KeyAdvertisement>,
    graph: BTreeMap<ClientId, Vec<ClientId>>,
    threshold: usize,
    bundles: BTreeMap<ClientId, Vec<SealedShare>>,
    sum: Vec<u32>,
    masked: BTreeSet<ClientId>,
    requests: BTreeMap<ClientId, UnmaskRequest>,
    responses: BTreeMap<ClientId, UnmaskResponse>,
}

impl SecAggServer {
    /// A session waiting for key advertisements.
    pub fn new(config: SecAggConfig) -> Self {
        Self {
            config,
            phase: ServerPhase::Advertise,
            keys: BTreeMap::new(),
            graph: BTreeMap::new(),
            threshold: 0,
            bundles: BTreeMap::new(),
            sum: Vec::new(),
            masked: BTreeSet::new(),
            requests: BTreeMap::new(),
            responses: BTreeMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }

    /// The threshold of every neighbourhood (0 before the graph is built).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// `client`'s neighbours (empty before the graph is built).
    pub fn neighbours(&self, client: ClientId) -> &[ClientId] {
        self.graph.get(&client).map_or(&[], Vec::as_slice)
    }

    fn expect(&self, phase: ServerPhase) -> Result<(), SecAggError> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(SecAggError::WrongPhase {
                expected: self.phase.name(),
                got: phase.name(),
            })
        }
    }

    /// Phase 1 input: a client's keys.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] out of phase, for a repeated client, or beyond the quantizer's clients.
    pub fn handle_advertisement(&mut self, msg: KeyAdvertisement) -> Result<(), SecAggError> {
        self.expect(ServerPhase::Advertise)?;
        if self.keys.contains_key(&msg.id) {
            return Err(SecAggError::Duplicate(msg.id));
        }
        if msg.id == u32::MAX || self.keys.len() >= self.config.quantizer.max_clients() {
            return Err(SecAggError::UnknownClient(msg.id));
        }
        self.keys.insert(msg.id, msg);
        Ok(())
    }

    /// Closes phase 1: builds the neighbour graph over the clients that advertised and returns
    /// each one's [`NeighbourKeys`].
    ///
    /// # Errors
    ///
    /// [`SecAggError::TooFewClients`] below three clients (two could unmask each other).
    pub fn close_advertisements(&mut self) -> Result<Vec<(ClientId, NeighbourKeys)>, SecAggError> {
        self.expect(ServerPhase::Advertise)?;
        let n = self.keys.len();
        if n < 3 {
            return Err(SecAggError::TooFewClients { got: n, needed: 3 });
        }
        let mut order: Vec<ClientId> = self.keys.keys().copied().collect();
        order.shuffle(&mut ChaCha20Rng::seed_from_u64(self.config.session));
        let half = self.config.degree / 2;
        let full = self.config.degree >= n - 1 || 2 * half >= n - 1;
        for (pos, &id) in order.iter().enumerate() {
            let neighbours: BTreeSet<ClientId> = if full {
                order.iter().copied().filter(|&c| c != id).collect()
            } else {
                (1..=half)
                    .flat_map(|k| [order[(pos + k) % n], order[(pos + n - k) % n]])
                    .collect()
            };
            self.graph.insert(id, neighbours.into_iter().collect());
        }
        let m = if full { n } else { 2 * half + 1 };
        self.threshold = self.config.threshold(m);
        self.phase = ServerPhase::ShareKeys;
        Ok(self
            .graph
            .iter()
            .map(|(&id, neighbours)| {
                let msg = NeighbourKeys {
                    threshold: self.threshold as u32,
                    neighbours: neighbours.iter().map(|n| self.keys[n].clone()).collect(),
                };
                (id, msg)
            })
            .collect())
    }

    /// Phase 2 input: a client's sealed shares.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] out of phase, for an unknown or repeated client, or a bundle that is
    /// not exactly one sealed share per neighbour.
    pub fn handle_share_bundle(&mut self, msg: ShareBundle) -> Result<(), SecAggError> {
        self.expect(ServerPhase::ShareKeys)?;
        let Some(neighbours) = self.graph.get(&msg.from) else {
            return Err(SecAggError::UnknownClient(msg.from));
        };
        if self.bundles.contains_key(&msg.from) {
            return Err(SecAggError::Duplicate(msg.from));
        }
        let to: BTreeSet<ClientId> = msg.shares.iter().map(|s| s.to).collect();
        let well_formed = msg.shares.len() == neighbours.len()
            && to.iter().copied().eq(neighbours.iter().copied())
            && msg
                .shares
                .iter()
                .all(|s| s.from == msg.from && s.sealed.len() == SEALED_SHARE_BYTES);
        if !well_formed {
            return Err(SecAggError::Malformed {
                client: msg.from,
                reason: "not one sealed share per neighbour".into(),
            });
        }
        self.bundles.insert(msg.from, msg.shares);
        Ok(())
    }

    /// Closes phase 2: the shares each client of `U2` receives from its neighbours in `U2`.
    ///
    /// # Errors
    ///
    /// [`SecAggError::TooFewClients`] when a neighbourhood has fewer than `t` clients left.
    pub fn close_share_bundles(&mut self) -> Result<Vec<(ClientId, ForwardedShares)>, SecAggError> {
        self.expect(ServerPhase::ShareKeys)?;
        let mut out: BTreeMap<ClientId, Vec<SealedShare>> =
            self.bundles.keys().map(|&c| (c, Vec::new())).collect();
        for shares in self.bundles.values() {
            for s in shares {
                if let Some(inbox) = out.get_mut(&s.to) {
                    inbox.push(s.clone());
                }
            }
        }
        if let Some(inbox) = out.values().find(|inbox| inbox.len() + 1 < self.threshold) {
            return Err(SecAggError::TooFewClients {
                got: inbox.len() + 1,
                needed: self.threshold,
            });
        }
        self.sum = vec![0; self.config.vector_len];
        self.phase = ServerPhase::MaskedInput;
        Ok(out
            .into_iter()
            .map(|(c, shares)| (c, ForwardedShares { shares }))
            .collect())
    }

    /// Phase 3 input: a masked input, added to the running sum at once.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] out of phase, for a client not in `U2`, a repeat or a wrong length.
    pub fn handle_masked_input(&mut self, msg: MaskedInput) -> Result<(), SecAggError> {
        self.expect(ServerPhase::MaskedInput)?;
        if !self.bundles.contains_key(&msg.from) {
            return Err(SecAggError::UnknownClient(msg.from));
        }
        if self.masked.contains(&msg.from) {
            return Err(SecAggError::Duplicate(msg.from));
        }
        if msg.masked.len() != 4 * self.config.vector_len {
            return Err(SecAggError::InputLength {
                expected: self.config.vector_len,
                got: msg.masked.len() / 4,
            });
        }
        for (s, w) in self.sum.iter_mut().zip(msg.masked.chunks_exact(4)) {
            *s = s.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        self.masked.insert(msg.from);
        Ok(())
    }

    /// Closes phase 3: tells each client of `U3` which neighbours survived and which dropped.
    ///
    /// # Errors
    ///
    /// [`SecAggError::TooFewClients`] when a neighbourhood has fewer than `t` survivors.
    pub fn close_masked_inputs(&mut self) -> Result<Vec<(ClientId, UnmaskRequest)>, SecAggError> {
        self.expect(ServerPhase::MaskedInput)?;
        let mut requests = BTreeMap::new();
        for &u in &self.masked {
            let in_u2 = self.graph[&u]
                .iter()
                .copied()
                .filter(|v| self.bundles.contains_key(v));
            let (mut survivors, dropped): (Vec<_>, Vec<_>) =
                in_u2.partition(|v| self.masked.contains(v));
            survivors.push(u);
            survivors.sort_unstable();
            if survivors.len() < self.threshold {
                return Err(SecAggError::TooFewClients {
                    got: survivors.len(),
                    needed: self.threshold,
                });
            }
            requests.insert(u, UnmaskRequest { survivors, dropped });
        }
        self.requests = requests.clone();
        self.phase = ServerPhase::Unmask;
        Ok(requests.into_iter().collect())
    }

    /// Phase 4 input: a client's revealed shares.
    ///
    /// # Errors
    ///
    /// [`SecAggError`] out of phase, for a client not asked, a repeat, or shares other than
    /// those asked for.
    pub fn handle_unmask_response(&mut self, msg: UnmaskResponse) -> Result<(), SecAggError> {
        self.expect(ServerPhase::Unmask)?;
        let Some(request) = self.requests.get(&msg.from) else {
            return Err(SecAggError::UnknownClient(msg.from));
        };
        if self.responses.contains_key(&msg.from) {
            return Err(SecAggError::Duplicate(msg.from));
        }
        let point = u64::from(msg.from) + 1;
        let owners = |shares: &[(ClientId, Share)]| -> Vec<ClientId> {
            shares.iter().map(|s| s.0).collect()
        };
        let as_asked = owners(&msg.self_mask_shares) == request.survivors
            && owners(&msg.key_shares) == request.dropped
            && msg
                .self_mask_shares
                .iter()
                .chain(&msg.key_shares)
                .all(|(_, s)| s.x == point);
        if !as_asked {
            return Err(SecAggError::Malformed {
                client: msg.from,
                reason: "revealed shares differ from those asked for".into(),
            });
        }
        self.responses.insert(msg.from, msg);
        Ok(())
    }

    /// Removes every mask and returns the sum of `U3`'s updates.
    ///
    /// # Errors
    ///
    /// [`SecAggError::Reconstruction`] when fewer than `t` shares of a needed secret arrived or
    /// a rebuilt masking secret does not match its advertised public key.
    pub fn finish(&mut self) -> Result<SecureSum, SecAggError> {
        self.expect(ServerPhase::Unmask)?;
        let mut self_shares: BTreeMap<ClientId, Vec<Share>> = BTreeMap::new();
        let mut key_shares: BTreeMap<ClientId, Vec<Share>> = BTreeMap::new();
        for r in self.responses.values() {
            for (owner, s) in &r.self_mask_shares {
                self_shares.entry(*owner).or_default().push(*s);
            }
            for (owner, s) in &r.key_shares {
                key_shares.entry(*owner).or_default().push(*s);
            }
        }
        let rebuild = |client: ClientId, shares: Option<&Vec<Share>>| {
            shamir::combine(shares.map_or(&[][..], Vec::as_slice), self.threshold).map_err(|e| {
                SecAggError::Reconstruction {
                    client,
                    reason: e.to_string(),
                }
            })
        };
        let mut sum = std::mem::take(&mut self.sum);
        for &v in &self.masked {
            let seed = rebuild(v, self_shares.get(&v))?;
            apply_mask(&mut sum, &seed, MaskSign::Subtract);
        }
        let dropped: Vec<ClientId> = self
            .bundles
            .keys()
            .copied()
            .filter(|v| !self.masked.contains(v))
            .collect();
        for v in dropped {
            let keys = KeyPair::from_secret_bytes(rebuild(v, key_shares.get(&v))?);
            if keys.public() != self.keys[&v].mask_public {
                return Err(SecAggError::Reconstruction {
                    client: v,
                    reason: "rebuilt secret does not match the public key".into(),
                });
            }
            for &w in self.graph[&v].iter().filter(|w| self.masked.contains(w)) {
                let seed = keys
                    .agree(
                        &self.keys[&w].mask_public,
                        self.config.session,
                        MASK_PURPOSE,
                        v,
                        w,
                    )
                    .ok_or(SecAggError::BadKey(w))?;
                // w added its mask for v with w's sign; take it back out.
                apply_mask(&mut sum, &seed, MaskSign::pairwise(w, v).flip());
            }
        }
        self.phase = ServerPhase::Finished;
        let clients: Vec<ClientId> = self.masked.iter().copied().collect();
        Ok(SecureSum {
            sum: self.config.quantizer.dequantize_sum(&sum, clients.len()),
            clients,
        })
    }
}
