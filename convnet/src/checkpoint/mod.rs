//! Checkpoints: one `.safetensors` file of parameters and buffers under PyTorch
//! `state_dict` names, with JSON metadata (architecture, input shape, class names,
//! normalisation, epoch/step, format version).
//!
//! `torch.nn.Module.load_state_dict(safetensors.torch.load_file(path))` loads a checkpoint
//! into the equivalent PyTorch model: `num_batches_tracked` is written as int64 like PyTorch's.
//! Writes are atomic — a temporary file in the same folder, flushed, then renamed over the
//! target — so a killed process never leaves a corrupt checkpoint behind.

use crate::data::Normalize;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

mod torch_file;

/// Version of the checkpoint metadata layout.
pub const FORMAT_VERSION: u32 = 1;

/// What a checkpoint says about its model, stored in the safetensors metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    /// Architecture name from the model zoo (`seed-cnn`, `resnet20`, ...).
    pub architecture: String,
    /// Input shape `[C, H, W]`.
    pub input_shape: [usize; 3],
    /// Class names, index = class.
    pub classes: Vec<String>,
    /// Input normalisation used in training.
    pub normalize: Normalize,
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimizer steps.
    pub step: usize,
    /// For a model built from a model file: the file's contents as JSON, so the checkpoint
    /// rebuilds without the file.
    pub model_spec: Option<String>,
    /// For a model of texts or audio: what it reads and how inputs are made (then
    /// `input_shape` is unused, `[0, 0, 0]`).
    pub sequence: Option<SequenceMeta>,
}

/// What a model of texts or audio reads, stored in its checkpoints so that `eval` and
/// `predict` turn new data into the inputs it was trained on.
///
/// ```
/// use convnet::checkpoint::SequenceMeta;
/// let m = SequenceMeta { input: vec![200], tokenizer: Some("{}".into()), audio: None };
/// assert_eq!(SequenceMeta::from_json(&m.to_json())?, m);
/// assert!(SequenceMeta::from_json("{\"input\": []}").is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SequenceMeta {
    /// The input of one example, batch excluded: `[L]` token ids, `[C, L]` samples,
    /// `[1, mels, frames]` spectrograms.
    pub input: Vec<usize>,
    /// A text model's tokenizer ([`crate::data::text::Tokenizer::to_json`]).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// An audio model's feature settings (JSON).
    #[serde(default)]
    pub audio: Option<String>,
}

impl SequenceMeta {
    /// As JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From [`SequenceMeta::to_json`]'s output; an empty or zero-sized input is an error.
    pub fn from_json(text: &str) -> Result<SequenceMeta> {
        let m: SequenceMeta = serde_json::from_str(text).map_err(|e| {
            crate::error::invalid("checkpoint", format!("bad sequence metadata: {e}"))
        })?;
        if m.input.is_empty() || m.input.contains(&0) || m.input.len() > 3 {
            return Err(crate::error::invalid(
                "checkpoint",
                format!("bad sequence metadata: input {:?}", m.input),
            ));
        }
        Ok(m)
    }
}

impl CheckpointMeta {
    pub(crate) fn to_map(&self) -> HashMap<String, String> {
        let j = |v: serde_json::Value| v.to_string();
        let mut m = HashMap::from([
            ("format".into(), "convnet-checkpoint".into()),
            ("format_version".into(), FORMAT_VERSION.to_string()),
            ("architecture".into(), self.architecture.clone()),
            ("input_shape".into(), j(serde_json::json!(self.input_shape))),
            ("classes".into(), j(serde_json::json!(self.classes))),
            (
                "normalize_mean".into(),
                j(serde_json::json!(self.normalize.mean)),
            ),
            (
                "normalize_std".into(),
                j(serde_json::json!(self.normalize.std)),
            ),
            ("epoch".into(), self.epoch.to_string()),
            ("step".into(), self.step.to_string()),
        ]);
        if let Some(spec) = &self.model_spec {
            m.insert("model_spec".into(), spec.clone());
        }
        if let Some(seq) = &self.sequence {
            m.insert("sequence".into(), seq.to_json());
        }
        m
    }

    pub(crate) fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let bad = |what: &str| Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "checkpoint metadata: missing or invalid {what}; was this file written by convnet?"
            ),
        };
        let get = |k: &str| m.get(k).ok_or_else(|| bad(k));
        let json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?).map_err(|_| bad(k))
        };
        let version: u32 = get("format_version")?
            .parse()
            .map_err(|_| bad("format_version"))?;
        if version > FORMAT_VERSION {
            return Err(Error::Format { path: path.to_path_buf(), msg: format!("checkpoint format version {version} is newer than this convnet understands ({FORMAT_VERSION}); upgrade convnet") });
        }
        let sequence = match m.get("sequence") {
            Some(text) => Some(SequenceMeta::from_json(text).map_err(|_| bad("sequence"))?),
            None => None,
        };
        let shape: Vec<usize> = match &sequence {
            Some(_) => vec![0; 3],
            None => serde_json::from_value(json("input_shape")?).map_err(|_| bad("input_shape"))?,
        };
        if shape.len() != 3 {
            return Err(bad("input_shape"));
        }
        Ok(CheckpointMeta {
            architecture: get("architecture")?.clone(),
            input_shape: [shape[0], shape[1], shape[2]],
            classes: serde_json::from_value(json("classes")?).map_err(|_| bad("classes"))?,
            normalize: Normalize {
                mean: serde_json::from_value(json("normalize_mean")?)
                    .map_err(|_| bad("normalize_mean"))?,
                std: serde_json::from_value(json("normalize_std")?)
                    .map_err(|_| bad("normalize_std"))?,
            },
            epoch: get("epoch")?.parse().map_err(|_| bad("epoch"))?,
            step: get("step")?.parse().map_err(|_| bad("step"))?,
            model_spec: m.get("model_spec").cloned(),
            sequence,
        })
    }
}

/// A tensor on its way into a safetensors file.
struct Out {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Out {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_out(name: &str, t: &Tensor) -> Out {
    if crate::nn::is_batch_counter(name) {
        let v = t.to_vec().first().copied().unwrap_or(0.0) as i64;
        return Out {
            dtype: Dtype::I64,
            shape: Vec::new(),
            bytes: v.to_le_bytes().to_vec(),
        };
    }
    Out {
        dtype: Dtype::F32,
        shape: t.dims().to_vec(),
        bytes: t.to_vec().iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `bytes` to `path` atomically: temporary file beside it, flush + fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Writes named tensors and metadata as one safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let outs: Vec<(String, Out)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), to_out(n, t)))
        .collect();
    let bytes = safetensors::serialize(outs.iter().map(|(n, o)| (n.as_str(), o)), Some(metadata))
        .map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("cannot serialise: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// A tensor of any element type on its way into a file ([`save_raw`]).
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    /// Float32 values.
    pub fn f32(shape: &[usize], v: &[f32]) -> RawTensor {
        RawTensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    /// Signed bytes.
    pub fn i8(shape: &[usize], v: &[i8]) -> RawTensor {
        RawTensor {
            dtype: Dtype::I8,
            shape: shape.to_vec(),
            bytes: v.iter().map(|&x| x as u8).collect(),
        }
    }
    /// 32-bit integers.
    pub fn i32(shape: &[usize], v: &[i32]) -> RawTensor {
        RawTensor {
            dtype: Dtype::I32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Writes tensors of any element type with `metadata`, atomically.
pub fn save_raw(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let outs: Vec<(String, Out)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Out {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: t.bytes.clone(),
                },
            )
        })
        .collect();
    let bytes = safetensors::serialize(outs.iter().map(|(n, o)| (n.as_str(), o)), Some(metadata))
        .map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("cannot serialise: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// The `format` entry of a safetensors file's metadata, reading only its header (`None`
/// for anything else).
pub fn read_format(path: &Path) -> Option<String> {
    read_metadata_entry(path, "format")
}

/// The entry `key` of a safetensors file's metadata, reading only its header (`None` when
/// the file or the entry is missing or unreadable): e.g. `sequence`, whose presence says a
/// checkpoint's model reads texts or audio.
pub fn read_metadata_entry(path: &Path, key: &str) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 * 1024 * 1024 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?
        .get(key)?
        .as_str()
        .map(str::to_string)
}

/// Saves a model checkpoint.
pub fn save_checkpoint(
    path: &Path,
    state: &[(String, Tensor)],
    meta: &CheckpointMeta,
) -> Result<()> {
    save_tensors(path, state, meta.to_map())
}

/// Named tensors in file order, as `state_dict()` gives them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Reads every tensor of a safetensors file, or of a PyTorch `torch.save` file (`.pt`,
/// `.pth`; a `state_dict` of tensors, read without running any code), as `f32` (`f64`,
/// `f16`, `bf16` and integer tensors are converted), with the file's metadata (none for
/// PyTorch files).
pub fn load_tensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    tensors_from_bytes(path, &bytes)
}

/// [`load_tensors`] for a file already in memory; `path` names it in errors.
pub fn tensors_from_bytes(
    path: &Path,
    bytes: &[u8],
) -> Result<(NamedTensors, HashMap<String, String>)> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Ok((torch_file::load(path, bytes)?, HashMap::new()));
    }
    if bytes.starts_with(&[0x80, 0x02]) {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "a PyTorch file in the legacy (pre-1.6) format; re-save it with a current torch.save, or as safetensors".into(),
        });
    }
    let corrupt = |e: safetensors::SafeTensorError| {
        Error::Format {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file ({e}); it may be truncated or corrupt — re-export or re-download it"),
    }
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(corrupt)?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(corrupt)?;
        let d = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f32)
                .collect(),
            Dtype::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            Dtype::U8 => d.iter().map(|&b| b as f32).collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("tensor {name} has unsupported dtype {other:?}"),
                });
            }
        };
        out.push((name, Tensor::from_vec(values, view.shape().to_vec())?));
    }
    Ok((out, meta))
}

/// Loads a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint(path: &Path) -> Result<(NamedTensors, CheckpointMeta)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    checkpoint_from_bytes(path, &bytes)
}

/// [`load_checkpoint`] for a file already in memory (e.g. weights built into a program);
/// `path` names it in errors.
pub fn checkpoint_from_bytes(path: &Path, bytes: &[u8]) -> Result<(NamedTensors, CheckpointMeta)> {
    let (tensors, meta) = tensors_from_bytes(path, bytes)?;
    if meta.get("format").map(String::as_str) == Some("convnet-quantized") {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "a quantized checkpoint: it runs for inference (eval, predict, summary, export, bench), not as float weights".into(),
        });
    }
    if meta.get("format").map(String::as_str) != Some("convnet-checkpoint") {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "a plain state_dict without convnet metadata: load it with --model NAME --weights FILE".into(),
        });
    }
    Ok((tensors, CheckpointMeta::from_map(path, &meta)?))
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            let v = mant as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (mant << 13),
        e => sign | (((e - 15 + 127) as u32) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}
