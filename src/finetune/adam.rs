//! Adam (Kingma & Ba, ICLR 2015) over one layer's expert weights, element-wise and therefore
//! independent of thread count.
use ndarray::{Array2, Zip};

use crate::model::common::SwiGlu;

/// First/second moment decay and the denominator's ε (the paper's defaults).
pub const BETA1: f32 = 0.9;
pub const BETA2: f32 = 0.999;
pub const EPS: f32 = 1e-8;

/// Adam's state for a list of experts.
pub struct Adam {
    m: Vec<[Array2<f32>; 2]>,
    v: Vec<[Array2<f32>; 2]>,
    t: i32,
}

impl Adam {
    /// Zero moments shaped like `experts`.
    pub fn new(experts: &[SwiGlu]) -> Self {
        let zeros = || {
            experts
                .iter()
                .map(|e| {
                    [
                        Array2::zeros(e.gate_up.raw_dim()),
                        Array2::zeros(e.down.raw_dim()),
                    ]
                })
                .collect::<Vec<_>>()
        };
        Self {
            m: zeros(),
            v: zeros(),
            t: 0,
        }
    }

    /// One step of size `lr` along `grads` (same shapes as `experts`; an empty list is no step).
    pub fn step(&mut self, experts: &mut [SwiGlu], grads: &[SwiGlu], lr: f32) {
        if grads.is_empty() {
            return;
        }
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t);
        let c2 = 1.0 - BETA2.powi(self.t);
        for (k, (e, g)) in experts.iter_mut().zip(grads).enumerate() {
            for (slot, (w, gw)) in [(&mut e.gate_up, &g.gate_up), (&mut e.down, &g.down)]
                .into_iter()
                .enumerate()
            {
                Zip::from(w)
                    .and(gw)
                    .and(&mut self.m[k][slot])
                    .and(&mut self.v[k][slot])
                    .for_each(|w, &g, m, v| {
                        *m = BETA1 * *m + (1.0 - BETA1) * g;
                        *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                        *w -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
                    });
            }
        }
    }
}
