//! Checkpoint files: `config.json`, one or many `*.safetensors` (optionally listed by
//! `model.safetensors.index.json`) and an optional `tokenizer.json`, read either from a directory
//! (memory-mapped) or from byte slices compiled into the binary.
//!
//! Tensors are converted to f32 once, when a layer asks for them, with their shape checked against
//! the one `config.json` implies, so every error names the file and the tensor.
//! Format: <https://github.com/huggingface/safetensors> (8-byte little-endian header length, JSON
//! header, raw little-endian data).
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use ndarray::{Array1, Array2, Array3, ArrayD, IxDyn};
use rayon::prelude::*;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

/// Name of the shard index written by `transformers` `save_pretrained` for sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where the checkpoint files come from.
#[derive(Debug, Clone, Copy)]
pub enum CheckpointSource<'a> {
    /// A HuggingFace checkpoint directory on disk; safetensors files are memory-mapped.
    Dir(&'a Path),
    /// Files compiled into the binary (`include_bytes!`), as `(file name, bytes)` pairs.
    Memory(&'a [(&'a str, &'static [u8])]),
}

/// The bytes of one file, borrowed from a memory map or from the binary.
pub enum Blob {
    Mapped(Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Blob::Mapped(m) => m,
            Blob::Static(s) => s,
            Blob::Owned(v) => v,
        }
    }
}

impl CheckpointSource<'_> {
    /// Human-readable location of `name`, used in error messages.
    pub fn display(&self, name: &str) -> String {
        match self {
            CheckpointSource::Dir(dir) => dir.join(name).display().to_string(),
            CheckpointSource::Memory(_) => format!("<embedded>/{name}"),
        }
    }

    /// Reads `name` if it exists; `Ok(None)` when absent.
    pub fn read(&self, name: &str) -> Result<Option<Blob>> {
        match self {
            CheckpointSource::Dir(dir) => {
                let path: PathBuf = dir.join(name);
                if !path.exists() {
                    return Ok(None);
                }
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: the map is read-only and lives only while the checkpoint is converted to
                // f32; a file changed underneath by another process would give wrong numbers,
                // never unsoundness in safe code reading plain bytes.
                let map = unsafe { Mmap::map(&file) }
                    .with_context(|| format!("memory-mapping {}", path.display()))?;
                Ok(Some(Blob::Mapped(map)))
            }
            CheckpointSource::Memory(files) => Ok(files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| Blob::Static(b))),
        }
    }

    /// Reads `name`, failing with the file's location when it is absent.
    pub fn read_required(&self, name: &str) -> Result<Blob> {
        self.read(name)?
            .ok_or_else(|| anyhow!("{}: file not found", self.display(name)))
    }

    /// The safetensors files that hold the weights: those named by the shard index when there is
    /// one, else `model.safetensors`, else every `*.safetensors` file (sorted).
    pub fn weight_files(&self) -> Result<Vec<String>> {
        if let Some(index) = self.read(INDEX_FILE)? {
            let at = self.display(INDEX_FILE);
            let value: serde_json::Value =
                serde_json::from_slice(&index).with_context(|| format!("{at}: invalid JSON"))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{at}: field `weight_map` missing or not an object"))?;
            let files: BTreeSet<String> = map
                .values()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("{at}: `weight_map` value {v} is not a file name"))
                })
                .collect::<Result<_>>()?;
            return Ok(files.into_iter().collect());
        }
        if self.read("model.safetensors")?.is_some() {
            return Ok(vec!["model.safetensors".into()]);
        }
        let mut names: Vec<String> = match self {
            CheckpointSource::Dir(dir) => std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect(),
            CheckpointSource::Memory(files) => files
                .iter()
                .map(|(n, _)| n.to_string())
                .filter(|n| n.ends_with(".safetensors"))
                .collect(),
        };
        names.sort();
        if names.is_empty() {
            bail!("{}: no *.safetensors weight file", self.display(""));
        }
        Ok(names)
    }
}

/// One parsed safetensors file: its bytes and header.
struct WeightFile {
    location: String,
    blob: Blob,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// All tensors of a checkpoint, looked up by name, converted to f32 on request.
pub struct TensorStore {
    files: Vec<WeightFile>,
    by_name: HashMap<String, usize>,
}

impl TensorStore {
    /// Opens every weight file of `source` and parses its header; a truncated or corrupt file is
    /// an error naming it.
    pub fn open(source: &CheckpointSource<'_>) -> Result<Self> {
        let mut files = Vec::new();
        let mut by_name = HashMap::new();
        for name in source.weight_files()? {
            let location = source.display(&name);
            let blob = source.read_required(&name)?;
            let (header_len, metadata) = SafeTensors::read_metadata(&blob)
                .map_err(|e| anyhow!("{location}: not a valid safetensors file ({e:?})"))?;
            let tensors: HashMap<String, TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for key in tensors.keys() {
                by_name.insert(key.clone(), files.len());
            }
            files.push(WeightFile {
                location,
                blob,
                data_start: 8 + header_len,
                tensors,
            });
        }
        Ok(Self { files, by_name })
    }

    /// Whether a tensor of that name exists in any file.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let file = &self.files[*self.by_name.get(name)?];
        Some(&file.tensors[name].shape)
    }

    /// Number of stored tensors (all files).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn locations(&self) -> String {
        self.files
            .iter()
            .map(|f| f.location.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Tensor `name` as f32 with exactly the `expected` shape (the one `config.json` implies).
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<ArrayD<f32>> {
        let mut values = vec![0.0f32; expected.iter().product()];
        self.convert_into(name, expected, &mut values)?;
        Ok(ArrayD::from_shape_vec(IxDyn(expected), values)?)
    }

    /// Tensors `names` (each `[rows, cols]`) stacked along the rows into one
    /// `[names.len()·rows, cols]` matrix, each converted straight into its block: no
    /// concatenation copy (at OLMoE-1B-7B size the experts' gate/up are 17 GB of f32).
    pub fn stacked_matrix(&self, names: &[&str], rows: usize, cols: usize) -> Result<Array2<f32>> {
        let mut values = vec![0.0f32; names.len() * rows * cols];
        for (name, block) in names.iter().zip(values.chunks_mut(rows * cols)) {
            self.convert_into(name, &[rows, cols], block)?;
        }
        Ok(Array2::from_shape_vec((names.len() * rows, cols), values)?)
    }

    /// Converts tensor `name`, which must have the `expected` shape, into `out` (as many
    /// values), rejecting non-finite values.
    fn convert_into(&self, name: &str, expected: &[usize], out: &mut [f32]) -> Result<()> {
        let idx = *self.by_name.get(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` not found in {} (its shape per config.json would be {expected:?})",
                self.locations()
            )
        })?;
        let file = &self.files[idx];
        let info = &file.tensors[name];
        if info.shape != expected {
            bail!(
                "{}: tensor `{name}` has shape {:?}, but config.json implies {expected:?}",
                file.location,
                info.shape
            );
        }
        let (start, end) = info.data_offsets;
        let bytes = &file.blob[file.data_start + start..file.data_start + end];
        to_f32(bytes, info.dtype, out)
            .with_context(|| format!("{}: tensor `{name}`", file.location))?;
        // A NaN or ±inf weight would make every downstream number silently non-finite.
        if let Some(i) = out.par_iter().position_first(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                file.location,
                out[i]
            );
        }
        Ok(())
    }

    /// A `[rows, cols]` matrix (PyTorch `nn.Linear` layout is `[out, in]`).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        Ok(self.tensor(name, &[rows, cols])?.into_dimensionality()?)
    }

    /// A vector of length `n`.
    pub fn vector(&self, name: &str, n: usize) -> Result<Array1<f32>> {
        Ok(self.tensor(name, &[n])?.into_dimensionality()?)
    }

    /// A 3-D tensor (fused expert weights `[E, out, in]`).
    pub fn tensor3(&self, name: &str, shape: [usize; 3]) -> Result<Array3<f32>> {
        Ok(self.tensor(name, &shape)?.into_dimensionality()?)
    }
}

/// Converts little-endian raw tensor bytes to f32 (f32, f16 and bf16 accepted) into `out`, in
/// parallel: the conversion (and the first touch of the output's pages) bounds the load of a
/// large checkpoint (27.6 GB of f32 at OLMoE-1B-7B size).
fn to_f32(bytes: &[u8], dtype: Dtype, out: &mut [f32]) -> Result<()> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => bail!("dtype {other:?} is not supported (f32, f16, bf16 are)"),
    };
    ensure!(
        bytes.len() == out.len() * width,
        "{} bytes of {dtype:?} for {} values",
        bytes.len(),
        out.len()
    );
    match dtype {
        Dtype::F32 => convert(bytes, f32::from_le_bytes, out),
        Dtype::F16 => convert(bytes, |b| f16::from_le_bytes(b).to_f32(), out),
        _ => convert(bytes, |b| bf16::from_le_bytes(b).to_f32(), out),
    }
    Ok(())
}

/// `bytes` as little-endian values of `W` bytes, each mapped by `f` into `out`: chunks of
/// 64 Ki values, sequential (monomorphised, vectorisable) inside, parallel across.
fn convert<const W: usize>(bytes: &[u8], f: impl Fn([u8; W]) -> f32 + Sync, out: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * W))
        .for_each(|(o, b)| {
            for (v, c) in o.iter_mut().zip(b.chunks_exact(W)) {
                *v = f(c.try_into().expect("chunks of W bytes"));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn converted(bytes: &[u8], dtype: Dtype, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; n];
        to_f32(bytes, dtype, &mut out)?;
        Ok(out)
    }

    #[test]
    fn half_precision_conversion_is_exact_for_representable_values() {
        let values = [1.5f32, -2.0, 0.0, 65504.0];
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(converted(&f16_bytes, Dtype::F16, 4).unwrap(), values);
        let bf16_bytes: Vec<u8> = [1.5f32, -2.0, 0.0, 3.0e38]
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let back = converted(&bf16_bytes, Dtype::BF16, 4).unwrap();
        assert_eq!(&back[..3], &[1.5, -2.0, 0.0]);
        assert!((back[3] / 3.0e38 - 1.0).abs() < 1.0 / 128.0);
        assert!(converted(&[0u8; 8], Dtype::I64, 1).is_err());
        // A byte count that does not match the shape is an error, not a short read.
        assert!(converted(&bf16_bytes, Dtype::BF16, 3).is_err());
    }
}
