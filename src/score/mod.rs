//! Scoring: text × video logits, their revision (none, CAMoE's dual softmax, CLIP2TV's
//! symmetric form, QB-Norm), each text's top-k and the ranks behind the metrics (contract §1, §5).
//!
//! The full N × M matrix is never required. Texts are cut into strips of rows whose logits
//! are one GEMM each. A first pass over the strips gathers what the revision needs from the
//! whole matrix (column softmax statistics, each text's own score); a second pass revises each
//! strip, keeps each row's top-k, counts each row's rank and, for video-to-text, the caption
//! groups that beat each video's own. Strips are recomputed in the second pass unless the
//! first pass could keep them within the cache budget, so a matrix that fits in memory costs
//! one GEMM and one that does not costs two, with memory bounded by the strip size.
//! Without `--dense`, the second pass of the dual softmax decides each comparison (top-k bar,
//! T2V rank, V2T groups) on f32 bounds of the revised value, and computes the f64 value only
//! for the few the bounds leave open, with the same results bit for bit.
//!
//! Texts are ordered by their video before cutting strips, and strips end on group
//! boundaries, so all captions of a video sit in one strip: V2T scores a video against each
//! caption group by the group's best caption, which one strip can then compute alone.

mod column_stats;
mod engine;
mod first_pass;
pub mod kernels;
pub mod metrics;
mod reviser;
mod revision;
mod second_pass;
pub mod split;
mod strip_layout;
pub mod topk;

pub use metrics::Metrics;
pub use revision::{Needs, Revision};
pub(crate) use strip_layout::StripLayout;

use engine::Engine;
use first_pass::first_pass;
use reviser::Reviser;
use second_pass::{own_scores, second_pass};

/// What a GPU multiplies (`--gpu-inputs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceInputs {
    /// The f32 embeddings: the cosines are those of the CPU path up to summation order, and the
    /// matrix is stored on the device in row blocks.
    #[default]
    F32,
    /// f16 embeddings on the tensor cores, accumulated in f32, with each tile of the matrix
    /// consumed where it is computed: never stored, so device memory grows only with N + M.
    F16,
}

/// Embeddings to score: row-major, L2-normalised, `dim` wide.
pub struct Problem<'a> {
    pub texts: &'a [f32],
    pub videos: &'a [f32],
    pub dim: usize,
    /// For each text, the column of its video, if that video is in the index.
    pub text_video: &'a [Option<u32>],
    /// The query bank, for QB-Norm.
    pub bank: Option<&'a [f32]>,
}

#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub revision: Revision,
    /// The logit multiplier, `exp(logit_scale)`.
    pub scale: f64,
    /// τ of the dual softmax, on logits.
    pub temperature: f64,
    /// β of QB-Norm, on cosines.
    pub beta: f64,
    pub top_k: usize,
    /// Strips the first pass may keep for the second instead of recomputing them.
    pub cache_bytes: usize,
    /// The size of one strip of logits (f32): the unit of work and of memory per thread.
    pub strip_bytes: usize,
    /// On a GPU: the most device memory one block of cosines may take; 0 sizes the blocks to
    /// the free memory once everything else the score allocates is counted (blocks smaller than
    /// the matrix cost a second GEMM per block).
    pub device_block_bytes: usize,
    /// On a GPU: what the matrix product takes.
    pub device_inputs: DeviceInputs,
}

/// The defaults of `score`, here once for the command line and for [`ScoreOptions::default`].
pub const DEFAULT_REVISION: Revision = Revision::None;
pub const DEFAULT_TEMPERATURE: f64 = 1.0;
pub const DEFAULT_BETA: f64 = 20.0;
pub const DEFAULT_TOP_K: usize = 10;
pub const DEFAULT_CACHE_MIB: usize = 1024;
pub const DEFAULT_DEVICE_INPUTS: DeviceInputs = DeviceInputs::F32;

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            revision: DEFAULT_REVISION,
            scale: 100.0,
            temperature: DEFAULT_TEMPERATURE,
            beta: DEFAULT_BETA,
            top_k: DEFAULT_TOP_K,
            cache_bytes: DEFAULT_CACHE_MIB << 20,
            strip_bytes: 32 << 20,
            device_block_bytes: 0,
            device_inputs: DEFAULT_DEVICE_INPUTS,
        }
    }
}

/// Receives every revised row (T2V and V2T values, texts × videos orientation) for `--dense`.
pub trait RowSink: Sync {
    fn row(&self, text: usize, t2v: &[f64], v2t: &[f64]) -> std::io::Result<()>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// For each text, in input order: `(column, score)`, best first.
    pub top: Vec<Vec<(u32, f64)>>,
    /// `(text, rank)` for each text whose video is a column, in text order.
    pub t2v_ranks: Vec<(usize, u32)>,
    /// `(column, rank)` for each video with at least one text, in column order.
    pub v2t_ranks: Vec<(u32, u32)>,
}

impl Outcome {
    pub fn t2v_metrics(&self) -> Option<Metrics> {
        Metrics::from_ranks(&self.t2v_ranks.iter().map(|&(_, r)| r).collect::<Vec<_>>())
    }

    pub fn v2t_metrics(&self) -> Option<Metrics> {
        Metrics::from_ranks(&self.v2t_ranks.iter().map(|&(_, r)| r).collect::<Vec<_>>())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write the dense matrices: {0}")]
    Dense(#[from] std::io::Error),
}

/// The cosine of two L2-normalised embeddings, summed in f64: what `search` ranks a video's
/// frames by.
pub fn cosine_of_unit_vectors(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// `x > 0`, false for NaN.
pub fn is_positive(x: f64) -> bool {
    x > 0.0
}

/// Checks a problem against its options: `(texts, videos, the bank QB-Norm uses)`.
pub(crate) fn check<'a>(
    problem: &Problem<'a>,
    options: &ScoreOptions,
) -> Result<(usize, usize, Option<&'a [f32]>), ScoreError> {
    let dim = problem.dim;
    if dim == 0 || !problem.texts.len().is_multiple_of(dim) || !problem.videos.len().is_multiple_of(dim) {
        return Err(ScoreError::Invalid(format!("embeddings are not rows of width {dim}")));
    }
    let (n, columns) = (problem.texts.len() / dim, problem.videos.len() / dim);
    if problem.text_video.len() != n || problem.text_video.iter().flatten().any(|&c| c as usize >= columns) {
        return Err(ScoreError::Invalid("each text needs one entry in text_video, a column or none".into()));
    }
    if ![options.temperature, options.scale, options.beta].into_iter().all(is_positive) {
        return Err(ScoreError::Invalid("the scale, temperature and beta must be positive".into()));
    }
    // The column sums and the second pass's brackets fold the factors into one f32 each.
    let factors = [options.scale, options.scale * (1.0 / options.temperature), options.beta];
    if !factors.into_iter().all(|f| (f as f32).is_finite()) {
        return Err(ScoreError::Invalid(format!(
            "the scale ({:e}), scale / temperature ({:e}) and beta ({:e}) must be within f32's range (3.4e38)",
            factors[0], factors[1], factors[2]
        )));
    }
    let bank = match (options.revision.needs().bank, problem.bank) {
        (true, Some(bank)) if !bank.is_empty() && bank.len() % dim == 0 => Some(bank),
        (true, _) => {
            let name = options.revision.name();
            return Err(ScoreError::Invalid(format!("--revise {name} needs a non-empty query bank")));
        }
        (false, _) => None,
    };
    Ok((n, columns, bank))
}

/// `(column, rank)` for each video with at least one text: one more than the caption groups
/// that beat its own.
pub(crate) fn v2t_ranks(group: &[Option<u32>], beaten: &[u32]) -> Vec<(u32, u32)> {
    let mut has_texts = vec![false; beaten.len()];
    for col in group.iter().flatten() {
        has_texts[*col as usize] = true;
    }
    (0..beaten.len()).filter(|&c| has_texts[c]).map(|c| (c as u32, 1 + beaten[c])).collect()
}

/// Scores every text against every video. `sink` receives every revised row (`--dense`).
pub fn score(problem: &Problem, options: &ScoreOptions, sink: Option<&dyn RowSink>) -> Result<Outcome, ScoreError> {
    let (n, columns, bank) = check(problem, options)?;
    let engine = Engine::new(problem, options, columns);
    let mut reviser = Reviser::new(options);
    if let Some(bank) = bank {
        let (stats, active) = engine.bank_statistics(bank);
        reviser.install_bank(stats, active);
    }
    let truths = first_pass(&engine, &mut reviser, n);
    let truth = own_scores(&engine, &reviser, &truths, n);
    let (beaten, results) = second_pass(&engine, &reviser, &truth, sink)?;

    let mut top = vec![Vec::new(); n];
    let mut t2v_ranks = Vec::new();
    for strip in results {
        for (text, items) in strip.top {
            top[text] = items;
        }
        t2v_ranks.extend(strip.t2v_ranks);
    }
    t2v_ranks.sort_unstable();
    Ok(Outcome { top, t2v_ranks, v2t_ranks: v2t_ranks(&engine.layout.group, &beaten) })
}
