//! Helpers shared by several modules of this test binary: the GPU of a test (`gpu`, `hopper`
//! for the sm_90a kernels), the test data (weights, top-k routing, programmed and drifted
//! experts, the presets the kernels run), the store-mode GEMM output, and the parity measures
//! and their bounds (`rel_rms`, `LAYER_REL_RMS_BOUND`, `assert_layer_parity`). They live in one
//! place so that the layer, wgmma, kernel-reference and whole-model tests draw the same data
//! and hold to the same bounds.

use aimc::backend::cuda::gemm::{grouped_gemm, GemmOutput};
use aimc::backend::cuda::grouped::{GpuGroupedMatrix, GroupedMatrix};
use aimc::backend::cuda::periphery::{GemmInput, GemmPeriphery};
use aimc::backend::cuda::routing::{route, GpuRouting};
use aimc::backend::cuda::CudaDevice;
use aimc::rng::{Purpose, Stream};
use aimc::tile::{AnalogMatrix, BoundManagement, TilePreset, WeightNoise};
use ndarray::{Array2, ArrayView2};

/// Relative RMS difference allowed between the analog MoE layer on the GPU and the CPU crossbar
/// path for a token without an ADC flip (the median token), and for the emulated operands.
pub(crate) const LAYER_REL_RMS_BOUND: f64 = 2e-3;

/// The GPU of an ignored test; a clear failure when there is none (the test was asked for).
pub(crate) fn gpu(test: &str) -> CudaDevice {
    match CudaDevice::open(0) {
        Ok(d) => {
            println!(
                "{test}: running on {} (sm_{}{})",
                d.name(),
                d.compute_capability().0,
                d.compute_capability().1
            );
            d
        }
        Err(e) => panic!("{test}: needs a CUDA GPU: {e}"),
    }
}

/// [`gpu`], for tests of the sm_90a wgmma kernels: `None` (with the reason) on other GPUs too.
pub(crate) fn hopper(test: &str) -> Option<CudaDevice> {
    let dev = gpu(test);
    if dev.compute_capability() != (9, 0) {
        println!(
            "{test}: skipped, the wgmma kernels need sm_90 (this GPU is sm_{}{})",
            dev.compute_capability().0,
            dev.compute_capability().1
        );
        return None;
    }
    Some(dev)
}

pub(crate) fn test_matrix(rows: usize, cols: usize, id: u32, scale: f32) -> Array2<f32> {
    let s = Stream::new(42, Purpose::TestData, id);
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        s.normal((i * cols + j) as u64, 0) * scale
    })
}

/// `e` standard-hwa experts of `n×d` test weights (`test_matrix(n, d, data_id + i, 0.05)`)
/// programmed under (`seed`, tensor id `tensor_id + i`) and drifted 1 h, with the preset and
/// their grouped kernel layout.
pub(crate) fn hwa_experts(
    e: u32,
    (n, d): (usize, usize),
    data_id: u32,
    seed: u64,
    tensor_id: u32,
) -> (TilePreset, Vec<AnalogMatrix>, GroupedMatrix) {
    let preset = TilePreset::resolve("standard-hwa").unwrap();
    let mats: Vec<AnalogMatrix> = (0..e)
        .map(|i| {
            let w = test_matrix(n, d, data_id + i, 0.05);
            drifted(&preset, w.view(), seed, tensor_id + i, 3600.0)
        })
        .collect();
    let grouped = GroupedMatrix::from_analog(&refs(&mats)).unwrap();
    (preset, mats, grouped)
}

/// `w` programmed on `preset` under (`seed`, `tensor_id`) and drifted to `t_seconds`.
pub(crate) fn drifted(
    preset: &TilePreset,
    w: ArrayView2<'_, f32>,
    seed: u64,
    tensor_id: u32,
    t_seconds: f64,
) -> AnalogMatrix {
    let mut m = AnalogMatrix::program(w, preset, seed, tensor_id).unwrap();
    m.drift_to(t_seconds);
    m
}

/// Random top-k routing: distinct experts per token, positive weights.
pub(crate) fn routing(t: usize, k: usize, e: usize) -> (Vec<u32>, Vec<f32>) {
    let s = Stream::new(3, Purpose::TestData, 900);
    let (mut experts, mut weights) = (Vec::new(), Vec::new());
    for tok in 0..t {
        let mut chosen: Vec<u32> = Vec::new();
        let mut i = 0u64;
        while chosen.len() < k {
            let c = (s.uniform((tok * 64) as u64 + i, 0) * e as f32) as u32 % e as u32;
            if !chosen.contains(&c) {
                chosen.push(c);
            }
            i += 1;
        }
        for (j, c) in chosen.into_iter().enumerate() {
            experts.push(c);
            weights.push(0.25 + s.uniform((tok * 64 + 63) as u64, j as u32));
        }
    }
    (experts, weights)
}

/// The (token, expert, weight) pairs of `experts`/`weights` (host), sorted on the device.
pub(crate) fn route_host(
    dev: &CudaDevice,
    experts: &[u32],
    weights: &[f32],
    t: usize,
    k: usize,
    e: usize,
) -> GpuRouting {
    route(
        dev,
        &dev.upload(experts).unwrap(),
        &dev.upload(weights).unwrap(),
        t,
        k,
        e,
    )
    .unwrap()
}

pub(crate) fn tokens_of(experts: &[u32], k: usize, e: u32) -> Vec<usize> {
    experts
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == e)
        .map(|(i, _)| i / k)
        .collect()
}

pub(crate) fn refs(v: &[AnalogMatrix]) -> Vec<&AnalogMatrix> {
    v.iter().collect()
}

pub(crate) fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// The MoE layer through the CPU's per-expert crossbars: each expert's tokens (rows of `x`)
/// through its gate and up matrices, SwiGLU, its down matrix (MVM call `mvm_id`), and each
/// token's outputs summed with its routing weights (`experts`, `weights`: `k` slots per token).
pub(crate) fn cpu_moe_layer(
    [gates, ups, downs]: [&[AnalogMatrix]; 3],
    x: &Array2<f32>,
    (experts, weights, k): (&[u32], &[f32], usize),
    mvm_id: u32,
) -> Array2<f32> {
    let mut y = Array2::<f32>::zeros((x.nrows(), downs[0].n_out()));
    for ex in 0..gates.len() {
        let toks = tokens_of(experts, k, ex as u32);
        let xe = Array2::from_shape_fn((toks.len(), x.ncols()), |(i, j)| x[[toks[i], j]]);
        let g = gates[ex].mvm(xe.view(), mvm_id);
        let u = ups[ex].mvm(xe.view(), mvm_id);
        let h = Array2::from_shape_fn(g.dim(), |(i, j)| silu_mul(g[[i, j]], u[[i, j]]));
        let ye = downs[ex].mvm(h.view(), mvm_id);
        for (i, &tok) in toks.iter().enumerate() {
            let slot = (0..k).find(|&s| experts[tok * k + s] == ex as u32).unwrap();
            y.row_mut(tok)
                .scaled_add(weights[tok * k + slot], &ye.row(i));
        }
    }
    y
}

/// standard-hwa without PCM_READ and IR drop: the AIHWKIT-Lightning feature set (DAC, ADC,
/// output noise), which the analog wgmma kernel runs.
pub(crate) fn lightning_set() -> TilePreset {
    let mut p = TilePreset::resolve("standard-hwa").unwrap();
    p.name = "standard-hwa without PCM_READ and IR drop".into();
    p.periphery.w_noise = WeightNoise::None;
    p.periphery.ir_drop = None;
    p
}

pub(crate) fn narrow_crossbars() -> TilePreset {
    let mut p = TilePreset::resolve("standard-hwa").unwrap();
    p.stack.cols = 250;
    p
}

/// Parity of a two-GEMM analog MoE layer, per token: most tokens agree to operand rounding
/// (median per-token relative RMS ≤ [`LAYER_REL_RMS_BOUND`]); a token with one ADC code flipped
/// in the gate/up GEMM (< 0.1 % of codes, one step) carries it through SwiGLU into the DAC codes
/// of the down GEMM and may move by a few percent, so at most 1 token in 20 may differ by more
/// than 1e-2. A wrong noise key, scale or block order moves every token.
pub(crate) fn assert_layer_parity(what: &str, y: &Array2<f32>, y_cpu: &Array2<f32>) {
    let t = y.nrows();
    let per_token: Vec<f64> = (0..t)
        .map(|i| rel_rms(y.row(i).iter(), y_cpu.row(i).iter()))
        .collect();
    let off = per_token.iter().filter(|&&r| r > 1e-2).count();
    let mut sorted = per_token.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "moe layer ({what}, 1 day): median per-token rel. diff {:.2e}, {off}/{t} tokens off by > 1e-2, whole rel. RMS {:.2e}",
        sorted[t / 2],
        rel_rms(y.iter(), y_cpu.iter())
    );
    assert!(
        sorted[t / 2] <= LAYER_REL_RMS_BOUND,
        "{what}: median {}",
        sorted[t / 2]
    );
    assert!(off * 20 <= t, "{what}: {off} of {t} tokens differ");
}

/// The store-mode output `[pairs, N]` of `m` on the token rows of `input` routed by `r`, analog
/// with (periphery, seed) or digital.
pub(crate) fn store_rows(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    input: &GemmInput<'_>,
    r: &GpuRouting,
    analog: Option<(&GemmPeriphery, u64)>,
    mvm_id: u32,
) -> Vec<f32> {
    let mut out = dev.zeros::<f32>(r.n_tokens * r.top_k * m.n_cols()).unwrap();
    grouped_gemm(
        dev,
        m,
        input,
        r,
        true,
        analog.map(|a| a.0),
        analog.map_or(0, |a| a.1),
        mvm_id,
        GemmOutput::Store,
        &mut out,
    )
    .unwrap();
    dev.download(&out).unwrap()
}

/// Test-data id of expert 0's gate weights; expert i's gate, up and down matrices take ids
/// `EXPERT_DATA_ID + 3i + {0, 1, 2}` (as tensor ids too).
pub(crate) const EXPERT_DATA_ID: u32 = 200;

/// Gate, up (`n × d`) and down (`d × n`) matrices of `e` experts, `test_matrix(…, 0.04)`
/// programmed on `preset` under seed 21 and drifted 1 day.
pub(crate) fn analog_experts(
    preset: &TilePreset,
    (e, n, d): (usize, usize, usize),
) -> [Vec<AnalogMatrix>; 3] {
    let mats = |which: u32, rows, cols| -> Vec<AnalogMatrix> {
        (0..e as u32)
            .map(|i| {
                let id = EXPERT_DATA_ID + 3 * i + which;
                drifted(
                    preset,
                    test_matrix(rows, cols, id, 0.04).view(),
                    21,
                    id,
                    86400.0,
                )
            })
            .collect()
    };
    [mats(0, n, d), mats(1, n, d), mats(2, d, n)]
}

/// The kernel tables of a layer: gate/up interleaved for SwiGLU, and down.
pub(crate) fn analog_layer_tables(
    gates: &[AnalogMatrix],
    ups: &[AnalogMatrix],
    downs: &[AnalogMatrix],
) -> (GroupedMatrix, GroupedMatrix) {
    let gate = GroupedMatrix::from_analog(&refs(gates)).unwrap();
    let up = GroupedMatrix::from_analog(&refs(ups)).unwrap();
    let down = GroupedMatrix::from_analog(&refs(downs)).unwrap();
    (GroupedMatrix::interleave_swiglu(&gate, &up).unwrap(), down)
}

pub(crate) fn rel_rms<'a>(
    a: impl Iterator<Item = &'a f32>,
    b: impl Iterator<Item = &'a f32>,
) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.zip(b) {
        num += f64::from(x - y).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den).sqrt()
}

/// Presets that exercise step 8 (iterative bound management) and ADDITIVE weight noise.
pub(crate) fn bound_managed_presets() -> Vec<TilePreset> {
    let mut additive = TilePreset::resolve("standard-hwa").unwrap();
    additive.name = "standard-hwa + additive + iterative".into();
    additive.periphery.w_noise = WeightNoise::Additive { std: 0.02 };
    additive.periphery.bound_management = BoundManagement::Iterative;
    additive.periphery.ir_drop = None;
    vec![
        TilePreset::resolve("pcm-3d-8tier").unwrap(),
        TilePreset::resolve("aihwkit-default").unwrap(),
        additive,
    ]
}

/// Inputs whose odd rows are a weight row of `w` scaled to max |x| = 1 (so that an output
/// saturates the ADC and bound management must act) and whose even rows are random.
pub(crate) fn saturating_inputs(w: &Array2<f32>, rows: usize, id: u32) -> Array2<f32> {
    let random = test_matrix(rows, w.ncols(), id, 0.3).mapv(|v| v.clamp(-1.0, 1.0));
    Array2::from_shape_fn((rows, w.ncols()), |(r, j)| {
        if r % 2 == 1 {
            let row = w.row((r * 37) % w.nrows());
            row[j] / row.fold(0.0f32, |m, v| m.max(v.abs()))
        } else {
            random[[r, j]]
        }
    })
}

/// Per-row relative RMS differences of `a` and `b`, ascending.
pub(crate) fn sorted_row_diffs(a: &Array2<f32>, b: &Array2<f32>) -> Vec<f64> {
    let mut d: Vec<f64> = (0..a.nrows())
        .map(|r| rel_rms(a.row(r).iter(), b.row(r).iter()))
        .collect();
    d.sort_by(f64::total_cmp);
    d
}
