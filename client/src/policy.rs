//! When a device may train: the app reports the device's conditions, a policy decides. The
//! SDK asks the policy before it connects and before each plan it accepts; a round already
//! started runs to its end (FedKSeed rounds are short, and the report would be lost otherwise).

use serde::{Deserialize, Serialize};

/// The device's state as the app sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeviceConditions {
    /// On external power.
    pub charging: bool,
    /// Battery level, 0.0 to 1.0.
    pub battery_level: f32,
    /// On an unmetered network (Wi-Fi, Ethernet).
    pub unmetered_network: bool,
    /// The user is not using the device.
    pub idle: bool,
    /// Thermal state.
    pub thermal: ThermalState,
}

impl Default for DeviceConditions {
    /// A plugged-in, idle machine on a wired network (what a Linux box running the CLI is).
    fn default() -> Self {
        Self {
            charging: true,
            battery_level: 1.0,
            unmetered_network: true,
            idle: true,
            thermal: ThermalState::Nominal,
        }
    }
}

/// Thermal pressure, as Android's and iOS's thermal APIs report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThermalState {
    /// No pressure.
    Nominal,
    /// Warm; work is still fine.
    Fair,
    /// Hot: heavy work should stop.
    Serious,
    /// Critical.
    Critical,
}

/// Decides whether training may run under some conditions.
pub trait TrainingPolicy: Send + Sync {
    /// `Ok(())` when training may run, or the reason it may not.
    fn allows(&self, conditions: &DeviceConditions) -> Result<(), &'static str>;
}

/// The usual mobile policy: charging, on an unmetered network, idle, not hot, battery at
/// least `min_battery`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChargingUnmeteredIdle {
    /// Lowest battery level at which training runs (even while charging).
    pub min_battery: f32,
}

impl Default for ChargingUnmeteredIdle {
    fn default() -> Self {
        Self { min_battery: 0.2 }
    }
}

impl TrainingPolicy for ChargingUnmeteredIdle {
    fn allows(&self, c: &DeviceConditions) -> Result<(), &'static str> {
        if !c.charging {
            return Err("not charging");
        }
        if !c.unmetered_network {
            return Err("on a metered network");
        }
        if !c.idle {
            return Err("device in use");
        }
        if matches!(c.thermal, ThermalState::Serious | ThermalState::Critical) {
            return Err("device too hot");
        }
        if c.battery_level < self.min_battery {
            return Err("battery too low");
        }
        Ok(())
    }
}

/// Trains whenever asked (servers, tests, the Linux CLI).
#[derive(Debug, Clone, Copy, Default)]
pub struct Always;

impl TrainingPolicy for Always {
    fn allows(&self, _: &DeviceConditions) -> Result<(), &'static str> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mobile_policy_refuses_each_condition() {
        let policy = ChargingUnmeteredIdle::default();
        let ok = DeviceConditions::default();
        assert!(policy.allows(&ok).is_ok());
        let cases: [(DeviceConditions, &str); 5] = [
            (
                DeviceConditions {
                    charging: false,
                    ..ok
                },
                "not charging",
            ),
            (
                DeviceConditions {
                    unmetered_network: false,
                    ..ok
                },
                "on a metered network",
            ),
            (DeviceConditions { idle: false, ..ok }, "device in use"),
            (
                DeviceConditions {
                    thermal: ThermalState::Serious,
                    ..ok
                },
                "device too hot",
            ),
            (
                DeviceConditions {
                    battery_level: 0.1,
                    ..ok
                },
                "battery too low",
            ),
        ];
        for (c, reason) in cases {
            assert_eq!(policy.allows(&c), Err(reason));
        }
    }
}
