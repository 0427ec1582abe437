//! The virtual devices of a run: each one's identity (a key derived from the run's seed, so
//! device ids are the same on every run and in both transports), its profile and its data,
//! held as indices into one shared table of tokenised examples. An idle virtual device costs
//! its index list and a few dozen bytes.

use fedtune_client::trainer::TrainingData;
use fedtune_shared::lora::train::TrainExample;
use fedtune_shared::protocol::{DeviceId, Digest, SigningKey};

/// One virtual device.
#[derive(Debug, Clone)]
pub struct VirtualClient {
    /// A name for tables (a role, or `client-17`).
    pub name: String,
    /// Seed of its Ed25519 key.
    pub key_seed: [u8; 32],
    /// Its id (from its key).
    pub device: DeviceId,
    /// Index of its profile in the fleet.
    pub profile: usize,
    /// Its training examples: indices into [`Population::examples`].
    pub items: Vec<u32>,
}

/// Every virtual device of a run and the data they share.
#[derive(Debug, Clone)]
pub struct Population {
    /// All training examples, tokenised once.
    pub examples: Vec<TrainExample>,
    /// The devices.
    pub clients: Vec<VirtualClient>,
    /// Held-out examples for evaluation (never trained on).
    pub heldout: Vec<TrainExample>,
    /// Held-out instructions for Rouge-L (instruction data only).
    pub heldout_answers: Vec<fedtune_shared::data::example::Example>,
    /// Padding token of batches.
    pub pad_id: u32,
    /// Whether the examples are instructions (loss on responses only).
    pub instruction: bool,
}

/// Why a population cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PopulationError {
    /// A key could not be made.
    #[error("device key: {0}")]
    Key(String),
    /// A device has no data.
    #[error("client {0} has no training data")]
    NoData(String),
    /// An item index points past the examples.
    #[error("client {client} refers to example {item}, past the {len} examples")]
    BadItem {
        /// The client.
        client: String,
        /// The index.
        item: u32,
        /// Examples there are.
        len: usize,
    },
}

/// The key seed of client `index` of a run seeded by `seed`: SHA-256(label ‖ seed ‖ index).
pub fn key_seed(seed: u64, index: usize) -> [u8; 32] {
    let mut bytes = b"fedtune-simulated-device".to_vec();
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(&(index as u64).to_le_bytes());
    Digest::of(&bytes).0
}

impl Population {
    /// A population of clients named `names`, client `i` holding `items[i]` and having profile
    /// `profiles[i]`, keys derived from `seed`.
    pub fn new(
        examples: Vec<TrainExample>,
        names: Vec<String>,
        items: Vec<Vec<u32>>,
        profiles: &[usize],
        heldout: Vec<TrainExample>,
        pad_id: u32,
        seed: u64,
    ) -> Result<Self, PopulationError> {
        let mut clients = Vec::with_capacity(names.len());
        for (i, (name, items)) in names.into_iter().zip(items).enumerate() {
            if items.is_empty() {
                return Err(PopulationError::NoData(name));
            }
            if let Some(&item) = items.iter().find(|&&x| x as usize >= examples.len()) {
                return Err(PopulationError::BadItem {
                    client: name,
                    item,
                    len: examples.len(),
                });
            }
            let key_seed = key_seed(seed, i);
            let key = SigningKey::from_seed(&key_seed)
                .map_err(|e| PopulationError::Key(e.to_string()))?;
            clients.push(VirtualClient {
                name,
                key_seed,
                device: key.public_key().device_id(),
                profile: profiles.get(i).copied().unwrap_or(0),
                items,
            });
        }
        let instruction = examples.iter().any(|e| e.prompt_len > 0);
        Ok(Self {
            examples,
            clients,
            heldout,
            heldout_answers: Vec::new(),
            pad_id,
            instruction,
        })
    }

    /// The training data of client `index`, as the device SDK takes it.
    pub fn training_data(&self, index: usize) -> TrainingData {
        let items = self.clients.get(index).map_or(&[][..], |c| &c.items[..]);
        let examples: Vec<TrainExample> = items
            .iter()
            .filter_map(|&i| self.examples.get(i as usize).cloned())
            .collect();
        TrainingData {
            sequences: examples.iter().map(|e| e.ids.clone()).collect(),
            examples: if self.instruction {
                examples
            } else {
                Vec::new()
            },
            pad_id: self.pad_id,
        }
    }
}
