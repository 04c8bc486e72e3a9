//! A large matrix split into equal-part crossbar blocks (docs/model.md §3 "Tiling").
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result};
use ndarray::{s, Array2, ArrayView2};

use super::{Crossbar, TilePreset};
use crate::device::Device;
use crate::rng::child_tensor_id;

/// Split `n` into ⌈n/max⌉ near-equal contiguous parts, the first `n % k` one larger
/// (docs/model.md §3). `n = 0` gives no parts.
pub fn split_equal(n: usize, max: usize) -> Vec<Range<usize>> {
    assert!(max > 0, "block size must be ≥ 1");
    if n == 0 {
        return Vec::new();
    }
    let k = n.div_ceil(max);
    let (base, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Where one block of an [`AnalogMatrix`] sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Block index along the output dimension.
    pub out_block: usize,
    /// Block index along the input dimension.
    pub in_block: usize,
    /// Output rows of the parent matrix held by the block.
    pub out_range: Range<usize>,
    /// Input columns of the parent matrix held by the block.
    pub in_range: Range<usize>,
    /// Tensor id of the block (derived from the parent's with [`child_tensor_id`]).
    pub tensor_id: u32,
}

/// A `[n_out, n_in]` matrix on as many crossbars as it needs; block outputs along the input
/// dimension are summed in digital (full precision), each block with its own periphery,
/// conductance scale and GDC α.
#[derive(Clone, Debug)]
pub struct AnalogMatrix {
    n_out: usize,
    n_in: usize,
    tensor_id: u32,
    out_parts: Vec<Range<usize>>,
    in_parts: Vec<Range<usize>>,
    /// Row-major over (out_block, in_block).
    blocks: Vec<Crossbar>,
}

impl AnalogMatrix {
    /// Split `w` (`[n_out, n_in]`) into blocks of at most `preset.stack.cols × rows` and program
    /// each; block b's tensor id is `child_tensor_id(tensor_id, b)`.
    pub fn program(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        Self::program_blocks(w, preset, tensor_id, |block, id| {
            Crossbar::program(block, preset, seed, id)
        })
    }

    /// [`AnalogMatrix::program`] with a caller-supplied device model for every block.
    pub fn program_with_device(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        Self::program_blocks(w, preset, tensor_id, |block, id| {
            Crossbar::program_with_device(block, preset, device.clone(), seed, id)
        })
    }

    /// The blocks [`AnalogMatrix::program_with_device`] would build, as ideal-device layouts
    /// ([`Crossbar::layout`]): the block split, tensor ids and mapping scales, no random draws.
    pub fn layout(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        Self::program_blocks(w, preset, tensor_id, |block, id| {
            Crossbar::layout(block, preset, device.clone(), seed, id)
        })
    }

    /// Split `w` by the preset's crossbar size and program each block with `program(block, id)`.
    fn program_blocks(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        tensor_id: u32,
        program: impl Fn(ArrayView2<f32>, u32) -> Result<Crossbar>,
    ) -> Result<Self> {
        let (n_out, n_in) = w.dim();
        let out_parts = split_equal(n_out, preset.stack.cols);
        let in_parts = split_equal(n_in, preset.stack.rows);
        let mut blocks = Vec::with_capacity(out_parts.len() * in_parts.len());
        for (bo, ro) in out_parts.iter().enumerate() {
            for (bi, ri) in in_parts.iter().enumerate() {
                let b = (bo * in_parts.len() + bi) as u32;
                let id = child_tensor_id(tensor_id, b);
                let block = w.slice(s![ro.clone(), ri.clone()]);
                blocks.push(
                    program(block, id)
                        .with_context(|| format!("tensor {tensor_id}: block ({bo}, {bi})"))?,
                );
            }
        }
        anyhow::ensure!(
            !blocks.is_empty(),
            "tensor {tensor_id}: empty weight matrix {n_out}×{n_in}"
        );
        Ok(Self {
            n_out,
            n_in,
            tensor_id,
            out_parts,
            in_parts,
            blocks,
        })
    }

    /// Drift every block to `t_seconds`.
    pub fn drift_to(&mut self, t_seconds: f64) {
        for b in &mut self.blocks {
            b.drift_to(t_seconds);
        }
    }

    /// `[batch, n_in]` → `[batch, n_out]`; partial sums added in input-block order.
    ///
    /// # Panics
    /// If `x` does not have `n_in` columns.
    pub fn mvm(&self, x: ArrayView2<f32>, mvm_id: u32) -> Array2<f32> {
        assert_eq!(
            x.ncols(),
            self.n_in,
            "tensor {}: input width",
            self.tensor_id
        );
        if let [block] = &self.blocks[..] {
            // One block: the sum below is 0 + y, which only turns −0 into +0.
            let mut y = block.mvm(x, mvm_id);
            y.mapv_inplace(|v| v + 0.0);
            return y;
        }
        let mut y = Array2::<f32>::zeros((x.nrows(), self.n_out));
        for (bo, ro) in self.out_parts.iter().enumerate() {
            for (bi, ri) in self.in_parts.iter().enumerate() {
                let block = &self.blocks[bo * self.in_parts.len() + bi];
                let part = block.mvm(x.slice(s![.., ri.clone()]), mvm_id);
                let mut dst = y.slice_mut(s![.., ro.clone()]);
                dst += &part;
            }
        }
        y
    }

    /// Output dimension.
    pub fn n_out(&self) -> usize {
        self.n_out
    }
    /// Input dimension.
    pub fn n_in(&self) -> usize {
        self.n_in
    }
    /// Parent tensor id.
    pub fn tensor_id(&self) -> u32 {
        self.tensor_id
    }
    /// Output ranges of the block rows.
    pub fn out_ranges(&self) -> &[Range<usize>] {
        &self.out_parts
    }
    /// Input ranges of the block columns.
    pub fn in_ranges(&self) -> &[Range<usize>] {
        &self.in_parts
    }
    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Geometry of every block, row-major over (out_block, in_block).
    pub fn geometry(&self) -> Vec<BlockGeometry> {
        let n_in_blocks = self.in_parts.len();
        self.blocks
            .iter()
            .enumerate()
            .map(|(b, xbar)| BlockGeometry {
                out_block: b / n_in_blocks,
                in_block: b % n_in_blocks,
                out_range: self.out_parts[b / n_in_blocks].clone(),
                in_range: self.in_parts[b % n_in_blocks].clone(),
                tensor_id: xbar.tensor_id(),
            })
            .collect()
    }
    /// The crossbars, row-major over (out_block, in_block).
    pub fn blocks(&self) -> &[Crossbar] {
        &self.blocks
    }
    /// Current weights of the whole matrix in the caller's units (blocks reassembled, no GDC).
    pub fn effective_weights(&self) -> Array2<f32> {
        let mut w = Array2::<f32>::zeros((self.n_out, self.n_in));
        for (g, b) in self.geometry().iter().zip(&self.blocks) {
            w.slice_mut(s![g.out_range.clone(), g.in_range.clone()])
                .assign(&b.effective_weights());
        }
        w
    }
}
