//! The GPU path (feature `cuda`): every kernel compiles for the architectures we support with no
//! spills and within shared memory (needs only NVRTC, no GPU), and scoring on a CUDA device gives
//! what the CPU path gives. The tests that need a device are `#[ignore]`d, so a machine without
//! one reports them as ignored, never as passed; `scripts/test.sh` runs them with `--ignored`
//! where `info --gpu` finds a device, and fails them there if the device does not work.
//!
//! A test binary of its own, unlike the rest: it must not link GStreamer, which the GPU machines
//! lack, so it includes only the helpers that do not reach it (`cargo test --features cuda --test gpu`).

#[allow(dead_code)]
mod score_cases;
#[allow(dead_code)]
mod tolerance;
#[allow(dead_code)]
mod util;

use vtr_index::gpu::{self, KERNEL_SOURCES, Probe};
use vtr_index::score::{DeviceInputs, Outcome, Problem, Revision, ScoreOptions, score};

use crate::score_cases::{
    DenseRows, UnderflowCase, assert_metrics_equal, load_case, problem, reference_metrics, synthetic,
};
use crate::tolerance::{F16_INPUTS_RECALL_POINTS, F16_INPUTS_TOP1_SHARE, SUM_TERMS_RELATIVE};

/// Architectures the kernels must build for: every one CUDA 13 supports, Turing (T4, sm_75) to
/// Blackwell (B200 sm_100, RTX 50xx sm_120), by way of A100 (sm_80), RTX 30xx and A10 (sm_86),
/// L4 and RTX 40xx (sm_89) and H100/H200 (sm_90).
const ARCHITECTURES: [&str; 7] = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"];

/// The f16 path's kernels, built only from sm_80 (`gpu::FUSED_MIN_CAPABILITY`).
const FUSED_KERNELS: [&str; 3] = ["fused_column_stats", "fused_row_stats", "fused_apply"];

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
            let has_tensor_cores = arch != "sm_75";
            for fused in FUSED_KERNELS {
                assert_eq!(
                    kernels.iter().any(|k| k.kernel == fused),
                    has_tensor_cores,
                    "{name} for {arch}: kernel {fused} built only where mma.sync m16n8k16 f16 exists"
                );
            }
            assert!(kernels.iter().any(|k| k.kernel == "t2v_apply"), "{name} for {arch}: the f32 path is built");
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

/// The kernels' shared constants come from the host alone (`gpu::score::kernel_defines`: the
/// `KERNEL_CONSTANTS` and each revision's code, as `-D` options): a source that defines one
/// itself differently is caught by the kernels' own checks of how their thread layout depends on
/// them, and one compiled without them is refused.
#[test]
fn the_kernels_take_their_constants_from_the_host() {
    if !gpu::nvrtc_present() {
        return; // every_kernel_compiles_without_spills reports the missing NVRTC
    }
    let defines = gpu::score::kernel_defines();
    assert!(
        defines.iter().any(|d| d == "-DTHREADS=256") && defines.iter().any(|d| d == "-DEXP_MIN=-708.0"),
        "{defines:?}"
    );
    let source = vtr_index::gpu::SCORE_KERNELS;
    let changed = format!("#undef THREADS\n#define THREADS 512\n{source}");
    let error = gpu::compile("score.cu", &changed, "sm_90").err().expect("THREADS changed on one side").to_string();
    assert!(error.contains("the fused kernels' thread layout"), "{error}");
    let missing = format!("#undef TOPK_MAX\n{source}");
    let error = gpu::compile("score.cu", &missing, "sm_90").err().expect("TOPK_MAX missing").to_string();
    assert!(error.contains("KERNEL_CONSTANTS"), "{error}");
}

/// Each kernel's `.entry` in the PTX NVRTC makes: its parameters' widths in bytes, in order.
fn ptx_entries(ptx: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    let mut entries = std::collections::BTreeMap::new();
    for entry in ptx.split(".entry ").skip(1) {
        let (name, rest) = entry.split_once('(').expect("an entry's parameter list");
        let params = rest.split(')').next().unwrap_or_default();
        let widths = params
            .split(',')
            .filter_map(|param| {
                let kind = param.split_whitespace().nth(1)?; // `.param .u64 name` → `.u64`
                Some(kind[2..].parse::<usize>().expect("a sized PTX type") / 8)
            })
            .collect();
        entries.insert(name.trim().to_string(), widths);
    }
    entries
}

/// The launch functions (`gpu::launch`) pass each kernel the parameters of its prototype in
/// `kernels/score.cu`, in order and width: an argument added, dropped or widened on one side
/// fails here, on every machine, instead of on a GPU.
#[test]
fn the_launchers_match_the_kernels_prototypes() {
    if !gpu::nvrtc_present() {
        return; // every_kernel_compiles_without_spills reports the missing NVRTC
    }
    let ptx = gpu::compile("score.cu", vtr_index::gpu::SCORE_KERNELS, "sm_90").unwrap().ptx;
    let kernels = ptx_entries(&ptx);
    let launchers: std::collections::BTreeMap<String, Vec<usize>> =
        gpu::launch::KERNEL_PARAMS.iter().map(|(name, widths)| (name.to_string(), widths.to_vec())).collect();
    assert_eq!(kernels.len(), 12, "{kernels:?}");
    assert_eq!(launchers, kernels);
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

/// The largest |a − b| over the largest |b|; infinite where either holds a NaN (a value the
/// device never wrote: `DenseRows` starts as NaN), which `f64::max` would pass over.
fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn a_value_never_written_is_a_difference() {
    assert_eq!(relative_difference(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert_eq!(relative_difference(&[1.0, f64::NAN], &[1.0, 2.0]), f64::INFINITY);
    assert_eq!(relative_difference(&[1.0], &[1.0, 2.0]), f64::INFINITY);
}

/// Whether two revised values are within what contract §6 lets the two paths differ by.
fn near(a: f64, b: f64) -> bool {
    (a - b).abs() <= SUM_TERMS_RELATIVE * a.abs().max(b.abs())
}

/// The device's outcome against the CPU's on the same problem (contract §6): both revise the
/// same logits (the same GEMM rounding) and differ only in their column sums, by at most
/// `SUM_TERMS_RELATIVE` of a value. So every top-k value is within that of the CPU's; a top-k
/// column differs only where the CPU's value at the device's column is that close to its own
/// (a near tie; exact ties, such as the duplicated videos, go to the lower column on both); and a
/// rank differs only by the number of values that close to the truth. `cpu_dense` holds the
/// CPU's revised rows, `text_video` each text's video.
fn assert_matches_cpu(device: &Outcome, cpu: &Outcome, cpu_dense: &DenseRows, text_video: &[Option<u32>], what: &str) {
    let (t2v, v2t) = (cpu_dense.t2v.lock().unwrap(), cpu_dense.v2t.lock().unwrap());
    let n = cpu.top.len();
    let columns = t2v.len() / n.max(1);
    let row = |m: &[f64], t: usize| m[t * columns..(t + 1) * columns].to_vec();
    assert_eq!(device.top.len(), n, "{what}: one top-k list per text");
    for (text, (d, c)) in device.top.iter().zip(&cpu.top).enumerate() {
        assert_eq!(d.len(), c.len(), "{what}: text {text}: {d:?} vs {c:?}");
        let values = row(&t2v, text);
        for (&(dc, dv), &(cc, cv)) in d.iter().zip(c) {
            assert!(near(dv, cv), "{what}: text {text}: {d:?} vs {c:?}");
            assert!(dc == cc || near(values[dc as usize], cv), "{what}: text {text}: columns {d:?} vs {c:?}");
        }
    }
    assert_eq!(device.t2v_ranks.len(), cpu.t2v_ranks.len(), "{what}: T2V queries");
    for (&(text, dr), &(ct, cr)) in device.t2v_ranks.iter().zip(&cpu.t2v_ranks) {
        assert_eq!(text, ct, "{what}: T2V queries");
        let values = row(&t2v, text);
        let own = values[text_video[text].expect("a T2V query has a video") as usize];
        let close = values.iter().filter(|&&v| v != own && near(v, own)).count() as u32;
        assert!(dr.abs_diff(cr) <= close, "{what}: text {text}: T2V rank {dr} vs {cr}");
    }
    assert_eq!(device.v2t_ranks.len(), cpu.v2t_ranks.len(), "{what}: V2T queries");
    for (&(video, dr), &(cv, cr)) in device.v2t_ranks.iter().zip(&cpu.v2t_ranks) {
        assert_eq!(video, cv, "{what}: V2T queries");
        if dr != cr {
            // Count the texts whose V2T value for this video is a near tie of another's.
            let column: Vec<f64> = (0..n).map(|t| v2t[t * columns + video as usize]).collect();
            let close = column.iter().filter(|&&a| column.iter().any(|&b| a != b && near(a, b))).count() as u32;
            assert!(dr.abs_diff(cr) <= close, "{what}: video {video}: V2T rank {dr} vs {cr}");
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
        let cpu_dense = DenseRows::new(1500, 900);
        let cpu = score(&problem, &options, Some(&cpu_dense)).unwrap();
        let whole = gpu::score::score(&gpu, &problem, &options, None).unwrap();
        assert_matches_cpu(&whole, &cpu, &cpu_dense, &text_video, &format!("{} in one block", revision.name()));
        // Blocks of 100 and of 37 rows: the path of matrices larger than device memory. The
        // column sums follow fixed parts of the rows, so the blocking changes no bit.
        for rows in [100, 37] {
            let blocked = ScoreOptions { device_block_bytes: rows * 4 * 900, ..options.clone() };
            let in_blocks = gpu::score::score(&gpu, &problem, &blocked, None).unwrap();
            assert_eq!(in_blocks, whole, "{}: blocks of {rows} rows change nothing", revision.name());
        }
    }
}

/// The shapes at the edges of the kernels' geometry: no top-k (k = 0), the most the device keeps
/// (32), more than there are videos, one video, fewer texts than a tile (64), and temperatures
/// other than 1; on the f32 path, in one block and in blocks of a few rows.
#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn device_edge_shapes_equal_the_cpu_path() {
    let gpu = device();
    let dim = 24;
    let cases = [(300, 200, 0), (300, 200, 32), (90, 20, 32), (80, 1, 5), (40, 30, 10), (1, 7, 3), (10, 150, 32)];
    for (n, m, top_k) in cases {
        let (texts, videos, text_video) = synthetic(n, m, dim, 3);
        let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
        for (revision, temperature) in
            [(Revision::None, 1.0), (Revision::Dsl, 1.0), (Revision::Dsl, 0.5), (Revision::DslSym, 0.2)]
        {
            let options = ScoreOptions { revision, scale: 100.0, temperature, top_k, ..ScoreOptions::default() };
            let what = format!("{n}×{m}, k {top_k}, {} at τ {temperature}", revision.name());
            let cpu_dense = DenseRows::new(n, m);
            let cpu = score(&problem, &options, Some(&cpu_dense)).unwrap();
            let whole = gpu::score::score(&gpu, &problem, &options, None).unwrap();
            assert_matches_cpu(&whole, &cpu, &cpu_dense, &text_video, &what);
            assert!(whole.top.iter().all(|items| items.len() == top_k.min(m)), "{what}: top-k lengths");
            let blocked = ScoreOptions { device_block_bytes: 3 * 4 * m, ..options.clone() };
            assert_eq!(gpu::score::score(&gpu, &problem, &blocked, None).unwrap(), whole, "{what}: in blocks");
        }
    }
}

/// Contract §1's underflow rule on the device: at τ = 0.01 most weights fall below e^−708 and are
/// 0, tied, as on the CPU. Exact cosines (multiples of 1/64), so the device's exponents equal the
/// formula's to the bit: ranks and top-k equal the definitions on the formula's matrix, and every
/// dense value is the formula's (0 exactly where it is 0).
#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn device_ties_underflowed_values_as_the_cpu_does() {
    let gpu = device();
    let case = UnderflowCase::new();
    for revision in [Revision::Dsl, Revision::DslSym] {
        let expected = case.expected(revision);
        for device_block_bytes in [0, 5 * 4 * UnderflowCase::VIDEOS] {
            let options = ScoreOptions {
                revision,
                scale: case.scale,
                temperature: case.temperature,
                top_k: case.top_k,
                device_block_bytes,
                ..ScoreOptions::default()
            };
            let what = format!("{} in blocks of {device_block_bytes} bytes", revision.name());
            let sink = DenseRows::new(UnderflowCase::TEXTS, UnderflowCase::VIDEOS);
            expected.assert_outcome(&gpu::score::score(&gpu, &case.problem(), &options, Some(&sink)).unwrap(), &what);
            expected.assert_dense(&sink, &what);
        }
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
                assert!(difference <= SUM_TERMS_RELATIVE, "{what}: {difference}");
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
    assert!(error.contains("--revise qbnorm is scored on the CPU only"), "{error}");
    let wide = ScoreOptions { top_k: 33, ..ScoreOptions::default() };
    let error = gpu::score::score(&gpu, &problem, &wide, None).unwrap_err().to_string();
    assert!(error.contains("--top-k 33"), "{error}");
}

/// Whether the device runs the f16 path (sm_80 and newer); below, scoring with f16 inputs is
/// refused with the reason, which this checks.
fn has_fused_path(gpu: &gpu::Gpu) -> bool {
    let dim = 8;
    let (texts, videos, text_video) = synthetic(10, 10, dim, 1);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let f16 = ScoreOptions { device_inputs: DeviceInputs::F16, ..ScoreOptions::default() };
    match gpu::score::score(gpu, &problem, &f16, None) {
        Ok(_) => {
            assert!(gpu.capability >= gpu::FUSED_MIN_CAPABILITY, "{}: f16 path below sm_80", gpu.name);
            true
        }
        Err(error) => {
            assert!(gpu.capability < gpu::FUSED_MIN_CAPABILITY, "{}: {error}", gpu.name);
            assert!(error.to_string().contains("need sm_80"), "{error}");
            false
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_on_the_tensor_cores_stay_close_to_the_cpu_path() {
    let gpu = device();
    if !has_fused_path(&gpu) {
        return;
    }
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
        let share = same_top1 as f64 / cpu.top.len() as f64;
        assert!(share >= F16_INPUTS_TOP1_SHARE, "{}: top-1 agrees for only {same_top1}", revision.name());
        let close = |a: f64, b: f64| (a - b).abs() <= F16_INPUTS_RECALL_POINTS;
        assert!(close(g.r1, c.r1) && close(g.r10, c.r10), "{}: {g:?} vs {c:?}", revision.name());
        let (gv, cv) = (fused.v2t_metrics().unwrap(), cpu.v2t_metrics().unwrap());
        assert!(close(gv.r1, cv.r1), "{} V2T: {gv:?} vs {cv:?}", revision.name());
    }
}

/// The f16 path's row blocks (whole caption groups of at most 64 rows), its parts and its
/// column tiles (128) at every edge: one text, fewer texts than a block, a group of exactly 64
/// captions, widths padded to 32, one video, more videos than a tile, and k from 0 to 32. Each
/// outcome is well formed (lengths, order, ties to the lower column) and its ranks agree with the
/// f32 path's but for the near ties that f16 products make.
#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_at_the_edges_of_the_tiles() {
    let gpu = device();
    if !has_fused_path(&gpu) {
        return;
    }
    let shapes = [(1, 1, 40), (63, 5, 40), (65, 129, 8), (200, 300, 72), (60, 1, 32)];
    for (n, m, dim) in shapes {
        let (texts, videos, mut text_video) = synthetic(n, m, dim, 8);
        if n >= 64 {
            text_video[..64].fill(Some(0)); // one group that fills a row block exactly
        }
        let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
        for (top_k, revision) in [(0, Revision::Dsl), (5, Revision::None), (32, Revision::DslSym)] {
            let options = ScoreOptions {
                revision,
                scale: 100.0,
                top_k,
                device_inputs: DeviceInputs::F16,
                ..ScoreOptions::default()
            };
            let what = format!("f16 {n}×{m}×{dim}, k {top_k}, {}", revision.name());
            let fused = gpu::score::score(&gpu, &problem, &options, None).unwrap();
            let exact =
                gpu::score::score(&gpu, &problem, &ScoreOptions { device_inputs: DeviceInputs::F32, ..options }, None)
                    .unwrap();
            assert_eq!(fused.top.len(), n, "{what}");
            for items in &fused.top {
                assert_eq!(items.len(), top_k.min(m), "{what}: {items:?}");
                assert!(items.iter().all(|&(c, v)| (c as usize) < m && v.is_finite()), "{what}: {items:?}");
                for pair in items.windows(2) {
                    assert!(
                        pair[0].1 > pair[1].1 || (pair[0].1 == pair[1].1 && pair[0].0 < pair[1].0),
                        "{what}: {pair:?}"
                    );
                }
            }
            let queries = |o: &Outcome| {
                (
                    o.t2v_ranks.iter().map(|r| r.0).collect::<Vec<_>>(),
                    o.v2t_ranks.iter().map(|r| r.0).collect::<Vec<_>>(),
                )
            };
            assert_eq!(queries(&fused), queries(&exact), "{what}: the same queries");
            let moved = fused.t2v_ranks.iter().zip(&exact.t2v_ranks).filter(|(a, b)| a.1.abs_diff(b.1) > 2).count();
            assert!(moved * 10 <= exact.t2v_ranks.len().max(1), "{what}: {moved} T2V ranks moved by more than 2");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_refuse_what_they_cannot_do() {
    let gpu = device();
    if !has_fused_path(&gpu) {
        return; // refused on this device, for the reason has_fused_path checked
    }
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

/// Embeddings of multiples of 1/16 (|k| ≤ 16) at widths up to 64: f16 holds them exactly, and
/// every product and partial sum of a cosine is a multiple of 1/256 below 2⁶, exact in f32 too.
/// So the f16 path's tensor-core cosines are the f32 path's to the bit, in every tile: without a
/// revision the two outcomes are equal, values and ranks, and with one they are held to the CPU
/// as the f32 path is. Shapes across the tile edges (64 rows, 128 columns, widths padded to 32).
#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn f16_inputs_equal_the_f32_path_where_f16_is_exact() {
    let gpu = device();
    if !has_fused_path(&gpu) {
        return;
    }
    let quantise =
        |values: &mut [f32]| values.iter_mut().for_each(|x| *x = ((*x * 32.0).round() / 16.0).clamp(-1.0, 1.0));
    let shapes = [(1, 1, 8), (63, 5, 40), (64, 128, 64), (65, 129, 33), (200, 300, 64), (130, 257, 17)];
    for (n, m, dim) in shapes {
        let (mut texts, mut videos, text_video) = synthetic(n, m, dim, 21);
        quantise(&mut texts);
        quantise(&mut videos);
        let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
        for revision in [Revision::None, Revision::Dsl, Revision::DslSym] {
            let options = ScoreOptions { revision, scale: 10.0, top_k: 32, ..ScoreOptions::default() };
            let f16 = ScoreOptions { device_inputs: DeviceInputs::F16, ..options.clone() };
            let what = format!("{n}×{m}×{dim} {}", revision.name());
            let fused = gpu::score::score(&gpu, &problem, &f16, None).unwrap();
            if revision == Revision::None {
                let exact = gpu::score::score(&gpu, &problem, &options, None).unwrap();
                assert_eq!(fused, exact, "{what}: the f16 path differs from the f32 path");
            } else {
                let cpu_dense = DenseRows::new(n, m);
                let cpu = score(&problem, &options, Some(&cpu_dense)).unwrap();
                assert_matches_cpu(&fused, &cpu, &cpu_dense, &text_video, &what);
            }
        }
    }
}

/// The CPU's revised T2V rows for the texts `keep` selects: at 48,000² the whole matrix would
/// take 18 GB of host memory.
struct SomeRows<F: Fn(usize) -> bool + Sync> {
    keep: F,
    kept: std::sync::Mutex<std::collections::HashMap<usize, Vec<f64>>>,
}

impl<F: Fn(usize) -> bool + Sync> vtr_index::score::RowSink for SomeRows<F> {
    fn row(&self, text: usize, t2v: &[f64], _v2t: &[f64]) -> std::io::Result<()> {
        if (self.keep)(text) {
            self.kept.lock().unwrap().insert(text, t2v.to_vec());
        }
        Ok(())
    }
}

/// The side of the square problem past 2³¹ elements: 48,000 (2.3 × 10⁹ elements), or
/// `VTR_INDEX_LARGE_SCORE_SIDE` (the device check's rehearsal on the emulated device, which
/// could not run the full size, takes a small one).
fn large_side() -> usize {
    std::env::var("VTR_INDEX_LARGE_SCORE_SIDE").map_or(48_000, |side| side.parse().expect("a side in rows"))
}

/// Past 2³¹ elements: 48,000 texts × 48,000 videos at D = 512, which a large card scores in one
/// row block, so the kernels' element indices pass 2³¹ (64-bit indexing), against the CPU path
/// on all the machine's cores. On every text past element 2³¹ and every 64th text before it,
/// the top-k lists and T2V ranks are held as `assert_matches_cpu` holds them, with the CPU's
/// revised row; on every text, each top-k value is near the CPU's; and at most 1 in 1,000 T2V
/// or V2T ranks differ (random data has near ties that rarely, and an indexing fault moves most).
/// Run by the device check (benchmarks/device_check/), skipped by the emulated run.
#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn device_scoring_past_2_pow_31_elements_matches_the_cpu_path() {
    let gpu = device();
    let (side, dim) = (large_side(), 512);
    let (texts, videos, text_video) = synthetic(side, side, dim, 31);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let options = ScoreOptions { revision: Revision::Dsl, scale: 100.0, top_k: 10, ..ScoreOptions::default() };
    let first_past = (1usize << 31).div_ceil(side).saturating_sub(1).min(side.saturating_sub(64));
    let keep = move |text: usize| text >= first_past || text.is_multiple_of(64);
    let started = std::time::Instant::now();
    let on_device = gpu::score::score(&gpu, &problem, &options, None).unwrap();
    eprintln!("{side}² on {}: {:.2} s", gpu.name, started.elapsed().as_secs_f64());
    let started = std::time::Instant::now();
    let sink = SomeRows { keep, kept: Default::default() };
    let cpu = score(&problem, &options, Some(&sink)).unwrap();
    eprintln!("{side}² on {} CPU threads: {:.2} s", rayon::current_num_threads(), started.elapsed().as_secs_f64());
    let kept = sink.kept.into_inner().unwrap();
    assert_eq!(on_device.top.len(), side);
    for (text, (d, c)) in on_device.top.iter().zip(&cpu.top).enumerate() {
        assert_eq!(d.len(), c.len(), "text {text}: {d:?} vs {c:?}");
        for (&(dc, dv), &(cc, cv)) in d.iter().zip(c) {
            assert!(near(dv, cv), "text {text}: {d:?} vs {c:?}");
            if let Some(values) = kept.get(&text) {
                assert!(dc == cc || near(values[dc as usize], cv), "text {text}: columns {d:?} vs {c:?}");
            }
        }
    }
    let mut differing = 0;
    for (&(text, dr), &(ct, cr)) in on_device.t2v_ranks.iter().zip(&cpu.t2v_ranks) {
        assert_eq!(text, ct, "T2V queries");
        if let Some(values) = kept.get(&text) {
            let own = values[text_video[text].expect("a T2V query has a video") as usize];
            let close = values.iter().filter(|&&v| v != own && near(v, own)).count() as u32;
            assert!(dr.abs_diff(cr) <= close, "text {text}: T2V rank {dr} vs {cr}");
        }
        differing += usize::from(dr != cr);
    }
    assert_eq!(on_device.v2t_ranks.len(), cpu.v2t_ranks.len(), "V2T queries");
    differing += on_device.v2t_ranks.iter().zip(&cpu.v2t_ranks).filter(|(d, c)| d != c).count();
    let queries = cpu.t2v_ranks.len() + cpu.v2t_ranks.len();
    eprintln!("{differing} of {queries} ranks differ; {} texts' rows checked exactly", kept.len());
    assert!(differing * 1000 <= queries, "{differing} of {queries} ranks differ");
}

/// The device check (`benchmarks/device_check/run.py`) selects tests of this file by name, for
/// compute-sanitizer and the 48,000² run: each name it holds is a test here, so a rename cannot
/// leave the check selecting nothing on the first GPU it meets.
#[test]
fn the_device_check_selects_tests_that_exist() {
    let check = include_str!("../benchmarks/device_check/run.py");
    let this = include_str!("gpu.rs");
    let names: Vec<&str> = check
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with(|c: char| c.is_ascii_lowercase()) && s.matches('_').count() >= 4)
        .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .collect();
    assert!(names.len() >= 4, "the scan finds the check's test names: {names:?}");
    for name in names {
        assert!(this.contains(&format!("fn {name}()")), "run.py selects `{name}`, which is no test of tests/gpu.rs");
    }
}
