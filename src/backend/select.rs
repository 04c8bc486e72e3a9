//! `--backend cpu|cuda|auto`: where the analog expert products of a run execute.
//!
//! Resolved once per command ([`Execution::resolve`]), then checked per tile preset
//! ([`Execution::gpu_for`]): the CUDA kernels cover the whole crossbar periphery for DACs of up to 11 bits
//! (their codes are exact fp16 operands), so a preset with a finer DAC runs on the CPU under
//! `auto` (with a one-line notice) and is an error under `cuda`.
#[cfg(feature = "cuda")]
use std::sync::Arc;

use anyhow::Result;

#[cfg(feature = "cuda")]
use super::cuda::CudaDevice;
use super::{AnalogWork, Backend, CpuBackend};
use crate::tile::TilePreset;

/// What the user asked for with `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendRequest {
    /// CPU crossbar path only.
    Cpu,
    /// CUDA, or a clear error when no driver or GPU exists or the preset needs a CPU-only feature.
    Cuda,
    /// CUDA when available and the preset is supported, else the CPU with a one-line notice.
    #[default]
    Auto,
}

/// What the user asked for with `--gpu-memory`: where the GPU keeps the programmed state and
/// digital weights of the routed experts between drift points (`experts::Residency` of the
/// CUDA backend; every choice gives bit-identical operands).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuMemory {
    /// The fastest that fits in device memory.
    #[default]
    Auto,
    /// Programmed state, digital weights and operands all stay (18 B per weight).
    Resident,
    /// Programming again at each drift point (8 B per weight stay).
    Transient,
    /// As `transient`, with the digital weights uploaded from the host per use (4 B stay).
    Streamed,
}

#[cfg(feature = "cuda")]
impl GpuMemory {
    /// The residency this request forces (`None`: the fastest that fits).
    pub fn residency(self) -> Option<super::cuda::programmed::Residency> {
        use super::cuda::programmed::Residency;
        match self {
            Self::Auto => None,
            Self::Resident => Some(Residency::Resident),
            Self::Transient => Some(Residency::Transient),
            Self::Streamed => Some(Residency::Streamed),
        }
    }
}

/// The resolved backend of a command.
#[derive(Clone, Debug, Default)]
pub struct Execution {
    #[cfg(feature = "cuda")]
    request: BackendRequest,
    #[cfg(feature = "cuda")]
    device: Option<Arc<CudaDevice>>,
    memory: GpuMemory,
}

impl Execution {
    /// The CPU backend.
    pub fn cpu() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            request: BackendRequest::Cpu,
            #[cfg(feature = "cuda")]
            device: None,
            memory: GpuMemory::Auto,
        }
    }

    /// Opens the GPU for `Cuda` (error naming what is missing) and `Auto` (notice on stderr and
    /// the CPU when there is none).
    pub fn resolve(request: BackendRequest) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let device = match request {
                BackendRequest::Cpu => None,
                BackendRequest::Cuda => Some(Arc::new(CudaDevice::open(0).map_err(|e| {
                    anyhow::anyhow!("--backend cuda: {e} (use --backend cpu or auto)")
                })?)),
                BackendRequest::Auto => match CudaDevice::open(0) {
                    Ok(d) => Some(Arc::new(d)),
                    Err(e) => {
                        eprintln!("note: running on the CPU backend ({e})");
                        None
                    }
                },
            };
            Ok(Self {
                request,
                device,
                memory: GpuMemory::Auto,
            })
        }
        #[cfg(not(feature = "cuda"))]
        match request {
            BackendRequest::Cuda => anyhow::bail!(
                "--backend cuda: this aimc was built without the `cuda` feature (use --backend cpu)"
            ),
            BackendRequest::Auto => {
                eprintln!("note: running on the CPU backend (built without the `cuda` feature)");
                Ok(Self::default())
            }
            BackendRequest::Cpu => Ok(Self::default()),
        }
    }

    /// This backend with the routed experts' device memory kept per `memory` (`--gpu-memory`).
    pub fn with_gpu_memory(mut self, memory: GpuMemory) -> Self {
        self.memory = memory;
        self
    }

    /// The `--gpu-memory` request.
    pub fn gpu_memory(&self) -> GpuMemory {
        self.memory
    }

    /// `cpu` or `cuda (<GPU name>)`, for reports.
    pub fn describe(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return format!("cuda ({})", d.name());
        }
        "cpu".to_string()
    }

    /// The GPU to run `preset` on, `None` for the CPU. Under `cuda` a periphery the kernels do
    /// not implement is an error naming the preset field; under `auto` it is a notice.
    #[cfg(feature = "cuda")]
    pub fn gpu_for(&self, preset: &TilePreset) -> Result<Option<Arc<CudaDevice>>> {
        let Some(dev) = &self.device else {
            return Ok(None);
        };
        match super::cuda::periphery::GemmPeriphery::from_spec(&preset.periphery) {
            Ok(_) => Ok(Some(dev.clone())),
            Err(e) if self.request == BackendRequest::Cuda => {
                anyhow::bail!("--backend cuda with preset `{}`: {e}", preset.name)
            }
            Err(e) => {
                eprintln!(
                    "note: preset `{}` runs on the CPU backend ({e})",
                    preset.name
                );
                Ok(None)
            }
        }
    }

    /// Runs `f` on the backend of `work`: the CUDA one when this command has a GPU and the
    /// preset's periphery runs there ([`Execution::gpu_for`]), else the CPU one. The one place
    /// that chooses.
    pub fn with_backend<R>(
        &self,
        work: AnalogWork<'_, '_>,
        f: impl FnOnce(&mut dyn Backend) -> Result<R>,
    ) -> Result<R> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = self.gpu_for(work.preset)? {
            return super::cuda::execution::with_cuda(&dev, self.describe(), self.memory, work, f);
        }
        #[cfg(not(feature = "cuda"))]
        self.gpu_for(work.preset)?;
        f(&mut CpuBackend::new(work))
    }

    /// Whether any run of this command can use a GPU.
    pub fn has_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.device.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Without the `cuda` feature every preset runs on the CPU.
    #[cfg(not(feature = "cuda"))]
    pub fn gpu_for(&self, _preset: &TilePreset) -> Result<Option<()>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_request_never_opens_a_gpu() {
        let e = Execution::resolve(BackendRequest::Cpu).unwrap();
        assert!(!e.has_gpu());
        assert_eq!(e.describe(), "cpu");
        let preset = TilePreset::resolve("standard-hwa").unwrap();
        assert!(e.gpu_for(&preset).unwrap().is_none());
    }
}
