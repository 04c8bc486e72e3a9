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

use super::preset::Quantizer;

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
/// crossbar repacks per batch chunk into a per-thread buffer rather than keep a second copy
/// of W̃.
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
            let outs = NR.min(n - p * NR);
            #[cfg(target_arch = "x86_64")]
            if available() && (w.strides()[1] == 1 || k == 1) {
                for g in 0..outs.div_ceil(8) {
                    let rows: [&[f32]; 8] = std::array::from_fn(|i| {
                        let o = (p * NR + g * 8 + i).min(p * NR + outs - 1);
                        let row = w.row(o);
                        // SAFETY: unit stride (checked above), `k` elements.
                        unsafe { std::slice::from_raw_parts(row.as_ptr(), k) }
                    });
                    let live = (outs - g * 8).min(8);
                    // SAFETY: features checked; `panel` holds k·NR values.
                    unsafe { pack_group(&rows, live, &mut panel[g * 8..]) };
                }
                continue;
            }
            for o in 0..outs {
                for (kk, &v) in w.row(p * NR + o).iter().enumerate() {
                    panel[kk * NR + o] = v;
                }
            }
        }
        (self.n, self.k, self.start) = (n, k, start);
    }

    /// Runs `f` on `w` and `w2` packed into this thread's buffers (no allocation once they
    /// have grown); a nested call on the same thread packs into buffers of its own.
    pub fn with<R>(
        w: ArrayView2<'_, f32>,
        w2: Option<ArrayView2<'_, f32>>,
        f: impl FnOnce(&Packed, Option<&Packed>) -> R,
    ) -> R {
        thread_local! {
            static BUF: std::cell::RefCell<[Packed; 2]> = std::cell::RefCell::default();
        }
        BUF.with(|b| {
            let mut own = None;
            let mut guard = b.try_borrow_mut().ok();
            let [p, p2] = match guard.as_deref_mut() {
                Some(bufs) => bufs,
                None => own.insert(<[Packed; 2]>::default()),
            };
            p.pack(w);
            if let Some(w2) = w2 {
                p2.pack(w2);
            }
            f(p, w2.map(|_| &*p2))
        })
    }

    fn panel(&self, p: usize) -> &[f32] {
        let len = self.k * NR;
        &self.buf[self.start + p * len..self.start + (p + 1) * len]
    }
}

/// Writes `rows[i][kk]` to `panel[kk·NR + i]` for the first `live` rows (the rest stay 0),
/// 8 × 8 blocks transposed in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_group(rows: &[&[f32]; 8], live: usize, panel: &mut [f32]) {
    let k = rows[0].len();
    let body = k / 8 * 8;
    let zero = _mm256_setzero_ps();
    for k0 in (0..body).step_by(8) {
        let r: [__m256; 8] = std::array::from_fn(|i| {
            if i < live {
                _mm256_loadu_ps(rows[i].as_ptr().add(k0))
            } else {
                zero
            }
        });
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let cols = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, c) in cols.into_iter().enumerate() {
            _mm256_storeu_ps(panel.as_mut_ptr().add((k0 + j) * NR), c);
        }
    }
    for kk in body..k {
        for (i, row) in rows.iter().enumerate().take(live) {
            panel[kk * NR + i] = row[kk];
        }
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
    let mut y = y;
    let ys = Out::rows(&mut y, (m, w.n), "output");
    let xs = In::rows(&x, (m, k), "input");
    if m == 0 || w.n == 0 {
        return;
    }
    match second {
        None => {
            // SAFETY: `available` checked the features; shapes and strides checked above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if abs_first {
                    run::<true, false, 6>(m, w, xs, ys, xs, ys)
                } else {
                    run::<false, false, 6>(m, w, xs, ys, xs, ys)
                }
            }
        }
        Some((x2, mut s)) => {
            let x2s = In::rows(&x2, (m, k), "second input");
            let ss = Out::rows(&mut s, (m, w.n), "second output");
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

/// Panics unless an array of shape `got` and `strides` is `dim` with contiguous rows (`what`
/// names it): the packed kernel's operands are row pointers and a row stride.
fn check_rows(got: (usize, usize), strides: &[isize], dim: (usize, usize), what: &str) {
    assert_eq!(got, dim, "{what} shape");
    assert!(
        strides[1] == 1 || dim.1 <= 1,
        "{what} needs contiguous rows"
    );
}

#[derive(Clone, Copy)]
struct In {
    ptr: *const f32,
    stride: isize,
}

impl In {
    /// The rows of `x`, which must be `dim` with contiguous rows (`what` names it in the panic).
    fn rows(x: &ArrayView2<'_, f32>, dim: (usize, usize), what: &str) -> Self {
        check_rows(x.dim(), x.strides(), dim, what);
        Self {
            ptr: x.as_ptr(),
            stride: x.strides()[0],
        }
    }
}

#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: isize,
}

impl Out {
    /// The rows of `y`, which must be `dim` with contiguous rows (`what` names it in the panic).
    fn rows(y: &mut ArrayViewMut2<'_, f32>, dim: (usize, usize), what: &str) -> Self {
        check_rows(y.dim(), y.strides(), dim, what);
        Self {
            ptr: y.as_mut_ptr(),
            stride: y.strides()[0],
        }
    }
}

/// Chains of [`KC`] inputs × row blocks × panels × groups of `MR` rows. Each chain's sums
/// go to the outputs as `matrixmultiply` writes them (`ab + 0`, then `C + ab`), so a panel
/// of [`KC`] inputs (16 KiB) stays in L1 while a block of rows passes over it. `MR` rows × 16
/// outputs keep ≥ 8 independent accumulators in flight (FMA latency × throughput) within the
/// 16 vector registers: 6 rows (12 accumulators) for one product, 2 rows (8) for two, where
/// 3 rows would spill.
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
    let at = |a: In, row: usize| a.ptr.offset(row as isize * a.stride);
    for k0 in (0..w.k).step_by(KC) {
        let k1 = (k0 + KC).min(w.k);
        let first = k0 == 0;
        for r0 in (0..m).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(m);
            for p in 0..panels {
                let panel = w.panel(p).as_ptr();
                let cols = NR.min(w.n - p * NR);
                let mut r = r0;
                while r < r1 {
                    let rows = MR.min(r1 - r);
                    let xr: [_; MR] = std::array::from_fn(|i| at(x, r + i.min(rows - 1)));
                    let x2r: [_; MR] = std::array::from_fn(|i| at(x2, r + i.min(rows - 1)));
                    let (acc, acc2) = tile::<ABS1, SECOND, MR>(k0, k1, panel, xr, x2r);
                    for i in 0..rows {
                        let row = (r + i) as isize;
                        let col = (p * NR) as isize;
                        store(y.ptr.offset(row * y.stride + col), acc[i], cols, first);
                        if SECOND {
                            store(s.ptr.offset(row * s.stride + col), acc2[i], cols, first);
                        }
                    }
                    r += rows;
                }
            }
        }
    }
}

/// One `MR` × 16 tile: the FMA chains over inputs `k0..k1`, from +0. Rows past the batch
/// repeat the last row's pointer and are discarded by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const ABS1: bool, const SECOND: bool, const MR: usize>(
    k0: usize,
    k1: usize,
    panel: *const f32,
    x: [*const f32; MR],
    x2: [*const f32; MR],
) -> ([[__m256; 2]; MR], [[__m256; 2]; MR]) {
    let zero = _mm256_setzero_ps();
    let sign = _mm256_set1_ps(-0.0);
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
    (acc, acc2)
}

/// Writes one chain's sums `v` to the first `cols` outputs at `dst`: `v + 0` for the first
/// chain (an FMA kernel's `C = 1·ab + 0`: −0 becomes +0), else `C + v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store(dst: *mut f32, v: [__m256; 2], cols: usize, first: bool) {
    let mut tmp = [0.0f32; NR];
    let c = if cols == NR {
        dst
    } else {
        if !first {
            std::ptr::copy_nonoverlapping(dst, tmp.as_mut_ptr(), cols);
        }
        tmp.as_mut_ptr()
    };
    for (h, v) in v.into_iter().enumerate() {
        let base = if first {
            _mm256_setzero_ps()
        } else {
            _mm256_loadu_ps(c.add(8 * h))
        };
        _mm256_storeu_ps(c.add(8 * h), _mm256_add_ps(base, v));
    }
    if cols < NR {
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
    }
}

/// The smallest variance a summed noise draw takes (2⁻¹⁰⁰): its σ is at least 2⁻⁵⁰ in output
/// units, far below any ADC step or f32 resolution of an output. With it the GPU's IEEE square
/// root needs no slow path (the fast one is exact from 2⁻¹⁰¹ up), and every backend applies it,
/// so their σ agree bit for bit. It binds only where the output noise is below 2⁻⁵⁰.
pub const NOISE_VAR_FLOOR: f32 = f32::from_bits(0x0D80_0000);

/// σ of a noise draw of variance `var`: √max(var, [`NOISE_VAR_FLOOR`]), rounded as IEEE.
/// `kernels/periphery.cuh` (`noise_sd`) and `backend::cuda::reference` mirror it.
#[inline]
pub fn noise_sd(var: f32) -> f32 {
    var.max(NOISE_VAR_FLOOR).sqrt()
}

/// The output noise of one row: `y += sd·z` with one σ for the row (output noise alone, or
/// with ADDITIVE weight noise), or `y += noise_sd(out_var + std2·s_i)·z` per output (PCM_READ).
#[derive(Clone, Copy, Debug)]
pub enum RowNoise<'a> {
    /// σ of every output of the row.
    Uniform(f32),
    /// σ_i² = out_var + std2·s_i with s = Σ_j |W̃_ij| x̃_j².
    PcmRead {
        out_var: f32,
        std2: f32,
        s: &'a [f32],
    },
}

/// One input row through the DAC: `out_j = dac.quantize(x_j / scale)`, or `x_j / scale`
/// without a DAC (docs/model.md §3, steps 1–2). The caller handles `scale == 0`.
pub fn encode(x: &[f32], scale: f32, dac: Option<Quantizer>, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "row widths");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features checked; equal lengths asserted.
        unsafe { encode_avx2(x, scale, dac, out) };
        return;
    }
    encode_scalar(x, scale, dac, out);
}

fn encode_scalar(x: &[f32], scale: f32, dac: Option<Quantizer>, out: &mut [f32]) {
    match dac {
        Some(dac) => {
            let step = dac.step();
            for (o, &v) in out.iter_mut().zip(x) {
                *o = dac.quantize(v / scale, step);
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v / scale;
            }
        }
    }
}

/// Adds the noise `noise` with the standard normals `z` to one output row, then applies the ADC
/// (steps 5–7); returns whether an output reached the ADC bound (saturation, for bound
/// management; false without an ADC).
pub fn noise_adc(
    y: &mut [f32],
    z: Option<&[f32]>,
    noise: RowNoise<'_>,
    adc: Option<Quantizer>,
) -> bool {
    if let Some(z) = z {
        assert_eq!(z.len(), y.len(), "noise width");
    }
    if let RowNoise::PcmRead { s, .. } = noise {
        assert_eq!(s.len(), y.len(), "PCM_READ sum width");
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features checked; lengths asserted.
        return unsafe { noise_adc_avx2(y, z, noise, adc) };
    }
    noise_adc_scalar(y, z, noise, adc)
}

fn noise_adc_scalar(
    y: &mut [f32],
    z: Option<&[f32]>,
    noise: RowNoise<'_>,
    adc: Option<Quantizer>,
) -> bool {
    if let Some(z) = z {
        match noise {
            RowNoise::Uniform(sd) => y.iter_mut().zip(z).for_each(|(y, &z)| *y += sd * z),
            RowNoise::PcmRead { out_var, std2, s } => {
                for ((y, &v), &z) in y.iter_mut().zip(s).zip(z) {
                    *y += noise_sd(out_var + std2 * v) * z;
                }
            }
        }
    }
    match adc {
        Some(q) => {
            let step = q.step();
            y.iter_mut().for_each(|v| *v = q.quantize(*v, step));
            y.iter().any(|v| v.abs() >= q.bound)
        }
        None => false,
    }
}

/// Step 9 on one output row: `y_j *= scale·map_scale_j·α_j` (α one value or one per output).
pub fn rescale(y: &mut [f32], scale: f32, map_scale: &[f32], alpha: &[f32]) {
    assert_eq!(map_scale.len(), y.len(), "mapping scales");
    let per_column = alpha.len() == y.len() && y.len() > 1;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features checked; lengths asserted.
        unsafe { rescale_avx2(y, scale, map_scale, alpha, per_column) };
        return;
    }
    for (j, v) in y.iter_mut().enumerate() {
        let a = if per_column { alpha[j] } else { alpha[0] };
        *v *= scale * map_scale[j] * a;
    }
}

/// max_j |x_j| (ABS_MAX noise management), NaN ignored as `f32::max` ignores it.
pub fn abs_max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features checked.
        return unsafe { abs_max_avx2(x) };
    }
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn abs_max_avx2(x: &[f32]) -> f32 {
    let body = x.len() / 8 * 8;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut m = _mm256_setzero_ps();
    for j in (0..body).step_by(8) {
        // max_ps(a, b) is `a > b ? a : b`: a NaN |x_j| keeps m.
        let a = _mm256_and_ps(_mm256_loadu_ps(x.as_ptr().add(j)), abs_mask);
        m = _mm256_max_ps(a, m);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    // A maximum is exact, so the lane order does not matter (no lane is NaN or −0).
    let head = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    x[body..].iter().fold(head, |m, v| m.max(v.abs()))
}

/// `v.clamp(lo, hi)` on 8 lanes with the same results, NaN included: `max_ps(a, b)` returns
/// `b` unless `a > b`, so `max_ps(lo, v)` is `v < lo ? lo : v`, and likewise for `min_ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn clamp8(v: __m256, lo: __m256, hi: __m256) -> __m256 {
    _mm256_min_ps(hi, _mm256_max_ps(lo, v))
}

/// [`Quantizer::quantize`] on 8 lanes, operation for operation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn quantize8(v: __m256, q: &Quant8) -> __m256 {
    let t = clamp8(_mm256_div_ps(v, q.step), q.neg_limit, q.limit);
    let r = _mm256_sub_ps(_mm256_add_ps(t, q.magic), q.magic);
    clamp8(_mm256_mul_ps(r, q.step), q.neg_bound, q.bound)
}

/// Broadcast constants of one quantiser.
#[cfg(target_arch = "x86_64")]
struct Quant8 {
    step: __m256,
    limit: __m256,
    neg_limit: __m256,
    magic: __m256,
    bound: __m256,
    neg_bound: __m256,
}

#[cfg(target_arch = "x86_64")]
impl Quant8 {
    #[target_feature(enable = "avx2,fma")]
    fn new(q: Quantizer) -> Self {
        // The constants of `Quantizer::quantize` and `rint`.
        const LIMIT: f32 = 2_097_152.0;
        const MAGIC: f32 = 12_582_912.0;
        Self {
            step: _mm256_set1_ps(q.step()),
            limit: _mm256_set1_ps(LIMIT),
            neg_limit: _mm256_set1_ps(-LIMIT),
            magic: _mm256_set1_ps(MAGIC),
            bound: _mm256_set1_ps(q.bound),
            neg_bound: _mm256_set1_ps(-q.bound),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn encode_avx2(x: &[f32], scale: f32, dac: Option<Quantizer>, out: &mut [f32]) {
    let n = x.len();
    let body = n / 8 * 8;
    let sv = _mm256_set1_ps(scale);
    let q = dac.map(|q| Quant8::new(q));
    for j in (0..body).step_by(8) {
        let v = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(j)), sv);
        let o = match &q {
            Some(q) => quantize8(v, q),
            None => v,
        };
        _mm256_storeu_ps(out.as_mut_ptr().add(j), o);
    }
    encode_scalar(&x[body..], scale, dac, &mut out[body..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn noise_adc_avx2(
    y: &mut [f32],
    z: Option<&[f32]>,
    noise: RowNoise<'_>,
    adc: Option<Quantizer>,
) -> bool {
    let n = y.len();
    let body = n / 8 * 8;
    let q = adc.map(|q| Quant8::new(q));
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut sat = _mm256_setzero_ps();
    let yp = y.as_mut_ptr();
    for j in (0..body).step_by(8) {
        let mut v = _mm256_loadu_ps(yp.add(j));
        if let Some(z) = z {
            let zv = _mm256_loadu_ps(z.as_ptr().add(j));
            let sd = match noise {
                RowNoise::Uniform(sd) => _mm256_set1_ps(sd),
                RowNoise::PcmRead { out_var, std2, s } => {
                    let sv = _mm256_loadu_ps(s.as_ptr().add(j));
                    let var = _mm256_add_ps(
                        _mm256_set1_ps(out_var),
                        _mm256_mul_ps(_mm256_set1_ps(std2), sv),
                    );
                    _mm256_sqrt_ps(_mm256_max_ps(var, _mm256_set1_ps(NOISE_VAR_FLOOR)))
                }
            };
            v = _mm256_add_ps(v, _mm256_mul_ps(sd, zv));
        }
        if let Some(q) = &q {
            v = quantize8(v, q);
            // |v| ≥ bound (ordered: NaN never saturates).
            sat = _mm256_or_ps(
                sat,
                _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(v, abs_mask), q.bound),
            );
        }
        _mm256_storeu_ps(yp.add(j), v);
    }
    let tail_noise = match noise {
        RowNoise::PcmRead { out_var, std2, s } => RowNoise::PcmRead {
            out_var,
            std2,
            s: &s[body..],
        },
        u => u,
    };
    let tail = noise_adc_scalar(&mut y[body..], z.map(|z| &z[body..]), tail_noise, adc);
    tail || _mm256_movemask_ps(sat) != 0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rescale_avx2(
    y: &mut [f32],
    scale: f32,
    map_scale: &[f32],
    alpha: &[f32],
    per_column: bool,
) {
    let n = y.len();
    let body = n / 8 * 8;
    let sv = _mm256_set1_ps(scale);
    let a0 = _mm256_set1_ps(alpha[0]);
    for j in (0..body).step_by(8) {
        let a = if per_column {
            _mm256_loadu_ps(alpha.as_ptr().add(j))
        } else {
            a0
        };
        // (scale·map_scale_j)·α_j, then y·that: the scalar order.
        let f = _mm256_mul_ps(
            _mm256_mul_ps(sv, _mm256_loadu_ps(map_scale.as_ptr().add(j))),
            a,
        );
        let p = y.as_mut_ptr().add(j);
        _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), f));
    }
    for j in body..n {
        let a = if per_column { alpha[j] } else { alpha[0] };
        y[j] *= scale * map_scale[j] * a;
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

    /// Values where a vector rewrite could differ from the scalar code: signed zeros, rint
    /// ties, the clamp limits, huge values, infinities and NaN.
    fn awkward_values(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        let special = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -2.5,
            1e-30,
            -1e-30,
            3.0e7,
            -3.0e7,
            1e38,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            10.0,
            -10.0,
            9.96,
            0.999,
        ];
        (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    special[(i / 3) % special.len()]
                } else {
                    rng.random_range(-12.0f32..12.0)
                }
            })
            .collect()
    }

    /// σ is the IEEE square root of the variance from the floor up, and 2⁻⁵⁰ (the floor's
    /// root, exact) below it; the per-output noise of a row with no output noise takes it.
    #[test]
    fn noise_sd_is_the_ieee_root_above_its_floor() {
        assert_eq!(NOISE_VAR_FLOOR, 2f32.powi(-100));
        let root = 2f32.powi(-50);
        assert_eq!(noise_sd(NOISE_VAR_FLOOR).to_bits(), root.to_bits());
        for var in [0.0f32, -0.0, 1e-45, 1e-38, NOISE_VAR_FLOOR / 2.0] {
            assert_eq!(noise_sd(var).to_bits(), root.to_bits(), "{var:e}");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..100_000 {
            // Log-uniform over the floor to 2¹⁰⁰.
            let var = 2f32.powf(rng.random_range(-100.0f32..100.0));
            assert_eq!(noise_sd(var).to_bits(), var.sqrt().to_bits(), "{var:e}");
        }
        let mut y = [0.0f32, 0.0];
        let s = [0.0f32, 1e-40];
        let noise = RowNoise::PcmRead {
            out_var: 0.0,
            std2: 0.5,
            s: &s,
        };
        noise_adc_scalar(&mut y, Some(&[3.0, -5.0]), noise, None);
        assert_eq!(y, [3.0 * root, -5.0 * root]);
    }

    /// The vector DAC, noise + ADC, rescale and abs-max give the scalar code's bits, NaN and
    /// signed zeros included, on lengths with and without a scalar tail.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn periphery_equals_the_scalar_code_bit_for_bit() {
        if !available() {
            return;
        }
        let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let quantizers = [
            None,
            Some(Quantizer {
                bits: 7,
                bound: 1.0,
            }),
            Some(Quantizer {
                bits: 9,
                bound: 12.0,
            }),
            Some(Quantizer {
                bits: 16,
                bound: 10.0,
            }),
        ];
        for n in [1usize, 7, 8, 29, 64, 131] {
            let x = awkward_values(n, &mut rng);
            let z = awkward_values(n, &mut rng);
            let s: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..40.0)).collect();
            let s_small: Vec<f32> = (0..n)
                .map(|i| [0.0, 1e-45, 1e-10, 40.0][i % 4] * rng.random_range(0.5f32..1.0))
                .collect();
            for q in quantizers {
                for scale in [1.0f32, 0.37, 3.0e-39, 1e30] {
                    let mut want = vec![0.0; n];
                    let mut got = vec![f32::NAN; n];
                    encode_scalar(&x, scale, q, &mut want);
                    unsafe { encode_avx2(&x, scale, q, &mut got) };
                    assert_eq!(bits(&got), bits(&want), "encode n {n} {q:?} scale {scale}");
                }
                let noises = [
                    RowNoise::Uniform(0.06),
                    RowNoise::PcmRead {
                        out_var: 0.0016,
                        std2: 0.0003,
                        s: &s,
                    },
                    // No output noise: variances of zero and below the floor.
                    RowNoise::PcmRead {
                        out_var: 0.0,
                        std2: 1e-30,
                        s: &s_small,
                    },
                ];
                for noise in noises {
                    for zz in [None, Some(&z[..])] {
                        let mut want = x.clone();
                        let mut got = x.clone();
                        let sw = noise_adc_scalar(&mut want, zz, noise, q);
                        let sg = unsafe { noise_adc_avx2(&mut got, zz, noise, q) };
                        assert_eq!(bits(&got), bits(&want), "noise n {n} {q:?} {noise:?}");
                        assert_eq!(sg, sw, "saturation n {n} {q:?}");
                    }
                }
            }
            let ms: Vec<f32> = (0..n).map(|_| rng.random_range(0.001f32..3.0)).collect();
            let alphas: Vec<f32> = (0..n).map(|_| rng.random_range(0.5f32..2.0)).collect();
            for alpha in [&alphas[..1], &alphas[..]] {
                let per_column = alpha.len() == n && n > 1;
                let mut want = x.clone();
                for (j, v) in want.iter_mut().enumerate() {
                    let a = if per_column { alpha[j] } else { alpha[0] };
                    *v *= 0.7 * ms[j] * a;
                }
                let mut got = x.clone();
                unsafe { rescale_avx2(&mut got, 0.7, &ms, alpha, per_column) };
                assert_eq!(bits(&got), bits(&want), "rescale n {n}");
            }
            let want = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(
                unsafe { abs_max_avx2(&x) }.to_bits(),
                want.to_bits(),
                "abs max n {n}"
            );
        }
    }
}
