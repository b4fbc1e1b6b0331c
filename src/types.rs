//! The plain types several layers share, so that none of them has to depend on another for
//! them: where and in what precision a model runs ([`DeviceChoice`], [`Precision`]), how a
//! video's frames become its vector ([`HeadKind`]), what the manifest records of a model
//! ([`ModelIdentity`]), and a decoded picture ([`RgbImage`]).
//! No logic beyond parsing and naming; this module depends on nothing else in the crate.

use serde::{Deserialize, Serialize};

/// Where a model runs or a score is computed: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(text: &str) -> Result<DeviceChoice, String> {
        match text {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device {other:?}: use cpu, cuda or cuda:N")),
            },
        }
    }
}

/// The dtype models run in, and embeddings are computed in (they are always written as f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn parse(text: &str) -> Result<Precision, String> {
        match text {
            "f32" | "float32" => Ok(Precision::F32),
            "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("unknown dtype {other:?}: use f32, f16 or bf16")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// CLIP4Clip's similarity heads that give one vector per video: `meanP` (parameter-free
/// pooling, plain CLIP's), `seqTransf` (a transformer over the frames) and `seqLSTM` (an LSTM
/// over them). Named as CLIP4Clip's `--sim_header` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HeadKind {
    #[default]
    #[serde(rename = "meanP")]
    MeanP,
    #[serde(rename = "seqTransf")]
    SeqTransf,
    #[serde(rename = "seqLSTM")]
    SeqLstm,
}

impl HeadKind {
    /// Parses a head's name, in any case (`meanP`, `meanp`, `seqTransf`, `seqLSTM`, …).
    pub fn parse(text: &str) -> Result<HeadKind, String> {
        match text.to_ascii_lowercase().as_str() {
            "meanp" => Ok(HeadKind::MeanP),
            "seqtransf" => Ok(HeadKind::SeqTransf),
            "seqlstm" => Ok(HeadKind::SeqLstm),
            "tighttransf" => Err("tightTransf scores each (text, video) pair with a cross-encoder and gives no \
                 vector per video, which an index stores: use meanP, seqTransf or seqLSTM"
                .into()),
            _ => Err(format!("unknown head {text:?}: use meanP, seqTransf or seqLSTM")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HeadKind::MeanP => "meanP",
            HeadKind::SeqTransf => "seqTransf",
            HeadKind::SeqLstm => "seqLSTM",
        }
    }
}

/// What the manifest records about the model an index was built with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// A short name: the checkpoint folder's (or file's) name.
    pub id: String,
    /// The checkpoint's canonical absolute path (an index of format 1 or 2 recorded the path as
    /// typed until its next writer upgraded it).
    pub source: String,
    /// SHA-256 of the weights file: two copies of the same model match, anything else does not.
    pub sha256: String,
    pub embed_dim: usize,
    pub image_size: usize,
    /// `logit_scale` as stored; the logit multiplier is `exp(logit_scale)`.
    pub logit_scale: f32,
    /// The dtype embeddings are computed in (indexes from before this field are f32).
    #[serde(default)]
    pub dtype: Precision,
    /// The head that pooled the videos' frames; `None` in an index made before heads existed,
    /// which is meanP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadKind>,
}

/// A packed 8-bit RGB image, rows of `width * 3` bytes, as displayed (rotation applied).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}
