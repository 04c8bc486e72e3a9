//! Energy accounting per layer and per component.
use serde::{Deserialize, Serialize};

/// Where the energy of a token goes. The first four are the analog tiles; the rest is digital or data movement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Crossbar array read of every block MVM.
    Crossbar,
    /// DAC input conversions.
    Dac,
    /// ADC output conversions.
    Adc,
    /// Switching a stack's periphery between tiers.
    TierSwitch,
    /// Attention projections, scores over the KV cache, and their on-chip weight/KV reads.
    DigitalAttention,
    /// Experts (routed, shared, dense MLPs) computed digitally, with their on-chip weight reads.
    DigitalExperts,
    /// Router products and softmax.
    DigitalRouter,
    /// RMSNorms and activation functions.
    DigitalNormAct,
    /// Summing crossbar partial sums and the weighted expert outputs.
    Accumulation,
    /// LM head product.
    LmHead,
    /// Moving crossbar inputs and outputs over the on-chip network.
    Interconnect,
    /// Reads from off-chip memory of digital weights and KV cache that do not fit on chip.
    OffChip,
    /// Static power of the digital units over the time a token occupies the chip.
    Static,
}

/// Number of [`Component`]s.
pub const N_COMPONENTS: usize = 13;

impl Component {
    /// All components, in breakdown order.
    pub const ALL: [Component; N_COMPONENTS] = [
        Component::Crossbar,
        Component::Dac,
        Component::Adc,
        Component::TierSwitch,
        Component::DigitalAttention,
        Component::DigitalExperts,
        Component::DigitalRouter,
        Component::DigitalNormAct,
        Component::Accumulation,
        Component::LmHead,
        Component::Interconnect,
        Component::OffChip,
        Component::Static,
    ];

    /// Short label for tables and legends.
    pub fn label(self) -> &'static str {
        match self {
            Component::Crossbar => "crossbar",
            Component::Dac => "DAC",
            Component::Adc => "ADC",
            Component::TierSwitch => "tier switch",
            Component::DigitalAttention => "digital attention",
            Component::DigitalExperts => "digital experts",
            Component::DigitalRouter => "router",
            Component::DigitalNormAct => "norms + activations",
            Component::Accumulation => "accumulation",
            Component::LmHead => "LM head",
            Component::Interconnect => "interconnect",
            Component::OffChip => "off-chip",
            Component::Static => "static",
        }
    }

    /// Whether the energy is spent in the analog tiles.
    pub fn is_analog(self) -> bool {
        matches!(
            self,
            Component::Crossbar | Component::Dac | Component::Adc | Component::TierSwitch
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Joules per component, one row per layer plus one for work outside the layers (LM head, static power).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// `per_layer[l][c]`: joules of component `c` ([`Component::ALL`] order) in layer `l`.
    pub per_layer: Vec<[f64; N_COMPONENTS]>,
    /// Joules not tied to a layer.
    pub global: [f64; N_COMPONENTS],
}

impl Breakdown {
    /// An all-zero breakdown for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            per_layer: vec![[0.0; N_COMPONENTS]; layers],
            global: [0.0; N_COMPONENTS],
        }
    }

    /// Adds `joules` to component `c` of layer `layer` (`None`: outside the layers).
    pub fn add(&mut self, layer: Option<usize>, c: Component, joules: f64) {
        match layer {
            Some(l) => self.per_layer[l][c.index()] += joules,
            None => self.global[c.index()] += joules,
        }
    }

    /// Joules of one component over all layers and the global row.
    pub fn component(&self, c: Component) -> f64 {
        self.per_layer.iter().map(|r| r[c.index()]).sum::<f64>() + self.global[c.index()]
    }

    /// Joules of one layer over all components.
    pub fn layer(&self, l: usize) -> f64 {
        self.per_layer[l].iter().sum()
    }

    /// The total, defined as the sum of [`Breakdown::component`] over [`Component::ALL`], so the components add up
    /// to it exactly.
    pub fn total(&self) -> f64 {
        Component::ALL.iter().map(|&c| self.component(c)).sum()
    }

    /// Joules spent in the analog tiles.
    pub fn analog(&self) -> f64 {
        Component::ALL
            .iter()
            .filter(|c| c.is_analog())
            .map(|&c| self.component(c))
            .sum()
    }

    /// Every entry divided by `n` (e.g. totals over a run → per token).
    pub fn scaled(&self, factor: f64) -> Self {
        let scale = |r: &[f64; N_COMPONENTS]| r.map(|v| v * factor);
        Self {
            per_layer: self.per_layer.iter().map(scale).collect(),
            global: scale(&self.global),
        }
    }
}
