//! What the app tells the SDK about the phone (power, network, use, heat) and which policy turns
//! that into "training may run now". The policies themselves live in `fedtune-client`; this
//! module only gives them foreign-language shapes.

use std::sync::Arc;

use fedtune_client::policy;

/// The device's state as the app sees it (Android's `BatteryManager`, `ConnectivityManager`,
/// `PowerManager.getCurrentThermalStatus`; iOS's `UIDevice` battery state, `NWPathMonitor`,
/// `ProcessInfo.thermalState`). Send a new value with
/// `FedtuneClient::set_conditions` whenever one of them
/// changes.
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Record)]
pub struct DeviceConditions {
    /// On external power.
    pub charging: bool,
    /// Battery level, 0.0 to 1.0.
    pub battery_level: f32,
    /// On an unmetered network (Android: `NET_CAPABILITY_NOT_METERED`; iOS: not
    /// `NWPath.isExpensive`).
    pub unmetered_network: bool,
    /// The user is not using the device (screen off, or the app's own notion of idle).
    pub idle: bool,
    /// Thermal pressure.
    pub thermal: ThermalState,
}

impl From<DeviceConditions> for policy::DeviceConditions {
    fn from(c: DeviceConditions) -> Self {
        Self {
            charging: c.charging,
            battery_level: c.battery_level,
            unmetered_network: c.unmetered_network,
            idle: c.idle,
            thermal: c.thermal.into(),
        }
    }
}

/// Thermal pressure, in the four levels both Android's and iOS's thermal APIs reduce to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
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

impl From<ThermalState> for policy::ThermalState {
    fn from(t: ThermalState) -> Self {
        match t {
            ThermalState::Nominal => Self::Nominal,
            ThermalState::Fair => Self::Fair,
            ThermalState::Serious => Self::Serious,
            ThermalState::Critical => Self::Critical,
        }
    }
}

/// When the SDK may train. Until the app sends conditions, the SDK assumes the device is
/// unplugged on a metered network (it trains only under `TrainingPolicy::Always`).
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Enum)]
pub enum TrainingPolicy {
    /// The usual mobile policy: charging, on an unmetered network, idle, not hot, and the
    /// battery at least `min_battery` (0.0 to 1.0).
    WhenChargingOnUnmeteredIdle {
        /// Lowest battery level at which training runs, even while charging.
        min_battery: f32,
    },
    /// Whenever started (development, kiosks, tests).
    Always,
}

impl TrainingPolicy {
    /// The client SDK's policy object.
    pub(crate) fn build(self) -> Arc<dyn policy::TrainingPolicy> {
        match self {
            Self::WhenChargingOnUnmeteredIdle { min_battery } => {
                Arc::new(policy::ChargingUnmeteredIdle { min_battery })
            }
            Self::Always => Arc::new(policy::Always),
        }
    }
}

/// What the SDK assumes before the app reports anything: the conservative case, so a mobile
/// policy never trains on a phone whose state it has not been told.
pub(crate) fn unknown_conditions() -> policy::DeviceConditions {
    policy::DeviceConditions {
        charging: false,
        battery_level: 0.0,
        unmetered_network: false,
        idle: false,
        thermal: policy::ThermalState::Nominal,
    }
}
