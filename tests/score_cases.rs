//! Scoring cases shared by the CPU tests (`score.rs`) and the GPU tests (`gpu.rs`, a binary of its
//! own): the fixture cases of `reference/score`, their reference metrics, a sink that collects
//! dense rows, and a deterministic synthetic corpus.

use std::sync::Mutex;

use vtr_index::score::{Metrics, Outcome, Problem, Revision, RowSink};

use crate::tolerance::*;
use crate::util::*;

pub struct Case {
    pub name: String,
    pub texts: Vec<f32>,
    pub videos: Vec<f32>,
    pub dim: usize,
    pub text_video: Vec<Option<u32>>,
    pub bank: Vec<f32>,
}

pub fn load_case(name: &str) -> Case {
    let dir = fixtures().join("reference/score");
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let (texts, shape) = read_npy(&dir.join(format!("{name}_texts.npy")));
    let (videos, _) = read_npy(&dir.join(format!("{name}_videos.npy")));
    let (text_video, _) = read_npy(&dir.join(format!("{name}_text_video.npy")));
    let (bank, _) = read_npy(&dir.join(format!("{name}_bank.npy")));
    Case {
        name: name.to_string(),
        texts: f32s(texts),
        videos: f32s(videos),
        dim: shape[1],
        text_video: text_video.into_iter().map(|c| Some(c as u32)).collect(),
        bank: f32s(bank),
    }
}

pub fn problem(case: &Case) -> Problem<'_> {
    Problem {
        texts: &case.texts,
        videos: &case.videos,
        dim: case.dim,
        text_video: &case.text_video,
        bank: Some(&case.bank),
    }
}

/// Collects the dense rows the engine hands out.
pub struct DenseRows {
    columns: usize,
    pub t2v: Mutex<Vec<f64>>,
    pub v2t: Mutex<Vec<f64>>,
}

impl DenseRows {
    pub fn new(rows: usize, columns: usize) -> DenseRows {
        DenseRows {
            columns,
            t2v: Mutex::new(vec![f64::NAN; rows * columns]),
            v2t: Mutex::new(vec![f64::NAN; rows * columns]),
        }
    }
}

impl RowSink for DenseRows {
    fn row(&self, text: usize, t2v: &[f64], v2t: &[f64]) -> std::io::Result<()> {
        let range = text * self.columns..(text + 1) * self.columns;
        self.t2v.lock().unwrap()[range.clone()].copy_from_slice(t2v);
        self.v2t.lock().unwrap()[range].copy_from_slice(v2t);
        Ok(())
    }
}

pub fn reference_metrics(case: &str, revision: Revision, direction: &str) -> Metrics {
    let text = std::fs::read_to_string(fixtures().join("reference/score/metrics.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = cases.as_array().unwrap().iter().find(|c| c["name"] == case).unwrap();
    serde_json::from_value(entry["results"][revision.name()][direction].clone()).unwrap()
}

pub fn assert_metrics_equal(got: Option<Metrics>, want: Metrics, what: &str) {
    let got = got.unwrap_or_else(|| panic!("{what}: no metrics"));
    let pairs = [(got.r1, want.r1), (got.r5, want.r5), (got.r10, want.r10), (got.mdr, want.mdr), (got.mnr, want.mnr)];
    for (g, w) in pairs {
        assert!((g - w).abs() <= METRICS_ABS, "{what}: got {got:?}, want {want:?}");
    }
    assert_eq!(got.n, want.n, "{what}");
}

/// A deterministic corpus with several captions per video, texts without a video, and
/// duplicated videos (exact ties, which must go to the lower column).
pub fn synthetic(texts: usize, videos: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Option<u32>>) {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
    };
    let normalise = |v: &mut [f32]| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
    };
    let mut video_matrix: Vec<f32> = (0..videos * dim).map(|_| next()).collect();
    video_matrix.chunks_mut(dim).for_each(normalise);
    for v in (0..videos).step_by(97).skip(1) {
        let (head, tail) = video_matrix.split_at_mut(v * dim);
        tail[..dim].copy_from_slice(&head[(v - 1) * dim..v * dim]);
    }
    let mut text_video = Vec::with_capacity(texts);
    let mut text_matrix = Vec::with_capacity(texts * dim);
    for t in 0..texts {
        let video = (t * 7 + t / 3) % videos;
        let mut e: Vec<f32> = (0..dim).map(|k| video_matrix[video * dim + k] + 1.5 * next()).collect();
        normalise(&mut e);
        text_matrix.extend(e);
        text_video.push(if t % 23 == 5 { None } else { Some(video as u32) });
    }
    (text_matrix, video_matrix, text_video)
}

/// Like [`synthetic`], but every entry is a multiple of 1/8 in [−3/8, 3/8] (not unit vectors):
/// each product and partial sum of a dot product is exact in f32, so every GEMM, on the CPU or
/// the GPU, gives the exact cosines, and a reference computed here in f64 starts from the same
/// matrix, its exponents equal to the engine's to the bit.
pub fn dyadic(texts: usize, videos: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Option<u32>>) {
    let (t, v, text_video) = synthetic(texts, videos, dim, seed);
    let snap = |x: f32| ((x * 8.0).round().clamp(-3.0, 3.0)) / 8.0;
    (t.into_iter().map(snap).collect(), v.into_iter().map(snap).collect(), text_video)
}

/// The cosines of every text with every video, in f64 (exact for [`dyadic`] embeddings).
pub fn cosines_f64(problem: &Problem) -> Vec<f64> {
    let dim = problem.dim;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
    problem.texts.chunks_exact(dim).flat_map(|t| problem.videos.chunks_exact(dim).map(move |v| dot(t, v))).collect()
}

/// `S ⊙ softmax(S · inv_tau)` of the logits `s` (rows × `columns`), written from contract §1 with
/// libm's `exp`: the softmax down each column (`over_texts`) or along each row, a weight whose
/// exponent is below −708 being 0 (the underflow rule).
pub fn dual_softmax_formula(s: &[f64], columns: usize, inv_tau: f64, over_texts: bool) -> Vec<f64> {
    let rows = s.len() / columns;
    let lines: Vec<Vec<usize>> = if over_texts {
        (0..columns).map(|v| (0..rows).map(|t| t * columns + v).collect()).collect()
    } else {
        (0..rows).map(|t| (0..columns).map(|v| t * columns + v).collect()).collect()
    };
    let mut out = vec![0.0; s.len()];
    for line in lines {
        let max = line.iter().map(|&i| s[i] * inv_tau).fold(f64::NEG_INFINITY, f64::max);
        let weight = |i: usize| {
            let exponent = s[i] * inv_tau - max;
            if exponent < -708.0 { 0.0 } else { exponent.exp() }
        };
        let sum: f64 = line.iter().map(|&i| weight(i)).sum();
        for &i in &line {
            out[i] = s[i] * weight(i) / sum;
        }
    }
    out
}

/// What contract §5 makes of dense matrices, by brute force: each text's top-k columns (ties to
/// the lower column), the T2V ranks `(text, rank)` and the V2T ranks `(video, rank)`.
pub struct ByDefinition {
    pub top: Vec<Vec<u32>>,
    pub t2v_ranks: Vec<(usize, u32)>,
    pub v2t_ranks: Vec<(u32, u32)>,
}

pub fn by_definition(t2v: &[f64], v2t: &[f64], text_video: &[Option<u32>], top_k: usize) -> ByDefinition {
    let columns = t2v.len() / text_video.len().max(1);
    let row = |m: &'_ [f64], t: usize| m[t * columns..(t + 1) * columns].to_vec();
    let mut out = ByDefinition { top: Vec::new(), t2v_ranks: Vec::new(), v2t_ranks: Vec::new() };
    for (t, video) in text_video.iter().enumerate() {
        let values = row(t2v, t);
        let mut order: Vec<usize> = (0..columns).collect();
        // −0 (a negative logit's underflowed value) ties with 0, as every comparison has it.
        order.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).expect("no NaN").then(a.cmp(&b)));
        out.top.push(order.iter().take(top_k).map(|&c| c as u32).collect());
        if let Some(v) = video {
            let own = values[*v as usize];
            out.t2v_ranks.push((t, 1 + values.iter().filter(|&&x| x > own).count() as u32));
        }
    }
    let groups: Vec<u32> = (0..columns as u32).filter(|g| text_video.contains(&Some(*g))).collect();
    for &video in &groups {
        let best = |g: u32| {
            (0..text_video.len())
                .filter(|&t| text_video[t] == Some(g))
                .map(|t| v2t[t * columns + video as usize])
                .fold(f64::NEG_INFINITY, f64::max)
        };
        let own = best(video);
        out.v2t_ranks.push((video, 1 + groups.iter().filter(|&&g| best(g) > own).count() as u32));
    }
    out
}

/// Contract §1's underflow case: exact cosines ([`dyadic`]) at scale 100 and τ = 0.01, where most
/// weights fall below e^−708 and are 0, tied; the engine's exponents equal the formula's to the
/// bit, so every value and every comparison must come out as the formula has them.
pub struct UnderflowCase {
    pub texts: Vec<f32>,
    pub videos: Vec<f32>,
    pub text_video: Vec<Option<u32>>,
    pub dim: usize,
    pub top_k: usize,
    pub scale: f64,
    pub temperature: f64,
}

/// The formula's dense matrices of one revision, and what the definitions make of them.
pub struct Expected {
    pub t2v: Vec<f64>,
    pub v2t: Vec<f64>,
    pub outcome: ByDefinition,
}

impl UnderflowCase {
    pub const TEXTS: usize = 240;
    pub const VIDEOS: usize = 70;

    pub fn new() -> UnderflowCase {
        let dim = 8;
        let (texts, videos, text_video) = dyadic(Self::TEXTS, Self::VIDEOS, dim, 9);
        UnderflowCase { texts, videos, text_video, dim, top_k: 12, scale: 100.0, temperature: 0.01 }
    }

    pub fn problem(&self) -> Problem<'_> {
        Problem { texts: &self.texts, videos: &self.videos, dim: self.dim, text_video: &self.text_video, bank: None }
    }

    pub fn expected(&self, revision: Revision) -> Expected {
        let logits: Vec<f64> = cosines_f64(&self.problem()).iter().map(|c| self.scale * c).collect();
        let inv_tau = 1.0 / self.temperature;
        let t2v = dual_softmax_formula(&logits, Self::VIDEOS, inv_tau, true);
        let v2t = match revision {
            Revision::DslSym => dual_softmax_formula(&logits, Self::VIDEOS, inv_tau, false),
            _ => t2v.clone(),
        };
        let outcome = by_definition(&t2v, &v2t, &self.text_video, self.top_k);
        Expected { t2v, v2t, outcome }
    }
}

impl Expected {
    /// The outcome's top-k columns and ranks are the definitions'.
    pub fn assert_outcome(&self, outcome: &Outcome, what: &str) {
        let top: Vec<Vec<u32>> = outcome.top.iter().map(|i| i.iter().map(|&(c, _)| c).collect()).collect();
        assert_eq!(top, self.outcome.top, "{what}: top-k");
        assert_eq!(outcome.t2v_ranks, self.outcome.t2v_ranks, "{what}: T2V ranks");
        assert_eq!(outcome.v2t_ranks, self.outcome.v2t_ranks, "{what}: V2T ranks");
    }

    /// Every dense value is the formula's: 0 exactly where it is 0, otherwise to 1e-12.
    pub fn assert_dense(&self, sink: &DenseRows, what: &str) {
        for (direction, got, want) in [("t2v", &sink.t2v, &self.t2v), ("v2t", &sink.v2t, &self.v2t)] {
            for (i, (g, w)) in got.lock().unwrap().iter().zip(want.iter()).enumerate() {
                let close = if *w == 0.0 { *g == 0.0 } else { (g - w).abs() <= 1e-12 * w.abs() };
                assert!(close, "{what} {direction}: element {i} is {g:e}, the formula gives {w:e}");
            }
        }
    }
}
