// The order in which CTAs walk the output tiles of a grouped GEMM (raster_tile, slab_tile,
// tile_of_block): per expert, raster groups of column tiles, column tile fastest, optionally in
// column slabs for the scatter-add (backend::cuda::gemm::tile::scatter_slab_cols). Plain C++
// between the BEGIN/END markers: tests/raster_host.rs compiles it on the host.
// CTA b → (expert e, row tile m_tile inside the expert, column tile n_tile), false past the last
// tile. Each expert's CTAs run in groups of `width` column tiles, all of the expert's row tiles
// per group, column tile fastest: the CTAs resident at once share a few weight column tiles in
// L2. Column-fastest over all of N instead streams every weight tile from DRAM once per row tile
// where one expert's weights exceed the L2 (Mixtral's gate/up: 235 MB in bf16).
// BEGIN raster_tile (plain C++: tests/raster_host.rs compiles it on the host and checks that it
// is a bijection onto the (expert, row tile, column tile) triples)
__device__ __forceinline__ bool raster_tile(const u32* tile_offsets, u32 n_experts, u32 b, u32 n_tiles_n, u32 width,
                                            u32& e, u32& m_tile, u32& n_tile) {
    if (b >= tile_offsets[n_experts] * n_tiles_n) return false;
    u32 lo = 0, hi = n_experts;  // the last expert whose first CTA is at or before b
    while (hi - lo > 1) {
        u32 mid = (lo + hi) / 2;
        if (tile_offsets[mid] * n_tiles_n <= b) lo = mid; else hi = mid;
    }
    e = lo;
    const u32 tiles_e = tile_offsets[e + 1] - tile_offsets[e];
    const u32 local = b - tile_offsets[e] * n_tiles_n;
    const u32 group = local / (width * tiles_e), r = local - group * width * tiles_e;
    const u32 left = n_tiles_n - group * width, w = left < width ? left : width;
    m_tile = r / w;
    n_tile = group * width + r % w;
    return true;
}

// Column slabs of `slab` column tiles, outermost: every expert's tiles of slab 0 (in
// raster_tile's order within the slab), then of slab 1, ... The weighted scatter-add of the
// down GEMM adds each token's k expert outputs into one f32 output row; in expert order those
// k additions are far apart and the output (OLMoE: 128 MiB) round-trips through DRAM k times,
// while one slab's output columns can stay in L2 for all of them. slab ≥ n_tiles_n is
// raster_tile itself.
__device__ __forceinline__ bool slab_tile(const u32* tile_offsets, u32 n_experts, u32 b, u32 n_tiles_n, u32 width,
                                          u32 slab, u32& e, u32& m_tile, u32& n_tile) {
    const u32 rows = tile_offsets[n_experts];
    if (b >= rows * n_tiles_n) return false;
    const u32 s = b / (rows * slab), left = n_tiles_n - s * slab, w = left < slab ? left : slab;
    if (!raster_tile(tile_offsets, n_experts, b - s * rows * slab, w, width < w ? width : w, e, m_tile, n_tile))
        return false;
    n_tile += s * slab;
    return true;
}
// END raster_tile

// Output columns per slab of the scatter-add GEMMs (slab_tile; 0: no slabs).
#ifndef MOE_SLAB_COLS
#define MOE_SLAB_COLS 0
#endif
__device__ __forceinline__ u32 slab_tiles(u32 n_tiles_n, u32 tile_cols) {
#if MOE_MODE == 2 && MOE_SLAB_COLS > 0
    const u32 slab = MOE_SLAB_COLS / tile_cols;
    return slab > 0 ? slab : 1;
#else
    return n_tiles_n;
#endif
}

// Tile b of the grouped GEMM in this order (b = blockIdx.x for one tile per CTA).
__device__ __forceinline__ bool tile_at(const GemmParams& p, u32 b, u32 n_tiles_n, u32 width, u32& e, u32& m_tile,
                                        u32& n_tile) {
    return slab_tile(p.tile_offsets, p.n_experts, b, n_tiles_n, width, slab_tiles(n_tiles_n, p.n / n_tiles_n), e,
                     m_tile, n_tile);
}
__device__ __forceinline__ bool tile_of_block(const GemmParams& p, u32 n_tiles_n, u32 width, u32& e, u32& m_tile,
                                              u32& n_tile) {
    return tile_at(p, blockIdx.x, n_tiles_n, width, e, m_tile, n_tile);
}
