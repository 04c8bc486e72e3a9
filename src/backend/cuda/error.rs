//! Errors of the CUDA backend: each names what failed (library, kernel file, kernel and launch
//! shape) so a user can act on it without a debugger.
use cudarc::driver::DriverError;
use thiserror::Error;

/// Why a CUDA operation failed.
#[derive(Debug, Error)]
pub enum CudaError {
    /// `libcuda` could not be loaded: no NVIDIA driver on this machine.
    #[error("no NVIDIA driver: libcuda.so could not be loaded")]
    NoDriver,
    /// `libnvrtc` could not be loaded: kernels cannot be compiled.
    #[error("NVRTC (libnvrtc.so of CUDA 13) not found in the library path: cannot compile the GPU kernels")]
    NoNvrtc,
    /// `libcublas` could not be loaded.
    #[error("cuBLAS (libcublas.so of CUDA 13) not found in the library path")]
    NoCublas,
    /// The driver is there but no usable device is.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice {
        /// Requested device ordinal.
        ordinal: usize,
        /// What the driver said.
        reason: String,
    },
    /// NVRTC rejected a kernel source; `log` is the compiler's log.
    #[error("NVRTC could not compile kernels/{file} for {arch}:\n{log}")]
    Compile {
        /// Kernel file name under `kernels/`.
        file: String,
        /// Target architecture option.
        arch: String,
        /// NVRTC program log.
        log: String,
    },
    /// A kernel failed to load, launch or run.
    #[error("CUDA kernel `{kernel}` (grid {grid:?}, block {block:?}, {shared_bytes} B dynamic shared memory) failed: {source}")]
    Kernel {
        /// Kernel function name.
        kernel: String,
        /// Grid dimensions of the launch.
        grid: (u32, u32, u32),
        /// Block dimensions of the launch.
        block: (u32, u32, u32),
        /// Dynamic shared memory of the launch.
        shared_bytes: u32,
        /// Driver error.
        source: DriverError,
    },
    /// Any other driver call (allocation, copy, module load).
    #[error("CUDA driver call failed while {what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// Driver error.
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS failed while {what}: {source}")]
    Cublas {
        /// What was being done.
        what: String,
        /// cuBLAS status.
        source: cudarc::cublas::result::CublasError,
    },
    /// The request cannot run on the GPU backend (unsupported preset feature, bad shape).
    #[error("{0}")]
    Unsupported(String),
}

/// `Result` with a [`CudaError`].
pub type CudaResult<T> = Result<T, CudaError>;

/// Attach a description to a driver error.
pub(crate) trait DriverContext<T> {
    /// Wrap the error as [`CudaError::Driver`] with `what`.
    fn while_(self, what: impl FnOnce() -> String) -> CudaResult<T>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn while_(self, what: impl FnOnce() -> String) -> CudaResult<T> {
        self.map_err(|source| CudaError::Driver {
            what: what(),
            source,
        })
    }
}
