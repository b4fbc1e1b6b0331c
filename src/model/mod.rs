//! CLIP checkpoints and the encoders built from them: the only module that knows candle and
//! weight formats.
//!
//! [`Checkpoint::open`] reads the weights a `--model` path names (a Hugging Face folder, or a
//! safetensors or PyTorch file in any layout `layout.rs` knows), brings them to one set of
//! names, takes the configuration from `config.json` or from the tensor shapes, and checks every
//! tensor against it, and recognises a CLIP4Clip temporal head beside the towers (`head.rs`);
//! the model's identity is the SHA-256 of its weights file. [`Clip::load`] builds both towers
//! from it in the dtype asked for (in two steps, [`Clip::unbuilt`] and [`Clip::build`], for a
//! caller with work to start between them), and [`Clip::use_head`] the head that pools a
//! video's frames.
//! Callers hand in plain `f32` pixel values or token ids and get embeddings back as plain
//! vectors, so no other module sees a tensor.

pub mod clip;
pub mod config;
mod fused;
mod head;
pub mod layout;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::ClipConfig;
pub use head::{Head, HeadConfig, mean_pool};
pub use layout::Layout;

use crate::matmul::bf16::Bf16Products;
use crate::preprocess::PreprocessConfig;
use crate::types::{DeviceChoice, HeadKind, ModelIdentity, Precision};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{path}: no such checkpoint (give a Hugging Face CLIP folder, or a .safetensors, .pt, .pth or .bin weights file)"
    )]
    NotFound { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("model computation failed: {0}")]
    Compute(String),
    #[error("{0}")]
    Mismatch(String),
    /// A setting of the environment the model cannot run under.
    #[error("{0}")]
    Environment(String),
}

/// Tells glibc's allocator to keep freed memory for reuse instead of handing it back to the
/// kernel. Each encoder layer allocates and frees activations of tens of MB; with glibc's
/// defaults many of them come back as fresh pages that the kernel zeroes again, about 5 % of
/// the image tower's time. Memory stays bounded: what is kept is reused by the next batch.
/// Call once at start-up.
pub fn keep_freed_activation_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; any values are valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// A checkpoint on disk, read: its weights under Hugging Face names, its configuration (from
/// `config.json`, or inferred from the tensor shapes) and what it is.
#[derive(Clone)]
pub struct Checkpoint {
    pub source: PathBuf,
    pub weights: PathBuf,
    /// The SHA-256 of `weights`: the model's identity.
    pub sha256: String,
    pub config: ClipConfig,
    pub preprocess: PreprocessConfig,
    pub layout: Layout,
    /// Whether `config` was inferred from the tensor shapes (no `config.json` applied).
    pub config_inferred: bool,
    /// The dtypes the weights are stored in (`f16`, `f32`, …).
    pub stored_dtypes: Vec<String>,
    /// Parameters in the two towers and projections.
    pub parameters: usize,
    /// Tensors recognised and not used (saved buffers).
    pub ignored: Vec<String>,
    /// The CLIP4Clip temporal head the checkpoint carries beside the towers, if any.
    pub head: Option<HeadConfig>,
    /// The dtype the model will run in.
    pub precision: Precision,
    tensors: HashMap<String, Tensor>,
    head_tensors: HashMap<String, Tensor>,
}

/// How a weights file is encoded, from its first bytes (names such as `pytorch_model.bin.1`
/// say nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightFormat {
    Safetensors,
    TorchZip,
}

impl Checkpoint {
    /// Resolves and reads `--model`: a Hugging Face folder (`model.safetensors` or
    /// `pytorch_model.bin`, with `config.json`), or one weights file (`.safetensors`, or a
    /// PyTorch file such as `.pt`, `.pth`, `.bin`, `pytorch_model.bin.N`) in any layout
    /// `layout.rs` knows. A `config.json` beside a Hugging Face file describes it; otherwise
    /// the shapes do. The weights file is hashed on another thread while it is read: each
    /// takes about a second of one core for a ViT-B/32.
    pub fn open(path: &Path) -> Result<Checkpoint, ModelError> {
        if !path.exists() {
            return Err(ModelError::NotFound { path: path.to_path_buf() });
        }
        let (folder, weights) = if path.is_dir() {
            let weights = ["model.safetensors", "pytorch_model.bin"]
                .iter()
                .map(|name| path.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| ModelError::Invalid {
                    path: path.to_path_buf(),
                    message: "no model.safetensors or pytorch_model.bin in this folder".into(),
                })?;
            (path.to_path_buf(), weights)
        } else {
            (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
        };
        let (read, sha256) = std::thread::scope(|scope| {
            let hashing = scope.spawn(|| sha256_file(&weights));
            let read = Checkpoint::read(path, &folder, &weights);
            (read, hashing.join().expect("hashing does not panic"))
        });
        let mut checkpoint = read?;
        checkpoint.sha256 = sha256?;
        Ok(checkpoint)
    }

    /// Reads the checkpoint at `path` (`weights` in `folder`), all but the hash.
    fn read(path: &Path, folder: &Path, weights: &Path) -> Result<Checkpoint, ModelError> {
        let weights_error = |message: String| ModelError::Weights { path: weights.to_path_buf(), message };
        let (raw, from_state_dict) = read_tensors(weights)?;
        let normalised = layout::normalise(raw, from_state_dict).map_err(weights_error)?;
        let config_path = folder.join("config.json");
        let use_config = normalised.layout == Layout::HuggingFace && config_path.is_file();
        let config = if use_config {
            let config_text = std::fs::read_to_string(&config_path)
                .map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
            ClipConfig::from_json(&config_text)
                .map_err(|message| ModelError::Invalid { path: config_path.clone(), message })?
        } else {
            layout::infer_config(&normalised.tensors).map_err(weights_error)?
        };
        let parameters = layout::check(&normalised, &config).map_err(weights_error)?;
        let head = head::find(&normalised.head_tensors, config.projection_dim).map_err(weights_error)?;
        let preprocess = if use_config {
            read_preprocessor_config(folder, config.vision.image_size as u32)?
        } else {
            PreprocessConfig::clip(config.vision.image_size as u32)
        };
        Ok(Checkpoint {
            source: path.to_path_buf(),
            weights: weights.to_path_buf(),
            sha256: String::new(),
            config,
            preprocess,
            layout: normalised.layout,
            config_inferred: !use_config,
            stored_dtypes: normalised.stored_dtypes.into_iter().collect(),
            parameters,
            ignored: normalised.ignored,
            head,
            precision: Precision::F32,
            tensors: normalised.tensors,
            head_tensors: normalised.head_tensors,
        })
    }

    /// The head `kind` of this checkpoint: meanP for any, seqTransf or seqLSTM where the
    /// checkpoint carries that head.
    pub fn load_head(&self, kind: HeadKind) -> Result<Head, ModelError> {
        match &self.head {
            _ if kind == HeadKind::MeanP => Ok(Head::MeanP),
            Some(config) if config.kind() == kind => Head::new(config, &self.head_tensors).map_err(|e| {
                ModelError::Weights { path: self.weights.clone(), message: format!("the {} head: {e}", kind.name()) }
            }),
            found => Err(ModelError::Mismatch(format!(
                "--head {}: {} carries {}",
                kind.name(),
                self.source.display(),
                found
                    .as_ref()
                    .map_or("no temporal head (meanP only)".to_string(), |c| format!("a {} head", c.kind().name()))
            ))),
        }
    }

    /// The same checkpoint, to run in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Checkpoint {
        self.precision = precision;
        self
    }

    /// What the index records of this checkpoint.
    pub fn identity(&self, logit_scale: f32) -> ModelIdentity {
        let name = self.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ModelIdentity {
            id: name,
            // Canonical and absolute, so a reader in any working folder finds the model.
            source: std::fs::canonicalize(&self.source)
                .unwrap_or_else(|_| self.source.clone())
                .to_string_lossy()
                .into_owned(),
            sha256: self.sha256.clone(),
            embed_dim: self.config.projection_dim,
            image_size: self.config.vision.image_size,
            logit_scale,
            dtype: self.precision,
            head: None,
        }
    }
}

/// Reads every tensor of a weights file as stored, and whether they came from a training
/// checkpoint's `state_dict` entry.
fn read_tensors(weights: &Path) -> Result<(Vec<(String, Tensor)>, bool), ModelError> {
    let weights_error = |e: candle_core::Error| ModelError::Weights {
        path: weights.to_path_buf(),
        message: format!("cannot read the weights ({e}); is the file complete?"),
    };
    match sniff_format(weights)? {
        WeightFormat::Safetensors => {
            let tensors = candle_core::safetensors::load(weights, &Device::Cpu).map_err(weights_error)?;
            Ok((tensors.into_iter().collect(), false))
        }
        WeightFormat::TorchZip => {
            let top = candle_core::pickle::read_all_with_key(weights, None).map_err(weights_error)?;
            if !top.is_empty() {
                return Ok((top, false));
            }
            // open_clip's training checkpoints hold the weights under `state_dict`, beside the
            // epoch and optimiser state.
            match candle_core::pickle::read_all_with_key(weights, Some("state_dict")) {
                Ok(inner) if !inner.is_empty() => Ok((inner, true)),
                _ => Err(ModelError::Weights {
                    path: weights.to_path_buf(),
                    message:
                        "a PyTorch file without tensors (neither a state dict nor a checkpoint with a state_dict entry)"
                            .into(),
                }),
            }
        }
    }
}

fn sniff_format(weights: &Path) -> Result<WeightFormat, ModelError> {
    use std::io::Read;
    let io = |source| ModelError::Io { path: weights.to_path_buf(), source };
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(weights).map_err(io)?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]).map_err(io)? {
            0 => break,
            n => read += n,
        }
    }
    if head[..read].starts_with(b"PK\x03\x04") {
        return Ok(WeightFormat::TorchZip);
    }
    // safetensors: an 8-byte little-endian header length, then the JSON header.
    if read == head.len() && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    Err(ModelError::Weights {
        path: weights.to_path_buf(),
        message: "neither a safetensors file nor a PyTorch zip checkpoint (files saved by torch.save before \
                  PyTorch 1.6 must be re-saved with a current version)"
            .into(),
    })
}

fn read_preprocessor_config(folder: &Path, image_size: u32) -> Result<PreprocessConfig, ModelError> {
    let path = folder.join("preprocessor_config.json");
    let mut config = PreprocessConfig::clip(image_size);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(config) };
    let invalid = |message: String| ModelError::Invalid { path: path.clone(), message };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let triple = |key: &str| -> Result<Option<[f32; 3]>, ModelError> {
        match value.get(key).and_then(|v| v.as_array()) {
            Some(a) if a.len() == 3 && a.iter().all(|x| x.is_number()) => {
                Ok(Some([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32)))
            }
            Some(_) => Err(invalid(format!("{key} must be three numbers"))),
            None => Ok(None),
        }
    };
    if let Some(mean) = triple("image_mean")? {
        config.mean = mean;
    }
    if let Some(std) = triple("image_std")? {
        config.std = std;
    }
    let size_of = |key: &str, inner: &str| -> Option<u32> {
        let v = value.get(key)?;
        v.as_u64().or_else(|| v.get(inner).and_then(|x| x.as_u64())).map(|n| n as u32)
    };
    if let Some(size) = size_of("size", "shortest_edge") {
        config.resize = size;
    }
    if let Some(crop) = size_of("crop_size", "height") {
        config.crop = crop;
    }
    if config.crop as usize != image_size as usize || config.resize < config.crop {
        return Err(invalid(format!(
            "crop {} and resize {} do not fit the model's image size {image_size}",
            config.crop, config.resize
        )));
    }
    Ok(config)
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
    crate::checksum::sha256_file(path)
        .map(|(_, sha256)| sha256)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

/// The candle device of a choice; CUDA only in a build with `cuda-encoder`.
fn candle_device(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            ModelError::Compute(format!(
                "cannot use CUDA device {n} ({e}); this build encodes on CPU (rebuild with --features cuda-encoder)"
            ))
        }),
    }
}

/// A loaded CLIP model, ready to embed images and texts, and the head that makes a video's
/// vector of its frames (meanP until [`Clip::use_head`] says otherwise). Its towers are `T`:
/// the built [`ClipModel`](clip::ClipModel), or [`Unbuilt`] between [`Clip::unbuilt`] and
/// [`Clip::build`].
pub struct Clip<T = clip::ClipModel> {
    model: T,
    device: Device,
    /// The dtype the towers' tensors hold: the precision's, except on the AVX-512 BF16 path,
    /// where the towers hold f32 and their products take bf16.
    dtype: DType,
    /// How the model multiplies under `--dtype bf16` on the CPU (`info --cpu` names it); `None`
    /// for other dtypes and devices.
    bf16_products: Option<Bf16Products>,
    head: Head,
    pub checkpoint: Checkpoint,
    pub identity: ModelIdentity,
}

/// Towers not built yet: their weights wait in the checkpoint.
pub struct Unbuilt;

impl Clip<Unbuilt> {
    /// The model with its identity and head known and its towers not built, so a caller can
    /// check and record the model, and start work that needs no tower (ingest's decoding),
    /// before the build (most of a second of both cores for a ViT-B/32).
    pub fn unbuilt(checkpoint: Checkpoint, device: DeviceChoice) -> Result<Self, ModelError> {
        let device = candle_device(device)?;
        let bf16_products = match (checkpoint.precision, &device) {
            (Precision::Bf16, Device::Cpu) => Some(Bf16Products::for_this_cpu().map_err(ModelError::Environment)?),
            _ => None,
        };
        let dtype = match bf16_products {
            Some(Bf16Products::Avx512Bf16) => DType::F32,
            _ => layout::candle_dtype(checkpoint.precision),
        };
        // Read as f32 whatever the dtype, so `exp(logit_scale)` stays exact.
        let logit_scale = checkpoint
            .tensors
            .get("logit_scale")
            .and_then(|t| t.to_dtype(DType::F32).ok())
            .and_then(|t| t.to_scalar::<f32>().ok())
            .ok_or_else(|| ModelError::Weights {
                path: checkpoint.weights.clone(),
                message: "no scalar logit_scale".into(),
            })?;
        let identity = checkpoint.identity(logit_scale);
        Ok(Clip { model: Unbuilt, device, dtype, bf16_products, head: Head::MeanP, checkpoint, identity })
    }

    /// Builds both towers from the checkpoint's weights.
    pub fn build(self) -> Result<Clip, ModelError> {
        let Clip { model: Unbuilt, device, dtype, bf16_products, head, mut checkpoint, identity } = self;
        // The VarBuilder converts each tensor to `dtype` as the towers read it.
        let vb = VarBuilder::from_tensors(std::mem::take(&mut checkpoint.tensors), dtype, &device);
        let mut model = clip::ClipModel::new(vb, &checkpoint.config).map_err(|e| ModelError::Weights {
            path: checkpoint.weights.clone(),
            message: format!("not a usable CLIP checkpoint: {e}"),
        })?;
        if bf16_products == Some(Bf16Products::Avx512Bf16) {
            model.use_bf16_products().map_err(|e| ModelError::Compute(format!("packing the weights as bf16: {e}")))?;
        }
        Ok(Clip { model, device, dtype, bf16_products, head, checkpoint, identity })
    }
}

impl<T> Clip<T> {
    /// Pools videos with the checkpoint's head `kind` from now on, and records it in the identity.
    pub fn use_head(&mut self, kind: HeadKind) -> Result<(), ModelError> {
        self.head = self.checkpoint.load_head(kind)?;
        self.identity.head = Some(kind);
        Ok(())
    }

    pub fn embed_dim(&self) -> usize {
        self.checkpoint.config.projection_dim
    }
}

impl Clip {
    pub fn load(checkpoint: Checkpoint, device: DeviceChoice) -> Result<Clip, ModelError> {
        Clip::unbuilt(checkpoint, device)?.build()
    }

    /// One video's raw frame features ([`Clip::image_features`]), in time order → the frames'
    /// L2-normalised embeddings and the video's vector, by the head in use.
    pub fn pool_video(&self, raw: Vec<Vec<f32>>) -> Result<(Vec<Vec<f32>>, Vec<f32>), ModelError> {
        self.head.pool(raw).map_err(|e| ModelError::Compute(format!("the {} head: {e}", self.head.kind().name())))
    }

    /// Loads the model an index records: from `path` when given (another copy of it), else from
    /// the recorded source. Anything whose weights differ from the recorded SHA-256 is refused.
    pub fn load_recorded(
        recorded: &ModelIdentity,
        path: Option<&Path>,
        device: DeviceChoice,
    ) -> Result<Clip, ModelError> {
        let source = path.map_or_else(|| PathBuf::from(&recorded.source), Path::to_path_buf);
        let checkpoint = Checkpoint::open(&source).map_err(|e| match (e, path) {
            (ModelError::NotFound { path: missing }, None) => ModelError::Mismatch(format!(
                "{}: the index's model is no longer there; give --model with a copy of it (sha256 {})",
                missing.display(),
                recorded.sha256
            )),
            (e, _) => e,
        })?;
        let clip = Clip::load(checkpoint.with_precision(recorded.dtype), device)?;
        if clip.identity.sha256 != recorded.sha256 {
            return Err(ModelError::Mismatch(format!(
                "{} is not the model this index was built with ({}, sha256 {}…); texts and videos must share one model",
                source.display(),
                recorded.source,
                &recorded.sha256[..12.min(recorded.sha256.len())]
            )));
        }
        Ok(clip)
    }

    /// Embeds `count` preprocessed images (`pixels` holds `count` CHW tensors back to back);
    /// returns `count × embed_dim` L2-normalised values, row-major.
    pub fn embed_images(&self, pixels: &[f32], count: usize) -> Result<Vec<f32>, ModelError> {
        self.images(pixels, count, true)
    }

    /// Like [`Clip::embed_images`], but the projected features as they are, not normalised:
    /// what CLIP4Clip's heads take.
    pub fn image_features(&self, pixels: &[f32], count: usize) -> Result<Vec<f32>, ModelError> {
        self.images(pixels, count, false)
    }

    fn images(&self, pixels: &[f32], count: usize, normalise: bool) -> Result<Vec<f32>, ModelError> {
        let size = self.checkpoint.config.vision.image_size;
        let compute = |e: candle_core::Error| ModelError::Compute(e.to_string());
        let input = Tensor::from_slice(pixels, (count, 3, size, size), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(compute)?;
        let out = self.model.image_embeddings(&input, normalise).map_err(compute)?;
        out.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(compute)
    }

    /// Embeds token sequences (start token to end token); returns `n × embed_dim` values.
    pub fn embed_texts(&self, token_ids: &[Vec<u32>]) -> Result<Vec<f32>, ModelError> {
        let compute = |e: candle_core::Error| ModelError::Compute(e.to_string());
        let out = self.model.text_embeddings(token_ids, &self.device).map_err(compute)?;
        out.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(compute)
    }

    pub fn max_text_tokens(&self) -> usize {
        self.model.text_model.max_tokens()
    }
}
