//! The crossbar products of the CPU MVM on AVX2 + FMA: W̃ (or [W̃; W̃∘F] under IR drop) packed
//! into 16-output panels, and a register-blocked kernel that computes W̃·x̃ and, in the same
//! pass over the weights, Σ_j |W̃_ij|·x̃_j² (PCM_READ) or Σ_j |W̃_ij|·|x̃_j| (IR drop).
//!
//! Bit-exactness: the CPU forward is the reference of the CUDA kernels and of every recorded
//! figure, and it was defined by `matrixmultiply`'s f32 GEMM on FMA machines. Each output of
//! that GEMM is a chain of fused multiply-adds from +0 over k, restarted every [`KC`] inputs,
//! the chains added left to right onto a zero-initialised C (`C = ab + 0`, then `C = C + ab`).
//! This kernel keeps exactly that order per output, so its results equal the previous ones bit
//! for bit; what changes is only how outputs share registers and that W̃ is not repacked per call.
//! On CPUs without AVX2 and FMA the crossbar keeps the `ndarray` GEMM (whose kernel there is
//! mul + add, a different rounding), so this module is used only where it reproduces it.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use ndarray::{ArrayView2, ArrayViewMut2};

/// Inputs per fused multiply-add chain: `matrixmultiply`'s `S_KC` for f32 (see the module doc).
pub const KC: usize = 256;
/// Outputs per packed panel (two AVX vectors).
const NR: usize = 16;
/// Batch rows per block whose inputs stay in L2 while every panel passes over them.
const ROW_BLOCK: usize = 64;

/// Whether this CPU runs the packed kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `[n, k]` in panels of [`NR`] outputs, k-major inside a panel (`panel[k][o]`),
/// the last panel padded with zero weights. Packing is a transposition of n·k values, a few
/// per cent of the products it feeds (k ≥ 64 multiply-adds per value per batch row); the
/// crossbar repacks per MVM into a per-thread buffer rather than keep a second copy of W̃.
#[derive(Clone, Debug, Default)]
pub struct Packed {
    n: usize,
    k: usize,
    /// Storage with room to start at a 32-byte boundary.
    buf: Vec<f32>,
    /// Offset of the first panel in `buf`.
    start: usize,
}

impl Packed {
    /// Packs `w` (`[n, k]`, any strides) into this buffer, reusing its allocation.
    pub fn pack(&mut self, w: ArrayView2<'_, f32>) {
        let (n, k) = w.dim();
        let panels = n.div_ceil(NR);
        let len = panels * k * NR;
        self.buf.clear();
        self.buf.resize(len + 8, 0.0);
        let start = (8 - (self.buf.as_ptr() as usize / 4) % 8) % 8;
        let data = &mut self.buf[start..start + len];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for o in 0..NR.min(n - p * NR) {
                let row = w.row(p * NR + o);
                match row.as_slice() {
                    Some(r) => {
                        for (kk, &v) in r.iter().enumerate() {
                            panel[kk * NR + o] = v;
                        }
                    }
                    None => {
                        for (kk, &v) in row.iter().enumerate() {
                            panel[kk * NR + o] = v;
                        }
                    }
                }
            }
        }
        (self.n, self.k, self.start) = (n, k, start);
    }

    /// Runs `f` on `w` packed into this thread's buffer (no allocation once it has grown).
    /// `f` must not pack again on the same thread (it would find the buffer borrowed).
    pub fn with<R>(w: ArrayView2<'_, f32>, f: impl FnOnce(&Packed) -> R) -> R {
        thread_local! {
            static BUF: std::cell::RefCell<Packed> = std::cell::RefCell::new(Packed::default());
        }
        BUF.with(|b| {
            let mut p = b.borrow_mut();
            p.pack(w);
            f(&p)
        })
    }

    fn panel(&self, p: usize) -> &[f32] {
        let len = self.k * NR;
        &self.buf[self.start + p * len..self.start + (p + 1) * len]
    }
}

/// What the kernel computes for row r and output i (every sum in the chunked order of the
/// module doc):
///
/// - `y[r][i] = Σ_j x[r][j]·w[i][j]`, or `Σ_j x[r][j]·|w[i][j]|` with `abs_first`;
/// - with `second = Some((x2, s))`: also `s[r][i] = Σ_j x2[r][j]·|w[i][j]|`.
///
/// `x` and `x2` are `[m, k]` with contiguous rows, `y` and `s` `[m, n]` with contiguous rows.
///
/// # Panics
/// On mismatched shapes or non-contiguous rows (caller bugs), or when [`available`] is false.
pub fn gemm(
    x: ArrayView2<'_, f32>,
    w: &Packed,
    abs_first: bool,
    y: ArrayViewMut2<'_, f32>,
    second: Option<(ArrayView2<'_, f32>, ArrayViewMut2<'_, f32>)>,
) {
    assert!(available(), "packed crossbar kernel needs AVX2 and FMA");
    let (m, k) = x.dim();
    assert_eq!(k, w.k, "input width");
    assert_eq!(y.dim(), (m, w.n), "output shape");
    assert!(x.strides()[1] == 1 || k <= 1, "inputs need contiguous rows");
    assert!(
        y.strides()[1] == 1 || w.n <= 1,
        "outputs need contiguous rows"
    );
    if m == 0 || w.n == 0 {
        return;
    }
    let mut y = y;
    let ys = Out {
        ptr: y.as_mut_ptr(),
        stride: y.strides()[0],
    };
    let xs = In {
        ptr: x.as_ptr(),
        stride: x.strides()[0],
    };
    match second {
        None => {
            // SAFETY: `available` checked the features; shapes and strides checked above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if abs_first {
                    run::<true, false, 4>(m, w, xs, ys, xs, ys)
                } else {
                    run::<false, false, 4>(m, w, xs, ys, xs, ys)
                }
            }
        }
        Some((x2, mut s)) => {
            assert_eq!(x2.dim(), (m, k), "second input shape");
            assert_eq!(s.dim(), (m, w.n), "second output shape");
            assert!(
                x2.strides()[1] == 1 || k <= 1,
                "inputs need contiguous rows"
            );
            assert!(
                s.strides()[1] == 1 || w.n <= 1,
                "outputs need contiguous rows"
            );
            let x2s = In {
                ptr: x2.as_ptr(),
                stride: x2.strides()[0],
            };
            let ss = Out {
                ptr: s.as_mut_ptr(),
                stride: s.strides()[0],
            };
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if abs_first {
                    run::<true, true, 2>(m, w, xs, ys, x2s, ss)
                } else {
                    run::<false, true, 2>(m, w, xs, ys, x2s, ss)
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct In {
    ptr: *const f32,
    stride: isize,
}

#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: isize,
}

/// Row blocks × panels × groups of `MR` rows. `MR` keeps 8 accumulators in flight (FMA
/// latency × throughput) within the 16 vector registers: 4 rows for one product, 2 for two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run<const ABS1: bool, const SECOND: bool, const MR: usize>(
    m: usize,
    w: &Packed,
    x: In,
    y: Out,
    x2: In,
    s: Out,
) {
    let panels = w.n.div_ceil(NR);
    for r0 in (0..m).step_by(ROW_BLOCK) {
        let r1 = (r0 + ROW_BLOCK).min(m);
        for p in 0..panels {
            let panel = w.panel(p).as_ptr();
            let cols = NR.min(w.n - p * NR);
            let mut r = r0;
            while r < r1 {
                let rows = MR.min(r1 - r);
                let at = |a: In, row: usize| a.ptr.offset(row as isize * a.stride);
                let xr: [_; MR] = std::array::from_fn(|i| at(x, r + i.min(rows - 1)));
                let x2r: [_; MR] = std::array::from_fn(|i| at(x2, r + i.min(rows - 1)));
                let (acc, acc2) = tile::<ABS1, SECOND, MR>(w.k, panel, xr, x2r);
                for i in 0..rows {
                    let row = (r + i) as isize;
                    store(
                        y.ptr.offset(row * y.stride + (p * NR) as isize),
                        acc[i],
                        cols,
                    );
                    if SECOND {
                        store(
                            s.ptr.offset(row * s.stride + (p * NR) as isize),
                            acc2[i],
                            cols,
                        );
                    }
                }
                r += rows;
            }
        }
    }
}

/// One `MR` × 16 tile: the chunked FMA chains of the module doc. Rows past the batch repeat
/// the last row's pointer and are discarded by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const ABS1: bool, const SECOND: bool, const MR: usize>(
    k: usize,
    panel: *const f32,
    x: [*const f32; MR],
    x2: [*const f32; MR],
) -> ([[__m256; 2]; MR], [[__m256; 2]; MR]) {
    let zero = _mm256_setzero_ps();
    let sign = _mm256_set1_ps(-0.0);
    let mut total = [[zero; 2]; MR];
    let mut total2 = [[zero; 2]; MR];
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let mut acc = [[zero; 2]; MR];
        let mut acc2 = [[zero; 2]; MR];
        for kk in k0..k1 {
            let wp = panel.add(kk * NR);
            let w0 = _mm256_load_ps(wp);
            let w1 = _mm256_load_ps(wp.add(8));
            let (a0, a1) = (_mm256_andnot_ps(sign, w0), _mm256_andnot_ps(sign, w1));
            let (f0, f1) = if ABS1 { (a0, a1) } else { (w0, w1) };
            for i in 0..MR {
                let xv = _mm256_broadcast_ss(&*x[i].add(kk));
                acc[i][0] = _mm256_fmadd_ps(xv, f0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(xv, f1, acc[i][1]);
                if SECOND {
                    let xv2 = _mm256_broadcast_ss(&*x2[i].add(kk));
                    acc2[i][0] = _mm256_fmadd_ps(xv2, a0, acc2[i][0]);
                    acc2[i][1] = _mm256_fmadd_ps(xv2, a1, acc2[i][1]);
                }
            }
        }
        // C = ab + 0 for the first chain (as an FMA-kernel writes it: −0 becomes +0), then
        // C = C + ab for every later one.
        let base = if k0 == 0 { [[zero; 2]; MR] } else { total };
        let base2 = if k0 == 0 { [[zero; 2]; MR] } else { total2 };
        for i in 0..MR {
            for h in 0..2 {
                total[i][h] = _mm256_add_ps(base[i][h], acc[i][h]);
                if SECOND {
                    total2[i][h] = _mm256_add_ps(base2[i][h], acc2[i][h]);
                }
            }
        }
        k0 = k1;
    }
    (total, total2)
}

/// Stores the first `cols` of 16 lanes at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store(dst: *mut f32, v: [__m256; 2], cols: usize) {
    if cols == NR {
        _mm256_storeu_ps(dst, v[0]);
        _mm256_storeu_ps(dst.add(8), v[1]);
    } else {
        let mut tmp = [0.0f32; NR];
        _mm256_storeu_ps(tmp.as_mut_ptr(), v[0]);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v[1]);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{linalg::general_mat_mul, Array2};
    use rand::{Rng, SeedableRng};

    /// Equal bits to `ndarray`'s GEMM (the previous crossbar path) over shapes that exercise
    /// partial panels, partial row groups and row blocks, and 1–3 chains of [`KC`] inputs.
    #[test]
    fn equals_the_ndarray_gemm_bit_for_bit() {
        if !available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 17, 5),
            (5, 16, 256),
            (67, 33, 257),
            (130, 100, 512),
            (9, 7, 700),
        ] {
            // Quantised-looking inputs with zeros and signs, binary16-looking weights.
            let x = Array2::from_shape_fn((m, k), |_| {
                (rng.random_range(-127i32..=127) as f32) * (1.0 / 127.0)
            });
            let w = Array2::from_shape_fn((n, k), |_| {
                crate::tile::operand::to_binary16(rng.random_range(-1.5f32..1.5))
            });
            let x2 = x.mapv(|v| v * v);
            let mut packed = Packed::default();
            packed.pack(w.view());
            let aw = w.mapv(f32::abs);
            for abs_first in [false, true] {
                let mut want = Array2::<f32>::zeros((m, n));
                let wf = if abs_first { &aw } else { &w };
                general_mat_mul(1.0, &x, &wf.t(), 0.0, &mut want);
                let mut want2 = Array2::<f32>::zeros((m, n));
                general_mat_mul(1.0, &x2, &aw.t(), 0.0, &mut want2);
                let mut got = Array2::<f32>::from_elem((m, n), f32::NAN);
                gemm(x.view(), &packed, abs_first, got.view_mut(), None);
                let mut got_y = Array2::<f32>::from_elem((m, n), f32::NAN);
                let mut got_s = Array2::<f32>::from_elem((m, n), f32::NAN);
                gemm(
                    x.view(),
                    &packed,
                    abs_first,
                    got_y.view_mut(),
                    Some((x2.view(), got_s.view_mut())),
                );
                let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{m}×{n}×{k} abs {abs_first}");
                assert_eq!(bits(&got_y), bits(&want), "{m}×{n}×{k} dual");
                assert_eq!(bits(&got_s), bits(&want2), "{m}×{n}×{k} second");
            }
        }
    }
}
