//! `--backend cpu|cuda|auto`: which execution backend a run uses.
use super::{CudaDevice, CudaResult};

/// What the user asked for with `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendRequest {
    /// CPU crossbar path only.
    Cpu,
    /// CUDA, or a clear error when no driver or GPU exists.
    Cuda,
    /// CUDA when available, else the CPU with a one-line notice on stderr.
    Auto,
}

/// Resolve a request to a device (`None` = run on the CPU).
///
/// `Cuda` on a machine without a GPU is an error naming what is missing; `Auto` falls back to
/// the CPU and prints why, once.
pub fn resolve(request: BackendRequest) -> CudaResult<Option<CudaDevice>> {
    match request {
        BackendRequest::Cpu => Ok(None),
        BackendRequest::Cuda => CudaDevice::open(0).map(Some),
        BackendRequest::Auto => match CudaDevice::open(0) {
            Ok(dev) => Ok(Some(dev)),
            Err(e) => {
                eprintln!("note: running on the CPU backend ({e})");
                Ok(None)
            }
        },
    }
}
