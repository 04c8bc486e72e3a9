//! A 3D tile stack: T tiers of crossbars behind one shared periphery (docs/model.md §4).
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{ensure, Context, Result};
use ndarray::{Array2, ArrayView2};

use super::{Crossbar, TilePreset};

/// Marker of "no tier active yet".
const NO_TIER: usize = usize::MAX;

/// T tiers sharing one set of DACs/ADCs: exactly one tier computes per MVM. The stack counts
/// MVMs and tier switches (a switch = an MVM on a different tier than the previous MVM), the
/// quantities the energy/latency model charges for.
#[derive(Debug)]
pub struct TileStack {
    preset: TilePreset,
    tiers: Vec<Option<Crossbar>>,
    active: AtomicUsize,
    switches: AtomicU64,
    mvms: AtomicU64,
}

impl TileStack {
    /// An empty stack of `preset.stack.tiers_per_stack` tiers.
    pub fn new(preset: &TilePreset) -> Self {
        Self {
            preset: preset.clone(),
            tiers: (0..preset.stack.tiers_per_stack).map(|_| None).collect(),
            active: AtomicUsize::new(NO_TIER),
            switches: AtomicU64::new(0),
            mvms: AtomicU64::new(0),
        }
    }

    /// Program `w` (at most R×C) onto tier `tier`, replacing what was there.
    pub fn program_tier(
        &mut self,
        tier: usize,
        w: ArrayView2<f32>,
        seed: u64,
        tensor_id: u32,
    ) -> Result<()> {
        ensure!(
            tier < self.tiers.len(),
            "tier {tier} out of range: stack has {} tiers",
            self.tiers.len()
        );
        let xbar = Crossbar::program(w, &self.preset, seed, tensor_id)
            .with_context(|| format!("programming tier {tier}"))?;
        self.tiers[tier] = Some(xbar);
        Ok(())
    }

    /// Drift every programmed tier to `t_seconds`.
    pub fn drift_to(&mut self, t_seconds: f64) {
        for xbar in self.tiers.iter_mut().flatten() {
            xbar.drift_to(t_seconds);
        }
    }

    /// MVM on tier `tier` (the only active one during this call). The stack does not lock:
    /// callers that share a stack between threads serialise its MVMs, as the hardware does.
    pub fn mvm(&self, tier: usize, x: ArrayView2<f32>, mvm_id: u32) -> Result<Array2<f32>> {
        let xbar = self
            .tiers
            .get(tier)
            .and_then(Option::as_ref)
            .with_context(|| {
                format!(
                    "tier {tier} is not programmed (stack has {} tiers)",
                    self.tiers.len()
                )
            })?;
        let previous = self.active.swap(tier, Ordering::Relaxed);
        if previous != NO_TIER && previous != tier {
            self.switches.fetch_add(1, Ordering::Relaxed);
        }
        self.mvms.fetch_add(1, Ordering::Relaxed);
        Ok(xbar.mvm(x, mvm_id))
    }

    /// Number of tiers T.
    pub fn num_tiers(&self) -> usize {
        self.tiers.len()
    }
    /// The crossbar on tier `tier`, if programmed.
    pub fn tier(&self, tier: usize) -> Option<&Crossbar> {
        self.tiers.get(tier).and_then(Option::as_ref)
    }
    /// Tier of the last MVM.
    pub fn active_tier(&self) -> Option<usize> {
        Some(self.active.load(Ordering::Relaxed)).filter(|&t| t != NO_TIER)
    }
    /// Tier switches so far.
    pub fn tier_switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }
    /// MVMs so far.
    pub fn mvm_count(&self) -> u64 {
        self.mvms.load(Ordering::Relaxed)
    }
    /// The preset shared by all tiers.
    pub fn preset(&self) -> &TilePreset {
        &self.preset
    }
}
