//! The simulated device fleet: what each virtual device is like (speed, memory, bandwidth,
//! availability, reliability), how profiles are given (a table or a named mix), and how a
//! device's round time is simulated from what this machine measured.

use serde::{Deserialize, Serialize};

/// One kind of device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// A name for tables and logs (`jetson-tx2`).
    pub name: String,
    /// Compute speed relative to this machine: `0.25` takes four times as long for the same
    /// work. The measured compute time is divided by it.
    pub speed: f64,
    /// Memory the device can give to training, in bytes (`None`: unlimited). A device whose
    /// task needs more (its model's weights and adapter) fails the round.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Upload bandwidth in bytes per second.
    pub up_bytes_per_s: f64,
    /// Download bandwidth in bytes per second.
    pub down_bytes_per_s: f64,
    /// Probability that the device is available (charging, idle, on Wi-Fi) in a round.
    #[serde(default = "always")]
    pub availability: f64,
    /// Probability that a device that took a task drops out before reporting.
    #[serde(default)]
    pub dropout: f64,
    /// How many devices of this profile the fleet has, relative to the other profiles (a mix
    /// of 30/40/10 gives 3/8, 4/8 and 1/8 of the clients).
    #[serde(default = "one")]
    pub share: u32,
}

fn always() -> f64 {
    1.0
}

fn one() -> u32 {
    1
}

/// Why a fleet cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// No profile, or every share is zero.
    #[error("the fleet has no devices")]
    Empty,
    /// A named mix this version does not know.
    #[error("unknown fleet mix {0:?} (known: {known})", known = MIXES.join(", "))]
    UnknownMix(String),
    /// A profile with an impossible value.
    #[error("profile {name:?}: {problem}")]
    Invalid {
        /// The profile.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Names of the built-in mixes.
pub const MIXES: [&str; 3] = ["uniform", "three-speeds", "fedspine-testbed"];

/// How the configuration gives the fleet: a named mix or a table of profiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FleetSpec {
    /// A named mix ([`MIXES`]).
    Mix {
        /// The mix's name.
        mix: String,
    },
    /// Profiles with their shares.
    Table {
        /// The profiles.
        profiles: Vec<DeviceProfile>,
    },
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self::Mix {
            mix: "fedspine-testbed".into(),
        }
    }
}

const MB: f64 = 1e6;

impl FleetSpec {
    /// The profiles of the fleet, checked.
    pub fn profiles(&self) -> Result<Vec<DeviceProfile>, FleetError> {
        let profiles = match self {
            Self::Mix { mix } => named_mix(mix)?,
            Self::Table { profiles } => profiles.clone(),
        };
        if profiles.iter().map(|p| u64::from(p.share)).sum::<u64>() == 0 {
            return Err(FleetError::Empty);
        }
        for p in &profiles {
            let bad = |problem: &str| FleetError::Invalid {
                name: p.name.clone(),
                problem: problem.into(),
            };
            if !(p.speed.is_finite() && p.speed > 0.0) {
                return Err(bad("speed must be a positive number"));
            }
            if !(p.up_bytes_per_s > 0.0 && p.down_bytes_per_s > 0.0) {
                return Err(bad("bandwidths must be positive"));
            }
            if !(0.0..=1.0).contains(&p.availability) || !(0.0..=1.0).contains(&p.dropout) {
                return Err(bad("availability and dropout are probabilities"));
            }
        }
        Ok(profiles)
    }
}

/// A built-in mix. The speeds of `fedspine-testbed` follow the ratios of FedSpine's testbed
/// (Jetson TX2 / Xavier NX / AGX Xavier, roughly 1 : 2 : 4 in training throughput) with
/// this machine as the fastest board; bandwidths are those of a phone on a congested cell
/// link, on home Wi-Fi and on a wired link.
fn named_mix(name: &str) -> Result<Vec<DeviceProfile>, FleetError> {
    let profile = |name: &str, speed, up, down, availability, dropout, share| DeviceProfile {
        name: name.into(),
        speed,
        memory_bytes: None,
        up_bytes_per_s: up * MB,
        down_bytes_per_s: down * MB,
        availability,
        dropout,
        share,
    };
    match name {
        "uniform" => Ok(vec![profile("host", 1.0, 12.5, 12.5, 1.0, 0.0, 1)]),
        "three-speeds" => Ok(vec![
            profile("slow", 0.25, 1.0, 5.0, 1.0, 0.0, 1),
            profile("medium", 0.5, 5.0, 20.0, 1.0, 0.0, 1),
            profile("fast", 1.0, 12.5, 50.0, 1.0, 0.0, 1),
        ]),
        "fedspine-testbed" => Ok(vec![
            profile("jetson-tx2", 0.25, 1.0, 5.0, 0.8, 0.05, 30),
            profile("xavier-nx", 0.5, 5.0, 20.0, 0.9, 0.02, 40),
            profile("agx-xavier", 1.0, 12.5, 50.0, 0.95, 0.01, 10),
        ]),
        other => Err(FleetError::UnknownMix(other.into())),
    }
}

/// Assigns a profile to each of `clients` devices in proportion to the shares: client `i`
/// gets the profile whose cumulative share covers `i`'s position, so every profile is spread
/// in blocks and the assignment does not depend on any random draw.
pub fn assign(profiles: &[DeviceProfile], clients: usize) -> Vec<usize> {
    let total: u64 = profiles.iter().map(|p| u64::from(p.share)).sum();
    if total == 0 {
        return vec![0; clients];
    }
    (0..clients)
        .map(|i| {
            // The position of client i on [0, total), largest-remainder style.
            let at = (i as u64 * total) / clients.max(1) as u64;
            let mut acc = 0u64;
            profiles
                .iter()
                .position(|p| {
                    acc += u64::from(p.share);
                    at < acc
                })
                .unwrap_or(profiles.len() - 1)
        })
        .collect()
}

/// A device's simulated round: compute measured on this machine scaled by its speed, plus its
/// transfers over its links.
pub fn round_time_s(
    profile: &DeviceProfile,
    compute_s: f64,
    down_bytes: u64,
    up_bytes: u64,
) -> f64 {
    compute_s / profile.speed
        + down_bytes as f64 / profile.down_bytes_per_s
        + up_bytes as f64 / profile.up_bytes_per_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_set_proportions() {
        let profiles = FleetSpec::default().profiles().unwrap();
        let a = assign(&profiles, 80);
        let count = |k| a.iter().filter(|&&x| x == k).count();
        assert_eq!((count(0), count(1), count(2)), (30, 40, 10));
        let a = assign(&profiles, 7);
        assert_eq!(a.len(), 7);
        assert!(a.contains(&2) || a.iter().filter(|&&x| x == 0).count() >= 2);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let mut p = named_mix("uniform").unwrap();
        p[0].speed = 0.0;
        let spec = FleetSpec::Table { profiles: p };
        assert!(matches!(spec.profiles(), Err(FleetError::Invalid { .. })));
        let spec = FleetSpec::Mix { mix: "nope".into() };
        assert!(matches!(spec.profiles(), Err(FleetError::UnknownMix(_))));
    }

    #[test]
    fn round_time_adds_compute_and_transfers() {
        let p = &named_mix("three-speeds").unwrap()[0];
        // 2 s of host compute at a quarter speed, 5 MB down at 5 MB/s, 1 MB up at 1 MB/s.
        let t = round_time_s(p, 2.0, 5_000_000, 1_000_000);
        assert!((t - (8.0 + 1.0 + 1.0)).abs() < 1e-9);
    }
}
