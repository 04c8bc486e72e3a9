// Fill kernels over one Philox stream (tests and benchmark data). Prepended: philox.cuh.

// out[i] = normal(start + i) of stream (seed, purpose, tensor_id); mirrors rng::Stream::fill_normal.
extern "C" __global__ void fill_normal(float* out, u64 n, u64 seed, u32 purpose, u32 tensor_id,
                                       u64 start, u32 mvm_id, u32 attempt) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = stream_normal(make_stream(seed, purpose, tensor_id), start + i, mvm_id, attempt);
}

// out[i] = uniform(start + i); mirrors rng::Stream::uniform.
extern "C" __global__ void fill_uniform(float* out, u64 n, u64 seed, u32 purpose, u32 tensor_id,
                                        u64 start, u32 mvm_id) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = stream_uniform(make_stream(seed, purpose, tensor_id), start + i, mvm_id);
}
