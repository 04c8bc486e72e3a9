//! Weight ↔ conductance mapping, one scale per crossbar block (docs/model.md §2; AIHWKIT
//! `SinglePairConductanceConverter` and `SingleDeviceConductanceConverter`).
use super::Device;

/// Smallest |W|max used to form a scale, as AIHWKIT's `_ZERO_CLIP` (avoids 0/0 on empty blocks).
const ZERO_CLIP: f32 = 1e-7;

/// How a weight is stored in conductances.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightConverter {
    /// w = (g⁺ − g⁻)/s with g± = clamp(±s·w, 0, g_max), s = g_max/max|W| (µS per weight unit).
    DifferentialPair {
        /// Largest conductance in µS.
        g_max_us: f32,
    },
    /// One device: g = g_mid + s·w, s = (g_max − g_min)/(2·max|W|), g_mid = (g_max + g_min)/2,
    /// read against a reference at g_mid (ReRAM CMO).
    SingleDevice {
        /// Smallest conductance in µS.
        g_min_us: f32,
        /// Largest conductance in µS.
        g_max_us: f32,
    },
}

impl WeightConverter {
    /// The converter a device asks for through [`Device::differential`].
    pub fn for_device(device: &dyn Device) -> Self {
        if device.differential() {
            Self::DifferentialPair {
                g_max_us: device.g_max_us(),
            }
        } else {
            Self::SingleDevice {
                g_min_us: device.g_min_us(),
                g_max_us: device.g_max_us(),
            }
        }
    }

    /// Devices per weight (2 for a pair, 1 for a single device).
    pub fn devices_per_weight(&self) -> usize {
        match self {
            Self::DifferentialPair { .. } => 2,
            Self::SingleDevice { .. } => 1,
        }
    }

    /// Conductance scale s (µS per weight unit) of a block whose largest |w| is `abs_max`.
    pub fn scale(&self, abs_max: f32) -> f32 {
        let abs_max = abs_max.max(ZERO_CLIP);
        match *self {
            Self::DifferentialPair { g_max_us } => g_max_us / abs_max,
            Self::SingleDevice { g_min_us, g_max_us } => (g_max_us - g_min_us) / (2.0 * abs_max),
        }
    }

    /// Target conductances (µS) of weight `w` under scale `s`; unused slots are 0.
    #[inline]
    pub fn to_conductances(&self, w: f32, s: f32) -> [f32; 2] {
        match *self {
            Self::DifferentialPair { g_max_us } => {
                let sw = s * w;
                [sw.clamp(0.0, g_max_us), (-sw).clamp(0.0, g_max_us)]
            }
            Self::SingleDevice { g_min_us, g_max_us } => {
                let mid = 0.5 * (g_max_us + g_min_us);
                [(mid + s * w).clamp(g_min_us, g_max_us), 0.0]
            }
        }
    }

    /// Weight represented by conductances `g` (µS) under scale `s`.
    #[inline]
    pub fn to_weight(&self, g: [f32; 2], s: f32) -> f32 {
        match *self {
            Self::DifferentialPair { .. } => (g[0] - g[1]) / s,
            Self::SingleDevice { g_min_us, g_max_us } => (g[0] - 0.5 * (g_max_us + g_min_us)) / s,
        }
    }
}
