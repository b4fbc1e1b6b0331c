//! GPU scoring figures: the Rust side of `benchmarks/gpu_vs_pytorch.py` (feature `cuda`; it
//! loads no GStreamer, so it runs on GPU machines that have none).
//!
//! `gpu_score probe` — what `vtr-index info --gpu` prints (the main binary links GStreamer).
//! `gpu_score copy MIB` — device-to-device copy bandwidth, the floor's denominator.
//! `gpu_score stored TEXTS.f32 VIDEOS.f32 DIM` — CAMoE's dual softmax of the stored matrix of
//!   cosines (computed on the device first, not timed) into f64 values.
//! `gpu_score score TEXTS.f32 VIDEOS.f32 DIM f32|f16 REVISE` — the whole score (text i's video is
//!   video i), with peak device memory sampled during the run.
//! Embeddings are raw little-endian f32 rows. Each command prints `key=value` lines.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vtr_index::gpu::{Gpu, score};
use vtr_index::score::{DeviceInputs, Problem, Revision, ScoreOptions};

fn read_f32(path: &str) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| path.to_string())?;
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Runs `work` while another thread samples the device memory in use; returns the peak above
/// what was in use before.
fn with_peak_memory<T>(gpu: &Gpu, work: impl FnOnce() -> T) -> Result<(T, usize)> {
    let (free, total) = gpu.memory()?;
    let baseline = total - free;
    let (peak, done) = (AtomicUsize::new(baseline), AtomicBool::new(false));
    let value = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok((free, total)) = gpu.memory() {
                    peak.fetch_max(total - free, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let value = work();
        done.store(true, Ordering::Relaxed);
        value
    });
    Ok((value, peak.load(Ordering::Relaxed) - baseline))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("probe") {
        print!("{}", vtr_index::gpu::report());
        return Ok(());
    }
    let gpu = Gpu::open(0)?;
    println!("device={}", gpu.name);
    match args.first().map(String::as_str) {
        Some("copy") => {
            let bytes = args.get(1).context("copy MIB")?.parse::<usize>()? << 20;
            let stream = gpu.stream();
            let source = stream.alloc_zeros::<u8>(bytes)?;
            let mut target = stream.alloc_zeros::<u8>(bytes)?;
            stream.memcpy_dtod(&source, &mut target)?;
            stream.synchronize()?;
            let started = Instant::now();
            let rounds = 10;
            for _ in 0..rounds {
                stream.memcpy_dtod(&source, &mut target)?;
            }
            stream.synchronize()?;
            let seconds = started.elapsed().as_secs_f64() / rounds as f64;
            // A copy reads and writes every byte.
            println!("copy_gb_per_s={:.1}", 2.0 * bytes as f64 / seconds / 1e9);
        }
        Some("stored") => {
            let [texts, videos, dim] = &args[1..4] else { bail!("stored TEXTS.f32 VIDEOS.f32 DIM") };
            let dim: usize = dim.parse()?;
            let (texts, videos) = (read_f32(texts)?, read_f32(videos)?);
            let (rows, cols) = (texts.len() / dim, videos.len() / dim);
            let cosines = score::cosines(&gpu, &texts, &videos, dim)?;
            let mut out = gpu.stream().alloc_zeros::<f64>(rows * cols)?;
            score::dual_softmax_stored(&gpu, &cosines, rows, cols, 100.0, 1.0, &mut out)?; // warm-up
            let rounds = 5;
            let started = Instant::now();
            for _ in 0..rounds {
                score::dual_softmax_stored(&gpu, &cosines, rows, cols, 100.0, 1.0, &mut out)?;
            }
            let seconds = started.elapsed().as_secs_f64() / rounds as f64;
            // Column statistics read S; the revision reads it again and writes f64.
            let bytes = (rows * cols) as f64 * (4.0 + 4.0 + 8.0);
            let first_rows = gpu.stream().clone_dtoh(&out.slice(..4 * cols))?;
            println!("seconds={seconds:.6} bytes={bytes:.0} gb_per_s={:.1}", bytes / seconds / 1e9);
            println!("checksum_first_4_rows={:.9e}", first_rows.iter().sum::<f64>());
        }
        Some("score") => {
            let [texts, videos, dim, inputs, revise] = &args[1..6] else {
                bail!("score TEXTS.f32 VIDEOS.f32 DIM f32|f16 REVISE")
            };
            let dim: usize = dim.parse()?;
            let (texts, videos) = (read_f32(texts)?, read_f32(videos)?);
            let text_video: Vec<Option<u32>> = (0..texts.len() / dim).map(|i| Some(i as u32)).collect();
            let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
            let revision = match revise.as_str() {
                "none" => Revision::None,
                "dsl" => Revision::Dsl,
                "dsl-sym" => Revision::DslSym,
                other => bail!("revise {other}?"),
            };
            let device_inputs = if inputs == "f16" { DeviceInputs::F16 } else { DeviceInputs::F32 };
            let options = ScoreOptions { revision, scale: 100.0, top_k: 10, device_inputs, ..ScoreOptions::default() };
            let started = Instant::now();
            let (outcome, peak) = with_peak_memory(&gpu, || score::score(&gpu, &problem, &options, None))?;
            let seconds = started.elapsed().as_secs_f64();
            let t2v = outcome?.t2v_metrics().context("no texts with videos")?;
            println!("seconds={seconds:.4} peak_device_mib={:.0}", peak as f64 / (1 << 20) as f64);
            println!(
                "t2v_r1={:.4} t2v_r5={:.4} t2v_r10={:.4} t2v_mdr={} t2v_mnr={:.4}",
                t2v.r1, t2v.r5, t2v.r10, t2v.mdr, t2v.mnr
            );
        }
        _ => {
            bail!("usage: gpu_score probe | copy MIB | stored TEXTS VIDEOS DIM | score TEXTS VIDEOS DIM f32|f16 REVISE")
        }
    }
    Ok(())
}
