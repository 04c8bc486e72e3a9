// The crossbar periphery fused into the GEMM epilogue, per crossbar block along K (steps 4–7
// and 9 of tile::Crossbar::forward_chunk): IR drop, short-term weight noise (PCM_READ,
// ADDITIVE), output noise, ADC, and the scale α_nm·s_map·α_GDC. block_outputs mirrors tile::Crossbar::analog and
// forward_chunk step 9; the noise draws mirror its Philox keys (tile::Crossbar::forward_chunk).
// The parameters come from backend::cuda::periphery::GemmPeriphery.
// IR-drop weighting of crossbar row j of n: 1 − (1 − j/n)², rounded step by step as
// tile::Crossbar::refresh_derived and backend::cuda::reference compute it (no contraction).
__device__ __forceinline__ float ir_row_factor(u32 j, float n) {
    const float u = __fsub_rn(1.0f, __fdiv_rn((float)j, n));
    return __fsub_rn(1.0f, __fmul_rn(u, u));
}

#if MOE_ANALOG && MOE_IR_DROP
// The weighting of crossbar rows (j, j + 1), j even, as the f16 pair the K loop multiplies the
// DAC codes with.
__device__ __forceinline__ u32 ir_pair_of(u32 j, float n) {
    return pack_f16x2(ir_row_factor(j, n), ir_row_factor(j + 1, n));
}
#if MOE_IR_TABLE
// Crossbars of at most 2·IR_TABLE_PAIRS rows (the host's gemm::IR_TABLE_ROWS): the pairs are
// tabulated in shared memory once per CTA. Computed in the loop they cost four IEEE divisions
// per thread and k16 step beside the MMAs, and with both paths in one kernel the division path
// stayed in the K loop (ptxas: 200 lane instructions per output and crossbar block for the
// standard-hwa loop, 106 without it).
#define IR_TABLE_PAIRS 2048
__shared__ u32 ir_pair_smem[IR_TABLE_PAIRS];
// Every GEMM kernel with MOE_IR_TABLE calls this first, with all its threads.
__device__ __forceinline__ void stage_ir_table(u32 k_block) {
    const float n = (float)k_block;
    for (u32 i = threadIdx.x; i < k_block / 2; i += blockDim.x) ir_pair_smem[i] = ir_pair_of(2 * i, n);
    __syncthreads();
}
__device__ __forceinline__ u32 ir_pair(u32 j, u32 k_block) {
    (void)k_block;
    return ir_pair_smem[j >> 1];
}
#else
__device__ __forceinline__ u32 ir_pair(u32 j, u32 k_block) { return ir_pair_of(j, (float)k_block); }
#endif
#endif

#if MOE_ANALOG && (MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE)
#define MOE_NORMALS 1
// The normal transform's table in shared memory for the epilogue's draws: a shared load takes
// a 32-bit immediate address where the global table needs a 64-bit pointer register, and the
// mma.sync kernel sits at its 128-register bound. Every GEMM kernel that draws normals calls
// stage_normal_table first, with all its threads.
__shared__ float2 normal_smem[NORMAL_TABLE_LEN];
__device__ __forceinline__ void stage_normal_table() {
    for (u32 i = threadIdx.x; i < NORMAL_TABLE_LEN; i += blockDim.x) normal_smem[i] = NORMAL_TABLE[i];
    __syncthreads();
}

// Two normals of `purpose` for columns (c, c + 1) of one output row; one Philox call when both
// sit in one crossbar at an even index (the common case), else two (same values either way).
__device__ __forceinline__ float2 periphery_normals(const GemmParams& p, u32 purpose, u32 tid0, u32 tid1, u64 idx0,
                                                    u64 idx1, u32 call) {
    if (tid0 == tid1 && idx1 == idx0 + 1 && (idx0 & 1) == 0)
        return stream_normal_pair_in(normal_smem, make_stream(p.seed, purpose, tid0), idx0, call, p.attempt);
    return make_float2(stream_normal_in(normal_smem, make_stream(p.seed, purpose, tid0), idx0, call, p.attempt),
                       stream_normal_in(normal_smem, make_stream(p.seed, purpose, tid1), idx1, call, p.attempt));
}
#else
#define MOE_NORMALS 0
#endif

// Noise row and call of sorted pair `pos`, the `row_local`-th row of its expert: the keys of
// the per-MVM noise (tile::Crossbar::forward_chunk keys it by batch row and mvm_id).
__device__ __forceinline__ u32 noise_row_of(const GemmParams& p, u32 pos, u32 row_local) {
    return p.noise_key ? p.noise_key[2 * pos] : row_local;
}
__device__ __forceinline__ u32 noise_call_of(const GemmParams& p, u32 pos) {
    return p.noise_key ? p.noise_key[2 * pos + 1] : p.mvm_id;
}

#if MOE_ANALOG
// One output row of crossbar block kb as the periphery epilogue needs it: the noise-management
// scale α of its operand row and the keys of its per-MVM noise.
struct BlockRow {
    float alpha_nm;
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
    u32 nrow, ncall;
#endif
#if MOE_ADDITIVE
    float sumsq;  // ‖x̃‖² of the row's input segment
#endif
};

// Sorted pair `pos`, the `row_local`-th row of its expert, in crossbar block kb.
__device__ __forceinline__ BlockRow block_row(const GemmParams& p, u32 pos, u32 row_local, u32 kb) {
    BlockRow r;
    const u32 arow = p.a_row_of ? p.a_row_of[pos] : pos;
    r.alpha_nm = p.a_alpha[(u64)arow * p.n_kb + kb];
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
    r.nrow = noise_row_of(p, pos, row_local);
    r.ncall = noise_call_of(p, pos);
#endif
#if MOE_ADDITIVE
    r.sumsq = p.a_sumsq[(u64)arow * p.n_kb + kb];
#endif
    return r;
}

// One thread's block sums of outputs (row, col) and (row, col + 1) of a crossbar block, in DAC
// code units: the product and the side accumulators.
struct PairSums {
    float acc[2];
#if MOE_PCM_READ
    float s2[2];
#endif
#if MOE_IR_DROP
    float abs[2], ir[2];
#endif
};

#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
// The noise-stream keys of the output columns one lane draws for: with MOE_NOISE_QUADS the
// column col0 + 8·(lane & 1) of a pair of n8 fragments (see output_normals), else both columns
// of both fragments. They depend on the column and the crossbar block only, so the GEMM loads
// them once per block (or, for the column's place in its crossbar, once per kernel), not once
// per output row.
struct NoiseCols {
#if MOE_NOISE_QUADS
    u32 tid, stride, local;  // tensor id of the crossbar, its columns, the column inside it
#else
    u32 col0;
    const u32* tid_of_col;
#endif
};
__device__ __forceinline__ NoiseCols noise_cols(const GemmParams& p, const u32* tid_of_col, u32 col0, u32 lane) {
    NoiseCols c;
#if MOE_NOISE_QUADS
    const u32 col = col0 + 8 * (lane & 1u);
    c.tid = tid_of_col[col];
    c.stride = p.col_block_cols[col];
    c.local = p.col_local[col];
#else
    (void)p;
    (void)lane;
    c.col0 = col0;
    c.tid_of_col = tid_of_col;
#endif
    return c;
}

#if MOE_NOISE_QUADS
// The Philox counter of row r's quad block: block idx / 4 of element idx = nrow·stride + local;
// the crossbar width `stride` is a multiple of 4 (host-checked), so it is
// nrow·(stride / 4) + local / 4.
__device__ __forceinline__ uint4 quad_counter(const GemmParams& p, const BlockRow& r, const NoiseCols& nc) {
    const u64 blk = (u64)r.nrow * (nc.stride >> 2) + (nc.local >> 2);
    return stream_counter(PURPOSE_OUTPUT_NOISE, nc.tid, blk, r.ncall, p.attempt);
}
// The normals of a lane pair's quad block q: this lane's words and its partner's, exchanged
// over the lanes in `mask` (which holds both of the pair).
__device__ __forceinline__ void quad_normals(uint4 q, u32 lane, u32 mask, float2& z0, float2& z1) {
    const u32 odd = lane & 1u;
    const u32 got0 = __shfl_xor_sync(mask, odd ? q.x : q.z, 1);
    const u32 got1 = __shfl_xor_sync(mask, odd ? q.y : q.w, 1);
    // One normal_pair_in per word pair, words selected first: selecting between two transformed
    // pairs made ptxas keep both alive (spills at the 128-register bound).
    const float2 mine = normal_pair_in(normal_smem, odd ? q.z : q.x, odd ? q.w : q.y);
    const float2 theirs = normal_pair_in(normal_smem, got0, got1);
    z0 = odd ? theirs : mine;
    z1 = odd ? mine : theirs;
}
#endif

// Output normals (purpose OutputNoise) of this thread's columns (col0, col0 + 1) and
// (col0 + 8, col0 + 9) of one row: two n8 fragments of the mma.sync / wgmma accumulator layout,
// where lanes l and l ^ 1 hold 4 consecutive columns of each. With MOE_NOISE_QUADS every 4
// columns sit in one crossbar at a multiple of 4 (host-checked), so one Philox block holds the
// normals of a lane pair's 4 columns (words x, y of the even lane, z, w of the odd one): each
// lane of the pair draws the block of one fragment and passes the partner its words, half the
// Philox work for the same values as stream_normal_pair. Both lanes of a pair must call this,
// and every lane in `mask` (~0u where the whole warp calls it: a partial mask costs a
// convergence check per exchange).
__device__ __forceinline__ void output_normals(const GemmParams& p, const BlockRow& r, const NoiseCols& nc, u32 lane,
                                               u32 mask, float2& z0, float2& z1) {
#if MOE_NOISE_QUADS
    const uint4 q = philox4x32_10_keyed(quad_counter(p, r, nc), p.round_keys);
    quad_normals(q, lane, mask, z0, z1);
#else
    (void)lane;
    (void)mask;
    auto pair = [&](u32 col) {
        const u64 idx0 = (u64)r.nrow * p.col_block_cols[col] + p.col_local[col];
        const u64 idx1 = (u64)r.nrow * p.col_block_cols[col + 1] + p.col_local[col + 1];
        return periphery_normals(p, PURPOSE_OUTPUT_NOISE, nc.tid_of_col[col], nc.tid_of_col[col + 1], idx0, idx1,
                                 r.ncall);
    };
    z0 = pair(nc.col0);
    z1 = pair(nc.col0 + 8);
#endif
}

// output_normals of two rows r[0], r[1] (z[h]: row h's), for a warp whose lanes all call it:
// with quads, the two Philox blocks run in lockstep and the lane exchange takes the full warp
// (a partial mask costs a convergence check per shuffle pair).
__device__ __forceinline__ void output_normals_rows2(const GemmParams& p, const BlockRow* r, const NoiseCols& nc,
                                                     u32 lane, float2 (&z)[2][2]) {
#if MOE_NOISE_QUADS
    uint4 q0 = quad_counter(p, r[0], nc), q1 = quad_counter(p, r[1], nc);
    philox4x32_10_keyed_x2(q0, q1, p.round_keys);
    quad_normals(q0, lane, ~0u, z[0][0], z[0][1]);
    quad_normals(q1, lane, ~0u, z[1][0], z[1][1]);
#else
    output_normals(p, r[0], nc, lane, ~0u, z[0][0], z[0][1]);
    output_normals(p, r[1], nc, lane, ~0u, z[1][0], z[1][1]);
#endif
}
#endif

#if MOE_ANALOG && MOE_ADC
// v / Δ_out as IEEE division rounds it (tile::Quantizer::quantize), without a division: the
// reciprocal and two residual steps of tile::quotient_by_reciprocal, which its test shows to be
// the division bit for bit. `/` cost a slow-path check and a branch per output, and the
// branches cut the epilogue into blocks that ptxas could not interleave. The caller limits v
// (adc_output): ±∞ would make the residual NaN.
__device__ __forceinline__ float adc_quotient(const GemmParams& p, float v) {
    const float q0 = __fmul_rn(v, p.adc_step_inv);
    const float q1 = __fmaf_rn(__fmaf_rn(-p.adc_step, q0, v), p.adc_step_inv, q0);
    return __fmaf_rn(__fmaf_rn(-p.adc_step, q1, v), p.adc_step_inv, q1);
}

// The ADC, tile::Quantizer::quantize: clamp(rint(v/Δ_out)·Δ_out, ±b_out).
__device__ __forceinline__ float adc_output(const GemmParams& p, float v) {
#if MOE_ADC_BOUND_LEVEL
    // b_out is a level (tile::Quantizer::bound_is_a_level, checked by the host): the input
    // clamped to ±b_out quantises to the same output with no clamp after.
    return __fmul_rn(rintf(adc_quotient(p, fminf(fmaxf(v, -p.adc_bound), p.adc_bound))), p.adc_step);
#else
    // v first limited to ±(b_out + 2Δ_out): an output beyond saturates the ADC either way.
    const float q = adc_quotient(p, fminf(fmaxf(v, -p.adc_clip), p.adc_clip));
    return fminf(fmaxf(__fmul_rn(rintf(q), p.adc_step), -p.adc_bound), p.adc_bound);
#endif
}
#endif

// Steps 3–4 of tile::Crossbar::forward_chunk for one output of a crossbar block: the block sum
// `acc` (DAC code units) in output units, less the IR drop its side sums `abs` = Σ|W̃||x̃| and
// `ir` = Σ W̃ x̃ f(j) give it (tile::Crossbar::analog).
__device__ __forceinline__ float block_value(const GemmParams& p, float acc, float abs, float ir) {
    float v = acc * p.dac_step;
#if MOE_IR_DROP
    float aa = p.ir_k * (abs * p.dac_step);
    float cc = aa * (aa * (0.05f * aa - 0.2f) + 0.5f);
    v -= p.ir_scale * cc * (ir * p.dac_step);
#else
    (void)abs;
    (void)ir;
#endif
    return v;
}

// Outputs (row, col), (row, col + 1) of one crossbar block after step 4 (block_value): the
// values `y` and, with PCM_READ, the sums Σ|W̃|x̃² (DAC code units) that set their weight-noise
// variance.
struct BlockValues {
    float y[2];
#if MOE_PCM_READ
    float s2[2];
#endif
};

__device__ __forceinline__ BlockValues block_values(const GemmParams& p, const PairSums& s) {
    BlockValues b;
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
#if MOE_IR_DROP
        b.y[c] = block_value(p, s.acc[c], s.abs[c], s.ir[c]);
#else
        b.y[c] = block_value(p, s.acc[c], 0.0f, 0.0f);
#endif
#if MOE_PCM_READ
        b.s2[c] = s.s2[c];
#endif
    }
    return b;
}

#if MOE_PCM_READ || MOE_ADDITIVE
// σ of a noise draw of variance v: √max(v, 2⁻¹⁰⁰) rounded as IEEE, mirroring tile::noise_sd
// (tile::NOISE_VAR_FLOOR). From 2⁻¹⁰¹ up (finite) __fsqrt_rn is its fast path alone:
// MUFU.RSQ y, s = x·y, the residual x − s² and s + residual·y/2 (ptxas 13.5, sm_90a), which
// this writes out; the floor keeps the argument there, so the slow-path call that __fsqrt_rn
// adds for zero, subnormal and special arguments (a branch that split the epilogue into blocks
// ptxas scheduled apart) is gone. The argument is a sum of non-negative finite terms.
__device__ __forceinline__ float noise_sd(float v) {
    const float x = fmaxf(v, 0x1p-100f);
#if MOE_MODE == 4
    // The bound-management attempt with every side accumulator sits at 255 registers, where
    // the interleaving the written-out root allows made ptxas spill 24 bytes: the library root
    // of the same argument, the same value.
    return __fsqrt_rn(x);
#else
    float y;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    const float s = __fmul_rn(x, y);
    return __fmaf_rn(__fmaf_rn(-s, s, x), __fmul_rn(y, 0.5f), s);
#endif
}
#endif

// Steps 5–7 and 9 of tile::Crossbar::forward_chunk for outputs (row, col), (row, col + 1) of one
// crossbar block with values `b` (block_values): short-term weight and output noise (normals
// z), ADC, and the scale α_nm·s_map·α_GDC (`scale`: s_map·α_GDC of the two columns), added to
// t[0], t[1] (the running total over the blocks along K). Mirrors tile::Crossbar::analog (one
// normal per output of the summed variance, σ = out_noise without PCM_READ or ADDITIVE) and
// forward_chunk step 9. With MOE_BM, sets `sat_bit` in `sat` when an output saturated the ADC
// in a row that bound management may redo (α_nm > 0); in MOE_MODE 4, `sat_bit << c` for
// output (row, col + c).
__device__ __forceinline__ void block_outputs_of(const GemmParams& p, const BlockRow& r, float2 scale,
                                                 const BlockValues& b, float2 z, float* t, u32& sat, u32 sat_bit) {
    float y[2] = {b.y[0], b.y[1]};
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
#if MOE_PCM_READ
    const float out_var = __fmul_rn(p.out_noise, p.out_noise);
    const float std2 = __fmul_rn(p.w_noise_std, p.w_noise_std);
    const float step2 = __fmul_rn(p.dac_step, p.dac_step);
    float sd[2];
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
        const float s2 = __fmul_rn(b.s2[c], step2);
        sd[c] = noise_sd(__fadd_rn(out_var, __fmul_rn(std2, s2)));
    }
#elif MOE_ADDITIVE
    const float out_var = __fmul_rn(p.out_noise, p.out_noise);
    const float std2 = __fmul_rn(p.w_noise_std, p.w_noise_std);
    const float sdr = noise_sd(__fadd_rn(out_var, __fmul_rn(std2, r.sumsq)));
    const float sd[2] = {sdr, sdr};
#else
    const float sd[2] = {p.out_noise, p.out_noise};
#endif
    y[0] += sd[0] * z.x;
    y[1] += sd[1] * z.y;
#endif
#pragma unroll
    for (u32 c = 0; c < 2; ++c) {
        float v = y[c];
#if MOE_ADC
        v = adc_output(p, v);
#endif
#if MOE_BM
        if (r.alpha_nm > 0.0f && fabsf(v) >= p.adc_bound) sat |= sat_bit << (MOE_MODE == 4 ? c : 0u);
#endif
#if MOE_CLIP_COUNT
        // The straight-through mask of fine-tuning (finetune::noisy::CpuObjective::product):
        // output (row, col) of this block clipped iff the scaled output reached the scaled
        // bound within 1e-5 relative, the scale α_nm·s_map·α_GDC being positive. Counted over
        // the blocks along K instead of the output itself.
        const float out_scale = r.alpha_nm * (c == 0 ? scale.x : scale.y);
        t[c] += (out_scale > 0.0f && fabsf(v) >= p.adc_bound * (1.0f - 1e-5f)) ? 1.0f : 0.0f;
#else
        t[c] += v * (r.alpha_nm * (c == 0 ? scale.x : scale.y));
#endif
    }
}

// Steps 3–7 and 9 (block_values, then block_outputs_of) for the sums `s` of one crossbar block.
__device__ __forceinline__ void block_outputs(const GemmParams& p, const BlockRow& r, float2 scale,
                                              const PairSums& s, float2 z, float* t, u32& sat, u32 sat_bit) {
    block_outputs_of(p, r, scale, block_values(p, s), z, t, sat, sat_bit);
}
#endif
