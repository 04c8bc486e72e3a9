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
    /// Files in memory, e.g. compiled into the binary (`include_bytes!`), as `(file name, bytes)`
    /// pairs.
    Memory(&'a [(&'a str, &'a [u8])]),
}

/// The bytes of one file, borrowed from a memory map or from memory.
pub enum Blob<'a> {
    Mapped(Mmap),
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Deref for Blob<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Blob::Mapped(m) => m,
            Blob::Borrowed(s) => s,
            Blob::Owned(v) => v,
        }
    }
}

impl<'a> CheckpointSource<'a> {
    /// Human-readable location of `name`, used in error messages.
    pub fn display(&self, name: &str) -> String {
        match self {
            CheckpointSource::Dir(dir) => dir.join(name).display().to_string(),
            CheckpointSource::Memory(_) => format!("<embedded>/{name}"),
        }
    }

    /// Reads `name` if it exists; `Ok(None)` when absent. On disk, `name` must be a relative path
    /// that resolves (symlinks followed) inside the checkpoint directory and names a regular file:
    /// a FIFO would block `open` forever and a device could be endless, so both are refused before
    /// anything is opened. A symlink that dangles or loops is an error, not an absent file.
    pub fn read(&self, name: &str) -> Result<Option<Blob<'a>>> {
        match self {
            CheckpointSource::Dir(dir) => {
                check_relative(name).map_err(|why| anyhow!("{}: {why}", self.display(name)))?;
                let path: PathBuf = dir.join(name);
                let Some(resolved) = resolve_inside(dir, &path)? else {
                    return Ok(None);
                };
                let file =
                    File::open(&resolved).with_context(|| format!("opening {}", path.display()))?;
                // The file could have been swapped between the check and the open: check again
                // what was actually opened.
                let meta = file
                    .metadata()
                    .with_context(|| format!("reading the metadata of {}", path.display()))?;
                ensure!(
                    meta.file_type().is_file(),
                    "{}: not a regular file",
                    path.display()
                );
                // SAFETY: the map is read-only and lives only while the checkpoint is converted to
                // f32; a file changed underneath by another process would give wrong numbers,
                // never unsoundness in safe code reading plain bytes.
                let map = unsafe { Mmap::map(&file) }
                    .with_context(|| format!("memory-mapping {}", path.display()))?;
                Ok(Some(Blob::Mapped(map)))
            }
            CheckpointSource::Memory(files) => {
                check_relative(name).map_err(|why| anyhow!("{}: {why}", self.display(name)))?;
                Ok(files
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, b)| Blob::Borrowed(b)))
            }
        }
    }

    /// Reads `name`, failing with the file's location when it is absent.
    pub fn read_required(&self, name: &str) -> Result<Blob<'a>> {
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
                .iter()
                .map(|(tensor, v)| {
                    let file = v.as_str().ok_or_else(|| {
                        anyhow!("{at}: `weight_map.{tensor}` = {v} is not a file name")
                    })?;
                    check_relative(file).map_err(|why| {
                        anyhow!("{at}: `weight_map.{tensor}` = \"{file}\": {why}")
                    })?;
                    Ok(file.to_owned())
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

/// Why `name` cannot name a file of the checkpoint: only plain relative paths (no root, no `..`,
/// no `.`, not empty) stay inside the checkpoint directory whatever it is.
fn check_relative(name: &str) -> std::result::Result<(), String> {
    use std::path::Component;
    let path = Path::new(name);
    if name.is_empty() {
        return Err("an empty file name".into());
    }
    if path.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(
            "a shard path must be a file name relative to the checkpoint directory \
             (no absolute path, no `..`)"
                .into(),
        )
    }
}

/// `path` (inside `dir`) with symlinks resolved, `None` when nothing is there. Errors: a dangling
/// or looping symlink, a target outside `dir`, or anything but a regular file.
fn resolve_inside(dir: &Path, path: &Path) -> Result<Option<PathBuf>> {
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("{}: {e}", path.display())),
    };
    let resolved = std::fs::canonicalize(path).map_err(|e| {
        if link.file_type().is_symlink() {
            anyhow!(
                "{}: a symbolic link that cannot be followed (dangling or looping: {e})",
                path.display()
            )
        } else {
            anyhow!("{}: {e}", path.display())
        }
    })?;
    let root =
        std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    ensure!(
        resolved.starts_with(&root),
        "{}: resolves to {}, outside the checkpoint directory {}",
        path.display(),
        resolved.display(),
        root.display()
    );
    let meta = std::fs::metadata(&resolved)
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    ensure!(
        meta.file_type().is_file(),
        "{}: not a regular file (a FIFO, device or directory cannot hold checkpoint data)",
        path.display()
    );
    Ok(Some(resolved))
}

/// One parsed safetensors file: its bytes and header.
struct WeightFile<'a> {
    location: String,
    blob: Blob<'a>,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// All tensors of a checkpoint, looked up by name, converted to f32 on request.
pub struct TensorStore<'a> {
    files: Vec<WeightFile<'a>>,
    by_name: HashMap<String, usize>,
}

impl<'a> TensorStore<'a> {
    /// Opens every weight file of `source` and parses its header; a truncated or corrupt file is
    /// an error naming it.
    pub fn open(source: &CheckpointSource<'a>) -> Result<Self> {
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
        // The shape is checked against the file before the buffer exists, so the allocation is
        // bounded by what the file holds, never by what config.json claims.
        let n = self.checked_len(name, expected)?;
        let mut values = vec![0.0f32; n];
        self.convert_into(name, expected, &mut values)?;
        Ok(ArrayD::from_shape_vec(IxDyn(expected), values)?)
    }

    /// Tensors `names` (each `[rows, cols]`) stacked along the rows into one
    /// `[names.len()·rows, cols]` matrix, each converted straight into its block: no
    /// concatenation copy (at OLMoE-1B-7B size the experts' gate/up are 17 GB of f32).
    pub fn stacked_matrix(&self, names: &[&str], rows: usize, cols: usize) -> Result<Array2<f32>> {
        let mut total = 0usize;
        for name in names {
            total = total
                .checked_add(self.checked_len(name, &[rows, cols])?)
                .ok_or_else(|| anyhow!("tensor `{name}`: stacked size overflows"))?;
        }
        let block_len = rows * cols; // ≤ total, checked above
        ensure!(
            block_len > 0,
            "tensors {names:?}: config.json implies an empty [{rows}, {cols}] matrix"
        );
        let mut values = vec![0.0f32; total];
        for (name, block) in names.iter().zip(values.chunks_mut(block_len)) {
            self.convert_into(name, &[rows, cols], block)?;
        }
        Ok(Array2::from_shape_vec((names.len() * rows, cols), values)?)
    }

    /// The file holding tensor `name` and its header entry, after checking that it exists with the
    /// `expected` shape.
    fn checked_tensor(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(&WeightFile<'a>, &TensorInfo)> {
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
        Ok((file, info))
    }

    /// The element count of tensor `name` after checking that it exists with the `expected` shape
    /// (the product cannot overflow then: the safetensors header check bounds it by the file).
    fn checked_len(&self, name: &str, expected: &[usize]) -> Result<usize> {
        let (file, _) = self.checked_tensor(name, expected)?;
        expected
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}`: shape {expected:?} overflows",
                    file.location
                )
            })
    }

    /// Indices `l` for which some tensor is named `model.layers.{l}.…`, i.e. the decoder layers
    /// the files hold, sorted.
    pub fn layer_indices(&self) -> BTreeSet<usize> {
        self.by_name
            .keys()
            .filter_map(|k| {
                k.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Converts tensor `name`, which must have the `expected` shape, into `out` (as many
    /// values), rejecting non-finite values.
    fn convert_into(&self, name: &str, expected: &[usize], out: &mut [f32]) -> Result<()> {
        let (file, info) = self.checked_tensor(name, expected)?;
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

/// Checks `config` (parsed from `config_at`) against what the weight files hold and against the
/// machine, before any weight buffer exists: the files must hold every decoder layer the config
/// names and the embedding table it implies, and the f32 weights must fit the host memory.
pub fn check_against_files(
    config: &super::ModelConfig,
    config_at: &str,
    store: &TensorStore,
) -> Result<()> {
    let layers = store.layer_indices();
    let held = layers.range(..config.num_layers).count();
    if held < config.num_layers {
        let first_missing = (0..config.num_layers)
            .find(|l| !layers.contains(l))
            .unwrap_or(held);
        bail!(
            "{config_at}: field `num_hidden_layers` = {}, but {} hold no tensor of layer {first_missing} \
             ({held} of the layers present)",
            config.num_layers,
            store.locations()
        );
    }
    let embed = "model.embed_tokens.weight";
    let expected = [config.vocab_size, config.hidden_size];
    match store.shape(embed) {
        None => bail!("tensor `{embed}` not found in {}", store.locations()),
        Some(shape) if shape != expected => bail!(
            "{config_at}: fields `vocab_size` = {} / `hidden_size` = {} disagree with tensor \
             `{embed}` of shape {shape:?} in {}",
            config.vocab_size,
            config.hidden_size,
            store.locations()
        ),
        Some(_) => {}
    }
    let weights = config.weight_count()?;
    let need = weights.saturating_mul(4);
    if let Some(available) = available_memory_bytes() {
        if need > available {
            bail!(
                "{config_at}: this checkpoint needs {} of host memory for f32 weights \
                 ({weights} weights); {} available (MemAvailable in /proc/meminfo)",
                human_bytes(need),
                human_bytes(available)
            );
        }
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes; `None` where it cannot be read (not Linux).
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` with a decimal SI prefix: `1.9 TB`, `23 GB`.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 || v >= 10.0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
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
