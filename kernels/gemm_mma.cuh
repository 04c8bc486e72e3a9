// The mma.sync grouped GEMM moe_gemm (sm_80+): one CTA per (expert, row tile, column tile),
// ldmatrix + m16n8k16 MMAs over cp.async stages, the periphery epilogue per crossbar block
// (analog) or bf16 × bf16 (digital). Mirrors tile::AnalogMatrix::mvm per expert (block partial
// sums added in input-block order); launched by backend::cuda::gemm::mma_sync::mma_sync_gemm,
// also for the GDC readout (MOE_DIAG, backend::cuda::periphery::crossbar_readout) and bound
// management's attempts (MOE_MODE 4, backend::cuda::periphery::bound_management).
extern "C" __global__ void __launch_bounds__(NTHREADS, MOE_MIN_CTAS) moe_gemm(GemmParams p) {
    extern __shared__ __align__(16) u16 smem[];
#if MOE_NORMALS
    stage_normal_table();
#endif
#if MOE_ANALOG && MOE_IR_DROP && MOE_IR_TABLE
    stage_ir_table(p.k_block);
#endif
    u32 e, m_tile, n_tile;
    if (!tile_of_block(p, p.n / BN, MOE_RASTER_COLS / BN, e, m_tile, n_tile)) return;
    const u32 row_begin = p.offsets[e], rows_e = p.offsets[e + 1] - row_begin;
    const u32 m0 = m_tile * BM, n0 = n_tile * BN;
#if MOE_MODE == 4
    // A bound-management attempt skips the row tiles without a live row.
    {
        bool live = false;
        for (u32 r = threadIdx.x; r < BM; r += NTHREADS)
            live |= m0 + r < rows_e && p.bm_flag[row_begin + m0 + r] != 0u;
        if (!__syncthreads_or(live)) return;
    }
#endif
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const u32 wm = warp / MOE_WARPS_N, wn = warp % MOE_WARPS_N;
    const u32 K = p.k;

    // Accumulator fragment of this thread (mma.sync m16n8 C layout): row of fragment (mi, half)
    // inside the expert's rows, first of the two columns of n8 fragment tn.
    auto frag_row = [&](u32 mi, u32 half) { return m0 + wm * (MI * 16) + mi * 16 + (lane >> 2) + half * 8; };
    auto frag_col = [&](u32 tn) { return n0 + wn * (TN * 8) + tn * 8 + (lane & 3) * 2; };

    // Loader plan, fixed for the whole K loop: 16-byte chunks, CHUNKS_PER_ROW per BK-half row;
    // chunk i of a thread lies NTHREADS/CHUNKS_PER_ROW rows below chunk 0 in shared memory. The
    // global sources advance by BK per stage, so a stage costs one add per source (the 64-bit
    // index arithmetic per stage was a quarter of the K loop's instructions). A rows are
    // gathered once here.
    constexpr u32 A_CHUNKS = BM * CHUNKS_PER_ROW / NTHREADS, B_CHUNKS = BN * CHUNKS_PER_ROW / NTHREADS;
    constexpr u32 CHUNK_ROWS = NTHREADS / CHUNKS_PER_ROW, STAGE_BYTES = STAGE_HALVES * 2;
    const u32 ld_row = t / CHUNKS_PER_ROW, ld_chunk = t % CHUNKS_PER_ROW;
    const u32 smem_base = smem_addr(smem);
    const u32 ld_dst = (ld_row * LDS + ld_chunk * 8) * 2;  // bytes, chunk 0 of A (B: + BM rows)
#if MOE_DIAG
    // GDC readout: this launch's expert e is crossbar block e % diag_kb of expert e / diag_kb of
    // the weights [E, N, diag_k] (the forward's operands, no regrouped copy), and its rows are
    // the identity rows in order, row r one-hot at input r. The tile's rows [m0, m0 + BM) thus
    // see inputs [m0, m0 + BM) only: the others are zero, and their products add exact zeros to
    // every sum (W x̃, Σ|W|x̃², the IR-drop sums), so the result is the whole block's. A quarter
    // of the MMAs for 512-row crossbars.
    const u32 k_first = m0, k_len = min(BM, K - m0);
    const u64 w_ld = p.diag_k;
    const u64 w_off = ((u64)(e / p.diag_kb) * p.n + n0 + ld_row) * w_ld + (u64)(e % p.diag_kb) * K + k_first +
                      ld_chunk * 8;
#else
    const u32 k_first = 0, k_len = K;
    const u64 w_ld = K;
    const u64 w_off = ((u64)e * p.n + n0 + ld_row) * K + ld_chunk * 8;
#endif
    const u64 b_stride = (u64)CHUNK_ROWS * w_ld;
    const u16* a_src[A_CHUNKS];
    u32 a_bytes[A_CHUNKS];
#pragma unroll
    for (u32 i = 0; i < A_CHUNKS; ++i) {
        const u32 r = ld_row + i * CHUNK_ROWS;
        const bool ok = m0 + r < rows_e;
        const u32 pos = row_begin + m0 + r;
        const u32 row = ok ? (p.a_row_of ? p.a_row_of[pos] : pos) : 0;
        a_src[i] = p.a + (u64)row * K + k_first + ld_chunk * 8;
        a_bytes[i] = ok ? 16u : 0u;
    }
    const u16* w_src = p.w + w_off;

    // Copies the next BK columns of K into the stage at byte offset `stage_off`.
    auto load_stage = [&](u32 stage_off) {
        const u32 s = smem_base + stage_off + ld_dst;
#pragma unroll
        for (u32 i = 0; i < A_CHUNKS; ++i) {
            cp_async16(s + i * CHUNK_ROWS * LDS * 2, a_src[i], a_bytes[i]);
            a_src[i] += BK;
        }
#pragma unroll
        for (u32 i = 0; i < B_CHUNKS; ++i) {
            cp_async16(s + (BM + i * CHUNK_ROWS) * LDS * 2, w_src + i * b_stride, 16u);
        }
        w_src += BK;
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // Per-thread ldmatrix offsets (bytes) inside a stage: A fragment rows of this warp, B rows.
    const u32 a_ld = ((wm * (MI * 16) + (lane & 15)) * LDS + (lane >> 4) * 8) * 2;
    const u32 b_ld = ((BM + wn * (TN * 8) + (lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8) * 2;

    float acc[MI][TN][4];
#if MOE_ANALOG
#if MOE_TOTAL_SMEM
    // The running total in shared memory after the stages, value (mi, tn, r) of this thread at
    // total_s[((mi·TN + tn)·4 + r)·NTHREADS] (thread-minor: conflict-free): with the side
    // accumulators it freed the registers that the 64-column K step needs without spilling.
    float* total_s = (float*)(smem + MOE_STAGES * STAGE_HALVES) + t;
    auto total_at = [&](u32 mi, u32 tn, u32 r) -> float& { return total_s[((mi * TN + tn) * 4 + r) * NTHREADS]; };
#else
    float total[MI][TN][4];
    auto total_at = [&](u32 mi, u32 tn, u32 r) -> float& { return total[mi][tn][r]; };
#endif
    u32 bm_rows = 0;  // MOE_BM: bit mi·2 + half: that row had a saturated output in some crossbar block
#endif
#if MOE_PCM_READ
    float acc_s2[MI][TN][4];
#endif
#if MOE_IR_DROP
    float acc_abs[MI][TN][4], acc_ir[MI][TN][4];
#endif
    // Zero the accumulators of one crossbar block along K (before each block's MMAs).
    auto reset_block = [&]() {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    acc[i][j][r] = 0.0f;
#if MOE_PCM_READ
                    acc_s2[i][j][r] = 0.0f;
#endif
#if MOE_IR_DROP
                    acc_abs[i][j][r] = 0.0f;
                    acc_ir[i][j][r] = 0.0f;
#endif
                }
    };
    reset_block();
#if MOE_ANALOG && MOE_MODE != 4  // an attempt writes bm_scratch, not a total
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) total_at(i, j, r) = 0.0f;
#endif

    // MOE_DIAG: one crossbar block (n_kb = 1), of which the tile's K range.
    const u32 n_steps = k_len / BK, steps_per_block = MOE_DIAG ? n_steps : p.k_block / BK;
    // Prologue: STAGES − 1 stages in flight (empty groups keep the group count uniform).
#pragma unroll
    for (u32 st = 0; st < MOE_STAGES - 1; ++st) {
        if (st < n_steps) load_stage(st * STAGE_BYTES);
        else asm volatile("cp.async.commit_group;\n" ::);
    }
    // Rotating stage offsets (read: this step's stage; write: the one STAGES − 1 ahead) and the
    // position inside the current crossbar block, as counters instead of divisions.
    u32 read_off = 0, write_off = (MOE_STAGES - 1) * STAGE_BYTES;
#if MOE_ANALOG
    u32 kb = 0, step_in_block = 0;
#endif
    for (u32 step = 0; step < n_steps; ++step) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(MOE_STAGES - 2));
        // Stage `step` has landed for every thread, and every thread is done with the stage
        // consumed at step − 1, which the load below overwrites.
        __syncthreads();
        if (step + MOE_STAGES - 1 < n_steps) load_stage(write_off);
        else asm volatile("cp.async.commit_group;\n" ::);
        write_off = write_off == (MOE_STAGES - 1) * STAGE_BYTES ? 0 : write_off + STAGE_BYTES;
        const u32 s = smem_base + read_off;
        read_off = read_off == (MOE_STAGES - 1) * STAGE_BYTES ? 0 : read_off + STAGE_BYTES;
#pragma unroll
        for (u32 kk = 0; kk < BK; kk += 16) {
            u32 a[MI][4];
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
                ldmatrix_x4(s + a_ld + (mi * 16 * LDS + kk) * 2, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
            u32 b[TN][2];
#pragma unroll
            for (u32 tp = 0; tp < TN / 2; ++tp)
                ldmatrix_x4(s + b_ld + (tp * 16 * LDS + kk) * 2, b[2 * tp][0], b[2 * tp][1], b[2 * tp + 1][0],
                            b[2 * tp + 1][1]);
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
                for (u32 tn = 0; tn < TN; ++tn) mma16816(acc[mi][tn], a[mi], b[tn][0], b[tn][1]);
#if MOE_PCM_READ || MOE_IR_DROP
            u32 babs[TN][2];
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                babs[tn][0] = b[tn][0] & 0x7fff7fffu;
                babs[tn][1] = b[tn][1] & 0x7fff7fffu;
            }
#endif
#if MOE_PCM_READ
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi) {
                const SideA o = side_operands(a[mi], 0u, 0u);
#pragma unroll
                for (u32 tn = 0; tn < TN; ++tn) mma16816(acc_s2[mi][tn], o.a2, babs[tn][0], babs[tn][1]);
            }
#endif
#if MOE_IR_DROP
            {
                const u32 j0 = k_first + step_in_block * BK + kk + (lane & 3) * 2;
                const u32 f_lo = ir_pair(j0, p.k_block), f_hi = ir_pair(j0 + 8, p.k_block);
#pragma unroll
                for (u32 mi = 0; mi < MI; ++mi) {
                    const SideA o = side_operands(a[mi], f_lo, f_hi);
#pragma unroll
                    for (u32 tn = 0; tn < TN; ++tn) {
                        mma16816(acc_abs[mi][tn], o.aa, babs[tn][0], babs[tn][1]);
                        mma16816(acc_ir[mi][tn], o.af, b[tn][0], b[tn][1]);
                    }
                }
            }
#endif
        }

#if MOE_ANALOG
        if (++step_in_block == steps_per_block) {
            step_in_block = 0;
            // Epilogue of crossbar block kb (block_outputs). The block's column tables (tensor
            // id, scale) as row pointers: 32-bit indexing below.
            const u64 tab_row = ((u64)e * p.n_kb + kb) * p.n;
            const u32* tid_of_col = p.col_tensor_id + tab_row;
            const float* scale_of_col = p.col_scale + tab_row;
            // The block's column constants of this thread, loaded once for all its rows (the
            // column is even and p.n too: 8-byte aligned).
            float2 col_scale[TN];
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) col_scale[tn] = *(const float2*)(scale_of_col + frag_col(tn));
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
            NoiseCols noise_col[TN / 2];
#pragma unroll
            for (u32 tn = 0; tn < TN; tn += 2) noise_col[tn / 2] = noise_cols(p, tid_of_col, frag_col(tn), lane);
#else
            (void)tid_of_col;
#endif
#pragma unroll
            for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
                for (u32 half = 0; half < 2; ++half) {
                    const u32 row_local = frag_row(mi, half);
#if MOE_MODE == 4 || !MOE_NOISE_QUADS
                    if (row_local >= rows_e) continue;
#if MOE_MODE == 4
                    // Rows without a pending crossbar (lanes l and l ^ 1 share the row).
                    if (p.bm_flag[row_begin + row_local] == 0u) continue;
                    const int slot = p.bm_slot[row_begin + row_local];
#endif
                    const BlockRow br = block_row(p, row_begin + row_local, row_local, kb);
                    const u32 lanes = 3u << (lane & 30u);  // the lane pair that shares the row
#else
                    // A row past the expert's runs too, with an all-zero BlockRow: finite
                    // outputs into a total no one stores, no saturation flag (α_nm = 0), no
                    // clip count. The whole warp then runs each row: no branch per row, and the
                    // normals' lane exchange takes the full warp. (The variants that draw
                    // normals per column pair keep the branch: straight-line, ptxas spilled
                    // them at the 128-register bound.)
                    BlockRow br = {};
                    if (row_local < rows_e) br = block_row(p, row_begin + row_local, row_local, kb);
                    const u32 lanes = ~0u;
#endif
                    float2 z[TN];
#pragma unroll
                    for (u32 tn = 0; tn < TN; tn += 2) {
                        z[tn] = z[tn + 1] = make_float2(0.0f, 0.0f);
#if MOE_PCM_READ || MOE_OUT_NOISE || MOE_ADDITIVE
                        output_normals(p, br, noise_col[tn / 2], lane, lanes, z[tn], z[tn + 1]);
#else
                        (void)lanes;
#endif
                    }
#pragma unroll
                    for (u32 tn = 0; tn < TN; ++tn) {
                        const u32 r0 = half * 2;
                        PairSums s;
#pragma unroll
                        for (u32 c = 0; c < 2; ++c) {
                            s.acc[c] = acc[mi][tn][r0 + c];
#if MOE_PCM_READ
                            s.s2[c] = acc_s2[mi][tn][r0 + c];
#endif
#if MOE_IR_DROP
                            s.abs[c] = acc_abs[mi][tn][r0 + c];
                            s.ir[c] = acc_ir[mi][tn][r0 + c];
#endif
                        }
#if MOE_MODE == 4
                        // The attempt's outputs of this row's pending crossbars, scaled as the
                        // running total would add them; saturation per crossbar for the host.
                        float t2[2] = {0.0f, 0.0f};
                        u32 sat = 0u;
                        block_outputs(p, br, col_scale[tn], s, z[tn], t2, sat, 1u);
#pragma unroll
                        for (u32 c = 0; c < 2; ++c) {
                            const u32 col = frag_col(tn) + c;
                            const u64 xb = ((u64)slot * p.n_kb + kb) * p.n_xbar + p.col_xbar[col];
                            if (!p.bm_pending[xb]) continue;
                            p.bm_scratch[((u64)slot * p.n_kb + kb) * p.n + col] = t2[c];
                            if ((sat >> c) & 1u) p.bm_sat[xb] = 1u;
                        }
#else
                        float t2[2] = {total_at(mi, tn, r0), total_at(mi, tn, r0 + 1)};
                        block_outputs(p, br, col_scale[tn], s, z[tn], t2, bm_rows, 1u << (mi * 2 + half));
                        total_at(mi, tn, r0) = t2[0];
                        total_at(mi, tn, r0 + 1) = t2[1];
#endif
                    }
                }
            reset_block();
            ++kb;
        }
#endif
    }

#if MOE_MODE == 4
    return;  // the attempt's outputs are in bm_scratch
#endif
#if MOE_BM
    // Flag each saturated row for the bound-management attempts, which redo it.
#pragma unroll
    for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
        for (u32 half = 0; half < 2; ++half)
            if (bm_rows & (1u << (mi * 2 + half))) {
                const u32 pos = row_begin + frag_row(mi, half);
                p.bm_flag[pos] = 1u;
            }
#endif

#if MOE_ANALOG
#define RESULT(mi, tn, r) total_at(mi, tn, r)
#else
#define RESULT(mi, tn, r) acc[mi][tn][r]
#endif
    // Output: store, SwiGLU, or weighted scatter-add (gather/scatter fused, no padded copies).
#pragma unroll
    for (u32 mi = 0; mi < MI; ++mi)
#pragma unroll
        for (u32 half = 0; half < 2; ++half) {
            const u32 row_local = frag_row(mi, half);
            if (row_local >= rows_e) continue;
            const u32 pos = row_begin + row_local;
#if MOE_MODE == 0 || MOE_MODE == 5
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                const u32 col = frag_col(tn);
                store_row2(p.out, (u64)pos * p.n + col, RESULT(mi, tn, half * 2), RESULT(mi, tn, half * 2 + 1));
            }
#elif MOE_MODE == 1 || MOE_MODE == 3
            // Columns come interleaved in groups of 8: gate group g, up group g (host layout).
#pragma unroll
            for (u32 tn = 0; tn < TN; tn += 2) {
                const u32 col = n0 + wn * (TN * 8) + tn * 8;
                const u32 hcol = (col / 16) * 8 + (lane & 3) * 2;
                float h[2];
#pragma unroll
                for (u32 c = 0; c < 2; ++c) {
                    h[c] = silu_mul(RESULT(mi, tn, half * 2 + c), RESULT(mi, tn + 1, half * 2 + c));
                }
                store_hidden(p.out, (u64)pos * (p.n / 2) + hcol, h[0], h[1]);
            }
#else
            const u32 token = p.sorted_token[pos];
            const float w = p.sorted_weight[pos];
#pragma unroll
            for (u32 tn = 0; tn < TN; ++tn) {
                const u32 col = frag_col(tn);
                float* dst = p.out + (u64)token * p.n + col;
                atomic_add2(dst, w * RESULT(mi, tn, half * 2), w * RESULT(mi, tn, half * 2 + 1));
            }
#endif
        }
}
