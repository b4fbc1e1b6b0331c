//! Scoring cases shared by the CPU tests (`score.rs`) and the GPU tests (`gpu.rs`, a binary of its
//! own): the fixture cases of `reference/score`, their reference metrics, a sink that collects
//! dense rows, and a deterministic synthetic corpus.

use std::sync::Mutex;

use vtr_index::score::{Metrics, Problem, Revision, RowSink};

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
