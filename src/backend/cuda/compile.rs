//! Run-time compilation of `kernels/*.cu` with NVRTC for the device's compute capability, with
//! an on-disk PTX cache per (source, options, device) in the user's cache directory.
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{self, CompileOptions, Ptx};

use super::error::{CudaError, CudaResult};

/// Philox streams, prepended to every kernel file (NVRTC gets one string, no include paths).
const PHILOX_CUH: &str = include_str!("../../../kernels/philox.cuh");

/// One NVRTC compilation unit: one or more files of `kernels/`, embedded in the binary.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// Name of the unit (named in compile errors and cache entries): the file name for a unit
    /// of one file.
    pub file: &'static str,
    /// The unit's files in the order NVRTC reads them; each starts a `#line 1 "<file>"`, so
    /// compile errors name the file and line.
    pub parts: &'static [KernelPart],
    /// Compile with `--fmad=false` so float formulas round exactly as the Rust ones
    /// (needed for CPU parity of device physics; off for the GEMMs).
    pub exact_fp: bool,
}

/// One file of a [`KernelFile`].
#[derive(Clone, Copy, Debug)]
pub struct KernelPart {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// Source text.
    pub text: &'static str,
}

/// A [`KernelPart`] of `kernels/<name>`.
macro_rules! part {
    ($name:literal) => {
        KernelPart {
            file: $name,
            text: include_str!(concat!("../../../kernels/", $name)),
        }
    };
}

/// `kernels/rng.cu`: fill kernels over one Philox stream.
pub const RNG_CU: KernelFile = KernelFile {
    file: "rng.cu",
    parts: &[part!("rng.cu")],
    exact_fp: true,
};
/// `kernels/program.cu`: programming, drift and read noise.
pub const PROGRAM_CU: KernelFile = KernelFile {
    file: "program.cu",
    parts: &[part!("program.cu")],
    exact_fp: true,
};
/// `kernels/finetune.cu`: the element-wise kernels of a fine-tuning step on the GPU (mapping
/// scales, dequantised inputs, effective weights, loss sums, SwiGLU backward, Adam).
pub const FINETUNE_CU: KernelFile = KernelFile {
    file: "finetune.cu",
    parts: &[part!("finetune.cu")],
    exact_fp: true,
};
/// The grouped MoE kernels, one unit of files by concern (`kernels/moe_config.cuh` lists
/// them): configuration, routing sort, DAC prologue, the shared GEMM parts, the periphery
/// epilogue, the CTA raster, the output modes, the mma.sync and wgmma GEMMs, and the layer's
/// element-wise kernels. One unit because every GEMM instantiation needs all of them.
pub const MOE_CU: KernelFile = KernelFile {
    file: "moe",
    parts: &[
        part!("moe_config.cuh"),
        part!("routing.cu"),
        part!("dac.cuh"),
        part!("gemm_common.cuh"),
        part!("periphery.cuh"),
        part!("raster.cuh"),
        part!("outputs.cuh"),
        part!("gemm_mma.cuh"),
        part!("gemm_wgmma.cuh"),
        part!("gemm_wgmma_analog.cuh"),
        part!("gemm_wgmma_digital.cuh"),
        part!("layer.cu"),
    ],
    exact_fp: false,
};
/// `kernels/model.cu`: embedding, norms, RoPE, attention, SwiGLU and evaluation metrics of the
/// whole-model forward pass.
pub const MODEL_CU: KernelFile = KernelFile {
    file: "model.cu",
    parts: &[part!("model.cu")],
    exact_fp: false,
};

/// Environment variable naming a directory whose `*.cu`/`*.cuh` files replace the embedded
/// ones of the same name: kernel development on a GPU machine without a Rust toolchain, where
/// only the kernel sources change between runs. Host-side parameters must stay as built.
pub const KERNEL_DIR_ENV: &str = "AIMC_KERNEL_DIR";

/// The text of kernel file `name`: `$AIMC_KERNEL_DIR/<name>` where that variable is set and the
/// file exists, else the embedded `text`.
fn part_text(name: &str, text: &'static str) -> CudaResult<std::borrow::Cow<'static, str>> {
    let dir = std::env::var_os(KERNEL_DIR_ENV).filter(|d| !d.is_empty());
    part_text_in(dir.as_deref().map(Path::new), name, text)
}

/// [`part_text`] with the directory given. A directory that does not exist is an error: a
/// mistyped path would otherwise run the embedded kernels under the name of the edited ones.
fn part_text_in(
    dir: Option<&Path>,
    name: &str,
    text: &'static str,
) -> CudaResult<std::borrow::Cow<'static, str>> {
    let Some(dir) = dir else {
        return Ok(text.into());
    };
    if !dir.is_dir() {
        return Err(CudaError::Unsupported(format!(
            "{KERNEL_DIR_ENV}={:?}: not a directory (it names the directory of kernel files that \
             replace the embedded ones)",
            dir.display().to_string()
        )));
    }
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(text.into());
    }
    std::fs::read_to_string(&path).map(Into::into).map_err(|e| {
        CudaError::Unsupported(format!(
            "{KERNEL_DIR_ENV}: cannot read {}: {e}",
            path.display()
        ))
    })
}

/// The full source NVRTC sees: configuration macros, the normal transform's table
/// ([`crate::rng::NormalTable::cuda_source`]), `philox.cuh`, then the unit's files.
pub fn full_source(kernel: &KernelFile, defines: &[(&str, i64)]) -> CudaResult<String> {
    let mut src = String::new();
    for (name, value) in defines {
        src.push_str(&format!("#define {name} {value}\n"));
    }
    src.push_str("#line 1 \"normal_table (generated)\"\n");
    src.push_str(&crate::rng::NormalTable::get().cuda_source());
    src.push_str("#line 1 \"philox.cuh\"\n");
    src.push_str(&part_text("philox.cuh", PHILOX_CUH)?);
    for part in kernel.parts {
        src.push_str(&format!("\n#line 1 \"{}\"\n", part.file));
        src.push_str(&part_text(part.file, part.text)?);
    }
    Ok(src)
}

/// Compile (or fetch from the cache) `kernel` with `defines` for compute capability `cc`.
pub fn compile(kernel: &KernelFile, defines: &[(&str, i64)], cc: (i32, i32)) -> CudaResult<Ptx> {
    let source = full_source(kernel, defines)?;
    // Hopper compiles for compute_90a, the architecture-specific target that admits wgmma; its
    // PTX loads only on sm_90 devices, which is all this per-device compile serves.
    let suffix = if cc == (9, 0) { "a" } else { "" };
    let arch = format!("--gpu-architecture=compute_{}{}{suffix}", cc.0, cc.1);
    let mut options = vec![arch.clone(), "--std=c++17".to_string()];
    if kernel.exact_fp {
        options.push("--fmad=false".to_string());
    }
    // Source lines in the PTX for Nsight Compute's source view (tools/gpu_ncu.sh); the same
    // machine code otherwise.
    if super::env::switch("AIMC_NVRTC_LINEINFO")? {
        options.push("--generate-line-info".to_string());
    }
    let key = fnv1a64(&[source.as_bytes(), options.join(" ").as_bytes()]);
    let cache_file = cache_dir().map(|d| {
        let stem = kernel.file.trim_end_matches(".cu");
        d.join(format!("{stem}-sm{}{}-{key:016x}.ptx", cc.0, cc.1))
    });
    if let Some(text) = cache_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        return Ok(Ptx::from_src(text));
    }
    let opts = CompileOptions {
        options,
        name: Some(kernel.file.to_string()),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(&source, opts).map_err(|e| match e {
        nvrtc::CompileError::CompileError { log, .. } => CudaError::Compile {
            file: kernel.file.to_string(),
            arch: arch.clone(),
            log: log.to_string_lossy().into_owned(),
        },
        other => CudaError::Compile {
            file: kernel.file.to_string(),
            arch: arch.clone(),
            log: format!("{other:?}"),
        },
    })?;
    if let Some(path) = cache_file {
        // A cache that cannot be written only costs a recompile next time.
        let _ = store(&path, &ptx.to_src());
    }
    Ok(ptx)
}

/// `$AIMC_CACHE_DIR`, else `$XDG_CACHE_HOME/aimc`, else `$HOME/.cache/aimc`; then `kernels/`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("AIMC_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("aimc")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/aimc")))?;
    Some(base.join("kernels"))
}

fn store(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().expect("cache file has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// FNV-1a, 64 bit: a cache key stable across Rust versions (unlike `DefaultHasher`).
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_source_orders_defines_table_philox_then_file() {
        let s = full_source(&RNG_CU, &[("FOO", 3)]).unwrap();
        let d = s.find("#define FOO 3").unwrap();
        let t = s.find("NORMAL_TABLE[").unwrap();
        let p = s.find("philox4x32_10").unwrap();
        let f = s.find("fill_normal").unwrap();
        assert!(d < t && t < p && p < f);
        assert!(s.contains("#line 1 \"rng.cu\""));
    }

    #[test]
    fn the_moe_unit_reads_its_files_in_order() {
        let s = full_source(&MOE_CU, &[]).unwrap();
        let at = |f: &str| s.find(&format!("#line 1 \"{f}\"")).unwrap();
        let order: Vec<usize> = MOE_CU.parts.iter().map(|p| at(p.file)).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // Every kernel the launchers name is in the unit.
        for k in [
            "moe_count",
            "moe_quantize",
            "moe_gemm(",
            "moe_gemm_wgmma(",
            "moe_analog_wgmma(",
            "gather_rows(",
            "bm_combine",
        ] {
            assert!(s.contains(k), "{k}");
        }
    }

    #[test]
    fn kernel_dir_replaces_the_files_it_has_and_must_exist() {
        let dir = std::env::temp_dir().join(format!("aimc-kernel-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rng.cu"), "// edited").unwrap();
        let text = |name| part_text_in(Some(&dir), name, "// embedded").unwrap();
        assert_eq!(text("rng.cu"), "// edited");
        assert_eq!(text("layer.cu"), "// embedded");
        let missing = dir.join("no-such-dir");
        let err = part_text_in(Some(&missing), "rng.cu", "// embedded")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AIMC_KERNEL_DIR")
                && err.contains("no-such-dir")
                && err.contains("not a directory"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a64(&[b"ab", b"c"]);
        assert_ne!(a, fnv1a64(&[b"a", b"bc"]));
        assert_ne!(a, fnv1a64(&[b"ab", b"d"]));
        assert_eq!(a, fnv1a64(&[b"ab", b"c"]));
    }
}
