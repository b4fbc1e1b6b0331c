//! Checkpoint layouts: the tensor names of every CLIP file users bring, brought to one set of
//! names (Hugging Face `CLIPModel`'s) so the towers in `clip.rs` load any of them.
//!
//! Recognised: Hugging Face (`vision_model.*`, `text_model.*`), OpenAI / open_clip
//! (`visual.conv1.weight`, `transformer.resblocks.N.attn.in_proj_weight`, …), CLIP4Clip
//! fine-tunes (the OpenAI names under `clip.`, beside CLIP4Clip's own head tensors) and open_clip
//! training checkpoints (a `state_dict` whose keys start with `module.`). OpenAI's fused
//! `in_proj` is split into q, k, v and its `x @ P` projections are transposed into `Linear`
//! weights. When no `config.json` describes the model, the hyper-parameters follow from the
//! tensor shapes as OpenAI's `build_model` does (heads = width / 64). Every tensor is checked
//! against what the configuration implies, so a missing, extra or misshapen tensor is one error
//! that names them all.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Tensor};

use super::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use crate::types::Precision;

/// How a checkpoint's tensors were named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    HuggingFace,
    OpenAi,
    Clip4Clip,
    OpenClipTraining,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::HuggingFace => "huggingface",
            Layout::OpenAi => "openai",
            Layout::Clip4Clip => "clip4clip",
            Layout::OpenClipTraining => "open_clip-training",
        }
    }
}

/// Head width of every released CLIP; OpenAI's `build_model` infers the head count from it.
const HEAD_WIDTH: usize = 64;

/// Tensors that carry no weights: buffers older exports saved, scalars OpenAI's JIT files keep.
fn is_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || matches!(name, "input_resolution" | "context_length" | "vocab_size")
}

/// A checkpoint's tensors under Hugging Face names, with what was learnt on the way.
pub struct Normalised {
    pub layout: Layout,
    pub tensors: HashMap<String, Tensor>,
    /// Hugging Face name → the name in the file, for messages.
    pub file_names: HashMap<String, String>,
    /// CLIP4Clip's head tensors beside `clip.*`, by their names in the file (`head.rs` reads them).
    pub head_tensors: HashMap<String, Tensor>,
    /// Tensors recognised and left out (buffers), by their names in the file.
    pub ignored: Vec<String>,
    /// Tensors nobody recognised, by their names in the file.
    pub unknown: Vec<String>,
    /// The dtypes the weights are stored in.
    pub stored_dtypes: BTreeSet<String>,
}

/// How a tensor of the file becomes one or more tensors of the Hugging Face layout.
enum Rename {
    Same(String),
    Transposed(String),
    /// OpenAI's fused attention input: rows are q, then k, then v.
    SplitQkv([String; 3]),
}

/// Brings `raw` (names and tensors as read) to Hugging Face names. `from_state_dict` tells that
/// the tensors came from a training checkpoint's `state_dict` entry.
pub fn normalise(raw: Vec<(String, Tensor)>, from_state_dict: bool) -> Result<Normalised, String> {
    let had_module = raw.iter().any(|(n, _)| n.starts_with("module."));
    let stripped: Vec<(String, String, Tensor)> =
        raw.into_iter().map(|(name, t)| (name.strip_prefix("module.").unwrap_or(&name).to_string(), name, t)).collect();
    let had_clip_prefix = stripped.iter().any(|(n, _, _)| n.starts_with("clip."));
    let openai = stripped.iter().any(|(n, _, _)| n.strip_prefix("clip.").unwrap_or(n).starts_with("visual."));
    let huggingface =
        stripped.iter().any(|(n, _, _)| n.strip_prefix("clip.").unwrap_or(n).starts_with("vision_model."));
    let layout = match (openai, huggingface) {
        (true, false) if had_clip_prefix => Layout::Clip4Clip,
        (true, false) if had_module || from_state_dict => Layout::OpenClipTraining,
        (true, false) => Layout::OpenAi,
        (false, true) => Layout::HuggingFace,
        (true, true) => return Err("holds both OpenAI (visual.*) and Hugging Face (vision_model.*) tensors".into()),
        (false, false) => {
            let examples: Vec<&str> = stripped.iter().take(4).map(|(_, file, _)| file.as_str()).collect();
            return Err(format!(
                "not a CLIP checkpoint: no vision_model.* (Hugging Face) or visual.* (OpenAI / open_clip) tensors \
                 among its {} tensors (first: {})",
                stripped.len(),
                if examples.is_empty() { "none".to_string() } else { examples.join(", ") }
            ));
        }
    };
    let mut out = Normalised {
        layout,
        tensors: HashMap::new(),
        file_names: HashMap::new(),
        head_tensors: HashMap::new(),
        ignored: Vec::new(),
        unknown: Vec::new(),
        stored_dtypes: BTreeSet::new(),
    };
    for (name, file_name, tensor) in stripped {
        let name = match name.strip_prefix("clip.") {
            Some(inner) => inner.to_string(),
            None if had_clip_prefix => {
                if super::head::HEAD_PREFIXES.iter().any(|head| name.starts_with(head)) {
                    out.head_tensors.insert(name, tensor);
                } else {
                    out.unknown.push(file_name);
                }
                continue;
            }
            None => name,
        };
        if is_buffer(&name) {
            out.ignored.push(file_name);
            continue;
        }
        out.stored_dtypes.insert(format!("{:?}", tensor.dtype()).to_lowercase());
        let rename =
            if layout == Layout::HuggingFace { Some(Rename::Same(name.clone())) } else { openai_rename(&name) };
        let Some(rename) = rename else {
            out.unknown.push(file_name);
            continue;
        };
        let convert = |e: candle_core::Error| format!("{file_name}: {e}");
        match rename {
            Rename::Same(to) => insert(&mut out, to, &file_name, tensor),
            Rename::Transposed(to) => {
                if tensor.rank() != 2 {
                    return Err(format!("{file_name}: expected a matrix, found shape {:?}", tensor.dims()));
                }
                insert(&mut out, to, &file_name, tensor.t().and_then(|t| t.contiguous()).map_err(convert)?);
            }
            Rename::SplitQkv(to) => {
                let rows = tensor.dims().first().copied().unwrap_or(0);
                if rows == 0 || rows % 3 != 0 {
                    return Err(format!("{file_name}: shape {:?} cannot be split into q, k, v", tensor.dims()));
                }
                for (i, to) in to.into_iter().enumerate() {
                    let part =
                        tensor.narrow(0, i * rows / 3, rows / 3).and_then(|t| t.contiguous()).map_err(convert)?;
                    insert(&mut out, to, &file_name, part);
                }
            }
        }
    }
    // OpenAI and Hugging Face both store `logit_scale` as a scalar; some exports keep shape [1].
    if let Some(scale) = out.tensors.get("logit_scale")
        && scale.dims() == [1]
    {
        let scalar = scale.reshape(()).map_err(|e| e.to_string())?;
        out.tensors.insert("logit_scale".into(), scalar);
    }
    Ok(out)
}

fn insert(out: &mut Normalised, to: String, file_name: &str, tensor: Tensor) {
    out.file_names.insert(to.clone(), file_name.to_string());
    out.tensors.insert(to, tensor);
}

/// The Hugging Face name(s) of an OpenAI / open_clip tensor.
fn openai_rename(name: &str) -> Option<Rename> {
    let same = |s: String| Some(Rename::Same(s));
    if let Some(rest) = name.strip_prefix("visual.") {
        if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
            return resblock_rename("vision_model", block);
        }
        return match rest {
            "conv1.weight" => same("vision_model.embeddings.patch_embedding.weight".into()),
            "class_embedding" => same("vision_model.embeddings.class_embedding".into()),
            "positional_embedding" => same("vision_model.embeddings.position_embedding.weight".into()),
            "proj" => Some(Rename::Transposed("visual_projection.weight".into())),
            _ => {
                let (norm, param) = rest.split_once('.')?;
                let to = match norm {
                    "ln_pre" => "pre_layrnorm",
                    "ln_post" => "post_layernorm",
                    _ => return None,
                };
                same(format!("vision_model.{to}.{param}"))
            }
        };
    }
    if let Some(block) = name.strip_prefix("transformer.resblocks.") {
        return resblock_rename("text_model", block);
    }
    match name {
        "token_embedding.weight" => same("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => same("text_model.embeddings.position_embedding.weight".into()),
        "text_projection" => Some(Rename::Transposed("text_projection.weight".into())),
        "logit_scale" => same("logit_scale".into()),
        _ => {
            let param = name.strip_prefix("ln_final.")?;
            same(format!("text_model.final_layer_norm.{param}"))
        }
    }
}

/// `N.attn.in_proj_weight` → `{tower}.encoder.layers.N.self_attn.{q,k,v}_proj.weight`, and so on.
fn resblock_rename(tower: &str, block: &str) -> Option<Rename> {
    let (layer, rest) = block.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let prefix = format!("{tower}.encoder.layers.{layer}");
    if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
        if kind != "weight" && kind != "bias" {
            return None;
        }
        return Some(Rename::SplitQkv(["q", "k", "v"].map(|p| format!("{prefix}.self_attn.{p}_proj.{kind}"))));
    }
    let (module, param) = rest.rsplit_once('.')?;
    let to = match module {
        "attn.out_proj" => "self_attn.out_proj",
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        _ => return None,
    };
    matches!(param, "weight" | "bias").then(|| Rename::Same(format!("{prefix}.{to}.{param}")))
}

/// The hyper-parameters a config-less checkpoint implies, read from its (Hugging Face named)
/// tensor shapes as OpenAI's `build_model` does.
pub fn infer_config(tensors: &HashMap<String, Tensor>) -> Result<ClipConfig, String> {
    let dims = |name: &str| -> Result<&[usize], String> {
        tensors
            .get(name)
            .map(|t| t.dims())
            .ok_or_else(|| format!("missing tensor {name}, needed to infer the model's shape"))
    };
    let dim = |name: &str, axis: usize| -> Result<usize, String> {
        dims(name)?.get(axis).copied().ok_or_else(|| format!("{name} has too few dimensions"))
    };
    let layers = |tower: &str| {
        let prefix = format!("{tower}.encoder.layers.");
        tensors
            .keys()
            .filter_map(|n| n.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last + 1)
    };
    let patch = dims("vision_model.embeddings.patch_embedding.weight")?;
    if patch.len() != 4 || patch[2] != patch[3] || patch[1] != 3 {
        return Err(format!("patch embedding has shape {patch:?}, expected [width, 3, patch, patch]"));
    }
    let (vision_width, patch_size) = (patch[0], patch[2]);
    let positions = dim("vision_model.embeddings.position_embedding.weight", 0)?;
    let grid = ((positions.saturating_sub(1)) as f64).sqrt().round() as usize;
    if grid * grid + 1 != positions {
        return Err(format!("{positions} vision positions is not a square grid plus the class token"));
    }
    let text_width = dim("text_model.embeddings.token_embedding.weight", 1)?;
    let config = ClipConfig {
        vision: VisionConfig {
            hidden_size: vision_width,
            intermediate_size: dim("vision_model.encoder.layers.0.mlp.fc1.weight", 0)?,
            num_hidden_layers: layers("vision_model"),
            num_attention_heads: (vision_width / HEAD_WIDTH).max(1),
            image_size: grid * patch_size,
            patch_size,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        },
        text: TextConfig {
            vocab_size: dim("text_model.embeddings.token_embedding.weight", 0)?,
            hidden_size: text_width,
            intermediate_size: dim("text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
            num_hidden_layers: layers("text_model"),
            num_attention_heads: (text_width / HEAD_WIDTH).max(1),
            max_position_embeddings: dim("text_model.embeddings.position_embedding.weight", 0)?,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        },
        projection_dim: dim("text_projection.weight", 0)?,
    };
    config.validate()?;
    Ok(config)
}

/// Every tensor the towers read, with its shape, under Hugging Face names.
pub fn expected_tensors(c: &ClipConfig) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| {
        out.insert(name, shape.to_vec());
    };
    let towers = [
        ("vision_model", c.vision.hidden_size, c.vision.intermediate_size, c.vision.num_hidden_layers),
        ("text_model", c.text.hidden_size, c.text.intermediate_size, c.text.num_hidden_layers),
    ];
    for (tower, w, mlp, layers) in towers {
        for layer in 0..layers {
            let p = format!("{tower}.encoder.layers.{layer}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                add(format!("{p}.self_attn.{proj}.weight"), &[w, w]);
                add(format!("{p}.self_attn.{proj}.bias"), &[w]);
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                add(format!("{p}.{norm}.weight"), &[w]);
                add(format!("{p}.{norm}.bias"), &[w]);
            }
            add(format!("{p}.mlp.fc1.weight"), &[mlp, w]);
            add(format!("{p}.mlp.fc1.bias"), &[mlp]);
            add(format!("{p}.mlp.fc2.weight"), &[w, mlp]);
            add(format!("{p}.mlp.fc2.bias"), &[w]);
        }
    }
    let (v, t) = (&c.vision, &c.text);
    let vw = v.hidden_size;
    add("vision_model.embeddings.class_embedding".into(), &[vw]);
    add("vision_model.embeddings.patch_embedding.weight".into(), &[vw, 3, v.patch_size, v.patch_size]);
    add("vision_model.embeddings.position_embedding.weight".into(), &[v.num_patches() + 1, vw]);
    for norm in ["pre_layrnorm", "post_layernorm"] {
        add(format!("vision_model.{norm}.weight"), &[vw]);
        add(format!("vision_model.{norm}.bias"), &[vw]);
    }
    let tw = t.hidden_size;
    add("text_model.embeddings.token_embedding.weight".into(), &[t.vocab_size, tw]);
    add("text_model.embeddings.position_embedding.weight".into(), &[t.max_position_embeddings, tw]);
    add("text_model.final_layer_norm.weight".into(), &[tw]);
    add("text_model.final_layer_norm.bias".into(), &[tw]);
    add("visual_projection.weight".into(), &[c.projection_dim, vw]);
    add("text_projection.weight".into(), &[c.projection_dim, tw]);
    add("logit_scale".into(), &[]);
    out
}

/// Checks `n` against `config`: one message naming every missing, misshapen and unknown tensor
/// (by its name in the file), or the parameter count.
pub fn check(n: &Normalised, config: &ClipConfig) -> Result<usize, String> {
    let expected = expected_tensors(config);
    let file_name = |hf: &str| n.file_names.get(hf).cloned().unwrap_or_else(|| hf.to_string());
    let mut missing = Vec::new();
    let mut misshapen = Vec::new();
    let mut parameters = 0;
    for (name, shape) in &expected {
        match n.tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                misshapen.push(format!("{} is {:?}, expected {:?}", file_name(name), t.dims(), shape));
            }
            Some(t) => parameters += t.elem_count(),
        }
    }
    let mut extra: Vec<String> = n.unknown.clone();
    extra.extend(n.tensors.keys().filter(|k| !expected.contains_key(*k)).map(|k| file_name(k)));
    extra.sort();
    extra.dedup();
    if missing.is_empty() && misshapen.is_empty() && extra.is_empty() {
        return Ok(parameters);
    }
    let list = |names: &[String]| name_list(names, 6);
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", list(&missing)));
    }
    if !misshapen.is_empty() {
        problems.push(format!("wrong shapes: {}", list(&misshapen)));
    }
    if !extra.is_empty() {
        problems.push(format!("unexpected tensors: {}", list(&extra)));
    }
    Err(format!("{} checkpoint does not match its configuration: {}", n.layout.name(), problems.join("; ")))
}

/// The first `shown` of `names`, comma-separated, and how many more there are.
pub fn name_list(names: &[String], shown: usize) -> String {
    let mut text = names.iter().take(shown).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > shown {
        text.push_str(&format!(" and {} more", names.len() - shown));
    }
    text
}

/// The candle dtype a model of this precision runs in.
pub(crate) fn candle_dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}
