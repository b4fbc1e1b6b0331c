//! CLIP's two towers in candle, laid out like the Hugging Face checkpoint they load from:
//! each struct's `new(vb, &cfg)` reads the tensors under its own name (`vb.pp("…")`), so the
//! Rust tree follows `vision_model.encoder.layers.N.self_attn.q_proj` and friends.
//!
//! ViT with class token and pre-LayerNorm, quick_gelu, causal text mask, text feature at the
//! first end-of-text token, projections without bias. A missing or misshapen weight is an
//! error naming the tensor: nothing here ever invents a value.

use candle_core::{D, DType, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use super::fused::{self, Dense, Epilogue, LayerNorm, layer_norm};
use super::tokenizer::END_OF_TEXT;

/// `self_attn.*`. The checkpoint's `q_proj`, `k_proj` and `v_proj` are read by their names and
/// kept as one layer: a single matrix product gives the packed `q | k | v` rows that
/// [`fused::attention`] reads.
struct Attention {
    qkv_proj: Dense,
    out_proj: Dense,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> Result<Self> {
        let [q, k, v] = ["q_proj", "k_proj", "v_proj"].map(|name| Dense::new(vb.pp(name), width, width));
        Ok(Attention {
            qkv_proj: Dense::concat(&[q?, k?, v?])?,
            out_proj: Dense::new(vb.pp("out_proj"), width, width)?,
            heads,
        })
    }

    /// `x + attention(normed)`, with `normed` [batch, tokens, width] and `x` [batch, queries,
    /// width]: the first `queries` tokens of the residual stream, whose outputs are wanted.
    fn forward_onto(&self, x: &Tensor, normed: &Tensor, causal: bool) -> Result<Tensor> {
        let qkv = self.qkv_proj.forward(normed, Epilogue::None)?;
        let heads = fused::attention(&qkv, self.heads, causal, x.dim(1)?)?;
        self.out_proj.forward(&heads, Epilogue::Residual(x))
    }
}

struct Mlp {
    fc1: Dense,
    fc2: Dense,
    activation: Activation,
}

impl Mlp {
    fn new(vb: VarBuilder, width: usize, hidden: usize, activation: Activation) -> Result<Self> {
        Ok(Mlp {
            fc1: Dense::new(vb.pp("fc1"), width, hidden)?,
            fc2: Dense::new(vb.pp("fc2"), hidden, width)?,
            activation,
        })
    }

    /// `x + mlp(normed)`.
    fn forward_onto(&self, x: &Tensor, normed: &Tensor) -> Result<Tensor> {
        let h = match self.activation {
            Activation::QuickGelu => self.fc1.forward(normed, Epilogue::QuickGelu)?,
            Activation::Gelu => self.fc1.forward(normed, Epilogue::None)?.gelu_erf()?,
        };
        self.fc2.forward(&h, Epilogue::Residual(x))
    }
}

struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, width: usize, heads: usize, hidden: usize, eps: f64, act: Activation) -> Result<Self> {
        Ok(EncoderLayer {
            self_attn: Attention::new(vb.pp("self_attn"), width, heads)?,
            layer_norm1: layer_norm(width, eps, vb.pp("layer_norm1"))?,
            mlp: Mlp::new(vb.pp("mlp"), width, hidden, act)?,
            layer_norm2: layer_norm(width, eps, vb.pp("layer_norm2"))?,
        })
    }

    /// [batch, tokens, width] → [batch, kept, width]: the outputs of the first `kept` tokens,
    /// each still attending to every token.
    fn forward(&self, x: &Tensor, causal: bool, kept: usize) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let x = if kept == x.dim(1)? { x.clone() } else { x.narrow(1, 0, kept)?.contiguous()? };
        let x = self.self_attn.forward_onto(&x, &normed, causal)?;
        self.mlp.forward_onto(&x, &self.layer_norm2.forward(&x)?)
    }
}

struct Encoder {
    layers: Vec<EncoderLayer>,
}

/// The shape of one tower's transformer, as both configs describe it.
struct TowerShape {
    layers: usize,
    width: usize,
    heads: usize,
    mlp: usize,
    eps: f64,
    activation: Activation,
}

impl From<&VisionConfig> for TowerShape {
    fn from(c: &VisionConfig) -> Self {
        let (layers, width, heads, mlp) =
            (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size);
        TowerShape { layers, width, heads, mlp, eps: c.layer_norm_eps, activation: c.hidden_act }
    }
}

impl From<&TextConfig> for TowerShape {
    fn from(c: &TextConfig) -> Self {
        let (layers, width, heads, mlp) =
            (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size);
        TowerShape { layers, width, heads, mlp, eps: c.layer_norm_eps, activation: c.hidden_act }
    }
}

impl Encoder {
    fn new(vb: VarBuilder, shape: TowerShape) -> Result<Self> {
        let vb = vb.pp("layers");
        // Each layer transposes its weights once (`Dense`): the layers are built in parallel.
        let layers = (0..shape.layers)
            .into_par_iter()
            .map(|i| EncoderLayer::new(vb.pp(i), shape.width, shape.heads, shape.mlp, shape.eps, shape.activation))
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder { layers })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        self.forward_keeping(x, causal, x.dim(1)?)
    }

    fn dense_layers_mut(&mut self) -> impl Iterator<Item = &mut Dense> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.self_attn.qkv_proj, &mut l.self_attn.out_proj, &mut l.mlp.fc1, &mut l.mlp.fc2])
    }

    /// [batch, tokens, width] → [batch, kept, width]. Only the last layer's outputs for the
    /// first `kept` tokens are computed: its other rows feed nothing. For the vision tower,
    /// which reads the class token alone, that skips 49 of 50 rows of the last layer's output
    /// projection and MLP, about 6 % of a ViT-B/32 forward pass.
    fn forward_keeping(&self, x: &Tensor, causal: bool, kept: usize) -> Result<Tensor> {
        let tokens = x.dim(1)?;
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            x = layer.forward(&x, causal, if last { kept } else { tokens })?;
        }
        Ok(x)
    }
}

/// `vision_model.*`: pixels → pooled class-token feature (before the projection).
pub struct VisionTransformer {
    /// `embeddings.patch_embedding.weight` as a dense layer from 3 · patch² to width: the
    /// convolution has stride = kernel, so it is one matrix product over non-overlapping patches.
    patch_embedding: Dense,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    config: VisionConfig,
}

impl VisionTransformer {
    pub fn new(vb: VarBuilder, c: &VisionConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((c.hidden_size, 3, c.patch_size, c.patch_size), "patch_embedding.weight")?;
        let patch_weight_t =
            patch_weight.reshape((c.hidden_size, 3 * c.patch_size * c.patch_size))?.t()?.contiguous()?;
        Ok(VisionTransformer {
            patch_embedding: Dense::without_bias(patch_weight_t)?,
            class_embedding: emb.get(c.hidden_size, "class_embedding")?,
            position_embedding: emb.get((c.num_patches() + 1, c.hidden_size), "position_embedding.weight")?,
            pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vb.pp("encoder"), TowerShape::from(c))?,
            post_layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            config: c.clone(),
        })
    }

    /// `pixels`: [batch, 3, image_size, image_size] → [batch, width].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let batch = pixels.dim(0)?;
        let grid = c.image_size / c.patch_size;
        let p = c.patch_size;
        let patches = pixels
            .reshape((batch, 3, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((batch, grid * grid, 3 * p * p))?;
        let patch_embeds = self.patch_embedding.forward(&patches, Epilogue::None)?;
        let class = self.class_embedding.reshape((1, 1, c.hidden_size))?.broadcast_as((batch, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&class, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let class_token = self.encoder.forward_keeping(&x, false, 1)?;
        self.post_layernorm.forward(&class_token.i((.., 0, ..))?)
    }
}

/// `text_model.*`: token ids → feature at the end-of-text token (before the projection).
pub struct TextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    config: TextConfig,
}

impl TextTransformer {
    pub fn new(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        Ok(TextTransformer {
            token_embedding: emb.get((c.vocab_size, c.hidden_size), "token_embedding.weight")?,
            position_embedding: emb.get((c.max_position_embeddings, c.hidden_size), "position_embedding.weight")?,
            encoder: Encoder::new(vb.pp("encoder"), TowerShape::from(c))?,
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: c.clone(),
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// `token_ids`: each sequence from the start token to the end token inclusive.
    /// Sequences are padded to the longest; the causal mask keeps padding out of each
    /// sequence's end-of-text feature.
    pub fn forward(&self, token_ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let batch = token_ids.len();
        let longest = token_ids.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 || longest > self.config.max_position_embeddings {
            candle_core::bail!("token sequences must hold 1 to {} ids", self.config.max_position_embeddings);
        }
        let mut flat = vec![0u32; batch * longest];
        let mut pooled_rows = Vec::with_capacity(batch);
        for (b, ids) in token_ids.iter().enumerate() {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                candle_core::bail!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size);
            }
            flat[b * longest..b * longest + ids.len()].copy_from_slice(ids);
            let eot = ids.iter().position(|&id| id == END_OF_TEXT).unwrap_or(ids.len() - 1);
            pooled_rows.push((b * longest + eot) as u32);
        }
        let ids = Tensor::from_vec(flat, (batch * longest,), device)?;
        let x = self
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((batch, longest, self.config.hidden_size))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, longest)?)?;
        let x = self.encoder.forward(&x, true)?;
        let x = self.final_layer_norm.forward(&x)?;
        let rows = Tensor::from_vec(pooled_rows, (batch,), device)?;
        x.reshape((batch * longest, self.config.hidden_size))?.index_select(&rows, 0)
    }
}

/// The whole model: both towers and their projections (the logit scale is the checkpoint's,
/// read into the model's identity by `Clip::unbuilt`).
pub struct ClipModel {
    pub vision_model: VisionTransformer,
    pub text_model: TextTransformer,
    visual_projection: Dense,
    text_projection: Dense,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        Ok(ClipModel {
            vision_model: VisionTransformer::new(vb.pp("vision_model"), &c.vision)?,
            text_model: TextTransformer::new(vb.pp("text_model"), &c.text)?,
            visual_projection: projection(vb.pp("visual_projection"), c.vision.hidden_size, c.projection_dim)?,
            text_projection: projection(vb.pp("text_projection"), c.text.hidden_size, c.projection_dim)?,
            config: c.clone(),
        })
    }

    /// Has every dense layer of both towers and their projections multiply with bf16 inputs
    /// on AVX-512 BF16 ([`crate::matmul::bf16`]): the `--dtype bf16` path of a model built in
    /// f32 on such a CPU. The layers are packed in parallel.
    pub fn use_bf16_products(&mut self) -> Result<()> {
        let mut layers: Vec<&mut Dense> = self.vision_model.encoder.dense_layers_mut().collect();
        layers.extend(self.text_model.encoder.dense_layers_mut());
        layers.extend([&mut self.vision_model.patch_embedding, &mut self.visual_projection, &mut self.text_projection]);
        layers.into_par_iter().try_for_each(Dense::pack_weight_bf16)
    }

    /// f32 image embeddings, [batch, projection_dim], L2-normalised or as projected.
    pub fn image_embeddings(&self, pixels: &Tensor, normalise: bool) -> Result<Tensor> {
        let features = self.visual_projection.forward(&self.vision_model.forward(pixels)?, Epilogue::None)?;
        if normalise { l2_normalise(&features) } else { features.to_dtype(DType::F32) }
    }

    /// L2-normalised f32 text embeddings, [batch, projection_dim].
    pub fn text_embeddings(&self, token_ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        l2_normalise(&self.text_projection.forward(&self.text_model.forward(token_ids, device)?, Epilogue::None)?)
    }
}

/// A projection without bias (`weight`: [out, in]).
fn projection(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Dense> {
    Dense::without_bias(vb.get((out_dim, in_dim), "weight")?.t()?.contiguous()?)
}

/// Normalises in f32 whatever the model's dtype: embeddings are always written as f32.
fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
