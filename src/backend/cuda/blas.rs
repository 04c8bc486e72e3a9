//! cuBLAS: the dense BF16 GEMM every GPU kernel is timed against (every speed figure is a ratio to a reference measured in the same run), and the f32
//! GEMMs of the dense model parts on the GPU ([`super::model`]) and of fine-tuning's backward
//! ([`super::finetune`]).
use std::sync::Arc;

use cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{CudaDevice, CudaError, CudaResult};

/// Side of the square f32 GEMM run once when a handle is created ([`Blas::new`]).
const WARM_UP_SIZE: usize = 256;

/// How [`Blas::sgemm_layout`] reads its row-major operands for C[m, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLayout {
    /// C = A[m, k] · B[n, k]ᵀ.
    Nt,
    /// C = A[k, m]ᵀ · B[k, n].
    Tn,
    /// C = A[m, k] · B[k, n].
    Nn,
}

impl RowLayout {
    /// The product, as error messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nt => "A·Bᵀ",
            Self::Tn => "Aᵀ·B",
            Self::Nn => "A·B",
        }
    }
}

/// A cuBLAS handle on the device's stream.
pub struct Blas {
    handle: Arc<CudaBlas>,
}

impl Blas {
    /// Load cuBLAS (run-time) and bind a handle to `dev`'s stream.
    pub fn new(dev: &CudaDevice) -> CudaResult<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        let handle = CudaBlas::new(dev.stream().clone()).map_err(|source| CudaError::Cublas {
            what: "creating a handle".into(),
            source,
        })?;
        let blas = Self {
            handle: Arc::new(handle),
        };
        // cuBLAS initialises itself (and loads its kernels) at the first GEMM of a process:
        // ~0.1 s of host time on the H100, which otherwise lands in whichever forward pass
        // comes first (the first point of an eval sweep). Pay it here, with the set-up.
        let n = WARM_UP_SIZE;
        let (a, b) = (dev.zeros::<f32>(n * n)?, dev.zeros::<f32>(n * n)?);
        let mut c = dev.zeros::<f32>(n * n)?;
        blas.sgemm_nt(dev, &a, &b, &mut c, (n, n, n), 0.0)?;
        dev.synchronize()?;
        Ok(blas)
    }

    /// C[m, n] = A[m, k] · B[n, k]ᵀ, row-major bf16 operands (`u16` bits), f32 output, f32
    /// accumulation (CUBLAS_COMPUTE_32F).
    pub fn gemm_bf16_nt(
        &self,
        dev: &CudaDevice,
        a: &CudaSlice<u16>,
        b: &CudaSlice<u16>,
        c: &mut CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> CudaResult<()> {
        let bf16 = cublas_sys::cudaDataType::CUDA_R_16BF;
        self.gemm(
            "bf16",
            bf16,
            RowLayout::Nt,
            dev,
            (a, 0),
            (b, 0),
            (c, 0),
            (m, n, k),
            0.0,
        )
    }

    /// Y[m, n] = X[m, k] · W[n, k]ᵀ + β·Y, row-major f32 (`nn.Linear` layout for W), f32
    /// arithmetic (CUBLAS_COMPUTE_32F: no TF32 unless the NVIDIA_TF32_OVERRIDE environment
    /// variable asks for it).
    pub fn sgemm_nt(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> CudaResult<()> {
        self.sgemm_nt_rows(dev, (x, 0), (w, 0), (y, 0), (m, n, k), beta)
    }

    /// [`Blas::sgemm_nt`] on row blocks: rows `x_row..x_row + m` of X, `w_row..w_row + n` of W
    /// and `y_row..y_row + m` of Y (one expert's sorted rows and weights of a grouped matrix).
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_nt_rows(
        &self,
        dev: &CudaDevice,
        (x, x_row): (&CudaSlice<f32>, usize),
        (w, w_row): (&CudaSlice<f32>, usize),
        (y, y_row): (&mut CudaSlice<f32>, usize),
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> CudaResult<()> {
        self.sgemm_layout(
            dev,
            RowLayout::Nt,
            (x, x_row * k),
            (w, w_row * k),
            (y, y_row * n),
            (m, n, k),
            beta,
        )
    }

    /// C[m, n] = op(A)·op(B) + β·C in f32 (CUBLAS_COMPUTE_32F) for row-major matrices that
    /// start at element offsets of their buffers, each operand read as `layout` says: the
    /// backward products of fine-tuning (dW = gᵀ·x̂ per expert, ∂L/∂x = g·Ŵ).
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_layout(
        &self,
        dev: &CudaDevice,
        layout: RowLayout,
        (a, a_off): (&CudaSlice<f32>, usize),
        (b, b_off): (&CudaSlice<f32>, usize),
        (c, c_off): (&mut CudaSlice<f32>, usize),
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> CudaResult<()> {
        let f32_ = cublas_sys::cudaDataType::CUDA_R_32F;
        self.gemm(
            "f32",
            f32_,
            layout,
            dev,
            (a, a_off),
            (b, b_off),
            (c, c_off),
            (m, n, k),
            beta,
        )
    }

    /// C[m, n] = op(A)·op(B) + β·C for row-major operands of cuBLAS type `operand` (`what`
    /// names it in errors), each read as `layout` says, f32 output and accumulation; each
    /// matrix starts at its element offset in its buffer.
    #[allow(clippy::too_many_arguments)]
    fn gemm<T>(
        &self,
        what: &str,
        operand: cublas_sys::cudaDataType,
        layout: RowLayout,
        dev: &CudaDevice,
        (a, a_off): (&CudaSlice<T>, usize),
        (b, b_off): (&CudaSlice<T>, usize),
        (c, c_off): (&mut CudaSlice<f32>, usize),
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> CudaResult<()> {
        if a.len() < a_off + m * k || b.len() < b_off + n * k || c.len() < c_off + m * n {
            return Err(CudaError::Unsupported(format!(
                "{what} GEMM C = {}: buffers of {}, {}, {} elements for m={m} n={n} k={k} at \
                 offsets {a_off}, {b_off}, {c_off}",
                layout.name(),
                a.len(),
                b.len(),
                c.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let stream = dev.stream();
        let size = std::mem::size_of::<T>() as u64;
        let (pa, _ga) = a.device_ptr(stream);
        let (pb, _gb) = b.device_ptr(stream);
        let (pc, _gc) = c.device_ptr_mut(stream);
        let (pa, pb, pc) = (
            pa + a_off as u64 * size,
            pb + b_off as u64 * size,
            pc + c_off as u64 * 4,
        );
        use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        // A row-major X[r, c] is the column-major Xᵀ with leading dimension c, so row-major
        // C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS gets B first.
        let (op_b, ld_b, op_a, ld_a) = match layout {
            // B is [n, k]: Bᵀ is its column-major view transposed back.
            RowLayout::Nt => (CUBLAS_OP_T, k, CUBLAS_OP_N, k),
            // A is [k, m], B is [k, n].
            RowLayout::Tn => (CUBLAS_OP_N, n, CUBLAS_OP_T, m),
            // A is [m, k], B is [k, n].
            RowLayout::Nn => (CUBLAS_OP_N, n, CUBLAS_OP_N, k),
        };
        let alpha = 1.0f32;
        // SAFETY: pointers come from live buffers of the sizes checked above.
        unsafe {
            cublas_result::gemm_ex(
                *self.handle.handle(),
                op_b,
                op_a,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                pb as *const _,
                operand,
                ld_b as i32,
                pa as *const _,
                operand,
                ld_a as i32,
                (&beta as *const f32).cast(),
                pc as *mut _,
                cublas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| CudaError::Cublas {
            what: format!("{what} GEMM C = {} m={m} n={n} k={k}", layout.name()),
            source,
        })
    }
}
