//! Energy accounting per layer and per component, serialised with every component named.
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

/// Where the energy of a token goes. The first four are the analog tiers; the rest is digital work, data movement
/// and static power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Crossbar array read of every block MVM (experts, dense MLPs and, in the paper's system, attention
    /// projections and LM head).
    Crossbar,
    /// DAC input conversions.
    Dac,
    /// ADC output conversions.
    Adc,
    /// Switching a stack's periphery between tiers.
    TierSwitch,
    /// QKᵀ, softmax and the weighted sum of values over the KV cache, on the attention units.
    DigitalAttention,
    /// Matrix products on the digital units: router, digital experts, digital projections (variant).
    DigitalMatmul,
    /// RMSNorms and activation functions.
    NormsActivations,
    /// Summing crossbar partial sums, the weighted expert outputs and the residuals.
    Accumulation,
    /// Moving crossbar inputs and outputs over the on-chip network.
    Interconnect,
    /// Reads and writes of digital weights, KV cache and embeddings held in on-chip SRAM.
    OnChipMemory,
    /// Reads and writes of what did not fit on chip.
    OffChipMemory,
    /// Static power of every block over the time a step occupies the chip (itemised in
    /// [`super::phase::StaticEnergy`]).
    Static,
}

/// Number of [`Component`]s.
pub const N_COMPONENTS: usize = 12;

impl Component {
    /// All components, in breakdown order.
    pub const ALL: [Component; N_COMPONENTS] = [
        Component::Crossbar,
        Component::Dac,
        Component::Adc,
        Component::TierSwitch,
        Component::DigitalAttention,
        Component::DigitalMatmul,
        Component::NormsActivations,
        Component::Accumulation,
        Component::Interconnect,
        Component::OnChipMemory,
        Component::OffChipMemory,
        Component::Static,
    ];

    /// Short label for tables and legends.
    pub fn label(self) -> &'static str {
        match self {
            Component::Crossbar => "crossbar arrays",
            Component::Dac => "DACs",
            Component::Adc => "ADCs",
            Component::TierSwitch => "tier switches",
            Component::DigitalAttention => "attention (QKᵀ, softmax, AV)",
            Component::DigitalMatmul => "digital matmuls",
            Component::NormsActivations => "norms + activations",
            Component::Accumulation => "partial sums + residuals",
            Component::Interconnect => "interconnect",
            Component::OnChipMemory => "on-chip SRAM",
            Component::OffChipMemory => "off-chip memory",
            Component::Static => "static power",
        }
    }

    /// Field name in JSON (`crossbar_j`, …).
    pub fn key(self) -> &'static str {
        match self {
            Component::Crossbar => "crossbar_j",
            Component::Dac => "dac_j",
            Component::Adc => "adc_j",
            Component::TierSwitch => "tier_switch_j",
            Component::DigitalAttention => "digital_attention_j",
            Component::DigitalMatmul => "digital_matmul_j",
            Component::NormsActivations => "norms_activations_j",
            Component::Accumulation => "accumulation_j",
            Component::Interconnect => "interconnect_j",
            Component::OnChipMemory => "on_chip_memory_j",
            Component::OffChipMemory => "off_chip_memory_j",
            Component::Static => "static_j",
        }
    }

    /// Whether the energy is spent in the analog tiers.
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

/// Joules per component, one row per layer plus one for work outside the layers (LM head, embeddings, static
/// power).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// `per_layer[l][c]`: joules of component `c` ([`Component::ALL`] order) in layer `l`.
    pub per_layer: Vec<[f64; N_COMPONENTS]>,
    /// Joules not tied to a layer.
    pub global: [f64; N_COMPONENTS],
}

/// One row of a breakdown with every component named.
struct Named<'a>(&'a [f64; N_COMPONENTS]);

impl Serialize for Named<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(N_COMPONENTS))?;
        for c in Component::ALL {
            m.serialize_entry(c.key(), &self.0[c.index()])?;
        }
        m.end()
    }
}

impl Serialize for Breakdown {
    /// `{ total_j, components: {crossbar_j: …}, outside_layers: {…}, per_layer: [{…}, …] }`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut totals = [0.0; N_COMPONENTS];
        for c in Component::ALL {
            totals[c.index()] = self.component(c);
        }
        let mut st = s.serialize_struct("Breakdown", 4)?;
        st.serialize_field("total_j", &self.total())?;
        st.serialize_field("components", &Named(&totals))?;
        st.serialize_field("outside_layers", &Named(&self.global))?;
        let rows: Vec<Named> = self.per_layer.iter().map(Named).collect();
        st.serialize_field("per_layer", &rows)?;
        st.end()
    }
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

    /// Joules spent in the analog tiers.
    pub fn analog(&self) -> f64 {
        Component::ALL
            .iter()
            .filter(|c| c.is_analog())
            .map(|&c| self.component(c))
            .sum()
    }

    /// Every entry multiplied by `factor` (e.g. totals over a run → per token).
    pub fn scaled(&self, factor: f64) -> Self {
        let scale = |r: &[f64; N_COMPONENTS]| r.map(|v| v * factor);
        Self {
            per_layer: self.per_layer.iter().map(scale).collect(),
            global: scale(&self.global),
        }
    }

    /// Whether every entry is finite.
    pub fn is_finite(&self) -> bool {
        self.global.iter().all(|v| v.is_finite())
            && self.per_layer.iter().flatten().all(|v| v.is_finite())
    }
}
