//! `vtr-index info`: what an index holds (`--index`), what a checkpoint is (`--model`),
//! whether this build and machine can score on CUDA (`--gpu`), or which products the towers
//! run on this CPU (`--cpu`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::load_manifest;
use crate::model::Checkpoint;
use crate::store::index_bytes;

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[arg(long, value_name = "INDEX")]
    pub index: Option<PathBuf>,
    #[arg(long, value_name = "M")]
    pub model: Option<PathBuf>,
    /// Whether this build and machine can score on CUDA, and with which devices.
    #[arg(long)]
    pub gpu: bool,
    /// The CPU's vector features and the products the towers run on it, in f32 and under
    /// `--dtype bf16` (`VTR_INDEX_CPU_WITHOUT` turns features off).
    #[arg(long)]
    pub cpu: bool,
}

pub fn run(args: InfoArgs) -> Result<u8> {
    match (args.index, args.model, args.gpu, args.cpu) {
        (Some(index), None, false, false) => print_index_info(&index),
        (None, Some(model), false, false) => print_model_info(&model),
        (None, None, true, false) => print_gpu_info(),
        (None, None, false, true) => print_cpu_info(),
        _ => bail!("give exactly one of --index INDEX, --model M, --gpu or --cpu"),
    }
}

fn print_cpu_info() -> Result<u8> {
    use crate::matmul::bf16::{Bf16Products, features_turned_off};
    let turned_off = features_turned_off().map_err(anyhow::Error::msg)?;
    println!("cpu:           {}", crate::matmul::cpu_model_name().unwrap_or_else(|| "unknown".into()));
    println!("features:      {}", crate::matmul::vector_features().join(", "));
    if !turned_off.is_empty() {
        println!("turned off:    {} ({})", turned_off.join(", "), crate::matmul::bf16::CPU_WITHOUT_VARIABLE);
    }
    println!("f32 products:  {}", crate::matmul::f32_products());
    let bf16 = Bf16Products::for_this_cpu().map_err(anyhow::Error::msg)?;
    println!("bf16 products: {}", bf16.describe());
    Ok(0)
}

#[cfg(feature = "cuda")]
fn print_gpu_info() -> Result<u8> {
    print!("{}", crate::gpu::report());
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn print_gpu_info() -> Result<u8> {
    println!("cuda:      not in this build (rebuild with --features cuda)");
    Ok(0)
}

fn print_index_info(index: &Path) -> Result<u8> {
    let m = load_manifest(index)?;
    println!("index:     {}", index.display());
    println!("videos:    {}", m.rows("videos"));
    println!("frames:    {}", m.rows("frames"));
    println!("failures:  {}", m.rows("failures"));
    for name in m.text_sets() {
        println!("texts:     {name} ({} rows)", m.rows(&format!("texts/{name}")));
    }
    println!("model:     {} ({}, sha256 {}, {})", m.model.id, m.model.source, m.model.sha256, m.model.dtype.name());
    println!(
        "           embed_dim {}, image_size {}, logit scale {:.4}",
        m.model.embed_dim,
        m.model.image_size,
        m.model.logit_scale.exp()
    );
    println!("head:      {}", m.model.head.map_or("meanP (made before temporal heads)", crate::types::HeadKind::name));
    println!("sampling:  {} fps, at most {} frames per video", m.sampling.fps, m.sampling.max_frames);
    println!("roots:     {}", m.roots.join(", "));
    if let Some(shard) = m.shard {
        println!("part:      {shard} of a sharded ingest (`vtr-index merge` joins the parts)");
    }
    if let Some(merged) = &m.merged {
        let parts: Vec<String> =
            merged.parts.iter().map(|p| format!("{}/{} {}", p.shard, merged.count, p.path)).collect();
        println!("merged:    {} parts: {}", merged.count, parts.join(", "));
    }
    let shards = m.tables.values().map(Vec::len).sum::<usize>();
    let segments = m.shards("videos").iter().filter(|s| s.segment.is_some()).count();
    println!("size:      {} bytes in {shards} shards and {segments} search segments", index_bytes(&m));
    if m.format_version < crate::store::segment::SEGMENTS_SINCE_FORMAT {
        println!(
            "format:    {} (searched from its tables; the next ingest or encode-text upgrades it to {})",
            m.format_version,
            crate::store::FORMAT_VERSION
        );
    }
    if let Some(run) = &m.last_run {
        println!("last run:  {run}");
    }
    Ok(0)
}

fn print_model_info(model: &Path) -> Result<u8> {
    let checkpoint = Checkpoint::open(model)?;
    let c = &checkpoint.config;
    let v = &c.vision;
    let t = &c.text;
    println!("checkpoint: {}", checkpoint.source.display());
    println!("layout:     {}", checkpoint.layout.name());
    println!("weights:    {}", checkpoint.weights.display());
    println!("sha256:     {}", checkpoint.sha256);
    println!(
        "config:     {}",
        if checkpoint.config_inferred { "inferred from the tensor shapes" } else { "config.json" }
    );
    println!("dtype:      {} (as stored)", checkpoint.stored_dtypes.join(" + "));
    println!("parameters: {}", checkpoint.parameters);
    println!(
        "head:       {}",
        checkpoint.head.as_ref().map_or("none: videos are pooled with meanP".to_string(), |h| h.describe())
    );
    if !checkpoint.ignored.is_empty() {
        println!(
            "ignored:    {} saved buffers, not weights: {}",
            checkpoint.ignored.len(),
            crate::model::layout::name_list(&checkpoint.ignored, 4)
        );
    }
    println!(
        "vision:     width {}, layers {}, heads {}, patch {}, image size {}, mlp {}, {:?}",
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.patch_size,
        v.image_size,
        v.intermediate_size,
        v.hidden_act
    );
    println!(
        "text:       width {}, layers {}, heads {}, context {}, vocabulary {}",
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size
    );
    println!("embed dim:  {}", c.projection_dim);
    let p = &checkpoint.preprocess;
    println!("preprocess: resize {} bicubic-antialias, crop {}, mean {:?}, std {:?}", p.resize, p.crop, p.mean, p.std);
    Ok(0)
}
