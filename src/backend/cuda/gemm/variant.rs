//! What one instantiation of the grouped GEMM computes: operand precision ([`Precision`]),
//! output mode and element type ([`GemmOutput`], [`GemmOutElem`]), the periphery switches
//! ([`GemmVariant`]) and the `#define` sets NVRTC compiles them with ([`gemm_defines`],
//! [`analog_wgmma_defines`]), plus the representative sets `tests/kernels_compile.rs` builds
//! ([`moe_gemm_variants`], [`moe_gemm_wgmma_variants`]).
//!
//! The macros are documented in `kernels/moe_config.cuh`; each field here names the one it sets.

use super::tile::{
    analog_wgmma_tile_of, GemmTile, WgmmaTile, ANALOG_WGMMA_COLS, TILE_ROWS, WGMMA_TILE_K,
};

/// Operand precision of a grouped GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Analog: integer DAC codes in fp16 × W̃ in fp16 (one MMA; W̃ is already binary16 on every
    /// backend, docs/model.md §3, so the product is exact), f32 accumulate.
    AnalogF16,
    /// Digital baseline: bf16 × bf16, f32 accumulate.
    DigitalBf16,
}

impl Precision {
    /// One-line description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AnalogF16 => "A = DAC codes (exact in fp16), W = W̃ in fp16, f32 accumulate",
            Self::DigitalBf16 => "A = bf16, W = bf16, f32 accumulate",
        }
    }
    pub(crate) fn analog(self) -> bool {
        self != Self::DigitalBf16
    }
}

/// What the grouped GEMM does with its result rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOutput {
    /// `out[sorted row, col]` (`[P, N]`).
    Store,
    /// SwiGLU of the interleaved gate/up columns: `out[sorted row, j]` (`[P, N/2]`).
    SwiGlu,
    /// `out[token, col] += router weight · result` (`[T, N]`, zero it first).
    ScatterAdd,
    /// Digital only: [`GemmOutput::SwiGlu`] rounded to bf16 (`[P, N/2]` `u16` bits), the down
    /// GEMM's operand as [`quantize`](crate::backend::cuda::periphery::quantize) would make it, without the f32 round trip.
    SwiGluBf16,
    /// One attempt of iterative bound management (the kernel's mode 4): the outputs of the
    /// crossbars still pending, per crossbar block, into the bound-management scratch. Run by
    /// [`grouped_gemm`](super::grouped_gemm) after a [`GemmOutput::Store`] pass flags rows; not an output of its own.
    BmAttempt,
    /// Digital only: [`GemmOutput::Store`] rounded to bf16 (`[P, N]` `u16` bits), the expert
    /// outputs [`combine_bf16_rows`](crate::backend::cuda::layer::combine_bf16_rows) sums per token.
    StoreBf16,
    /// Analog with an ADC and without bound management: per sorted row and column (`[P, N]`
    /// f32), the number of crossbar blocks along K whose ADC output clipped, with the draws of
    /// the [`GemmOutput::Store`] pass of the same arguments (store mode with `MOE_CLIP_COUNT`):
    /// fine-tuning's straight-through mask.
    ClipCount,
}

impl GemmOutput {
    /// The kernels' `MOE_MODE`.
    pub fn mode(self) -> i64 {
        match self {
            Self::Store | Self::ClipCount => 0,
            Self::SwiGlu => 1,
            Self::ScatterAdd => 2,
            Self::SwiGluBf16 => 3,
            Self::BmAttempt => 4,
            Self::StoreBf16 => 5,
        }
    }

    /// Whether the output holds bf16 bits (`u16` elements).
    pub fn bf16(self) -> bool {
        matches!(self, Self::SwiGluBf16 | Self::StoreBf16)
    }
}

/// Element type of a grouped GEMM's output buffer: `f32`, or `u16` bf16 bits for
/// [`GemmOutput::SwiGluBf16`] and [`GemmOutput::StoreBf16`].
pub trait GemmOutElem: cudarc::driver::DeviceRepr {
    /// Whether the buffer holds bf16 bits.
    const BF16: bool;
}
impl GemmOutElem for f32 {
    const BF16: bool = false;
}
impl GemmOutElem for u16 {
    const BF16: bool = true;
}

/// Crossbar rows up to which the IR-drop row factors come from the kernel's shared-memory
/// table (`IR_TABLE_PAIRS` pairs in `kernels/periphery.cuh`).
pub const IR_TABLE_ROWS: usize = 4096;

/// Compile-time configuration of one `moe_gemm` instantiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmVariant {
    /// Analog pre/epilogue (false: the digital bf16 baseline).
    pub analog: bool,
    /// PCM_READ weight noise (second GEMM of the weight magnitudes).
    pub pcm_read: bool,
    /// IR-drop correction.
    pub ir_drop: bool,
    /// With `ir_drop`: the crossbars have at most [`IR_TABLE_ROWS`] rows, so the kernel reads
    /// the row factors from the table it fills in shared memory (`MOE_IR_TABLE`), else it
    /// computes them in its K loop.
    pub ir_table: bool,
    /// ADDITIVE weight noise (‖x̃‖² per row from the prologue).
    pub additive: bool,
    /// Iterative bound management (saturated rows flagged in store mode, redone by
    /// [`GemmOutput::BmAttempt`] passes).
    pub bound_management: bool,
    /// Output noise.
    pub out_noise: bool,
    /// ADC quantisation and clamp.
    pub adc: bool,
    /// The ADC's bound is one of its levels ([`crate::tile::Quantizer::bound_is_a_level`]):
    /// the epilogue clamps its input once instead of its input and its output
    /// (`MOE_ADC_BOUND_LEVEL`).
    pub adc_bound_level: bool,
    /// What the epilogue does with the rows.
    pub output: GemmOutput,
    /// Every 4 output columns lie in one crossbar at a multiple of 4 ([`GroupedMatrix::noise_quads`](crate::backend::cuda::grouped::GroupedMatrix::noise_quads)):
    /// a lane pair shares one Philox block per 4 columns.
    pub noise_quads: bool,
    /// The GDC readout ([`crossbar_readout`](crate::backend::cuda::periphery::crossbar_readout)): identity rows through each crossbar block of a
    /// matrix's own operands, each row tile over its own K range (`MOE_DIAG`).
    pub block_readout: bool,
}

impl GemmVariant {
    /// The AIHWKIT-Lightning feature set with `output`: output noise and ADC, no short-term
    /// weight noise, IR drop or bound management, each 4 columns in one crossbar (Philox quads).
    pub fn lightning(output: GemmOutput) -> Self {
        Self {
            analog: true,
            pcm_read: false,
            ir_drop: false,
            ir_table: true,
            additive: false,
            bound_management: false,
            out_noise: true,
            adc: true,
            adc_bound_level: true,
            output,
            noise_quads: true,
            block_readout: false,
        }
    }

    /// Whether the mma.sync kernel keeps its running total over the crossbar blocks in shared
    /// memory (`MOE_TOTAL_SMEM`; [`TILE_ROWS`] × tile columns × 4 bytes after the stages)
    /// rather than registers: with side accumulators (PCM_READ, IR drop), whose sets take the
    /// registers the 64-column K step needs (in registers, ptxas 13.5 spilled it 16–32 bytes).
    /// Not in a bound-management attempt, which writes its block outputs to the scratch and
    /// keeps no total.
    pub fn total_in_shared(&self) -> bool {
        self.analog && (self.pcm_read || self.ir_drop) && self.output != GemmOutput::BmAttempt
    }

    /// Whether the analog GEMM forms side products beside W̃·x̃: Σ|W̃|x̃² (PCM_READ), Σ|W̃||x̃|
    /// and Σ W̃ x̃ f(j) (IR drop).
    pub fn side_products(&self) -> bool {
        self.analog && (self.pcm_read || self.ir_drop)
    }

    /// Whether the sm_90a wgmma kernel runs this variant: digital, or analog with an f32
    /// output that is not a bound-management attempt or a GDC readout (those run the mma.sync
    /// kernel).
    pub fn wgmma_ready(&self) -> bool {
        !self.analog
            || !(self.block_readout || self.output.bf16() || self.output == GemmOutput::BmAttempt)
    }
}

/// The `#define`s of one `moe_gemm` instantiation, in a fixed order.
pub type GemmDefines = [(&'static str, i64); 20];

/// The `#define`s NVRTC compiles `moe_gemm` with for `v` on `tile`.
pub fn gemm_defines(v: &GemmVariant, tile: GemmTile) -> GemmDefines {
    let flag = |b: bool| i64::from(b);
    let mode = v.output.mode();
    [
        ("MOE_ANALOG", flag(v.analog)),
        ("MOE_PCM_READ", flag(v.analog && v.pcm_read)),
        ("MOE_IR_DROP", flag(v.analog && v.ir_drop)),
        ("MOE_IR_TABLE", flag(v.analog && v.ir_drop && v.ir_table)),
        ("MOE_ADDITIVE", flag(v.analog && v.additive && !v.pcm_read)),
        ("MOE_BM", flag(v.analog && v.bound_management && v.adc)),
        ("MOE_OUT_NOISE", flag(v.analog && v.out_noise)),
        ("MOE_ADC", flag(v.analog && v.adc)),
        (
            "MOE_ADC_BOUND_LEVEL",
            flag(v.analog && v.adc && v.adc_bound_level),
        ),
        ("MOE_MODE", mode),
        ("MOE_NOISE_QUADS", flag(v.analog && v.noise_quads)),
        ("MOE_TILE_M", TILE_ROWS as i64),
        ("MOE_TILE_N", tile.cols as i64),
        ("MOE_WARPS_M", tile.warps_m as i64),
        ("MOE_WARPS_N", tile.warps_n as i64),
        ("MOE_STAGES", tile.stages as i64),
        ("MOE_DIAG", flag(v.analog && v.block_readout)),
        ("MOE_BK", tile.k_step as i64),
        (
            "MOE_CLIP_COUNT",
            flag(v.analog && v.output == GemmOutput::ClipCount),
        ),
        ("MOE_TOTAL_SMEM", flag(v.total_in_shared())),
    ]
}

/// The `#define`s of the analog wgmma GEMM for `v` on `tile` with crossbars of `k_block` rows:
/// `v`'s periphery switches as [`gemm_defines`] gives them, the tile, and `MOE_KB_STEPS`
/// (wgmma K steps per crossbar block, which the kernel unrolls).
pub fn analog_wgmma_defines(
    v: &GemmVariant,
    tile: WgmmaTile,
    k_block: usize,
    slab_cols: usize,
) -> Vec<(&'static str, i64)> {
    let mut d: Vec<_> = gemm_defines(v, GemmTile::for_variant(v)).to_vec();
    d.extend([
        ("MOE_WGMMA", 1),
        ("WG_BN", tile.cols as i64),
        ("WG_STAGES", tile.stages as i64),
        ("WG_PIPE", tile.pipe as i64),
        ("MOE_KB_STEPS", (k_block / WGMMA_TILE_K) as i64),
        (
            "MOE_SLAB_COLS",
            if v.output == GemmOutput::ScatterAdd {
                slab_cols as i64
            } else {
                0
            },
        ),
    ]);
    d
}

/// The `#define`s of the sm_90a wgmma GEMM checked at build time: each output mode on the
/// 256-column pipelined and clustered tiles, and the other pipelines on one mode.
pub fn moe_gemm_wgmma_variants() -> Vec<Vec<(&'static str, i64)>> {
    let tile = WgmmaTile::new;
    let modes = [0, 1, 2, 3, GemmOutput::StoreBf16.mode()];
    let mut v: Vec<_> = modes
        .iter()
        .map(|&mode| tile(256, 4, 1).defines(mode, 0).to_vec())
        .collect();
    v.extend(
        modes
            .iter()
            .map(|&mode| tile(256, 4, 3).defines(mode, 0).to_vec()),
    );
    v.push(tile(256, 4, 1).defines(2, 256).to_vec());
    v.extend(
        [
            tile(128, 5, 1),
            tile(128, 4, 0),
            tile(128, 6, 2),
            tile(256, 4, 2),
        ]
        .iter()
        .map(|t| t.defines(2, 0).to_vec()),
    );
    // The analog kernel in every output mode with output noise and ADC (Philox quads or not),
    // bound management and ADDITIVE noise in store mode, 256- and 1024-row crossbars.
    let analog = GemmVariant::lightning(GemmOutput::SwiGlu);
    let mut a = vec![(analog, 512, 0)];
    for output in [
        GemmOutput::Store,
        GemmOutput::ScatterAdd,
        GemmOutput::ClipCount,
    ] {
        a.push((GemmVariant { output, ..analog }, 512, 0));
    }
    a.push((
        GemmVariant {
            output: GemmOutput::ScatterAdd,
            ..analog
        },
        512,
        256,
    ));
    a.push((
        GemmVariant {
            noise_quads: false,
            ..analog
        },
        256,
        0,
    ));
    a.push((
        GemmVariant {
            output: GemmOutput::Store,
            bound_management: true,
            additive: true,
            ..analog
        },
        1024,
        0,
    ));
    a.push((
        GemmVariant {
            out_noise: false,
            adc: false,
            ..analog
        },
        512,
        0,
    ));
    // Each on both tiles: 128 columns (one CTA per multiprocessor) and 64 (two, at 128
    // registers).
    v.extend(a.into_iter().flat_map(|(var, k_block, slab)| {
        ANALOG_WGMMA_COLS.map(|cols| {
            let tile = analog_wgmma_tile_of(cols, k_block).expect("analog wgmma tile");
            analog_wgmma_defines(&var, tile, k_block, slab)
        })
    }));
    // TMA stages (pipe 2) on the 64-column tile, in the three output modes the layers run.
    let on_tma_stages = |var: GemmVariant| {
        [
            GemmOutput::SwiGlu,
            GemmOutput::Store,
            GemmOutput::ScatterAdd,
        ]
        .map(|output| {
            analog_wgmma_defines(
                &GemmVariant { output, ..var },
                WgmmaTile::new(64, 3, 2),
                512,
                0,
            )
        })
    };
    v.extend(on_tma_stages(analog));
    // Side products, on the 64-column tile alone: standard-hwa (PCM_READ and IR drop) in
    // every output mode, each alone, IR drop's row factors computed in the K loop (crossbars
    // beyond its table), and bound management beside them.
    let hwa = GemmVariant {
        pcm_read: true,
        ir_drop: true,
        ..analog
    };
    let mut side = [
        GemmOutput::Store,
        GemmOutput::SwiGlu,
        GemmOutput::ScatterAdd,
        GemmOutput::ClipCount,
    ]
    .map(|output| (GemmVariant { output, ..hwa }, 512))
    .to_vec();
    side.extend([
        (
            GemmVariant {
                ir_drop: false,
                ..hwa
            },
            512,
        ),
        (
            GemmVariant {
                pcm_read: false,
                ..hwa
            },
            512,
        ),
        (
            GemmVariant {
                ir_table: false,
                ..hwa
            },
            8192,
        ),
        (
            GemmVariant {
                output: GemmOutput::Store,
                bound_management: true,
                ..hwa
            },
            512,
        ),
        (
            GemmVariant {
                noise_quads: false,
                ..hwa
            },
            512,
        ),
    ]);
    v.extend(side.into_iter().map(|(var, k_block)| {
        let tile = analog_wgmma_tile_of(64, k_block).expect("analog wgmma tile");
        analog_wgmma_defines(&var, tile, k_block, 0)
    }));
    // And standard-hwa on TMA stages.
    v.extend(on_tma_stages(hwa));
    v
}

/// Representative instantiations for compile checks: every output mode digital, analog with
/// everything on and everything off, and each analog feature alone.
/// Each on its default [`GemmTile`], and where 512-row crossbars give it the long K step, on
/// that tile too.
pub fn moe_gemm_variants() -> Vec<GemmDefines> {
    let modes = [
        GemmOutput::Store,
        GemmOutput::SwiGlu,
        GemmOutput::ScatterAdd,
    ];
    let all = |analog: bool, on: bool, output| GemmVariant {
        analog,
        pcm_read: on,
        ir_drop: on,
        ir_table: true,
        additive: false,
        bound_management: false,
        out_noise: on,
        adc: on,
        adc_bound_level: on,
        output,
        noise_quads: true,
        block_readout: false,
    };
    let mut v = Vec::new();
    for output in modes {
        v.push(all(false, false, output));
        v.push(all(true, true, output));
        v.push(all(true, false, output));
    }
    v.push(all(false, false, GemmOutput::SwiGluBf16));
    v.push(all(false, false, GemmOutput::StoreBf16));
    let base = all(true, false, GemmOutput::SwiGlu);
    v.push(GemmVariant {
        pcm_read: true,
        ..base
    });
    v.push(GemmVariant {
        ir_drop: true,
        ..base
    });
    // Crossbars beyond the IR table: the row factors computed in the K loop.
    v.push(GemmVariant {
        ir_table: false,
        ..all(true, true, GemmOutput::SwiGlu)
    });
    v.push(GemmVariant {
        out_noise: true,
        ..base
    });
    v.push(GemmVariant { adc: true, ..base });
    v.push(GemmVariant {
        out_noise: true,
        noise_quads: false,
        ..base
    });
    v.push(GemmVariant {
        additive: true,
        out_noise: true,
        ..base
    });
    // Fine-tuning's clip count: store mode with an ADC and no bound management, with
    // everything else on (standard-hwa) and with the ADC alone.
    v.push(all(true, true, GemmOutput::ClipCount));
    v.push(GemmVariant {
        adc: true,
        output: GemmOutput::ClipCount,
        ..all(true, false, GemmOutput::Store)
    });
    // Bound management runs in store mode: with everything else, and as the AIHWKIT default
    // (ABS_MAX, ADC, output noise) and pcm-3d-8tier (plus PCM_READ) configure it.
    let store = all(true, true, GemmOutput::Store);
    v.push(GemmVariant {
        bound_management: true,
        ..store
    });
    v.push(GemmVariant {
        bound_management: true,
        pcm_read: false,
        ir_drop: false,
        ..store
    });
    v.push(GemmVariant {
        bound_management: true,
        additive: true,
        pcm_read: false,
        ir_drop: false,
        ..store
    });
    // Output noise and ADC (standard-hwa without its PCM_READ and IR drop), with the bound a
    // level of the ADC and not.
    v.push(GemmVariant {
        out_noise: true,
        adc: true,
        adc_bound_level: true,
        ..base
    });
    v.push(GemmVariant {
        out_noise: true,
        adc: true,
        ..base
    });
    // GDC readouts through each crossbar block: pcm-3d-8tier's periphery (bound-managed), and
    // everything on (IR drop's row factors start at the tile's K range).
    v.push(GemmVariant {
        bound_management: true,
        ir_drop: false,
        block_readout: true,
        ..store
    });
    v.push(GemmVariant {
        block_readout: true,
        ..store
    });
    // The attempt passes of each bound-managed variant.
    let attempts: Vec<GemmVariant> = v
        .iter()
        .filter(|v| v.bound_management)
        .map(|v| GemmVariant {
            output: GemmOutput::BmAttempt,
            ..*v
        })
        .collect();
    v.extend(attempts);
    v.iter()
        .flat_map(|v| {
            let (short, long) = (GemmTile::for_variant(v), GemmTile::for_k_block(v, 512));
            let long = (long != short).then(|| gemm_defines(v, long));
            std::iter::once(gemm_defines(v, short)).chain(long)
        })
        .collect()
}
