//! Device discovery, kernel modules and launches with errors that name the kernel and shape.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut,
    DeviceRepr, LaunchArgs, LaunchConfig, PinnedHostSlice, ValidAsZeroBits,
};
use rayon::prelude::*;

use super::compile::{compile, KernelFile};
use super::error::{CudaError, CudaResult, DriverContext};

/// Environment variable with the device memory aimc may plan with, in GiB
/// ([`CudaDevice::set_memory_limit`]).
pub const MEMORY_LIMIT_ENV: &str = "AIMC_GPU_MEMORY_GIB";

/// (free, total) of a device with `free` of `total` bytes free under a limit of `limit` bytes
/// (0: none): the device counts as `limit` bytes, of which what is in use now is taken.
fn limited_memory(free: usize, total: usize, limit: usize) -> (usize, usize) {
    if limit == 0 {
        return (free, total);
    }
    let used = total.saturating_sub(free);
    (free.min(limit.saturating_sub(used)), total.min(limit))
}

/// Shape of the last launch, kept to name the kernel when an asynchronous error surfaces.
#[derive(Clone, Debug)]
struct LaunchRecord {
    kernel: String,
    cfg: LaunchConfig,
}

/// One GPU with its stream and compiled kernel modules.
///
/// All work goes to one stream (the context's default), so operations are ordered and a
/// [`CudaDevice::synchronize`] error can be blamed on the last kernel launched.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    /// Streaming multiprocessors (the grid of the persistent kernels).
    sm_count: u32,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    last_launch: Mutex<Option<LaunchRecord>>,
    /// Device memory aimc plans with, in bytes (0: the whole device); see
    /// [`CudaDevice::set_memory_limit`].
    memory_limit: AtomicUsize,
    /// The pinned buffers of [`CudaDevice::upload_staged`], allocated at its first use.
    staging: Mutex<Option<Staging>>,
}

/// Elements of each pinned staging buffer of [`CudaDevice::upload_staged`] (64 MiB of f32):
/// large enough that a copy's fixed cost (~10 µs) is < 1 % of its ~2 ms, small enough that
/// the host copy of one chunk hides behind the transfer of the other.
const STAGE_ELEMS: usize = 16 << 20;

/// Two pinned (page-locked, write-combined) host buffers, each with the event of its last
/// transfer: the host fills one while the DMA engine reads the other.
struct Staging {
    buffers: [PinnedHostSlice<f32>; 2],
    done: [CudaEvent; 2],
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, sm_{}{})",
            self.name, self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl CudaDevice {
    /// Open device `ordinal`. Errors say which library or device is missing; nothing panics
    /// when no CUDA is installed (libraries are loaded at run time).
    pub fn open(ordinal: usize) -> CudaResult<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice {
            ordinal,
            reason: e.to_string(),
        })?;
        // One stream, ordered work: cudarc's per-buffer event tracking is not needed.
        // SAFETY: nothing has been allocated on this context yet.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().while_(|| "reading the device name".into())?;
        let compute_capability = ctx
            .compute_capability()
            .while_(|| "reading the compute capability".into())?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .while_(|| "reading the multiprocessor count".into())?
            .max(1) as u32;
        let stream = ctx.default_stream();
        let dev = Self {
            ctx,
            stream,
            name,
            compute_capability,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            last_launch: Mutex::new(None),
            memory_limit: AtomicUsize::new(0),
            staging: Mutex::new(None),
        };
        if let Ok(text) = std::env::var(MEMORY_LIMIT_ENV) {
            let gib: f64 = text
                .trim()
                .parse()
                .ok()
                .filter(|g: &f64| g.is_finite() && *g > 0.0)
                .ok_or_else(|| {
                    CudaError::Unsupported(format!(
                        "{MEMORY_LIMIT_ENV}={text:?}: want a positive number of GiB"
                    ))
                })?;
            dev.set_memory_limit(Some((gib * (1u64 << 30) as f64) as usize));
        }
        Ok(dev)
    }

    /// Device 0 if a driver and a GPU exist, else `None` (the caller prints the fallback notice).
    pub fn discover() -> Option<Self> {
        Self::open(0).ok()
    }

    /// Marketing name of the GPU (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// The stream all work of this device goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// (free, total) device memory in bytes, as the memory plans see it: under a limit `L`
    /// ([`CudaDevice::set_memory_limit`]) the device counts as `L` bytes of which what is in
    /// use now (by every process) is taken, so a plan never counts on more than `L`.
    pub fn memory_bytes(&self) -> CudaResult<(usize, usize)> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .while_(|| "querying device memory".into())?;
        Ok(limited_memory(
            free,
            total,
            self.memory_limit.load(Ordering::Relaxed),
        ))
    }

    /// Plan with at most `bytes` of device memory (`None`: the whole device). The CLI sets it
    /// from `AIMC_GPU_MEMORY_GIB`, for a GPU shared with other jobs; the tests use it to run
    /// the out-of-memory fallbacks on any GPU.
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        self.memory_limit
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Function `name` of `kernel` compiled with `defines` (compiled once per process, PTX
    /// cached on disk across processes).
    pub fn function(
        &self,
        kernel: &KernelFile,
        defines: &[(&str, i64)],
        name: &str,
    ) -> CudaResult<CudaFunction> {
        let key = format!("{}{defines:?}", kernel.file);
        let module = {
            let mut modules = self.modules.lock().expect("module cache lock");
            match modules.get(&key) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile(kernel, defines, self.compute_capability)?;
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .while_(|| format!("loading the module of kernels/{}", kernel.file))?;
                    modules.insert(key, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .while_(|| format!("looking up kernel `{name}` in kernels/{}", kernel.file))
    }

    /// Launch `f` with the arguments pushed by `push_args`; a failure names the kernel and shape.
    pub fn launch<'a>(
        &'a self,
        f: &'a CudaFunction,
        kernel: &str,
        cfg: LaunchConfig,
        push_args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> CudaResult<()> {
        let mut builder = self.stream.launch_builder(f);
        push_args(&mut builder);
        *self.last_launch.lock().expect("launch record lock") = Some(LaunchRecord {
            kernel: kernel.to_string(),
            cfg,
        });
        // SAFETY: every kernel of this crate takes exactly the arguments its wrapper pushes;
        // buffer sizes are checked by the wrappers before launch.
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|source| kernel_error(kernel, cfg, source))
    }

    /// Wait for all work; an asynchronous kernel fault names the last kernel launched.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream.synchronize().map_err(|source| {
            match self.last_launch.lock().expect("launch record lock").clone() {
                Some(r) => kernel_error(&r.kernel, r.cfg, source),
                None => CudaError::Driver {
                    what: "synchronising the stream".into(),
                    source,
                },
            }
        })
    }

    /// Copy a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> CudaResult<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .while_(|| format!("copying {} elements to the device", host.len()))
    }

    /// Copies `host` into `dst[offset..offset + host.len()]`; an error (not a panic) when it
    /// does not fit.
    pub fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaSlice<T>,
        offset: usize,
    ) -> CudaResult<()> {
        let (len, end) = (dst.len(), offset.saturating_add(host.len()));
        let Some(mut view) = dst.try_slice_mut(offset..end) else {
            return Err(CudaError::Unsupported(format!(
                "copying {} elements to offset {offset} of a device buffer of {len}",
                host.len()
            )));
        };
        self.stream
            .memcpy_htod(host, &mut view)
            .while_(|| format!("copying {} elements to the device", host.len()))
    }

    /// The concatenation of `parts` in a new device buffer, through
    /// [`CudaDevice::upload_staged`].
    pub fn upload_concat(&self, parts: &[&[f32]]) -> CudaResult<CudaSlice<f32>> {
        let mut w = self.scratch::<f32>(parts.iter().map(|p| p.len()).sum())?;
        self.upload_staged(parts, &mut w, 0)?;
        Ok(w)
    }

    /// Copies the concatenation of `parts` into `dst[offset..]`, as [`CudaDevice::upload_into`]
    /// per part, for large f32 arrays in pageable host memory (a model's weights): through
    /// two pinned staging buffers, all host threads filling one while the other transfers.
    /// The driver's own path for pageable memory reached ~8 GB/s on the H100 machine (one
    /// thread copies into its staging area, then waits for the transfer). The host may reuse
    /// `parts` on return; the device copy completes in the stream's order.
    pub fn upload_staged(
        &self,
        parts: &[&[f32]],
        dst: &mut CudaSlice<f32>,
        offset: usize,
    ) -> CudaResult<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total < 2 * STAGE_ELEMS {
            let mut at = offset;
            for part in parts {
                self.upload_into(part, dst, at)?;
                at += part.len();
            }
            return Ok(());
        }
        let (len, end) = (dst.len(), offset.saturating_add(total));
        let Some(mut view) = dst.try_slice_mut(offset..end) else {
            return Err(CudaError::Unsupported(format!(
                "copying {total} elements to offset {offset} of a device buffer of {len}"
            )));
        };
        let what = || format!("copying {total} elements to the device (staged)");
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if staging.is_none() {
            let pinned = || {
                // SAFETY: every element a transfer reads is written before it.
                unsafe { self.ctx.alloc_pinned::<f32>(STAGE_ELEMS) }
            };
            let event = || self.ctx.new_event(None);
            *staging = Some(Staging {
                buffers: [pinned().while_(what)?, pinned().while_(what)?],
                done: [event().while_(what)?, event().while_(what)?],
            });
        }
        let Staging { buffers, done } = staging.as_mut().expect("allocated above");
        let (base, _record) = view.device_ptr_mut(&self.stream);
        // Cursor into `parts`: part index, elements of it already staged.
        let (mut part, mut within) = (0usize, 0usize);
        for (i, start) in (0..total).step_by(STAGE_ELEMS).enumerate() {
            let n = STAGE_ELEMS.min(total - start);
            let b = i % 2;
            // The transfer from this buffer two chunks ago is done before it is refilled.
            done[b].synchronize().while_(what)?;
            let buf = &mut buffers[b].as_mut_slice().while_(what)?[..n];
            let mut pieces = Vec::new();
            let mut rest = &mut *buf;
            while !rest.is_empty() {
                let src = &parts[part][within..];
                let take = src.len().min(rest.len());
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                pieces.push((head, &src[..take]));
                rest = tail;
                within += take;
                if within == parts[part].len() {
                    (part, within) = (part + 1, 0);
                }
            }
            pieces.into_par_iter().for_each(|(d, s)| {
                d.par_chunks_mut(1 << 18)
                    .zip(s.par_chunks(1 << 18))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            });
            let at = base + (start * std::mem::size_of::<f32>()) as u64;
            // SAFETY: `at` + the chunk's bytes lies inside `view`; the pinned source stays
            // untouched until `done[b]` (recorded after the copy) completes.
            unsafe { cudarc::driver::result::memcpy_htod_async(at, buf, self.stream.cu_stream()) }
                .while_(what)?;
            done[b].record(&self.stream).while_(what)?;
        }
        Ok(())
    }

    /// Keeps the freed blocks of the stream-ordered memory pool for reuse until the guard drops
    /// (which hands them back to the driver). Programming and drifting a large model frees and
    /// allocates GB-sized transient buffers per matrix, with a host synchronisation between
    /// (the GDC readout's download); at the pool's default release threshold (0) each
    /// synchronisation returns them to the driver, which maps them again at the next
    /// allocation. The memory plans count that transient peak already.
    pub fn retain_pool(&self) -> CudaResult<PoolRetention<'_>> {
        let pool = self.default_pool()?;
        set_release_threshold(pool, u64::MAX)?;
        Ok(PoolRetention { dev: self, pool })
    }

    /// The high-water mark of the bytes allocated from the device's stream-ordered memory pool
    /// (every buffer of this crate) since [`CudaDevice::reset_pool_peak`]: the peak device
    /// memory of a run's own buffers, without the context, modules and cuBLAS workspace.
    pub fn pool_peak_bytes(&self) -> CudaResult<u64> {
        let pool = self.default_pool()?;
        let mut value = 0u64;
        // SAFETY: the attribute is a u64 written through the pointer.
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value as *mut u64).cast(),
            )
        }
        .result()
        .while_(|| "reading the memory pool's high-water mark".into())?;
        Ok(value)
    }

    /// Starts [`CudaDevice::pool_peak_bytes`] again from what is in use now.
    pub fn reset_pool_peak(&self) -> CudaResult<()> {
        let pool = self.default_pool()?;
        let mut zero = 0u64;
        // SAFETY: setting the high-water mark to 0 (the driver's documented reset).
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .result()
        .while_(|| "resetting the memory pool's high-water mark".into())
    }

    fn default_pool(&self) -> CudaResult<sys::CUmemoryPool> {
        self.ctx
            .bind_to_thread()
            .while_(|| "binding the CUDA context".into())?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer; the device handle comes from the live context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }
            .result()
            .while_(|| "querying the default memory pool".into())?;
        Ok(pool)
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> CudaResult<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .while_(|| format!("allocating {len} elements on the device"))
    }

    /// A buffer of `len` elements with undefined contents, for outputs a kernel writes in full
    /// (saves the memset of [`CudaDevice::zeros`] on large scratch buffers).
    pub(crate) fn scratch<T: DeviceRepr>(&self, len: usize) -> CudaResult<CudaSlice<T>> {
        // SAFETY: device memory is never read on the host before a kernel has written every
        // element (each caller's kernel covers the whole buffer).
        unsafe { self.stream.alloc(len) }
            .while_(|| format!("allocating {len} elements on the device"))
    }

    /// Copy a device buffer back to the host (synchronises first, so kernel faults are named).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> CudaResult<Vec<T>> {
        self.synchronize()?;
        self.stream
            .clone_dtoh(dev)
            .while_(|| format!("copying {} elements to the host", dev.len()))
    }
}

fn kernel_error(kernel: &str, cfg: LaunchConfig, source: cudarc::driver::DriverError) -> CudaError {
    CudaError::Kernel {
        kernel: kernel.to_string(),
        grid: cfg.grid_dim,
        block: cfg.block_dim,
        shared_bytes: cfg.shared_mem_bytes,
        source,
    }
}

/// A 1-D launch of `n` threads in blocks of 256.
pub fn linear_launch(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch over the rows of a matrix `[rows, k]` for `grouped_element` in
/// `kernels/program.cu`: blocks of 256 threads, ⌈k / (256·per_thread)⌉ of them per row, each
/// thread `per_thread` consecutive elements of one row. An error past 2^31 − 1 blocks.
pub fn row_launch(rows: usize, k: usize, per_thread: usize) -> CudaResult<LaunchConfig> {
    let chunks = k.div_ceil(256 * per_thread.max(1)).max(1);
    let blocks = rows.max(1).saturating_mul(chunks);
    if blocks > i32::MAX as usize || rows > u32::MAX as usize || k > u32::MAX as usize {
        return Err(CudaError::Unsupported(format!(
            "a row launch over {rows} rows of {k} elements needs {blocks} blocks (at most 2^31 − 1)"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// [`CudaDevice::retain_pool`]'s guard: on drop, the pool's release threshold goes back to 0
/// and its unused memory back to the driver (after the stream's work).
pub struct PoolRetention<'d> {
    dev: &'d CudaDevice,
    pool: sys::CUmemoryPool,
}

impl Drop for PoolRetention<'_> {
    fn drop(&mut self) {
        // Errors here only leave memory cached in the pool; the next plan reads the driver's
        // free figure, which then undercounts, never overcounts.
        let _ = self.dev.synchronize();
        let _ = set_release_threshold(self.pool, 0);
        // SAFETY: the pool handle is the device's default pool, alive with the context.
        let _ = unsafe { sys::cuMemPoolTrimTo(self.pool, 0) }.result();
    }
}

fn set_release_threshold(pool: sys::CUmemoryPool, bytes: u64) -> CudaResult<()> {
    let mut value = bytes;
    // SAFETY: the attribute takes a u64 through a pointer to it.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut value as *mut u64).cast(),
        )
    }
    .result()
    .while_(|| "setting the memory pool's release threshold".into())
}

/// `bytes` in GiB, for the memory plans' messages.
pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::limited_memory;

    #[test]
    fn a_memory_limit_counts_what_is_in_use() {
        const GIB: usize = 1 << 30;
        // No limit: the driver's figures.
        assert_eq!(limited_memory(70 * GIB, 80 * GIB, 0), (70 * GIB, 80 * GIB));
        // 10 GiB in use of a 16 GiB limit: 6 GiB free.
        assert_eq!(
            limited_memory(70 * GIB, 80 * GIB, 16 * GIB),
            (6 * GIB, 16 * GIB)
        );
        // More in use than the limit: nothing free.
        assert_eq!(limited_memory(70 * GIB, 80 * GIB, 8 * GIB), (0, 8 * GIB));
        // A limit above the device: the device's figures.
        assert_eq!(
            limited_memory(70 * GIB, 80 * GIB, 100 * GIB),
            (70 * GIB, 80 * GIB)
        );
    }
}
