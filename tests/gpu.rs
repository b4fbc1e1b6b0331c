//! The GPU path (feature `cuda`): every kernel compiles for the architectures we support with no
//! spills and within shared memory (needs only NVRTC, no GPU), and scoring on a CUDA device gives
//! what the CPU path gives. The tests that need a device are `#[ignore]`d, so a machine without
//! one reports them as ignored, never as passed; `scripts/test.sh` runs them with `--ignored`
//! where `info --gpu` finds a device, and fails them there if the device does not work.
//!
//! A test binary of its own, unlike the rest: it must not link GStreamer, which the GPU machines
//! lack, so it includes only the helpers that do not reach it (`cargo test --features cuda --test gpu`).

#[allow(dead_code)]
mod scoring;
#[allow(dead_code)]
mod tolerance;
#[allow(dead_code)]
mod util;

use vtr_index::gpu::{self, KERNEL_SOURCES, Probe};
use vtr_index::score::{DeviceInputs, Outcome, Problem, Revision, ScoreOptions, score};

use crate::scoring::{DenseRows, assert_metrics_equal, load_case, problem, reference_metrics, synthetic};

/// Architectures the kernels must build for: A100 (sm_80) and H100/H200 (sm_90).
const ARCHITECTURES: [&str; 2] = ["sm_80", "sm_90"];

#[test]
fn every_kernel_compiles_without_spills() {
    assert!(
        gpu::nvrtc_present(),
        "NVRTC is not on LD_LIBRARY_PATH; run the tests through scripts/test.sh, which fetches it"
    );
    for (name, source) in KERNEL_SOURCES {
        for arch in ARCHITECTURES {
            let compiled = gpu::compile(name, source, arch).unwrap_or_else(|e| panic!("{e}"));
            let kernels = gpu::kernel_resources(&compiled.log);
            assert!(!kernels.is_empty(), "{name} for {arch}: no ptxas report in the log:\n{}", compiled.log);
            for k in &kernels {
                eprintln!(
                    "{name} {arch} {}: {} registers, {} B stack, {} B shared",
                    k.kernel, k.registers, k.stack_bytes, k.shared_bytes
                );
                assert_eq!(
                    (k.spill_store_bytes, k.spill_load_bytes),
                    (0, 0),
                    "{name} for {arch}: kernel {} spills registers",
                    k.kernel
                );
            }
        }
    }
}

#[test]
fn a_kernel_that_overruns_shared_memory_is_an_error() {
    if !gpu::nvrtc_present() {
        return; // every_kernel_compiles_without_spills reports the missing NVRTC
    }
    let source = r#"extern "C" __global__ void too_big(float *out) {
        __shared__ float tile[64 * 1024];
        tile[threadIdx.x] = threadIdx.x;
        __syncthreads();
        out[threadIdx.x] = tile[threadIdx.x ^ 1];
    }"#;
    let error =
        gpu::compile("too_big.cu", source, "sm_90").err().expect("256 KiB of static shared memory must not compile");
    assert!(error.to_string().contains("too_big.cu"), "{error}");
}

/// The device to test on; a test asked to run without one fails.
fn device() -> gpu::Gpu {
    match gpu::probe() {
        Probe::Ready { .. } => gpu::Gpu::open(0).unwrap_or_else(|e| panic!("CUDA device 0: {e}")),
        other => panic!("this test needs a CUDA device ({other})"),
    }
}

#[test]
fn the_probe_answers_without_panicking() {
    let probe = gpu::probe();
    eprintln!("CUDA probe: {probe}");
    if probe == Probe::NoDriver {
        assert!(matches!(gpu::Gpu::open(0), Err(gpu::GpuError::NoDriver)));
    }
}

/// The largest |a − b| over the largest |b|, over the values both hold.
fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The device's outcome against the CPU's on the same f32 embeddings: metrics exactly, every
/// top-k score within 1e-4 of the largest (positions may swap only between near ties).
fn assert_matches_cpu(gpu_outcome: &Outcome, cpu: &Outcome, what: &str) {
    assert_eq!(gpu_outcome.t2v_metrics(), cpu.t2v_metrics(), "{what}: T2V metrics");
    assert_eq!(gpu_outcome.v2t_metrics(), cpu.v2t_metrics(), "{what}: V2T metrics");
    let largest = cpu.top.iter().flatten().fold(0f64, |m, x| m.max(x.1.abs()));
    for (text, (g, c)) in gpu_outcome.top.iter().zip(&cpu.top).enumerate() {
        assert_eq!(g.len(), c.len(), "{what}: text {text}: {g:?} vs {c:?}");
        for (p, q) in g.iter().zip(c) {
            assert!((p.1 - q.1).abs() <= 1e-4 * largest, "{what}: text {text}: {g:?} vs {c:?}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn device_scoring_equals_the_cpu_path() {
    let gpu = device();
    let dim = 48;
    let (texts, videos, text_video) = synthetic(1500, 900, dim, 11);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    for revision in [Revision::None, Revision::Dsl, Revision::DslSym] {
        let options = ScoreOptions { revision, scale: 100.0, top_k: 10, ..ScoreOptions::default() };
        let cpu = score(&problem, &options, None).unwrap();
        let whole = gpu::score::score(&gpu, &problem, &options, None).unwrap();
        assert_matches_cpu(&whole, &cpu, &format!("{} in one block", revision.name()));
        // Blocks of about 100 rows: the path of matrices larger than device memory.
        let blocked = ScoreOptions { device_block_bytes: 100 * 4 * 900, ..options.clone() };
        let in_blocks = gpu::score::score(&gpu, &problem, &blocked, None).unwrap();
        assert_eq!(in_blocks, whole, "{}: blocks change nothing", revision.name());
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn device_metrics_and_matrices_equal_the_reference() {
    let gpu = device();
    for name in ["square_small", "multi_caption", "square_hubs"] {
        let case = load_case(name);
        let problem = problem(&case);
        for revision in [Revision::None, Revision::Dsl, Revision::DslSym] {
            let options = ScoreOptions { revision, scale: 100.0, ..ScoreOptions::default() };
            let (n, m) = (case.texts.len() / case.dim, case.videos.len() / case.dim);
            let (on_device, on_cpu) = (DenseRows::new(n, m), DenseRows::new(n, m));
            let outcome = gpu::score::score(&gpu, &problem, &options, Some(&on_device)).unwrap();
            score(&problem, &options, Some(&on_cpu)).unwrap();
            let what = format!("{name} {}", revision.name());
            assert_metrics_equal(outcome.t2v_metrics(), reference_metrics(name, revision, "t2v"), &what);
            assert_metrics_equal(outcome.v2t_metrics(), reference_metrics(name, revision, "v2t"), &what);
            for (device_matrix, cpu_matrix) in [(&on_device.t2v, &on_cpu.t2v), (&on_device.v2t, &on_cpu.v2t)] {
                let difference = relative_difference(&device_matrix.lock().unwrap(), &cpu_matrix.lock().unwrap());
                eprintln!("{what}: max |GPU − CPU| / max |CPU| = {difference:.2e}");
                assert!(difference <= 1e-4, "{what}: {difference}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn the_device_refuses_what_it_does_not_score() {
    let gpu = device();
    let dim = 8;
    let (texts, videos, text_video) = synthetic(40, 40, dim, 2);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: Some(&texts) };
    let qbnorm = ScoreOptions { revision: Revision::Qbnorm, ..ScoreOptions::default() };
    let error = gpu::score::score(&gpu, &problem, &qbnorm, None).unwrap_err().to_string();
    assert!(error.contains("QB-Norm"), "{error}");
    let wide = ScoreOptions { top_k: 33, ..ScoreOptions::default() };
    let error = gpu::score::score(&gpu, &problem, &wide, None).unwrap_err().to_string();
    assert!(error.contains("--top-k 33"), "{error}");
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_on_the_tensor_cores_stay_close_to_the_cpu_path() {
    let gpu = device();
    let dim = 64;
    let (texts, videos, text_video) = synthetic(2000, 1200, dim, 5);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    for revision in [Revision::None, Revision::Dsl, Revision::DslSym] {
        let options = ScoreOptions { revision, scale: 100.0, top_k: 10, ..ScoreOptions::default() };
        let cpu = score(&problem, &options, None).unwrap();
        let f16 = ScoreOptions { device_inputs: DeviceInputs::F16, ..options.clone() };
        let fused = gpu::score::score(&gpu, &problem, &f16, None).unwrap();
        let same_top1 =
            fused.top.iter().zip(&cpu.top).filter(|(a, b)| a.first().map(|x| x.0) == b.first().map(|x| x.0)).count();
        let rank_changes = fused.t2v_ranks.iter().zip(&cpu.t2v_ranks).filter(|(a, b)| a != b).count();
        let (g, c) = (fused.t2v_metrics().unwrap(), cpu.t2v_metrics().unwrap());
        eprintln!(
            "{} f16 vs CPU: top-1 equal for {same_top1}/{} texts, {rank_changes} T2V ranks differ; R@1 {:.2} vs {:.2}, MnR {:.3} vs {:.3}",
            revision.name(),
            cpu.top.len(),
            g.r1,
            c.r1,
            g.mnr,
            c.mnr
        );
        assert!(same_top1 * 100 >= cpu.top.len() * 95, "{}: top-1 agrees for only {same_top1}", revision.name());
        assert!((g.r1 - c.r1).abs() <= 1.0 && (g.r10 - c.r10).abs() <= 1.0, "{}: {g:?} vs {c:?}", revision.name());
        let (gv, cv) = (fused.v2t_metrics().unwrap(), cpu.v2t_metrics().unwrap());
        assert!((gv.r1 - cv.r1).abs() <= 1.0, "{} V2T: {gv:?} vs {cv:?}", revision.name());
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_refuse_what_they_cannot_do() {
    let gpu = device();
    let dim = 8;
    let (texts, videos, _) = synthetic(100, 10, dim, 4);
    // 100 captions of one video: more than a fused row block holds.
    let one_video = vec![Some(0u32); 100];
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &one_video, bank: None };
    let f16 = ScoreOptions { device_inputs: DeviceInputs::F16, ..ScoreOptions::default() };
    let error = gpu::score::score(&gpu, &problem, &f16, None).unwrap_err().to_string();
    assert!(error.contains("100 captions"), "{error}");
    let sink = DenseRows::new(100, 10);
    let error = gpu::score::score(&gpu, &problem, &f16, Some(&sink)).unwrap_err().to_string();
    assert!(error.contains("--dense"), "{error}");
}
