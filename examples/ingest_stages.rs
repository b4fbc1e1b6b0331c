//! The stages of `ingest` run alone: the Rust side of the stage figures in
//! `benchmarks/ingest_vs_pyav.py`, which compares their sum with the whole ingest.
//!
//! `ingest_stages decode ROOT MODEL WORKERS PIXELS.f32` walks ROOT as ingest does and runs
//! ingest's decode workers' work (decode, sample, preprocess, hash) on WORKERS threads of one process, with no model
//! (MODEL's `config.json` gives the image size);
//! it writes the pixels of every frame, in the walk's order, and prints `frames=N`.
//! `ingest_stages tower MODEL PIXELS.f32 BATCH [DTYPE]` runs the image tower (in DTYPE, default
//! f32) on those frames in batches of BATCH as ingest packs them (full batches across videos, one partial batch at the end),
//! with no warm-up, and prints `frames=N seconds=S`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::bounded;
use vtr_index::decode::DecodeConfig;
use vtr_index::ingest::worker::{Prepared, prepare};
use vtr_index::model::{Checkpoint, Clip, ClipConfig};
use vtr_index::preprocess::PreprocessConfig;
use vtr_index::sampling::SamplingConfig;
use vtr_index::types::{DeviceChoice, Precision};
use vtr_index::walk::{Root, walk_roots};

fn decode(root: &str, model: &str, workers: usize, out: &str) -> Result<()> {
    vtr_index::decode::init().map_err(anyhow::Error::msg)?;
    // The model's size from its config.json alone: reading (and hashing) the weights is the
    // model's cost, which (b) and ingest pay, not decoding's.
    let model = Path::new(model);
    if model.join("preprocessor_config.json").exists() {
        bail!("{}: a preprocessor_config.json this stage does not read", model.display());
    }
    let config = std::fs::read_to_string(model.join("config.json")).context("the model's config.json")?;
    let config = ClipConfig::from_json(&config).map_err(anyhow::Error::msg)?;
    let preprocess = PreprocessConfig::clip(config.vision.image_size as u32);
    let decode = DecodeConfig::new(SamplingConfig::default(), Duration::from_secs(300));
    let files = walk_roots(&[Root::new(root)], Path::new("/nonexistent"), 0)?.videos;
    let count = files.len();
    let (tasks, task_rx) = bounded(count.max(1));
    for (i, file) in files.into_iter().enumerate() {
        tasks.send((i, file))?;
    }
    drop(tasks);
    let (results, result_rx) = bounded(count.max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            let (task_rx, results) = (task_rx.clone(), results.clone());
            let (decode, preprocess) = (&decode, &preprocess);
            scope.spawn(move || {
                for (i, file) in task_rx {
                    results
                        .send((i, (file.path.clone(), prepare(&file.abs_path, decode, preprocess))))
                        .expect("the receiver outlives the workers");
                }
            });
        }
    });
    drop(results);
    let mut decoded: Vec<_> = result_rx.into_iter().collect();
    decoded.sort_by_key(|(i, _)| *i);
    let mut writer = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| out.to_string())?);
    let mut frames = 0;
    for (_, (path, video)) in decoded {
        match video {
            Prepared::Video { frames: video_frames, .. } => {
                for (_, pixels) in &video_frames {
                    for value in pixels {
                        writer.write_all(&value.to_le_bytes())?;
                    }
                    frames += 1;
                }
            }
            Prepared::Failed(rejection) => bail!("{path}: {rejection:?}"),
        }
    }
    writer.flush()?;
    println!("frames={frames}");
    Ok(())
}

fn tower(model: &str, pixels: &str, batch: usize, dtype: &str) -> Result<()> {
    vtr_index::model::keep_freed_activation_memory();
    let precision = Precision::parse(dtype).map_err(anyhow::Error::msg)?;
    let clip = Clip::load(Checkpoint::open(Path::new(model))?.with_precision(precision), DeviceChoice::Cpu)?;
    let bytes = std::fs::read(pixels).with_context(|| pixels.to_string())?;
    let pixels: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let size = clip.checkpoint.config.vision.image_size;
    let per_image = 3 * size * size;
    let count = pixels.len() / per_image;
    let started = Instant::now();
    for start in (0..count).step_by(batch.max(1)) {
        let n = batch.max(1).min(count - start);
        clip.image_features(&pixels[start * per_image..(start + n) * per_image], n)?;
    }
    println!("frames={count} seconds={:.3}", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Result<()> {
    vtr_index::matmul::choose_blas_kernels();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["decode", root, model, workers, out] => decode(root, model, workers.parse()?, out),
        ["tower", model, pixels, batch] => tower(model, pixels, batch.parse()?, "f32"),
        ["tower", model, pixels, batch, dtype] => tower(model, pixels, batch.parse()?, dtype),
        _ => bail!("usage: ingest_stages decode ROOT MODEL WORKERS PIXELS.f32 | tower MODEL PIXELS.f32 BATCH [DTYPE]"),
    }
}
