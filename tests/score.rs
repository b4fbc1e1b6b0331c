//! Scoring against the reference cases of `tests/fixtures/reference/score` (metrics to 1e-6, the
//! symmetric dual-softmax matrices to 1e-5 of their largest value), every revision's dense
//! matrices against the formulas computed here in plain f64, and the tiled two-pass path
//! against the single-strip one on matrices far larger than one strip.

use vtr_index::score::{Outcome, Problem, Revision, RowSink, ScoreOptions, score};

use crate::score_cases::*;
use crate::tolerance::*;
use crate::util::*;

const REVISIONS: [Revision; 4] = [Revision::None, Revision::Dsl, Revision::DslSym, Revision::Qbnorm];

/// Strips of a few rows and no cache: every case runs through many strips and recomputes
/// each one in the second pass, the path large corpora take.
fn small_strips(revision: Revision) -> ScoreOptions {
    ScoreOptions { revision, scale: 100.0, cache_bytes: 0, strip_bytes: 1, ..ScoreOptions::default() }
}

#[test]
fn metrics_equal_the_reference_for_every_case_and_revision() {
    for name in ["square_small", "multi_caption", "square_hubs"] {
        let case = load_case(name);
        for revision in REVISIONS {
            for options in [ScoreOptions { revision, scale: 100.0, ..ScoreOptions::default() }, small_strips(revision)]
            {
                let outcome = score(&problem(&case), &options, None).unwrap();
                let what = format!("{} {} (strips of {} bytes)", case.name, revision.name(), options.strip_bytes);
                assert_metrics_equal(
                    outcome.t2v_metrics(),
                    reference_metrics(name, revision, "t2v"),
                    &format!("{what} t2v"),
                );
                assert_metrics_equal(
                    outcome.v2t_metrics(),
                    reference_metrics(name, revision, "v2t"),
                    &format!("{what} v2t"),
                );
            }
        }
    }
}

#[test]
fn symmetric_dual_softmax_matrices_match_the_reference() {
    for name in ["square_small", "multi_caption", "square_hubs"] {
        let case = load_case(name);
        let rows = case.text_video.len();
        let columns = case.videos.len() / case.dim;
        let sink = DenseRows::new(rows, columns);
        score(&problem(&case), &small_strips(Revision::DslSym), Some(&sink)).unwrap();
        for (direction, got) in [("t2v", sink.t2v.into_inner().unwrap()), ("v2t", sink.v2t.into_inner().unwrap())] {
            let (want, shape) = read_npy(&fixtures().join(format!("reference/score/{name}_dslsym_{direction}.npy")));
            assert_eq!(shape, [rows, columns]);
            let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((g - w).abs()));
            assert!(
                worst <= SCORE_RELATIVE * largest,
                "{name} {direction}: max |M − R| = {worst}, max |R| = {largest}"
            );
        }
    }
}

/// Every revision's dense matrices (T2V and V2T) against a plain f64 computation written here
/// from the contract's formulas (§1), independent of the engine's strips, bounds and kernels:
/// `none`, `dsl`, `dsl-sym` and `qbnorm` on each fixture case.
#[test]
fn dense_matrices_of_every_revision_equal_the_formulas_in_f64() {
    let (scale, tau, beta) = (100.0f64, 1.0f64, 20.0f64);
    for name in ["square_small", "multi_caption", "square_hubs"] {
        let case = load_case(name);
        let dim = case.dim;
        let rows = case.text_video.len();
        let columns = case.videos.len() / dim;
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
        let text = |t: usize| &case.texts[t * dim..(t + 1) * dim];
        let video = |v: usize| &case.videos[v * dim..(v + 1) * dim];
        let cosines: Vec<f64> =
            (0..rows).flat_map(|t| (0..columns).map(move |v| (t, v))).map(|(t, v)| cos(text(t), video(v))).collect();
        let s: Vec<f64> = cosines.iter().map(|c| scale * c).collect();
        let at = |m: &[f64], t: usize, v: usize| m[t * columns + v];
        let dsl = dual_softmax_formula(&s, columns, 1.0 / tau, true);
        let over_videos = dual_softmax_formula(&s, columns, 1.0 / tau, false);
        // QB-Norm: the bank's normalisers and activation set; rows of active queries replaced.
        let bank_rows = case.bank.len() / dim;
        let bank = |b: usize| &case.bank[b * dim..(b + 1) * dim];
        let top1 = |cosines_of: &dyn Fn(usize) -> f64| {
            (0..columns).fold(0, |best, v| if cosines_of(v) > cosines_of(best) { v } else { best })
        };
        let mut z = vec![0.0f64; columns];
        let mut active = vec![false; columns];
        for b in 0..bank_rows {
            for (v, zv) in z.iter_mut().enumerate() {
                *zv += (beta * cos(bank(b), video(v))).exp();
            }
            active[top1(&|v| cos(bank(b), video(v)))] = true;
        }
        let mut qbnorm = cosines.clone();
        for t in 0..rows {
            if active[top1(&|v| at(&cosines, t, v))] {
                for v in 0..columns {
                    qbnorm[t * columns + v] = (beta * at(&cosines, t, v)).exp() / z[v];
                }
            }
        }
        let cases: [(Revision, &[f64], &[f64]); 4] = [
            (Revision::None, &s, &s),
            (Revision::Dsl, &dsl, &dsl),
            (Revision::DslSym, &dsl, &over_videos),
            (Revision::Qbnorm, &qbnorm, &qbnorm),
        ];
        for (revision, want_t2v, want_v2t) in cases {
            let sink = DenseRows::new(rows, columns);
            score(&problem(&case), &small_strips(revision), Some(&sink)).unwrap();
            for (direction, got, want) in
                [("t2v", sink.t2v.into_inner().unwrap(), want_t2v), ("v2t", sink.v2t.into_inner().unwrap(), want_v2t)]
            {
                let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((g - w).abs()));
                assert!(
                    worst <= SCORE_RELATIVE * largest,
                    "{name} {} {direction}: max |M − R| = {worst}, max |R| = {largest}",
                    revision.name()
                );
            }
        }
    }
}

/// Same ranks and top-k columns; scores within [`SUM_TERMS_RELATIVE`] (contract §6): the column
/// sums' f32 terms are taken against each strip's (or block's) maximum, so sums merged from
/// other strips differ in their last digits (1.1e-7 between 7 blocks and one run, measured).
fn assert_same_outcome(a: &Outcome, b: &Outcome, what: &str) {
    assert_eq!(a.t2v_ranks, b.t2v_ranks, "{what}: T2V ranks");
    assert_eq!(a.v2t_ranks, b.v2t_ranks, "{what}: V2T ranks");
    for (t, (x, y)) in a.top.iter().zip(&b.top).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: text {t}");
        for (p, q) in x.iter().zip(y) {
            assert_eq!(p.0, q.0, "{what}: text {t}: top-k columns {x:?} vs {y:?}");
            let close = (p.1 - q.1).abs() <= SUM_TERMS_RELATIVE * p.1.abs().max(1e-300);
            assert!(close, "{what}: text {t}: {p:?} vs {q:?}");
        }
    }
}

fn tiled_equals_single_strip(texts: usize, videos: usize) {
    let dim = 32;
    let (text_matrix, video_matrix, text_video) = synthetic(texts, videos, dim, 7);
    let bank: Vec<f32> = text_matrix[..200 * dim].to_vec();
    let problem =
        Problem { texts: &text_matrix, videos: &video_matrix, dim, text_video: &text_video, bank: Some(&bank) };
    for revision in REVISIONS {
        let whole = ScoreOptions {
            revision,
            scale: 100.0,
            top_k: 10,
            strip_bytes: usize::MAX / 8,
            cache_bytes: usize::MAX,
            ..ScoreOptions::default()
        };
        let tiled = ScoreOptions { strip_bytes: 64 * 4 * videos, cache_bytes: 0, ..whole.clone() };
        let a = score(&problem, &whole, None).unwrap();
        let b = score(&problem, &tiled, None).unwrap();
        assert_same_outcome(&a, &b, &format!("{texts}×{videos} {}", revision.name()));
        assert_eq!(a.t2v_metrics(), b.t2v_metrics());
        assert_eq!(a.v2t_metrics(), b.v2t_metrics());
        // Exact ties (duplicated videos) are ordered by the lower column.
        for items in &a.top {
            for pair in items.windows(2) {
                assert!(pair[0].1 > pair[1].1 || (pair[0].1 == pair[1].1 && pair[0].0 < pair[1].0), "{pair:?}");
            }
        }
    }
}

#[test]
fn tiled_scoring_equals_one_strip_at_4000_by_4000() {
    tiled_equals_single_strip(4000, 4000);
}

#[test]
#[ignore = "20,000 × 20,000, minutes on 2 cores: run with -- --ignored"]
fn tiled_scoring_equals_one_strip_at_20000_by_20000() {
    tiled_equals_single_strip(20_000, 20_000);
}

/// Without `--dense` the second pass of both dual softmax forms decides comparisons on f32 bounds and
/// computes f64 values only where the bounds cannot; with a sink every row is computed in f64.
/// Both must give the same bits, including where f32 underflows (scale 1000 and τ 0.02 put
/// exponents far below −87), on exact ties (duplicated videos, repeated captions) and for
/// multi-caption groups.
#[test]
fn dual_softmax_on_bounds_equals_the_f64_rows() {
    struct Discard;
    impl RowSink for Discard {
        fn row(&self, _: usize, _: &[f64], _: &[f64]) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dim = 16;
    let (mut texts, videos, text_video) = synthetic(900, 300, dim, 11);
    let repeated = texts[..dim].to_vec();
    texts[5 * dim..6 * dim].copy_from_slice(&repeated);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let settings = [(100.0, 1.0), (1000.0, 1.0), (100.0, 0.02), (1.0, 5.0)];
    for ((scale, temperature), revision) in
        settings.into_iter().flat_map(|s| [(s, Revision::Dsl), (s, Revision::DslSym)])
    {
        let options = ScoreOptions { revision, scale, temperature, top_k: 12, strip_bytes: 1, ..Default::default() };
        let bounded = score(&problem, &options, None).unwrap();
        let exact = score(&problem, &options, Some(&Discard)).unwrap();
        let what = format!("{} at scale {scale}, τ {temperature}", revision.name());
        assert_eq!(bounded.t2v_ranks, exact.t2v_ranks, "{what}: T2V ranks");
        assert_eq!(bounded.v2t_ranks, exact.v2t_ranks, "{what}: V2T ranks");
        assert_eq!(bounded.top, exact.top, "{what}: top-k");
    }
}

/// The column sums are merged in an order fixed by the strips alone: the same scores, to the
/// bit, with one thread or several, for every revision.
#[test]
fn scores_do_not_depend_on_the_number_of_threads() {
    let dim = 16;
    let (texts, videos, text_video) = synthetic(3000, 500, dim, 5);
    let bank = texts[..300 * dim].to_vec();
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: Some(&bank) };
    for revision in REVISIONS {
        let options = ScoreOptions { revision, scale: 100.0, strip_bytes: 1, ..ScoreOptions::default() };
        let runs: Vec<Outcome> = [1, 2, 3, 8]
            .into_iter()
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| score(&problem, &options, None).unwrap())
            })
            .collect();
        for (threads, run) in [2, 3, 8].into_iter().zip(&runs[1..]) {
            let what = format!("{} on {threads} threads", revision.name());
            assert_eq!(run.top, runs[0].top, "{what}: top-k");
            assert_eq!((&run.t2v_ranks, &run.v2t_ranks), (&runs[0].t2v_ranks, &runs[0].v2t_ranks), "{what}: ranks");
        }
    }
}

/// Ranks from the definitions of contract §5, by brute force over a matrix held whole.
#[test]
fn ranks_and_top_k_follow_the_definitions() {
    let dim = 16;
    let (texts, videos, text_video) = synthetic(300, 120, dim, 3);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    let sink = DenseRows::new(300, 120);
    let options =
        ScoreOptions { revision: Revision::Dsl, scale: 100.0, top_k: 7, strip_bytes: 1, ..ScoreOptions::default() };
    let outcome = score(&problem, &options, Some(&sink)).unwrap();
    let matrix = sink.t2v.into_inner().unwrap();
    let want = by_definition(&matrix, &matrix, &text_video, 7);
    let top: Vec<Vec<u32>> = outcome.top.iter().map(|items| items.iter().map(|&(c, _)| c).collect()).collect();
    assert_eq!(top, want.top);
    assert_eq!(outcome.t2v_ranks, want.t2v_ranks);
    assert_eq!(outcome.v2t_ranks, want.v2t_ranks);
}

/// Contract §1's underflow rule: at scale 100 and τ = 0.01 most exponents fall below −708, and
/// those values are 0, tied, on every path (with and without `--dense`, in one strip or many).
/// Against the formula written in the tests from exact cosines (their exponents equal the
/// engine's to the bit), so every value and every comparison is decided the same way.
#[test]
fn weights_below_the_exponent_range_are_zero_and_tie() {
    let case = UnderflowCase::new();
    let (n, m) = (UnderflowCase::TEXTS, UnderflowCase::VIDEOS);
    for revision in [Revision::Dsl, Revision::DslSym] {
        let expected = case.expected(revision);
        let zeros = expected.t2v.iter().filter(|&&x| x == 0.0).count();
        assert!(zeros * 2 > n * m, "the case must underflow: {zeros} of {} values are 0", n * m);
        let tied_truths =
            expected.outcome.t2v_ranks.iter().filter(|&&(t, _)| {
                expected.t2v[t * m + case.text_video[t].expect("a query has a video") as usize] == 0.0
            });
        assert!(tied_truths.count() > 0, "some true values must be among the tied zeros");
        for strip_bytes in [1, usize::MAX / 8] {
            let options = ScoreOptions {
                revision,
                scale: case.scale,
                temperature: case.temperature,
                top_k: case.top_k,
                strip_bytes,
                ..ScoreOptions::default()
            };
            let what = format!("{} in strips of {strip_bytes} bytes", revision.name());
            let sink = DenseRows::new(n, m);
            expected.assert_outcome(&score(&case.problem(), &options, Some(&sink)).unwrap(), &what);
            expected.assert_outcome(&score(&case.problem(), &options, None).unwrap(), &what);
            expected.assert_dense(&sink, &what);
        }
    }
}

#[test]
fn invalid_problems_are_refused() {
    let case = load_case("square_small");
    let mut p = problem(&case);
    p.bank = None;
    let err = score(&p, &ScoreOptions { revision: Revision::Qbnorm, ..ScoreOptions::default() }, None).unwrap_err();
    assert!(err.to_string().contains("query bank"), "{err}");
    let bad = [Some(999)];
    let p =
        Problem { texts: &case.texts[..case.dim], videos: &case.videos, dim: case.dim, text_video: &bad, bank: None };
    assert!(score(&p, &ScoreOptions::default(), None).is_err());
    // The kernels fold scale/τ into one f32 factor, which must be an f32 number.
    let p = problem(&case);
    for options in [
        ScoreOptions { revision: Revision::Dsl, temperature: 1e-40, ..ScoreOptions::default() },
        ScoreOptions { revision: Revision::None, scale: 1e39, ..ScoreOptions::default() },
        ScoreOptions { revision: Revision::Qbnorm, beta: 1e39, ..ScoreOptions::default() },
    ] {
        let err = score(&p, &options, None).unwrap_err();
        assert!(err.to_string().contains("f32"), "{err}");
    }
}

/// Contract §6: the CPU sums each column's softmax terms in f32 (a loop of eight lanes) into f64
/// sums, the GPU in f64. On the CPU's own logits (`--revise none` gives `scale · s` exactly),
/// every dual-softmax value stays within [`SUM_TERMS_RELATIVE`] of the formula computed here with
/// f64 terms, the GPU's way: the bound the device tests hold the two paths to.
#[test]
fn dual_softmax_values_are_within_the_sum_tolerance_of_f64_terms() {
    let (dim, n, m) = (48, 1000, 600);
    let (texts, videos, text_video) = synthetic(n, m, dim, 11);
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: None };
    // 100 is exact in f32; the scale `score` uses by default, exp(logit_scale) of a CLIP
    // checkpoint (4.6052 as f32, so 100.00296…), is not.
    for (scale, temperature) in [100.0, f64::from(4.6052f32).exp()]
        .into_iter()
        .flat_map(|scale| [1.0, 0.5, 0.1, 0.02].map(|temperature| (scale, temperature)))
    {
        let raw = DenseRows::new(n, m);
        score(&problem, &ScoreOptions { revision: Revision::None, scale, ..ScoreOptions::default() }, Some(&raw))
            .unwrap();
        let logits = raw.t2v.into_inner().unwrap();
        let sink = DenseRows::new(n, m);
        let options = ScoreOptions { revision: Revision::DslSym, scale, temperature, ..ScoreOptions::default() };
        score(&problem, &options, Some(&sink)).unwrap();
        for (direction, got, over_texts) in [("t2v", &sink.t2v, true), ("v2t", &sink.v2t, false)] {
            let want = dual_softmax_formula(&logits, m, 1.0 / temperature, over_texts);
            let worst = got
                .lock()
                .unwrap()
                .iter()
                .zip(&want)
                .map(|(g, w)| if *w == 0.0 { if *g == 0.0 { 0.0 } else { f64::INFINITY } } else { ((g - w) / w).abs() })
                .fold(0f64, f64::max);
            eprintln!("scale {scale}, τ {temperature} {direction}: largest relative difference {worst:.2e}");
            assert!(worst <= SUM_TERMS_RELATIVE, "scale {scale}, τ {temperature} {direction}: {worst:e}");
        }
    }
}

/// A score split into blocks (contract §7: stage 1 per block, stage 2 per block from every
/// block's stage 1, then the join), its stage outputs passed through JSON as the tasks pass
/// them, and each stage on another number of threads (as on nodes of other sizes), gives the
/// single score's outcome: the same top-k columns in the same order, the same ranks, and values
/// within 1e-7 (the column sums are merged in another order).
#[test]
fn a_split_score_equals_the_whole_one() {
    use vtr_index::score::split;
    let on_threads = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let dim = 48;
    let (texts, videos, text_video) = synthetic(900, 300, dim, 21);
    let bank = texts[..200 * dim].to_vec();
    let problem = Problem { texts: &texts, videos: &videos, dim, text_video: &text_video, bank: Some(&bank) };
    for revision in REVISIONS {
        let options = ScoreOptions { revision, scale: 100.0, top_k: 10, strip_bytes: 1, ..ScoreOptions::default() };
        let whole = score(&problem, &options, None).unwrap();
        for parts in [1, 3, 7] {
            let blocks = split::blocks(&text_video, parts);
            let stats: Vec<split::BlockStats> = (0..parts)
                .map(|p| {
                    let out = on_threads(1 + p % 3).install(|| split::stats(&problem, &options, &blocks, p)).unwrap();
                    serde_json::from_str(&serde_json::to_string(&out).unwrap()).unwrap()
                })
                .collect();
            let ranks: Vec<split::BlockRanks> = (0..parts)
                .map(|p| {
                    let pool = on_threads(1 + (p + 1) % 3);
                    let out = pool.install(|| split::rank(&problem, &options, &blocks, p, &stats)).unwrap();
                    serde_json::from_str(&serde_json::to_string(&out).unwrap()).unwrap()
                })
                .collect();
            let joined = split::finish(&text_video, 300, ranks);
            assert_same_outcome(&joined, &whole, &format!("{} in {parts} blocks", revision.name()));
        }
    }
}

/// A score folder's ranks give its `metrics.json` (contract §5, computed here from the ranks
/// alone), every output of it carries the run id of its `run.json`, and that record names the
/// index's shards by their SHA-256s.
pub fn assert_ranks_give_the_metrics(out: &std::path::Path) {
    use arrow::array::AsArray;
    use arrow::datatypes::UInt32Type;
    let record = vtr_index::store::read_score_folder(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let ranks = |file: &str| -> Vec<Option<u32>> {
        crate::util::read_parquet(&out.join(file))
            .iter()
            .flat_map(|b| b.column_by_name("rank").unwrap().as_primitive::<UInt32Type>().iter().collect::<Vec<_>>())
            .collect()
    };
    let t2v: Vec<u32> = ranks("t2v_ranks.parquet").into_iter().flatten().collect();
    let v2t: Vec<u32> = ranks("v2t_ranks.parquet").into_iter().map(Option::unwrap).collect();
    assert_eq!(ranks("t2v_ranks.parquet").len(), record.n_texts, "a row for every text");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["run_id"], record.run_id.as_str());
    for (direction, ranks) in [("t2v", &t2v), ("v2t", &v2t)] {
        let n = ranks.len() as f64;
        let recall = |k: u32| 100.0 * ranks.iter().filter(|&&r| r <= k).count() as f64 / n;
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            f64::from(sorted[middle])
        } else {
            (f64::from(sorted[middle - 1]) + f64::from(sorted[middle])) / 2.0
        };
        let mean = ranks.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
        let m = &metrics[direction];
        assert_eq!(m["n"], ranks.len(), "{direction}");
        for (name, want) in [("r1", recall(1)), ("r5", recall(5)), ("r10", recall(10)), ("mdr", median), ("mnr", mean)]
        {
            let got = m[name].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{direction} {name}: {got} against {want} from the ranks"
            );
        }
    }
}
