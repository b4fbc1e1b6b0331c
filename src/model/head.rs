//! How the frame embeddings of one video become its vector (contract §1): CLIP4Clip's similarity
//! heads, computed as its `_loose_similarity` computes them. meanP (plain CLIP's) only pools;
//! seqTransf runs a transformer over the frames (position embeddings added, pre-LayerNorm
//! blocks with eps 1e-12 and quick_gelu) and seqLSTM a one-layer LSTM, each adding the frames
//! back; then every head normalises each frame, averages and normalises the mean.
//!
//! The head's tensors sit beside `clip.*` in a CLIP4Clip checkpoint under CLIP4Clip's names
//! (`frame_position_embeddings.weight`, `transformerClip.resblocks.N.…`,
//! `lstm_visual.weight_ih_l0`, …); [`find`] recognises the head and reads its geometry from the
//! shapes, and each struct's `new(vb, &cfg)` reads its tensors under those names. A head runs
//! on one video at a time (its frames in time order), in f32 on the CPU whatever the towers'
//! dtype and device, so a video's vector does not depend on the batch its frames were embedded
//! in; it costs well under a frame's encoding.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_nn::rnn::{LSTM, LSTMConfig, RNN};

use super::fused::{self, Dense, Epilogue, LayerNorm, layer_norm};
use crate::types::HeadKind;

/// CLIP4Clip's `LayerNorm` (TF style, ε inside the square root) uses ε = 1e-12.
const LAYER_NORM_EPS: f64 = 1e-12;
/// OpenAI's head width, from which CLIP4Clip takes its head count (width / 64).
const HEAD_WIDTH: usize = 64;

/// The prefixes of CLIP4Clip's tensors beside `clip.*`.
pub const HEAD_PREFIXES: [&str; 5] =
    ["frame_position_embeddings.", "transformerClip.", "lstm_visual.", "cross.", "similarity_dense."];

/// A temporal head a checkpoint carries, its geometry read from the tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadConfig {
    SeqTransf { width: usize, layers: usize, heads: usize, max_positions: usize },
    SeqLstm { width: usize },
}

impl HeadConfig {
    pub fn kind(&self) -> HeadKind {
        match self {
            HeadConfig::SeqTransf { .. } => HeadKind::SeqTransf,
            HeadConfig::SeqLstm { .. } => HeadKind::SeqLstm,
        }
    }

    /// The most frames the head takes: seqTransf has one position embedding per frame.
    pub fn max_frames(&self) -> Option<usize> {
        match self {
            HeadConfig::SeqTransf { max_positions, .. } => Some(*max_positions),
            HeadConfig::SeqLstm { .. } => None,
        }
    }

    /// The head and its geometry, for `info --model`.
    pub fn describe(&self) -> String {
        match self {
            HeadConfig::SeqTransf { width, layers, heads, max_positions } => format!(
                "seqTransf ({layers} layer{}, width {width}, {heads} attention head{}, {max_positions} frame positions)",
                if *layers == 1 { "" } else { "s" },
                if *heads == 1 { "" } else { "s" }
            ),
            HeadConfig::SeqLstm { width } => format!("seqLSTM (1 layer, width {width})"),
        }
    }
}

/// Recognises the head among a CLIP4Clip checkpoint's tensors beside `clip.*` (`tensors`, by
/// their names in the file) and checks every one of them against its geometry; the head's
/// width must be the CLIP embedding's. `None` where there is none (a meanP fine-tune).
/// tightTransf, which needs the text of every (text, video) pair, is refused.
pub fn find(tensors: &HashMap<String, Tensor>, embed_dim: usize) -> std::result::Result<Option<HeadConfig>, String> {
    let has = |prefix: &str| tensors.keys().any(|name| name.starts_with(prefix));
    if has("cross.") || has("similarity_dense.") {
        return Err("a tightTransf head (cross.*, similarity_dense.*): it scores each (text, video) pair with a \
                    cross-encoder and gives no vector per video, which an index stores; only meanP, seqTransf \
                    and seqLSTM checkpoints can be indexed"
            .into());
    }
    let config = match (has("transformerClip."), has("lstm_visual.")) {
        (true, true) => {
            return Err("holds both a seqTransf (transformerClip.*) and a seqLSTM (lstm_visual.*) head".into());
        }
        (false, false) if tensors.is_empty() => return Ok(None),
        (false, false) => {
            return Err(format!(
                "{} without transformerClip.* or lstm_visual.*: an incomplete seqTransf or seqLSTM head",
                super::layout::name_list(&tensors.keys().cloned().collect::<Vec<_>>(), 4)
            ));
        }
        (true, false) => {
            let positions = shape_of(tensors, "frame_position_embeddings.weight")?;
            let [max_positions, width] = positions[..] else {
                return Err(format!("frame_position_embeddings.weight: expected a matrix, found shape {positions:?}"));
            };
            let layers: BTreeSet<usize> = tensors
                .keys()
                .filter_map(|n| n.strip_prefix("transformerClip.resblocks.")?.split('.').next()?.parse().ok())
                .collect();
            if width % HEAD_WIDTH != 0 {
                return Err(format!("the seqTransf head's width {width} is not a multiple of {HEAD_WIDTH}"));
            }
            HeadConfig::SeqTransf { width, layers: layers.len(), heads: width / HEAD_WIDTH, max_positions }
        }
        (false, true) => {
            let hidden = shape_of(tensors, "lstm_visual.weight_hh_l0")?.get(1).copied().unwrap_or(0);
            HeadConfig::SeqLstm { width: hidden }
        }
    };
    let width = match config {
        HeadConfig::SeqTransf { width, .. } | HeadConfig::SeqLstm { width } => width,
    };
    if width != embed_dim {
        return Err(format!(
            "the {} head is {width} wide but the CLIP embedding is {embed_dim}: they must be equal",
            config.kind().name()
        ));
    }
    check(tensors, &expected_shapes(&config))?;
    Ok(Some(config))
}

fn shape_of(tensors: &HashMap<String, Tensor>, name: &str) -> std::result::Result<Vec<usize>, String> {
    tensors.get(name).map(|t| t.dims().to_vec()).ok_or_else(|| format!("the head's {name} is missing"))
}

/// Every tensor the head reads, with its shape. A seqLSTM checkpoint also stores
/// `frame_position_embeddings.weight`, which that head does not use: it is accepted, any shape.
fn expected_shapes(config: &HeadConfig) -> BTreeMap<String, Vec<usize>> {
    let mut shapes = BTreeMap::new();
    match *config {
        HeadConfig::SeqTransf { width: w, layers, max_positions, .. } => {
            shapes.insert("frame_position_embeddings.weight".to_string(), vec![max_positions, w]);
            for i in 0..layers {
                let p = format!("transformerClip.resblocks.{i}");
                for (name, shape) in [
                    ("attn.in_proj_weight", vec![3 * w, w]),
                    ("attn.in_proj_bias", vec![3 * w]),
                    ("attn.out_proj.weight", vec![w, w]),
                    ("attn.out_proj.bias", vec![w]),
                    ("ln_1.weight", vec![w]),
                    ("ln_1.bias", vec![w]),
                    ("ln_2.weight", vec![w]),
                    ("ln_2.bias", vec![w]),
                    ("mlp.c_fc.weight", vec![4 * w, w]),
                    ("mlp.c_fc.bias", vec![4 * w]),
                    ("mlp.c_proj.weight", vec![w, 4 * w]),
                    ("mlp.c_proj.bias", vec![w]),
                ] {
                    shapes.insert(format!("{p}.{name}"), shape);
                }
            }
        }
        HeadConfig::SeqLstm { width: w } => {
            for (name, shape) in [
                ("weight_ih_l0", vec![4 * w, w]),
                ("weight_hh_l0", vec![4 * w, w]),
                ("bias_ih_l0", vec![4 * w]),
                ("bias_hh_l0", vec![4 * w]),
            ] {
                shapes.insert(format!("lstm_visual.{name}"), shape);
            }
        }
    }
    shapes
}

/// One error naming every missing, misshapen and unexpected head tensor.
fn check(
    tensors: &HashMap<String, Tensor>,
    expected: &BTreeMap<String, Vec<usize>>,
) -> std::result::Result<(), String> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match tensors.get(name) {
            None => problems.push(format!("{name} is missing")),
            Some(t) if t.dims() != shape.as_slice() => {
                problems.push(format!("{name} has shape {:?}, expected {shape:?}", t.dims()))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> =
        tensors.keys().filter(|n| !expected.contains_key(*n) && *n != "frame_position_embeddings.weight").collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|n| format!("{n} is not a tensor of this head")));
    if problems.is_empty() { Ok(()) } else { Err(format!("head tensors: {}", problems.join("; "))) }
}

/// `transformerClip.resblocks.N`: CLIP4Clip's `ResidualAttentionBlock` (`nn.MultiheadAttention`
/// with its packed `in_proj`, pre-LayerNorm, quick_gelu MLP).
struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    in_proj: Dense,
    out_proj: Dense,
    ln_2: LayerNorm,
    c_fc: Dense,
    c_proj: Dense,
    heads: usize,
}

impl ResidualAttentionBlock {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> Result<Self> {
        Ok(ResidualAttentionBlock {
            ln_1: layer_norm(width, LAYER_NORM_EPS, vb.pp("ln_1"))?,
            in_proj: Dense::with_names(vb.pp("attn"), width, 3 * width, "in_proj_weight", "in_proj_bias")?,
            out_proj: Dense::new(vb.pp("attn.out_proj"), width, width)?,
            ln_2: layer_norm(width, LAYER_NORM_EPS, vb.pp("ln_2"))?,
            c_fc: Dense::new(vb.pp("mlp.c_fc"), width, 4 * width)?,
            c_proj: Dense::new(vb.pp("mlp.c_proj"), 4 * width, width)?,
            heads,
        })
    }

    /// `x` [1, frames, width]. Every frame attends to every frame: the video's own, unpadded.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.in_proj.forward(&self.ln_1.forward(x)?, Epilogue::None)?;
        let attended = fused::attention(&qkv, self.heads, false, x.dim(1)?)?;
        let x = self.out_proj.forward(&attended, Epilogue::Residual(x))?;
        let hidden = self.c_fc.forward(&self.ln_2.forward(&x)?, Epilogue::QuickGelu)?;
        self.c_proj.forward(&hidden, Epilogue::Residual(&x))
    }
}

/// seqTransf: `frame_position_embeddings` and `transformerClip`.
pub struct SeqTransf {
    frame_position_embeddings: Tensor,
    resblocks: Vec<ResidualAttentionBlock>,
}

impl SeqTransf {
    fn new(vb: VarBuilder, width: usize, layers: usize, heads: usize, max_positions: usize) -> Result<Self> {
        let blocks = vb.pp("transformerClip.resblocks");
        Ok(SeqTransf {
            frame_position_embeddings: vb.get((max_positions, width), "frame_position_embeddings.weight")?,
            resblocks: (0..layers)
                .map(|i| ResidualAttentionBlock::new(blocks.pp(i.to_string()), width, heads))
                .collect::<Result<_>>()?,
        })
    }

    fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        let positions = self.frame_position_embeddings.narrow(0, 0, frames.dim(1)?)?;
        let mut x = frames.broadcast_add(&positions)?;
        for block in &self.resblocks {
            x = block.forward(&x)?;
        }
        x + frames
    }
}

/// seqLSTM: `lstm_visual`, PyTorch's `nn.LSTM` (gates i, f, g, o), over the video's frames.
pub struct SeqLstm {
    lstm_visual: LSTM,
}

impl SeqLstm {
    fn new(vb: VarBuilder, width: usize) -> Result<Self> {
        Ok(SeqLstm { lstm_visual: candle_nn::lstm(width, width, LSTMConfig::default(), vb.pp("lstm_visual"))? })
    }

    fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        let states = self.lstm_visual.seq(frames)?;
        self.lstm_visual.states_to_tensor(&states)? + frames
    }
}

/// A loaded head.
pub enum Head {
    MeanP,
    SeqTransf(SeqTransf),
    SeqLstm(SeqLstm),
}

impl Head {
    /// Builds `config`'s head from its `tensors` (by their names in the file), in f32.
    pub fn new(config: &HeadConfig, tensors: &HashMap<String, Tensor>) -> Result<Head> {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        Ok(match *config {
            HeadConfig::SeqTransf { width, layers, heads, max_positions } => {
                Head::SeqTransf(SeqTransf::new(vb, width, layers, heads, max_positions)?)
            }
            HeadConfig::SeqLstm { width } => Head::SeqLstm(SeqLstm::new(vb, width)?),
        })
    }

    pub fn kind(&self) -> HeadKind {
        match self {
            Head::MeanP => HeadKind::MeanP,
            Head::SeqTransf(_) => HeadKind::SeqTransf,
            Head::SeqLstm(_) => HeadKind::SeqLstm,
        }
    }

    /// One video's raw (unnormalised) frame embeddings, in time order → its frames'
    /// L2-normalised embeddings (what the frames table keeps) and its vector.
    pub fn pool(&self, raw: Vec<Vec<f32>>) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let frames: Vec<Vec<f32>> = raw.iter().map(|f| normalised(f)).collect();
        let vector = match self {
            Head::MeanP => mean_pool(&frames),
            Head::SeqTransf(head) => mean_pool(&head_output(&raw, |x| head.forward(x))?),
            Head::SeqLstm(head) => mean_pool(&head_output(&raw, |x| head.forward(x))?),
        };
        Ok((frames, vector))
    }
}

/// Runs a head's `forward` on one video's frames, as a batch of one.
fn head_output(raw: &[Vec<f32>], forward: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<Vec<f32>>> {
    let (count, width) = (raw.len(), raw.first().map_or(0, Vec::len));
    let flat: Vec<f32> = raw.iter().flatten().copied().collect();
    let out = forward(&Tensor::from_vec(flat, (1, count, width), &Device::Cpu)?)?;
    out.squeeze(0)?.to_vec2::<f32>()
}

/// CLIP4Clip's pooling: normalise each frame's vector, average, normalise the mean.
pub fn mean_pool(frames: &[Vec<f32>]) -> Vec<f32> {
    let dim = frames.first().map_or(0, Vec::len);
    let mut mean = vec![0f32; dim];
    for frame in frames {
        let norm = l2_norm(frame);
        for (m, v) in mean.iter_mut().zip(frame) {
            *m += v / norm;
        }
    }
    let norm = l2_norm(&mean);
    mean.iter_mut().for_each(|m| *m /= norm);
    mean
}

/// `v / ‖v‖`.
pub fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = l2_norm(v);
    v.iter().map(|x| x / norm).collect()
}

fn l2_norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_normalises_before_and_after() {
        let pooled = mean_pool(&[vec![3.0, 0.0], vec![0.0, 0.5]]);
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((pooled[0] - s).abs() < 1e-6 && (pooled[1] - s).abs() < 1e-6, "{pooled:?}");
    }

    fn zeros(shapes: &[(&str, &[usize])]) -> HashMap<String, Tensor> {
        shapes.iter().map(|(n, s)| (n.to_string(), Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap())).collect()
    }

    #[test]
    fn heads_are_found_from_their_shapes_and_every_fault_is_named() {
        assert_eq!(find(&HashMap::new(), 128), Ok(None));
        let lstm = zeros(&[
            ("lstm_visual.weight_ih_l0", &[512, 128]),
            ("lstm_visual.weight_hh_l0", &[512, 128]),
            ("lstm_visual.bias_ih_l0", &[512]),
            ("lstm_visual.bias_hh_l0", &[512]),
            ("frame_position_embeddings.weight", &[77, 128]),
        ]);
        assert_eq!(find(&lstm, 128), Ok(Some(HeadConfig::SeqLstm { width: 128 })));
        let wrong_width = find(&lstm, 64).unwrap_err();
        assert!(wrong_width.contains("seqLSTM head is 128 wide but the CLIP embedding is 64"), "{wrong_width}");
        let mut broken = lstm.clone();
        broken.remove("lstm_visual.bias_hh_l0");
        broken.insert("lstm_visual.weight_ih_l0".into(), Tensor::zeros((512, 64), DType::F32, &Device::Cpu).unwrap());
        broken.insert("lstm_visual.weight_ih_l1".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
        let error = find(&broken, 128).unwrap_err();
        for named in [
            "lstm_visual.bias_hh_l0 is missing",
            "lstm_visual.weight_ih_l0 has shape [512, 64], expected [512, 128]",
            "lstm_visual.weight_ih_l1 is not a tensor of this head",
        ] {
            assert!(error.contains(named), "{error}");
        }
        let tight =
            zeros(&[("cross.embeddings.position_embeddings.weight", &[77, 128]), ("similarity_dense.bias", &[1])]);
        assert!(find(&tight, 128).unwrap_err().contains("tightTransf"));
        let lone = zeros(&[("frame_position_embeddings.weight", &[77, 128])]);
        assert!(find(&lone, 128).unwrap_err().contains("incomplete"));
    }
}
