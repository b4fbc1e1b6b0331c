//! Sampling one video: the Rust side of the long-video figure in `benchmarks/ingest_vs_pyav.py`.
//!
//! `cargo run --release --example sample_video -- VIDEO` decodes the frames the default sampling
//! protocol chooses (1 per second, at most 12) exactly as `ingest` does, and prints the seconds
//! it took and each chosen frame's time.

use std::path::Path;
use std::time::{Duration, Instant};

use vtr_index::decode::{DecodeConfig, decode_video, init};
use vtr_index::sampling::SamplingConfig;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: sample_video VIDEO"))?;
    init().map_err(anyhow::Error::msg)?;
    let config = DecodeConfig::new(SamplingConfig::default(), Duration::from_secs(600));
    let started = Instant::now();
    let video = decode_video(Path::new(&path), &config).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let times: Vec<String> = video.frames.iter().map(|f| format!("{:.6}", f.pts_s)).collect();
    println!("seconds={seconds:.3} frames={} pts={}", video.frames.len(), times.join(","));
    Ok(())
}
