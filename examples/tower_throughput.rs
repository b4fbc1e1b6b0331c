//! Image-tower throughput on given pixels: the Rust side of `benchmarks/tower_vs_pytorch.py`.
//!
//! `cargo run --release --example tower_throughput -- MODEL PIXELS.f32 COUNT BATCH OUT.f32 [f32|f16|bf16] [cpu|cuda]`
//! reads COUNT preprocessed images (raw little-endian f32, CHW each), embeds them in batches of
//! BATCH after one warm-up batch, prints the frames per second, and writes the embeddings (raw
//! f32) so the harness can compare them with PyTorch's.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use vtr_index::model::{Checkpoint, Clip};
use vtr_index::types::{DeviceChoice, Precision};

fn main() -> anyhow::Result<()> {
    vtr_index::model::keep_freed_activation_memory();
    vtr_index::matmul::choose_blas_kernels();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 6, "usage: tower_throughput MODEL PIXELS.f32 COUNT BATCH OUT.f32 [DTYPE] [DEVICE]");
    let precision = Precision::parse(args.get(6).map_or("f32", String::as_str)).map_err(anyhow::Error::msg)?;
    let device = DeviceChoice::parse(args.get(7).map_or("cpu", String::as_str)).map_err(anyhow::Error::msg)?;
    let clip = Clip::load(Checkpoint::open(Path::new(&args[1]))?.with_precision(precision), device)?;
    let bytes = std::fs::read(&args[2])?;
    let pixels: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let (count, batch): (usize, usize) = (args[3].parse()?, args[4].parse()?);
    let size = clip.checkpoint.config.vision.image_size;
    let per_image = 3 * size * size;
    anyhow::ensure!(pixels.len() >= count * per_image, "{} holds fewer than {count} images", args[2]);
    clip.embed_images(&pixels[..per_image * batch.min(count)], batch.min(count))?;
    let started = Instant::now();
    let mut embeddings = Vec::with_capacity(count * clip.embed_dim());
    for start in (0..count).step_by(batch) {
        let n = batch.min(count - start);
        embeddings.extend(clip.embed_images(&pixels[start * per_image..(start + n) * per_image], n)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "frames_per_s={:.3} seconds={seconds:.3} threads={}",
        count as f64 / seconds,
        rayon::current_num_threads()
    );
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[5])?);
    for v in embeddings {
        out.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}
