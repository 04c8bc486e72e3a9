//! Next-token scores of a forward pass against the digital reference: the one definition of
//! the per-position sums (−log p of the target, argmax agreement, KL(digital ‖ analog)) that
//! every backend computes where its logits are.
//!
//! It lives in `backend/`, not in `eval/`, because a backend scores its own logits: the CPU
//! backend with [`compare`], the CUDA backend on the device (`token_metrics` in
//! `kernels/model.cu` mirrors [`compare`]) so that the logits never cross the bus. The
//! evaluation protocol turns the sums into perplexity, agreement and mean KL per point.

use ndarray::{Array2, ArrayView1, ArrayView2, Axis};

/// Sums over the scored positions of one or more sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScoreSums {
    /// Σ −log p(target), nats.
    pub nll: f64,
    /// Positions whose argmax equals the digital one.
    pub agree: usize,
    /// Σ KL(digital ‖ this), nats.
    pub kl: f64,
    /// Positions scored.
    pub positions: usize,
}

impl std::ops::AddAssign for ScoreSums {
    fn add_assign(&mut self, o: Self) {
        self.nll += o.nll;
        self.agree += o.agree;
        self.kl += o.kl;
        self.positions += o.positions;
    }
}

/// Digital reference of one sequence: log-probabilities of the positions that have a next
/// token (`[len − 1, vocab]`) and their argmax.
#[derive(Clone, Debug)]
pub struct Reference {
    pub logp: Array2<f32>,
    pub argmax: Vec<usize>,
}

impl Reference {
    /// The reference of a sequence of `len` tokens from its digital logits (`[≥ len − 1, vocab]`).
    pub fn from_logits(logits: ArrayView2<f32>, len: usize) -> Self {
        let logp = log_softmax_rows(logits.slice(ndarray::s![..len - 1, ..]));
        let argmax = logp.axis_iter(Axis(0)).map(argmax).collect();
        Self { logp, argmax }
    }

    /// Σ −log p(`targets[i]`) of the digital model over the scored positions.
    pub fn nll(&self, targets: &[u32]) -> f64 {
        targets
            .iter()
            .enumerate()
            .map(|(i, &t)| -f64::from(self.logp[[i, t as usize]]))
            .sum()
    }
}

/// Row-wise log-softmax in f64 accumulation (stable: max subtracted first).
pub fn log_softmax_rows(logits: ArrayView2<f32>) -> Array2<f32> {
    let mut out = logits.to_owned();
    out.axis_iter_mut(Axis(0)).for_each(|mut row| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(m)
            + row
                .iter()
                .map(|&x| f64::from(x - m).exp())
                .sum::<f64>()
                .ln();
        row.mapv_inplace(|x| (f64::from(x) - lse) as f32);
    });
    out
}

/// Index of the first largest value of `row`.
pub fn argmax(row: ArrayView1<f32>) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Scores `logits` (`[≥ n, vocab]`) against `reference` on `targets` (the n next tokens).
pub fn compare(reference: &Reference, logits: ArrayView2<f32>, targets: &[u32]) -> ScoreSums {
    let n = targets.len();
    let la = log_softmax_rows(logits.slice(ndarray::s![..n, ..]));
    let mut s = ScoreSums {
        positions: n,
        ..Default::default()
    };
    for i in 0..n {
        let (a, d) = (la.row(i), reference.logp.row(i));
        s.nll -= f64::from(a[targets[i] as usize]);
        s.agree += usize::from(argmax(a) == reference.argmax[i]);
        s.kl += a
            .iter()
            .zip(d.iter())
            .map(|(&qa, &pd)| f64::from(pd).exp() * (f64::from(pd) - f64::from(qa)))
            .sum::<f64>();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn log_softmax_rows_normalise() {
        let l = log_softmax_rows(array![[1.0f32, 2.0, 3.0], [1000.0, 1000.0, -1000.0]].view());
        for row in l.rows() {
            let s: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        assert!((l[[1, 0]] - (0.5f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn identical_distributions_agree_fully_with_zero_kl() {
        let logits = array![[0.1f32, 2.0, -1.0], [3.0, 0.0, 0.5], [9.0, 9.0, 9.0]];
        let r = Reference::from_logits(logits.view(), 3);
        assert_eq!(r.argmax, vec![1, 0]);
        let s = compare(&r, logits.view(), &[1, 0]);
        assert_eq!((s.agree, s.positions), (2, 2));
        assert!(s.kl.abs() < 1e-9);
        assert!((s.nll - r.nll(&[1, 0])).abs() < 1e-9);
        // Shifting all logits of a row by a constant changes nothing.
        let shifted = logits.mapv(|x| x + 7.0);
        let s2 = compare(&r, shifted.view(), &[1, 0]);
        assert!((s2.nll - s.nll).abs() < 1e-5 && s2.kl.abs() < 1e-6);
    }
}
