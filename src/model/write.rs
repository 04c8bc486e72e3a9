//! Writing a checkpoint: the files of a source checkpoint with the routed experts of some MoE
//! layers replaced, in the source's own layout (shard names, index, tensor names, order, dtypes
//! and shapes), every other tensor byte-identical, every non-weight file copied.
//!
//! Safetensors is written by hand: an 8-byte little-endian header length, a JSON header
//! (`__metadata__` kept, then each tensor's `dtype`, `shape` and `data_offsets` in data order)
//! padded with spaces to a multiple of 8 bytes, then the raw little-endian data, the tensors in
//! the source's order so that the alignment of each stays what the source had. New f32 values
//! are rounded to the source dtype (f32, f16 or bf16) to nearest, ties to even; a finite value
//! that would become ±inf is an error naming the tensor, since that weight would silently
//! poison every output.
//!
//! Everything is validated before the first byte is written (the destination, every replaced
//! tensor's layout, shape, dtype and values), and the files go to a temporary directory beside
//! the destination that is renamed into place at the end, so a failure leaves no half checkpoint.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use ndarray::ArrayView2;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::checkpoint::{CheckpointSource, TensorStore, INDEX_FILE};
use super::common::SwiGlu;
use super::config::ModelConfig;

/// New routed-expert weights, by MoE layer.
#[derive(Debug, Clone, Default)]
pub struct ExpertUpdates {
    /// Decoder layer index → that MoE layer's routed experts in expert order, in the model's
    /// in-memory f32 layout (`SwiGlu { gate_up: [2I, H], down: [H, I] }`).
    pub layers: BTreeMap<usize, Vec<SwiGlu>>,
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    /// The destination directory.
    pub dir: PathBuf,
    /// Safetensors files written (the source's names).
    pub weight_files: Vec<String>,
    /// Other files copied unchanged (the shard index, rewritten, is not among them).
    pub copied_files: Vec<String>,
    /// Files of the source not copied: weights in another format (`pytorch_model.bin`, …) that
    /// would still hold the old experts, hidden entries, and anything not a file or directory.
    pub skipped_files: Vec<String>,
    /// Names of the tensors whose values were replaced.
    pub replaced_tensors: Vec<String>,
    /// Bytes of tensor data in the weight files (the index's `total_size`).
    pub tensor_bytes: u64,
}

/// Writes `src` (a checkpoint directory) to `dst` with the routed experts of the layers in
/// `experts` replaced. `dst` must not exist or be an empty directory, and must not be `src` or
/// lie inside it.
pub fn write_checkpoint(
    src: &Path,
    dst: &Path,
    experts: &ExpertUpdates,
) -> Result<WrittenCheckpoint> {
    ensure!(
        src.is_dir(),
        "{}: not a checkpoint directory",
        src.display()
    );
    write_checkpoint_from(&CheckpointSource::Dir(src), dst, experts)
}

/// [`write_checkpoint`] from any source, e.g. the embedded model
/// ([`super::embedded::source`]), whose files are in memory.
pub fn write_checkpoint_from(
    source: &CheckpointSource<'_>,
    dst: &Path,
    experts: &ExpertUpdates,
) -> Result<WrittenCheckpoint> {
    check_destination(source, dst)?;
    let config_at = source.display("config.json");
    let config = ModelConfig::from_json(&source.read_required("config.json")?, &config_at)?;
    let store = TensorStore::open(source)?;
    let plan = Plan::new(&config, &config_at, &store, experts)?;

    // Every weight file's header, and the dtype and values of every replaced tensor, checked
    // before anything is written.
    let weight_names = source.weight_files()?;
    let mut files = Vec::with_capacity(weight_names.len());
    for name in &weight_names {
        let location = source.display(name);
        let blob = source.read_required(name)?;
        let (header_len, meta) = SafeTensors::read_metadata(&blob)
            .map_err(|e| anyhow!("{location}: not a valid safetensors file ({e:?})"))?;
        let mut tensors: Vec<Entry> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| Entry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offsets: info.data_offsets,
            })
            .collect();
        tensors.sort_by_key(|t| t.offsets);
        // Tensors in parallel; the first bad one in data order is reported.
        if let Some(e) = tensors.par_iter().find_map_first(|t| {
            let values = plan.replacements.get(&t.name)?;
            check_values(values, t, &location).err()
        }) {
            return Err(e);
        }
        let metadata: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        files.push(SourceFile {
            name: name.clone(),
            location,
            data_start: 8 + header_len,
            blob,
            tensors,
            metadata,
        });
    }
    let written: BTreeSet<&str> = files
        .iter()
        .flat_map(|f| f.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    if let Some(missing) = plan
        .replacements
        .keys()
        .find(|k| !written.contains(k.as_str()))
    {
        bail!(
            "tensor `{missing}` is not in the weight files {:?}",
            weight_names
        );
    }

    let tmp = temporary_sibling(dst)?;
    let result = (|| {
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // Files in parallel (a large checkpoint has one per layer or so): rounding the
        // replaced values, not the disk, bounds one writer. Errors in file order.
        let sizes: Vec<Result<u64>> = files
            .par_iter()
            .map(|f| write_safetensors(&tmp.join(&f.name), f, &plan))
            .collect();
        let mut tensor_bytes = 0u64;
        for size in sizes {
            tensor_bytes += size?;
        }
        let (copied_files, skipped_files) = copy_other_files(source, &weight_names, &tmp)?;
        if let Some(index) = source.read(INDEX_FILE)? {
            let text = rewrite_index(&index, tensor_bytes, &source.display(INDEX_FILE))?;
            fs::write(tmp.join(INDEX_FILE), text)
                .with_context(|| format!("writing {}", tmp.join(INDEX_FILE).display()))?;
        }
        // An empty directory at `dst` is replaced by the rename (rename(2) allows it).
        fs::rename(&tmp, dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
        Ok(WrittenCheckpoint {
            dir: dst.to_path_buf(),
            weight_files: weight_names.clone(),
            copied_files,
            skipped_files,
            replaced_tensors: plan.replacements.keys().cloned().collect(),
            tensor_bytes,
        })
    })();
    if result.is_err() && tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// One tensor of a source file's header.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    offsets: (usize, usize),
}

/// A source weight file, its header parsed.
struct SourceFile<'a> {
    name: String,
    location: String,
    blob: super::checkpoint::Blob<'a>,
    data_start: usize,
    /// In data order.
    tensors: Vec<Entry>,
    metadata: BTreeMap<String, String>,
}

/// Which tensors get which values: tensor name → its new f32 values in row-major order.
struct Plan<'u> {
    replacements: BTreeMap<String, Values<'u>>,
}

/// The new values of one tensor, as row-major views to concatenate (a fused tensor is one view
/// per expert).
struct Values<'u> {
    parts: Vec<ArrayView2<'u, f32>>,
    len: usize,
}

impl<'u> Values<'u> {
    fn new(parts: Vec<ArrayView2<'u, f32>>) -> Self {
        let len = parts.iter().map(|p| p.len()).sum();
        Self { parts, len }
    }

    fn iter(&self) -> impl Iterator<Item = f32> + '_ {
        self.parts.iter().flat_map(|p| p.iter().copied())
    }
}

impl<'u> Plan<'u> {
    /// Maps every expert of `updates` to the tensor names the loader reads for `config`'s family
    /// in `store` (per-expert or fused), after checking layers, expert counts and shapes.
    fn new(
        config: &ModelConfig,
        config_at: &str,
        store: &TensorStore<'_>,
        updates: &'u ExpertUpdates,
    ) -> Result<Self> {
        let names = super::moe_names(config.family, store);
        let (h, i, e) = (
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
        );
        let mut replacements = BTreeMap::new();
        for (&layer, experts) in &updates.layers {
            let moe = config.moe_layers.get(layer).copied().unwrap_or(false);
            if !moe {
                let list: Vec<usize> = (0..config.num_layers)
                    .filter(|&l| config.moe_layers[l])
                    .collect();
                bail!(
                    "expert update for layer {layer}: {config_at} has no MoE layer {layer} \
                     (its MoE layers: {list:?})"
                );
            }
            ensure!(
                experts.len() == e,
                "expert update for layer {layer}: {} experts given, {config_at} has {e}",
                experts.len()
            );
            for (x, s) in experts.iter().enumerate() {
                ensure!(
                    s.gate_up.dim() == (2 * i, h) && s.down.dim() == (h, i),
                    "expert update for layer {layer} expert {x}: gate_up {:?} and down {:?}, but \
                     {config_at} implies gate_up [{}, {h}] and down [{h}, {i}]",
                    s.gate_up.shape(),
                    s.down.shape(),
                    2 * i
                );
            }
            let p = format!("model.layers.{layer}.{}.experts", names.block);
            let fused = format!("{p}.gate_up_proj");
            let mut add = |name: String, want: Vec<usize>, values: Values<'u>| -> Result<()> {
                match store.shape(&name) {
                    None => bail!(
                        "tensor `{name}` not found in the source checkpoint (the {:?} layout of \
                         layer {layer})",
                        config.family
                    ),
                    Some(shape) if shape != want.as_slice() => bail!(
                        "tensor `{name}` has shape {shape:?} in the source, but {config_at} \
                         implies {want:?}"
                    ),
                    Some(_) => {}
                }
                replacements.insert(name, values);
                Ok(())
            };
            if store.contains(&fused) {
                add(
                    fused,
                    vec![e, 2 * i, h],
                    Values::new(experts.iter().map(|s| s.gate_up.view()).collect()),
                )?;
                add(
                    format!("{p}.down_proj"),
                    vec![e, h, i],
                    Values::new(experts.iter().map(|s| s.down.view()).collect()),
                )?;
            } else {
                for (x, s) in experts.iter().enumerate() {
                    let [g, u, d] = names.expert_proj;
                    add(
                        format!("{p}.{x}.{g}.weight"),
                        vec![i, h],
                        Values::new(vec![s.gate()]),
                    )?;
                    add(
                        format!("{p}.{x}.{u}.weight"),
                        vec![i, h],
                        Values::new(vec![s.up()]),
                    )?;
                    add(
                        format!("{p}.{x}.{d}.weight"),
                        vec![h, i],
                        Values::new(vec![s.down.view()]),
                    )?;
                }
            }
        }
        Ok(Self { replacements })
    }
}

/// Refuses a destination that exists and is not an empty directory, is the source, or lies
/// inside the source directory.
fn check_destination(source: &CheckpointSource<'_>, dst: &Path) -> Result<()> {
    match fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", dst.display()),
        Ok(m) if !m.is_dir() => bail!(
            "{}: exists and is not a directory (the destination must not exist or be empty)",
            dst.display()
        ),
        Ok(_) => {
            let mut entries =
                fs::read_dir(dst).with_context(|| format!("listing {}", dst.display()))?;
            ensure!(
                entries.next().is_none(),
                "{}: exists and is not empty (the destination must not exist or be empty)",
                dst.display()
            );
        }
    }
    if let CheckpointSource::Dir(src) = source {
        let src = fs::canonicalize(src).with_context(|| format!("resolving {}", src.display()))?;
        let dst_abs = absolute_lexical(dst)?;
        ensure!(
            !dst_abs.starts_with(&src),
            "{}: the destination is the source checkpoint {} or inside it",
            dst.display(),
            src.display()
        );
    }
    Ok(())
}

/// `path` made absolute with its deepest existing ancestor resolved (symlinks followed), so that
/// a destination reached through a link to the source is recognised before it exists.
fn absolute_lexical(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while fs::symlink_metadata(existing).is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    out.extend(rest.iter().rev());
    Ok(out)
}

/// A fresh directory name beside `dst` (same file system, so the final rename is atomic).
fn temporary_sibling(dst: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(dst).with_context(|| format!("resolving {}", dst.display()))?;
    let parent = abs
        .parent()
        .ok_or_else(|| anyhow!("{}: no parent directory", dst.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = abs
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a directory name", dst.display()))?
        .to_string_lossy();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Ok(parent.join(format!(".{name}.partial-{}-{nanos}", std::process::id())))
}

/// Checks that every value of `values` is finite and stays finite in `t`'s dtype.
fn check_values(values: &Values<'_>, t: &Entry, location: &str) -> Result<()> {
    let n: usize = t.shape.iter().product();
    ensure!(
        n == values.len,
        "{location}: tensor `{}`: {} new values for shape {:?}",
        t.name,
        values.len,
        t.shape
    );
    match t.dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
        other => bail!(
            "{location}: tensor `{}` has dtype {other:?}; replaced tensors must be F32, F16 or BF16",
            t.name
        ),
    }
    for (k, v) in values.iter().enumerate() {
        encode(v, t.dtype)
            .map_err(|why| anyhow!("{location}: tensor `{}` at flat index {k}: {why}", t.name))?;
    }
    Ok(())
}

/// `v` rounded to `dtype` (to nearest, ties to even) as little-endian bytes (the first
/// `dtype`-width of the returned array), or why it cannot be.
pub fn encode(v: f32, dtype: Dtype) -> std::result::Result<[u8; 4], String> {
    if !v.is_finite() {
        return Err(format!("the new value {v} is not finite"));
    }
    let mut out = [0u8; 4];
    match dtype {
        Dtype::F32 => out = v.to_le_bytes(),
        Dtype::BF16 => {
            let b = f32_to_bf16_bits(v);
            if b & 0x7fff == 0x7f80 {
                return Err(format!(
                    "the new value {v} overflows bf16 (largest finite {})",
                    bf16::MAX
                ));
            }
            out[..2].copy_from_slice(&b.to_le_bytes());
        }
        Dtype::F16 => {
            let h = f16::from_f32(v);
            if h.is_infinite() {
                return Err(format!(
                    "the new value {v} overflows f16 (largest finite {})",
                    f16::MAX
                ));
            }
            out[..2].copy_from_slice(&h.to_le_bytes());
        }
        other => return Err(format!("dtype {other:?} cannot hold a replaced weight")),
    }
    Ok(out)
}

/// bf16 bits of a finite `v`, rounded to nearest, ties to even: add half an ulp of bf16 less one
/// plus the kept lowest bit, then truncate (a carry into the exponent rounds up correctly, to
/// infinity past the largest finite bf16).
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let bias = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(bias) >> 16) as u16
}

/// Bytes per value of a float dtype.
fn width(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    }
}

/// Writes one safetensors file: `f`'s header (tensors in data order, offsets recomputed) and
/// data, replaced tensors encoded from `plan`. Returns the data bytes written.
fn write_safetensors(path: &Path, f: &SourceFile<'_>, plan: &Plan<'_>) -> Result<u64> {
    let mut header = String::from("{");
    if !f.metadata.is_empty() {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(&f.metadata)?);
    }
    let mut offset = 0usize;
    for t in &f.tensors {
        let len = t.offsets.1 - t.offsets.0;
        if header.len() > 1 {
            header.push(',');
        }
        header.push_str(&format!(
            "{}:{{\"dtype\":{},\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&t.name)?,
            serde_json::to_string(&t.dtype)?,
            serde_json::to_string(&t.shape)?,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    // Pad with spaces so the data starts 8-byte aligned, as the safetensors writer does.
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| anyhow!("writing {}: {e}", path.display());
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for t in &f.tensors {
        match plan.replacements.get(&t.name) {
            None => {
                let (a, b) = t.offsets;
                w.write_all(&f.blob[f.data_start + a..f.data_start + b])
                    .map_err(io)?;
            }
            Some(values) => {
                let wd = width(t.dtype);
                let mut buf = Vec::with_capacity(64 * 1024);
                for v in values.iter() {
                    let bytes = encode(v, t.dtype)
                        .map_err(|why| anyhow!("{}: tensor `{}`: {why}", f.location, t.name))?;
                    buf.extend_from_slice(&bytes[..wd]);
                    if buf.len() >= 64 * 1024 {
                        w.write_all(&buf).map_err(io)?;
                        buf.clear();
                    }
                }
                w.write_all(&buf).map_err(io)?;
            }
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(offset as u64)
}

/// The shard index with `metadata.total_size` set to `tensor_bytes` (other fields unchanged),
/// pretty-printed with sorted keys as transformers writes it.
fn rewrite_index(bytes: &[u8], tensor_bytes: u64, at: &str) -> Result<String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("{at}: invalid JSON"))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| anyhow!("{at}: not a JSON object"))?;
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}));
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| anyhow!("{at}: field `metadata` is not an object"))?;
    meta.insert("total_size".into(), tensor_bytes.into());
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

/// Whether a file holds weights in a format other than safetensors (a copy would keep the old
/// experts and a loader preferring it would silently read them).
fn other_format_weights(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".msgpack",
        ".h5",
        ".bin.index.json",
    ]
    .iter()
    .any(|ext| lower.ends_with(ext))
}

/// Copies every file of `source` other than the weight files and the shard index into `dst`
/// (directories recursively); returns the copied and the skipped names.
fn copy_other_files(
    source: &CheckpointSource<'_>,
    weights: &[String],
    dst: &Path,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut copied = Vec::new();
    let mut skipped = Vec::new();
    let keep = |name: &str| !weights.iter().any(|w| w == name) && name != INDEX_FILE;
    match source {
        CheckpointSource::Memory(files) => {
            for (name, bytes) in files.iter().filter(|(n, _)| keep(n)) {
                let to = dst.join(name);
                fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
                copied.push(name.to_string());
            }
        }
        CheckpointSource::Dir(src) => {
            copy_dir(src, dst, "", &keep, &mut copied, &mut skipped)?;
        }
    }
    copied.sort();
    skipped.sort();
    Ok((copied, skipped))
}

/// Recursive part of [`copy_other_files`] for a directory: `rel` is the path below the source.
fn copy_dir(
    from: &Path,
    to: &Path,
    rel: &str,
    keep: &dyn Fn(&str) -> bool,
    copied: &mut Vec<String>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(from)
        .with_context(|| format!("listing {}", from.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", from.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel_name = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if !keep(&rel_name) {
            continue;
        }
        if name.starts_with('.') || other_format_weights(&name) {
            skipped.push(rel_name);
            continue;
        }
        // Symbolic links are followed (a HuggingFace cache snapshot is made of them).
        let meta = fs::metadata(entry.path());
        match meta {
            Ok(m) if m.is_file() => {
                fs::copy(entry.path(), to.join(&name)).with_context(|| {
                    format!("copying {} to {}", entry.path().display(), to.display())
                })?;
                copied.push(rel_name);
            }
            Ok(m) if m.is_dir() => {
                let sub = to.join(&name);
                fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
                copy_dir(&entry.path(), &sub, &rel_name, keep, copied, skipped)?;
            }
            _ => skipped.push(rel_name),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_of(v: f32) -> u16 {
        u16::from_le_bytes(encode(v, Dtype::BF16).unwrap()[..2].try_into().unwrap())
    }

    fn f16_of(v: f32) -> u16 {
        u16::from_le_bytes(encode(v, Dtype::F16).unwrap()[..2].try_into().unwrap())
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_of(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
        assert_eq!(bf16_of(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Just above a tie rounds up, just below rounds down.
        assert_eq!(bf16_of(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_of(f32::from_bits(0x3f80_7fff)), 0x3f80);
        assert_eq!(bf16_of(-1.5), 0xbfc0);
        assert_eq!(bf16_of(0.0), 0x0000);
        assert_eq!(bf16_of(-0.0), 0x8000);
        // Subnormals: the smallest bf16 subnormal and a tie below it (to even: zero).
        assert_eq!(bf16_of(f32::from_bits(0x0001_0000)), 0x0001);
        assert_eq!(bf16_of(f32::from_bits(0x0000_8000)), 0x0000);
        assert_eq!(bf16_of(f32::from_bits(0x0001_8000)), 0x0002);
        // The largest finite bf16 stays; the rounding carry into the exponent is exact.
        assert_eq!(bf16_of(bf16::MAX.to_f32()), 0x7f7f);
        assert_eq!(bf16_of(f32::from_bits(0x3fff_ffff)), 0x4000);
        // Agrees with the half crate's conversion on a sweep of bit patterns.
        for bits in (0..0x7f7f_0000u32).step_by(7919) {
            let v = f32::from_bits(bits);
            assert_eq!(bf16_of(v), bf16::from_f32(v).to_bits(), "{bits:#x}");
            assert_eq!(bf16_of(-v), bf16::from_f32(-v).to_bits(), "-{bits:#x}");
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: to even (1.0); 1 + 3·2^-11 up.
        assert_eq!(f16_of(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f16_of(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f16_of(65504.0), 0x7bff);
        // Subnormals: 2^-24 is the smallest; half of it is a tie to zero; 1.5·2^-24 to 2·2^-24.
        assert_eq!(f16_of(2f32.powi(-24)), 0x0001);
        assert_eq!(f16_of(2f32.powi(-25)), 0x0000);
        assert_eq!(f16_of(1.5 * 2f32.powi(-24)), 0x0002);
        assert_eq!(f16_of(-2f32.powi(-14)), 0x8400);
    }

    #[test]
    fn overflow_and_non_finite_values_are_errors() {
        // 65520 is the tie between 65504 and 2^16 (infinity in f16): rounds to infinity.
        assert!(encode(65519.0, Dtype::F16).is_ok());
        let e = encode(65520.0, Dtype::F16).unwrap_err();
        assert!(e.contains("overflows f16"), "{e}");
        let e = encode(f32::MAX, Dtype::BF16).unwrap_err();
        assert!(e.contains("overflows bf16"), "{e}");
        assert!(encode(-f32::MAX, Dtype::BF16).is_err());
        assert_eq!(
            encode(f32::MAX, Dtype::F32).unwrap(),
            f32::MAX.to_le_bytes()
        );
        assert!(encode(f32::NAN, Dtype::F32).is_err());
        assert!(encode(f32::INFINITY, Dtype::BF16).is_err());
        assert!(encode(1.0, Dtype::I64).is_err());
    }
}
