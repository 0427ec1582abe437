//! Misbehaving devices: what an attacker does to the update it reports, which devices of the
//! fleet are attackers (a profile's own behaviour, or a seeded fraction of all devices), and
//! the tampering itself, applied to the report a virtual device built with the SDK's own
//! training code.
//!
//! An update is what a round changes: for LoRA and FedSpine the adapter the device uploads
//! minus the global adapter it received, for FedKSeed its accumulated scalar gradients (which
//! are already a change). An attacker reports `global + f(update)` in place of
//! `global + update`, so the server sees a well-formed report of the right shape, as a real
//! poisoning device would send.

use fedtune_shared::lora::adapter::AdapterWeights;
use fedtune_shared::robust::flat::{FlatError, adapter_delta, apply_adapter_delta};
use fedtune_shared::zo::round::ClientReport;
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::fleet::DeviceProfile;

/// What a device does with its update before reporting it. In TOML: `"honest"`,
/// `"sign_flip"`, `{ scaled = { factor = -4.0 } }` or `{ noise = { std = 0.01 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Behaviour {
    /// Reports what it trained.
    #[default]
    Honest,
    /// Multiplies its update by `factor` (`-4`: a boosted step the other way; `10`: a boosted
    /// step its own way, as a model-replacement attack).
    Scaled {
        /// The multiplier.
        factor: f64,
    },
    /// Negates its update (`Scaled { factor: -1 }`).
    SignFlip,
    /// Replaces its update by Gaussian noise: every coordinate drawn from `N(0, std²)`.
    Noise {
        /// Standard deviation of each coordinate.
        std: f64,
    },
}

/// Why a behaviour or an attacker setting cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AttackError {
    /// A value out of range.
    #[error("attackers: {0}")]
    Invalid(String),
    /// The trained adapter does not fit the global adapter it started from.
    #[error("attacker's update: {0}")]
    Shape(#[from] FlatError),
}

impl Behaviour {
    /// The behaviour's name in tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Honest => "honest",
            Self::Scaled { .. } => "scaled",
            Self::SignFlip => "sign_flip",
            Self::Noise { .. } => "noise",
        }
    }

    /// True for every behaviour but [`Behaviour::Honest`].
    pub fn is_attack(&self) -> bool {
        *self != Self::Honest
    }

    /// Checks the behaviour's numbers.
    ///
    /// # Errors
    ///
    /// [`AttackError::Invalid`] for a non-finite factor or a negative or non-finite standard
    /// deviation.
    pub fn validate(&self) -> Result<(), AttackError> {
        match *self {
            Self::Scaled { factor } if !factor.is_finite() => Err(AttackError::Invalid(format!(
                "scaled: factor must be a finite number, not {factor}"
            ))),
            Self::Noise { std } if !(std.is_finite() && std >= 0.0) => Err(AttackError::Invalid(
                format!("noise: std must be a non-negative number, not {std}"),
            )),
            _ => Ok(()),
        }
    }

    /// `update` as this device reports it; `seed` draws the noise.
    pub fn tamper(&self, update: &mut [f32], seed: u64) {
        match *self {
            Self::Honest => {}
            Self::Scaled { factor } => update.iter_mut().for_each(|v| *v *= factor as f32),
            Self::SignFlip => update.iter_mut().for_each(|v| *v = -*v),
            Self::Noise { std } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                // `validate` keeps std finite and non-negative; anything else sends nothing.
                let Ok(normal) = Normal::new(0.0f32, std as f32) else {
                    update.fill(0.0);
                    return;
                };
                update.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
            }
        }
    }

    /// The adapter this device uploads after training `trained` from `global`:
    /// `global + f(trained − global)`.
    ///
    /// # Errors
    ///
    /// [`AttackError::Shape`] when `trained` does not have `global`'s rank, layers and shapes.
    pub fn tamper_adapter(
        &self,
        global: &AdapterWeights,
        trained: AdapterWeights,
        seed: u64,
    ) -> Result<AdapterWeights, AttackError> {
        if !self.is_attack() {
            return Ok(trained);
        }
        let mut update = adapter_delta(global, &trained)?;
        self.tamper(&mut update, seed);
        Ok(apply_adapter_delta(global, &update)?)
    }

    /// A FedKSeed report as this device sends it: its scalar gradients (and FedKSeed-Pro's
    /// per-step values) tampered with.
    pub fn tamper_seed_grads(&self, report: &mut ClientReport, seed: u64) {
        if !self.is_attack() {
            return;
        }
        let mut values: Vec<f32> = report.seed_grads.iter().map(|&(_, g)| g).collect();
        self.tamper(&mut values, seed);
        for ((_, g), v) in report.seed_grads.iter_mut().zip(values) {
            *g = v;
        }
        let mut steps: Vec<f32> = report.step_grads.iter().map(|&(_, g)| g).collect();
        self.tamper(&mut steps, seed ^ 0x5bd1_e995);
        for ((_, g), v) in report.step_grads.iter_mut().zip(steps) {
            *g = v;
        }
    }
}

impl std::fmt::Display for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scaled { factor } => write!(f, "scaled ×{factor}"),
            Self::Noise { std } => write!(f, "noise (std {std})"),
            other => f.write_str(other.name()),
        }
    }
}

/// A fraction of the fleet made attackers (`[fleet] attackers = { fraction = 0.2, behaviour =
/// "sign_flip" }`), whatever their profiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackerSpec {
    /// Fraction of all devices that attack, in `[0, 1]`: `round(fraction × clients)` devices,
    /// drawn with the simulation's seed.
    pub fraction: f64,
    /// What they do.
    pub behaviour: Behaviour,
}

impl AttackerSpec {
    /// Checks the fraction and the behaviour.
    ///
    /// # Errors
    ///
    /// [`AttackError::Invalid`] for a fraction outside `[0, 1]` or a bad behaviour.
    pub fn validate(&self) -> Result<(), AttackError> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(AttackError::Invalid(format!(
                "fraction must be in [0, 1], not {}",
                self.fraction
            )));
        }
        self.behaviour.validate()
    }

    /// How many of `clients` devices attack.
    pub fn count(&self, clients: usize) -> usize {
        ((self.fraction * clients as f64).round() as usize).min(clients)
    }
}

/// Each device's behaviour: its profile's (`profiles[assignment[i]]`), except for the
/// `spec.count(clients)` devices drawn with `seed`, which take `spec`'s. The draw depends only
/// on `seed` and the number of devices, so every run of a simulation (and every algorithm
/// compared in it) has the same attackers.
pub fn behaviours(
    profiles: &[DeviceProfile],
    assignment: &[usize],
    spec: Option<&AttackerSpec>,
    seed: u64,
) -> Vec<Behaviour> {
    let mut out: Vec<Behaviour> = assignment
        .iter()
        .map(|&p| profiles.get(p).map_or(Behaviour::Honest, |p| p.behaviour))
        .collect();
    if let Some(spec) = spec {
        // A stream of its own: adding attackers changes no other draw of the simulation.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa77a_c4e5_0000_0001);
        for i in sample(&mut rng, out.len(), spec.count(out.len())) {
            out[i] = spec.behaviour;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSpec;

    #[test]
    fn behaviours_parse_from_toml() {
        #[derive(Deserialize)]
        struct T {
            a: AttackerSpec,
            b: AttackerSpec,
            c: AttackerSpec,
        }
        let t: T = toml::from_str(
            "a = { fraction = 0.2, behaviour = \"sign_flip\" }\n\
             b = { fraction = 0.1, behaviour = { scaled = { factor = -4.0 } } }\n\
             c = { fraction = 0.5, behaviour = { noise = { std = 0.01 } } }\n",
        )
        .unwrap();
        assert_eq!(t.a.behaviour, Behaviour::SignFlip);
        assert_eq!(t.b.behaviour, Behaviour::Scaled { factor: -4.0 });
        assert_eq!(t.c.behaviour, Behaviour::Noise { std: 0.01 });
        let e = toml::from_str::<AttackerSpec>("fraction = 0.2\nbehaviour = \"evil\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil"), "{e}");
    }

    #[test]
    fn bad_settings_are_refused() {
        let spec = |fraction, behaviour| AttackerSpec {
            fraction,
            behaviour,
        };
        assert!(spec(1.5, Behaviour::SignFlip).validate().is_err());
        assert!(spec(-0.1, Behaviour::SignFlip).validate().is_err());
        assert!(
            spec(0.2, Behaviour::Scaled { factor: f64::NAN })
                .validate()
                .is_err()
        );
        assert!(
            spec(0.2, Behaviour::Noise { std: -1.0 })
                .validate()
                .is_err()
        );
        assert!(
            spec(0.2, Behaviour::Scaled { factor: -4.0 })
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn tampering_scales_flips_and_replaces() {
        let mut u = vec![1.0f32, -2.0];
        Behaviour::Scaled { factor: -4.0 }.tamper(&mut u, 0);
        assert_eq!(u, [-4.0, 8.0]);
        Behaviour::SignFlip.tamper(&mut u, 0);
        assert_eq!(u, [4.0, -8.0]);
        Behaviour::Honest.tamper(&mut u, 0);
        assert_eq!(u, [4.0, -8.0]);
        let mut a = vec![0.0f32; 1000];
        let mut b = vec![0.0f32; 1000];
        Behaviour::Noise { std: 2.0 }.tamper(&mut a, 7);
        Behaviour::Noise { std: 2.0 }.tamper(&mut b, 7);
        assert_eq!(a, b, "seeded");
        let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
        assert!((var - 4.0).abs() < 0.6, "variance {var}");
    }

    #[test]
    fn seed_grads_are_tampered_in_place() {
        let mut report = ClientReport {
            round: 3,
            seed_grads: vec![(1, 0.5), (7, -1.0)],
            step_grads: vec![(1, 0.25), (1, 0.25), (7, -1.0)],
            samples: 4,
        };
        Behaviour::Scaled { factor: 10.0 }.tamper_seed_grads(&mut report, 1);
        assert_eq!(report.seed_grads, [(1, 5.0), (7, -10.0)]);
        assert_eq!(report.step_grads, [(1, 2.5), (1, 2.5), (7, -10.0)]);
        assert_eq!((report.round, report.samples), (3, 4));
    }

    #[test]
    fn a_fraction_of_the_fleet_attacks_deterministically() {
        let profiles = FleetSpec::default().profiles().unwrap();
        let assignment = crate::fleet::assign(&profiles, 50);
        let spec = AttackerSpec {
            fraction: 0.2,
            behaviour: Behaviour::SignFlip,
        };
        let a = behaviours(&profiles, &assignment, Some(&spec), 3);
        assert_eq!(a.iter().filter(|b| b.is_attack()).count(), 10);
        assert_eq!(a, behaviours(&profiles, &assignment, Some(&spec), 3));
        assert_ne!(a, behaviours(&profiles, &assignment, Some(&spec), 4));
        assert!(
            behaviours(&profiles, &assignment, None, 3)
                .iter()
                .all(|b| !b.is_attack())
        );
    }

    #[test]
    fn a_profile_can_be_an_attacker() {
        let mut profiles = FleetSpec::Mix {
            mix: "uniform".into(),
        }
        .profiles()
        .unwrap();
        let mut attacker = profiles[0].clone();
        attacker.name = "attacker".into();
        attacker.behaviour = Behaviour::Scaled { factor: -4.0 };
        profiles[0].share = 4;
        profiles.push(attacker);
        let assignment = crate::fleet::assign(&profiles, 10);
        let b = behaviours(&profiles, &assignment, None, 0);
        assert_eq!(b.iter().filter(|b| b.is_attack()).count(), 2);
    }
}
