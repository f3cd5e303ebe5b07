//! Memory-mapped safetensors checkpoints (single file or sharded), read tensor by tensor with a shape
//! check and a cast to the model's dtype: the pull style of candle's VarBuilder, on tch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

#[derive(Clone)]
struct TensorInfo {
    file: usize,
    name_in_file: String,
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range in the mapped file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, indexed by (canonical) name.
pub struct Weights {
    files: Arc<[(PathBuf, Mmap)]>,
    tensors: HashMap<String, TensorInfo>,
    used: Mutex<BTreeSet<String>>,
    progress: Option<indicatif::ProgressBar>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Large loads draw a progress bar on stderr (when it is a terminal).
const PROGRESS_MIN_BYTES: usize = 256 << 20;

impl Weights {
    /// Maps `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::from_files(&[single])
        } else if index.exists() {
            Self::from_files(&shards_of(&index)?)
        } else {
            Err(Error::Weights(format!(
                "{}: neither model.safetensors nor model.safetensors.index.json is present",
                dir.display()
            )))
        }
    }

    /// Maps the given safetensors files.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let handle = std::fs::File::open(path)
                .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while mapped is the user's error
            // (every loader that maps, from safetensors to candle, shares this caveat).
            let mmap = unsafe { Mmap::map(&handle) }
                .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::Weights(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let shape = info.shape.iter().map(|&d| d as i64).collect();
                let info = TensorInfo {
                    file,
                    name_in_file: name.clone(),
                    dtype: info.dtype,
                    shape,
                    start: data_start + start,
                    end: data_start + end,
                };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(Error::Weights(format!(
                        "tensor `{name}` appears in more than one shard"
                    )));
                }
            }
            files.push((path.clone(), mmap));
        }
        let total: usize = tensors.values().map(|t| t.end - t.start).sum();
        let progress = (total >= PROGRESS_MIN_BYTES).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "loading weights {bar:40} {bytes}/{total_bytes} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Ok(Self {
            files: files.into(),
            tensors,
            used: Mutex::default(),
            progress,
        })
    }

    /// A view of the same mapped files with every tensor renamed through `canonical` (checkpoint name →
    /// the model's name); `None` drops a tensor the model never reads (e.g. `position_ids` buffers).
    pub fn renamed(&self, canonical: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut renamed = HashMap::with_capacity(self.tensors.len());
        for (name, info) in &self.tensors {
            if let Some(new) = canonical(name) {
                if let Some(clash) = renamed.insert(new.clone(), info.clone()) {
                    return Err(Error::Weights(format!(
                        "tensors `{}` and `{name}` both map to `{new}`",
                        clash.name_in_file
                    )));
                }
            }
        }
        Ok(Self {
            files: self.files.clone(),
            tensors: renamed,
            used: Mutex::default(),
            progress: self.progress.clone(),
        })
    }

    /// The (canonical) names of every tensor, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The checkpoint's shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Reads a tensor, checks its shape, casts it to `kind` and moves it to `device`.
    pub fn get(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        if info.shape != shape {
            return Err(Error::Weights(format!(
                "tensor `{name}` has shape {:?} in {} but the model expects {shape:?}",
                info.shape,
                self.files[info.file].0.display()
            )));
        }
        let source_kind = self.source_kind(name, info, kind)?;
        let bytes = &self.files[info.file].1[info.start..info.end];
        let tensor = Tensor::f_from_data_size(bytes, &info.shape, source_kind)?;
        let tensor = if source_kind == kind {
            tensor
        } else {
            tensor.f_to_kind(kind)?
        };
        let tensor = tensor.f_to_device(device)?;
        self.mark_read(name, info.end - info.start);
        Ok(tensor)
    }

    /// The kind a tensor is stored in, checked against the `kind` the model reads it as.
    fn source_kind(&self, name: &str, info: &TensorInfo, kind: Kind) -> Result<Kind> {
        let source_kind = kind_of(info.dtype).ok_or_else(|| {
            Error::Weights(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                info.dtype
            ))
        })?;
        if is_float(kind) && !is_float(source_kind) {
            return Err(Error::Weights(format!(
                "tensor `{name}` has dtype {:?} in {} but the model expects floating-point weights",
                info.dtype,
                self.files[info.file].0.display()
            )));
        }
        Ok(source_kind)
    }

    /// Records that `name` was read (`bytes` of it), for `check_all_used` and the progress bar.
    fn mark_read(&self, name: &str, bytes: usize) {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
        if let Some(bar) = &self.progress {
            bar.inc(bytes as u64);
        }
    }

    /// Reads `len` rows (along `dim`) from `start` of a tensor whose full shape is `shape`: a rank's slice
    /// under tensor parallelism. Only the slice is copied out of the mapped file (the rest is never
    /// read into memory), cast to `kind` and moved to `device`.
    #[allow(clippy::too_many_arguments)]
    pub fn get_slice(
        &self,
        name: &str,
        shape: &[i64],
        dim: usize,
        start: i64,
        len: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        if start == 0 && shape.get(dim) == Some(&len) {
            return self.get(name, shape, kind, device);
        }
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        if info.shape != shape || dim >= shape.len() || start < 0 || start + len > shape[dim] {
            return Err(Error::Weights(format!(
                "tensor `{name}` has shape {:?} in {}; the model expects {shape:?} and reads {len} of dim {dim} from {start}",
                info.shape,
                self.files[info.file].0.display()
            )));
        }
        let source_kind = self.source_kind(name, info, kind)?;
        let bytes = &self.files[info.file].1[info.start..info.end];
        let strides = contiguous_strides(shape);
        // SAFETY: `bytes` is the whole tensor (its shape and dtype checked above) in a read-only mapping
        // that outlives this call; the view is only read, and copied before it is dropped.
        let whole = unsafe {
            Tensor::f_from_blob(bytes.as_ptr(), shape, &strides, source_kind, Device::Cpu)?
        };
        let part = whole.f_narrow(dim as i64, start, len)?;
        let mut out_shape = shape.to_vec();
        out_shape[dim] = len;
        let mut out = Tensor::f_empty(&out_shape, (kind, device))?;
        out.f_copy_(&part)?;
        self.mark_read(
            name,
            (info.end - info.start) * len as usize / shape[dim].max(1) as usize,
        );
        Ok(out)
    }

    /// Marks every tensor under `prefix.` as deliberately unread (e.g. vision layers after the feature layer),
    /// so that [`Weights::check_all_used`] does not report them.
    pub fn skip_prefix(&self, prefix: &str) {
        let prefix = format!("{prefix}.");
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.extend(
            self.tensors
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned(),
        );
    }

    /// Fails if the checkpoint holds tensors the model never read, naming them.
    pub fn check_all_used(&self) -> Result<()> {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let unused: BTreeMap<&str, &[i64]> = self
            .tensors
            .iter()
            .filter(|(name, _)| !used.contains(*name))
            .map(|(_, info)| (info.name_in_file.as_str(), info.shape.as_slice()))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = unused
            .iter()
            .take(10)
            .map(|(n, s)| format!("`{n}` {s:?}"))
            .collect();
        let more = unused.len().saturating_sub(10);
        Err(Error::Weights(format!(
            "the checkpoint has {} tensor(s) the model does not use: {}{}",
            unused.len(),
            list.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )))
    }

    fn missing(&self, name: &str) -> Error {
        // Point at the likely cause: a name with the same last components under another prefix.
        let tail: Vec<&str> = name.rsplit('.').take(3).collect();
        let mut similar: Vec<&str> = self
            .tensors
            .keys()
            .filter(|k| k.rsplit('.').take(3).eq(tail.iter().copied()))
            .map(String::as_str)
            .collect();
        similar.sort_unstable();
        similar.truncate(3);
        let hint = if similar.is_empty() {
            String::new()
        } else {
            format!(" (similar: {})", similar.join(", "))
        };
        Error::Weights(format!(
            "tensor `{name}` is missing from the checkpoint{hint}"
        ))
    }
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(index.display().to_string(), e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index.display().to_string(), "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::config(
                index.display().to_string(),
                format!("`weight_map.{tensor}` is not a file name"),
            )
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(Error::config(
                index.display().to_string(),
                format!("shard `{file}` is outside the checkpoint"),
            ));
        }
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Row-major strides of `shape`, in elements.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}
