// Configuration of the grouped MoE kernels: routing, the DAC prologue, the analog and digital
// grouped GEMMs with the crossbar periphery fused, and the layer's element-wise kernels. They
// form one NVRTC unit (backend::cuda::compile::MOE_CU) read in this order after the host's
// #defines and philox.cuh: moe_config.cuh, routing.cu, dac.cuh, gemm_common.cuh,
// periphery.cuh, raster.cuh, outputs.cuh, gemm_mma.cuh, gemm_wgmma.cuh, gemm_wgmma_analog.cuh,
// gemm_wgmma_digital.cuh, layer.cu.
// The macros (set per instantiation by backend::cuda::gemm::variant::gemm_defines):
//   MOE_ANALOG   1: analog epilogue per crossbar block along K; 0: digital baseline
//   MOE_PCM_READ 1: PCM_READ short-term weight noise (second accumulator Σ|W|x̃²)
//   MOE_IR_DROP  1: AIHWKIT static IR drop (accumulators Σ|W||x̃| and Σ W x̃ f(j))
//   MOE_IR_TABLE 1: the IR-drop row factors f(j) from a shared-memory table (crossbars of at
//                   most 4,096 rows), 0: computed in the K loop
//   MOE_ADDITIVE 1: ADDITIVE short-term weight noise (σ² = std²·‖x̃‖² per row and crossbar block)
//   MOE_OUT_NOISE, MOE_ADC: output noise, ADC
//   MOE_ADC_BOUND_LEVEL 1: the ADC's bound is one of its levels: one clamp, of its input
//   MOE_BM       1: iterative bound management: rows with a saturated ADC output are flagged
//                   (MOE_MODE 0) and redone by attempt passes (MOE_MODE 4; needs MOE_ADC)
//   MOE_NOISE_QUADS 1: every 4 columns lie in one crossbar at a multiple of 4 (one Philox block)
//   MOE_WGMMA    1 (sm_90a only): also build moe_gemm_wgmma (digital) or moe_analog_wgmma (see there)
//   MOE_MODE     0: store [P, N]; 1: SwiGLU of interleaved gate/up → [P, N/2]; 2: weighted scatter-add → [T, N];
//                3 (digital): SwiGLU → [P, N/2] bf16 (the next GEMM's operand, round to nearest even as to_bf16);
//                4 (MOE_BM): one bound-management attempt: per crossbar block, the outputs of the pending
//                  crossbars of the live rows → bm_scratch [slots, KB, N], saturation → bm_sat
//                5 (digital): store [P, N] rounded to bf16 (the expert outputs that combine_bf16_rows
//                  sums per token: no read-modify-write of the f32 output per expert)
//   MOE_CLIP_COUNT 1 (store mode, ADC without MOE_BM): each output is the number of crossbar blocks along K
//                whose ADC output clipped, not the output (fine-tuning's straight-through mask)
//   MOE_DIAG     1 (moe_gemm): the GDC readout through every crossbar block of a grouped matrix
//                (launch expert g = block g % diag_kb of expert g / diag_kb of weights [E, N, diag_k]),
//                input rows the identity in order: each row tile multiplies only its own K range
//   MOE_TOTAL_SMEM 1 (moe_gemm, analog): the running total over the crossbar blocks in shared memory
//                after the stages (BM × BN f32, the host adds it to the launch), not in registers
// With PCM_READ, ADDITIVE and/or output noise, each output gets one normal (purpose OutputNoise)
// scaled by sqrt(out_noise² + σ_w²), as tile::Crossbar::analog. The CPU model of every kernel
// here, the oracle of the GPU tests, is backend::cuda::reference.
//
// Operands: analog A = integer DAC codes in fp16 (exact for ≤ 11-bit DACs), W̃ in fp16 (binary16
// on every backend after programming and drift, docs/model.md §3: products exact in f32);
// digital A and W in bf16. Accumulation in f32 (mma.sync m16n8k16). The periphery per crossbar
// block mirrors tile::Crossbar::analog + forward_chunk step 9, block partial sums
// are added in input-block order as tile::AnalogMatrix::mvm does.

typedef unsigned short u16;

#ifndef MOE_ANALOG
#define MOE_ANALOG 1
#endif
#ifndef MOE_PCM_READ
#define MOE_PCM_READ 0
#endif
#ifndef MOE_IR_DROP
#define MOE_IR_DROP 0
#endif
#ifndef MOE_IR_TABLE
#define MOE_IR_TABLE 0
#endif
#ifndef MOE_ADDITIVE
#define MOE_ADDITIVE 0
#endif
#ifndef MOE_BM
#define MOE_BM 0
#endif
#ifndef MOE_OUT_NOISE
#define MOE_OUT_NOISE 1
#endif
#ifndef MOE_ADC
#define MOE_ADC 1
#endif
#ifndef MOE_MODE
#define MOE_MODE 0
#endif
#ifndef MOE_NOISE_QUADS
#define MOE_NOISE_QUADS 0
#endif
#ifndef MOE_WGMMA
#define MOE_WGMMA 0
#endif
#ifndef MOE_ADC_BOUND_LEVEL
#define MOE_ADC_BOUND_LEVEL 0
#endif
#ifndef MOE_CLIP_COUNT
#define MOE_CLIP_COUNT 0
#endif
#ifndef MOE_DIAG
#define MOE_DIAG 0
#endif
#ifndef MOE_TOTAL_SMEM
#define MOE_TOTAL_SMEM 0
#endif
// Output columns per raster group of one expert's CTAs (tile_of_block): 2048 columns keep the
// group's weight tiles (≤ 2048 × K × 4 bytes) and the expert's gathered rows within the L2.
#ifndef MOE_RASTER_COLS
#define MOE_RASTER_COLS 2048
#endif
