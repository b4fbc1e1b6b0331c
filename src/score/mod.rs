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

pub mod kernels;
pub mod metrics;
pub mod split;
pub mod topk;

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

pub use metrics::Metrics;

use kernels::{
    SoftmaxStats, argmax, count_greater, dual_softmax, dual_softmax_bounds, f32_above, f32_below, greater_on_bounds,
    inverted_softmax, strip_gemm,
};
use topk::TopK;

/// The matrix revision applied before ranking (contract §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Revision {
    /// The logits as they are.
    None,
    /// CAMoE's dual softmax: `S ⊙ softmax_over_texts(S/τ)`, one matrix for both directions.
    Dsl,
    /// CLIP2TV's symmetric form: the column prior for T2V, the row prior for V2T.
    DslSym,
    /// QB-Norm's dynamic inverted softmax with a query bank.
    Qbnorm,
}

impl Revision {
    pub fn name(self) -> &'static str {
        match self {
            Revision::None => "none",
            Revision::Dsl => "dsl",
            Revision::DslSym => "dsl-sym",
            Revision::Qbnorm => "qbnorm",
        }
    }
}

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
    /// On a GPU: the most device memory one block of cosines may take; 0 lets it take a quarter
    /// of the free memory (blocks smaller than the matrix cost a second GEMM per block).
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

/// Texts in strip order and the strips cut from them (the GPU path cuts its row blocks the
/// same way).
pub(crate) struct Layout {
    /// Position → text index: texts grouped by video column, unmatched texts last.
    pub(crate) order: Vec<usize>,
    /// Position → the column of the text's video.
    pub(crate) group: Vec<Option<u32>>,
    pub(crate) strips: Vec<Range<usize>>,
}

impl Layout {
    fn new(text_video: &[Option<u32>], columns: usize, strip_bytes: usize) -> Layout {
        Layout::with_strip_rows(text_video, (strip_bytes / (4 * columns.max(1))).clamp(8, 1024))
    }

    /// Strips of about `target` rows, each extended to the end of the caption group it cuts.
    pub(crate) fn with_strip_rows(text_video: &[Option<u32>], target: usize) -> Layout {
        let mut order: Vec<usize> = (0..text_video.len()).collect();
        order.sort_by_key(|&i| (text_video[i].map_or(u64::MAX, u64::from), i));
        let group: Vec<Option<u32>> = order.iter().map(|&i| text_video[i]).collect();
        let mut strips = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let mut end = (start + target.max(1)).min(order.len());
            while end < order.len() && group[end].is_some() && group[end] == group[end - 1] {
                end += 1;
            }
            strips.push(start..end);
            start = end;
        }
        Layout { order, group, strips }
    }

    pub(crate) fn starts_group(&self, pos: usize) -> bool {
        pos == 0 || self.group[pos - 1] != self.group[pos]
    }

    fn ends_group(&self, pos: usize) -> bool {
        pos + 1 == self.group.len() || self.group[pos + 1] != self.group[pos]
    }
}

/// Per-column softmax statistics, accumulated strip by strip.
#[derive(Clone)]
struct ColumnStats {
    /// Of `x = to_x(s)`, in f64: what the second pass subtracts.
    max: Vec<f64>,
    /// The matrix value `s` that gives `max` (`max = to_x(top)`).
    top: Vec<f32>,
    sum: Vec<f64>,
}

impl ColumnStats {
    fn new(columns: usize) -> ColumnStats {
        ColumnStats {
            max: vec![f64::NEG_INFINITY; columns],
            top: vec![f32::NEG_INFINITY; columns],
            sum: vec![0.0; columns],
        }
    }

    /// Adds the rows of one strip, given as `x = to_x(s)`: `s` times a positive factor (τ
    /// and scale, or β, folded in), computed in f64 exactly as the second pass computes it.
    #[inline(always)]
    fn add_strip(&mut self, strip: &[f32], columns: usize, to_x: impl Fn(f32) -> f64) {
        // `to_x` only multiplies by a positive factor, so it keeps the order: the column's
        // largest `x` is `to_x` of its largest `s`, found in f32 (8 lanes, no conversions).
        let mut strip_top = vec![f32::NEG_INFINITY; columns];
        for s in strip.chunks_exact(columns) {
            for (t, &v) in strip_top.iter_mut().zip(s) {
                *t = t.max(v);
            }
        }
        for (((old_max, top), sum), &new) in
            self.max.iter_mut().zip(self.top.iter_mut()).zip(self.sum.iter_mut()).zip(&strip_top)
        {
            if new > *top {
                let max = to_x(new);
                *sum *= kernels::exp(*old_max - max);
                (*old_max, *top) = (max, new);
            }
        }
        // Each term `exp(x − max) = exp(factor · (s − top))` in f32, summed in f64. Its error
        // (a few 1e-7 of the term, from rounding `s − top` and the factor) is far below the f32
        // GEMM's in the cosines, and a term past f32's range (x − max < −87) is below 1e-37 of
        // the sum, which holds 1 from the column's maximum.
        // Two rows' terms are added in f32 first (an error of 6e-8 of the pair, below the
        // terms' own), in a loop of f32 alone that runs on eight lanes: a loop that adds each
        // term to its f64 sum runs on the four lanes of an f64 vector, `exp` included.
        let factor = to_x(1.0) as f32;
        let term = |v: f32, top: f32| crate::simd::exp_f32(factor * (v - top));
        const COLUMN_CHUNK: usize = 1024; // 4 KiB of pair terms, which stay in L1
        let mut pair_terms = [0f32; COLUMN_CHUNK];
        let rows: Vec<&[f32]> = strip.chunks_exact(columns).collect();
        for pair in rows.chunks(2) {
            for start in (0..columns).step_by(COLUMN_CHUNK) {
                let cols = start..(start + COLUMN_CHUNK).min(columns);
                let (terms, tops) = (&mut pair_terms[..cols.len()], &self.top[cols.clone()]);
                match pair {
                    [a, b] => {
                        for ((t, (&x, &y)), &top) in
                            terms.iter_mut().zip(a[cols.clone()].iter().zip(&b[cols.clone()])).zip(tops)
                        {
                            *t = term(x, top) + term(y, top);
                        }
                    }
                    _ => {
                        for ((t, &x), &top) in terms.iter_mut().zip(&pair[0][cols.clone()]).zip(tops) {
                            *t = term(x, top);
                        }
                    }
                }
                for (sum, &t) in self.sum[cols].iter_mut().zip(terms.iter()) {
                    *sum += f64::from(t);
                }
            }
        }
    }

    fn merge(mut self, other: ColumnStats) -> ColumnStats {
        for j in 0..self.max.len() {
            let merged = SoftmaxStats { max: self.max[j], sum: self.sum[j] }
                .merge(SoftmaxStats { max: other.max[j], sum: other.sum[j] });
            (self.max[j], self.sum[j]) = (merged.max, merged.sum);
            self.top[j] = self.top[j].max(other.top[j]);
        }
        self
    }

    /// `(max, 1/sum, top)` per column.
    fn finish(self) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
        let inverse = self.sum.iter().map(|&s| 1.0 / s).collect();
        (self.max, inverse, self.top)
    }
}

/// What the second pass needs to revise any element: the revision and its statistics.
struct Reviser {
    revision: Revision,
    scale: f64,
    inv_tau: f64,
    beta: f64,
    /// Column statistics: of `S/τ` over texts (dual softmax), or of `β·cos` over the bank (QB-Norm).
    col_max: Vec<f64>,
    col_inv_sum: Vec<f64>,
    /// The dual softmax's column statistics in f32 for [`dual_softmax_bounds`]: the cosine
    /// whose `S/τ` is `col_max`, and `col_inv_sum`.
    col_top: Vec<f32>,
    col_inv_sum_f32: Vec<f32>,
    /// Row statistics of `S/τ` over videos, by position (symmetric dual softmax).
    row_stats: Vec<SoftmaxStats>,
    /// QB-Norm: the columns that are some bank query's top-1 (the activation set).
    active_columns: Vec<bool>,
}

impl Reviser {
    /// A reviser of `options`, its statistics still to be installed.
    fn new(options: &ScoreOptions) -> Reviser {
        Reviser {
            revision: options.revision,
            scale: options.scale,
            inv_tau: 1.0 / options.temperature,
            beta: options.beta,
            col_max: Vec::new(),
            col_inv_sum: Vec::new(),
            col_top: Vec::new(),
            col_inv_sum_f32: Vec::new(),
            row_stats: Vec::new(),
            active_columns: Vec::new(),
        }
    }

    /// Whether a QB-Norm row is revised: its own top-1 video is in the activation set.
    #[inline(always)]
    fn row_is_active(&self, s_row: &[f32]) -> bool {
        self.revision == Revision::Qbnorm && self.active_columns[argmax(s_row)]
    }

    /// [`Self::row_is_active`] of a row whose top-1 column is `top`.
    fn is_active(&self, top: u32) -> bool {
        self.revision == Revision::Qbnorm && self.active_columns[top as usize]
    }

    #[inline(always)]
    fn t2v_value(&self, s: f32, col: usize, active: bool) -> f64 {
        match self.revision {
            Revision::None => self.scale * s as f64,
            Revision::Dsl | Revision::DslSym => {
                dual_softmax(self.scale * s as f64, self.inv_tau, self.col_max[col], self.col_inv_sum[col])
            }
            Revision::Qbnorm if active => {
                inverted_softmax(s as f64, self.beta, self.col_max[col], self.col_inv_sum[col])
            }
            Revision::Qbnorm => s as f64,
        }
    }

    #[inline(always)]
    fn v2t_value(&self, s: f32, col: usize, pos: usize, active: bool) -> f64 {
        self.v2t_value_in_row(s, col, self.row_stats.get(pos).copied(), active)
    }

    /// [`Self::v2t_value`] with the row's statistics given (the symmetric form's).
    #[inline(always)]
    fn v2t_value_in_row(&self, s: f32, col: usize, row: Option<SoftmaxStats>, active: bool) -> f64 {
        match self.revision {
            Revision::DslSym => {
                let stats = row.expect("the symmetric form has row statistics");
                dual_softmax(self.scale * s as f64, self.inv_tau, stats.max, 1.0 / stats.sum)
            }
            _ => self.t2v_value(s, col, active),
        }
    }

    /// The T2V row; the loops are written per revision so that each vectorises, and each
    /// computes exactly [`Self::t2v_value`].
    #[inline(always)]
    fn t2v_row(&self, s_row: &[f32], active: bool, out: &mut [f64]) {
        let (scale, inv_tau, beta) = (self.scale, self.inv_tau, self.beta);
        match self.revision {
            Revision::None => kernels::logits(s_row, scale, out),
            Revision::Dsl | Revision::DslSym => {
                for (((o, &s), &m), &inv) in out.iter_mut().zip(s_row).zip(&self.col_max).zip(&self.col_inv_sum) {
                    *o = dual_softmax(scale * s as f64, inv_tau, m, inv);
                }
            }
            Revision::Qbnorm if active => {
                for (((o, &s), &m), &inv) in out.iter_mut().zip(s_row).zip(&self.col_max).zip(&self.col_inv_sum) {
                    *o = inverted_softmax(s as f64, beta, m, inv);
                }
            }
            Revision::Qbnorm => {
                for (o, &s) in out.iter_mut().zip(s_row) {
                    *o = s as f64;
                }
            }
        }
    }

    /// The symmetric form's V2T row (other revisions rank V2T on the T2V row).
    #[inline(always)]
    fn v2t_row(&self, s_row: &[f32], pos: usize, out: &mut [f64]) {
        let stats = self.row_stats[pos];
        let (scale, inv_tau, inv_sum) = (self.scale, self.inv_tau, 1.0 / stats.sum);
        for (o, &s) in out.iter_mut().zip(s_row) {
            *o = dual_softmax(scale * s as f64, inv_tau, stats.max, inv_sum);
        }
    }
}

/// What the first pass learns from one strip.
#[derive(Default)]
struct StripFacts {
    /// `(position, own logit's cosine, the row's top-1 column under QB-Norm, else 0)` for rows
    /// with a video.
    truths: Vec<(usize, f32, u32)>,
    /// `(position, row statistics)`, for the symmetric form.
    row_stats: Vec<(usize, SoftmaxStats)>,
}

/// What the second pass produces from one strip.
struct StripResults {
    top: Vec<(usize, Vec<(u32, f64)>)>,
    t2v_ranks: Vec<(usize, u32)>,
}

/// Per-thread state of the second pass.
struct PassTwoState {
    /// For each column, how many caption groups beat the column's own captions.
    v2t_beaten: Vec<u32>,
    group_max: Vec<f64>,
    t2v: Vec<f64>,
    v2t: Vec<f64>,
    /// Bounds of the row's revised values ([`dual_softmax_bounds`]), and of its V2T values
    /// in the symmetric form.
    lower: Vec<f32>,
    upper: Vec<f32>,
    v2t_lower: Vec<f32>,
    v2t_upper: Vec<f32>,
    /// For each column, whether a caption of the current group beats the column's own.
    beats_own: Vec<u8>,
    results: Vec<StripResults>,
}

struct Engine<'a> {
    problem: &'a Problem<'a>,
    options: &'a ScoreOptions,
    layout: Layout,
    columns: usize,
    cache: Vec<Mutex<Option<Vec<f32>>>>,
    cached_bytes: AtomicUsize,
}

impl<'a> Engine<'a> {
    /// The engine of `problem` (`columns` videos), its strips cut from `options.strip_bytes`.
    fn new(problem: &'a Problem<'a>, options: &'a ScoreOptions, columns: usize) -> Engine<'a> {
        let layout = Layout::new(problem.text_video, columns, options.strip_bytes);
        Engine {
            problem,
            options,
            cache: (0..layout.strips.len()).map(|_| Mutex::new(None)).collect(),
            layout,
            columns,
            cached_bytes: AtomicUsize::new(0),
        }
    }
}

impl Engine<'_> {
    /// The cosines of one strip's rows against every video.
    fn compute_strip(&self, range: &Range<usize>) -> Vec<f32> {
        let dim = self.problem.dim;
        let mut rows = Vec::with_capacity(range.len() * dim);
        for &text in &self.layout.order[range.clone()] {
            rows.extend_from_slice(&self.problem.texts[text * dim..(text + 1) * dim]);
        }
        let mut out = vec![0f32; range.len() * self.columns];
        strip_gemm(&rows, self.problem.videos, dim, &mut out);
        out
    }

    fn keep_if_room(&self, strip_index: usize, strip: Vec<f32>) {
        let bytes = strip.len() * 4;
        if self.cached_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.options.cache_bytes {
            *self.cache[strip_index].lock().expect("cache lock") = Some(strip);
        } else {
            self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    fn strip(&self, strip_index: usize) -> Vec<f32> {
        let cached = self.cache[strip_index].lock().expect("cache lock").take();
        cached.unwrap_or_else(|| self.compute_strip(&self.layout.strips[strip_index]))
    }

    /// QB-Norm's bank statistics: the column statistics of `β·cos` and the activation set.
    fn bank_statistics(&self, bank: &[f32]) -> (ColumnStats, Vec<bool>) {
        let (dim, columns, beta) = (self.problem.dim, self.columns, self.options.beta);
        let rows_per_strip = (self.options.strip_bytes / (4 * columns.max(1))).clamp(8, 1024);
        let bank_strips: Vec<&[f32]> = bank.chunks(rows_per_strip * dim).collect();
        let (stats, active) = in_fixed_order(
            bank_strips.len(),
            &|strips| {
                let (mut stats, mut active) = (ColumnStats::new(columns), vec![false; columns]);
                for rows in &bank_strips[strips] {
                    let mut strip = vec![0f32; rows.len() / dim * columns];
                    strip_gemm(rows, self.problem.videos, dim, &mut strip);
                    for s_row in strip.chunks_exact(columns) {
                        active[argmax(s_row)] = true;
                    }
                    crate::simd::with_wide_vectors(
                        #[inline(always)]
                        || stats.add_strip(&strip, columns, |c| beta * c as f64),
                    );
                }
                (stats, active)
            },
            &|(a, mut active_a): (ColumnStats, Vec<bool>), (b, active_b)| {
                for (x, y) in active_a.iter_mut().zip(active_b) {
                    *x |= y;
                }
                (a.merge(b), active_a)
            },
        );
        (stats, active)
    }
}

/// Strips one leaf of [`in_fixed_order`] takes in turn. One, so that the threads share the
/// last strips evenly; a thread holds one leaf's result per level of the tree it waits on
/// (log2 of the strips: 22 column statistics of 2 MB each at 100,000 videos on 2 threads).
const STRIPS_PER_LEAF: usize = 1;

/// Runs `leaf` over consecutive ranges of `0..count` in parallel and merges the results in a
/// binary tree fixed by `count` alone. Column sums merged this way are added in the same order
/// whatever the number of threads or the scheduling, so a score gives the same bits on every
/// run (rayon's `fold`/`reduce` merges in the order work happens to be stolen).
fn in_fixed_order<T: Send>(
    count: usize,
    leaf: &(impl Fn(Range<usize>) -> T + Sync),
    merge: &(impl Fn(T, T) -> T + Sync),
) -> T {
    let leaves = count.div_ceil(STRIPS_PER_LEAF).max(1);
    fn tree<T: Send>(
        leaves: Range<usize>,
        count: usize,
        leaf: &(impl Fn(Range<usize>) -> T + Sync),
        merge: &(impl Fn(T, T) -> T + Sync),
    ) -> T {
        if leaves.len() == 1 {
            let first = leaves.start * STRIPS_PER_LEAF;
            return leaf(first.min(count)..(first + STRIPS_PER_LEAF).min(count));
        }
        let middle = leaves.start + leaves.len() / 2;
        let (a, b) = rayon::join(
            || tree(leaves.start..middle, count, leaf, merge),
            || tree(middle..leaves.end, count, leaf, merge),
        );
        merge(a, b)
    }
    tree(0..leaves, count, leaf, merge)
}

/// Each matched text's own revised score (by position, T2V) and each video's best own caption
/// (V2T): what a row's values are ranked against.
struct Truths {
    t2v: Vec<f64>,
    v2t: Vec<f64>,
    /// `v2t` rounded to f32 downwards and upwards, for comparisons with f32 bounds.
    v2t_below: Vec<f32>,
    v2t_above: Vec<f32>,
}

/// The second pass over one strip: revise each row, keep its top-k, count its T2V rank, and
/// fold its caption group into the count of groups that beat each video's own.
#[inline(always)]
fn second_pass_strip(
    engine: &Engine,
    reviser: &Reviser,
    st: &mut PassTwoState,
    range: Range<usize>,
    strip: &[f32],
    truth: &Truths,
    sink: Option<&dyn RowSink>,
) -> Result<StripResults, std::io::Error> {
    let columns = engine.columns;
    let top_k = engine.options.top_k.min(columns);
    let symmetric = reviser.revision == Revision::DslSym;
    let mut results = StripResults { top: Vec::with_capacity(range.len()), t2v_ranks: Vec::new() };
    // Without `--dense` no row needs all its f64 values, only comparisons: dual softmax rows
    // are decided on f32 bounds.
    let bounded = sink.is_none() && matches!(reviser.revision, Revision::Dsl | Revision::DslSym);
    for (pos, s_row) in range.zip(strip.chunks_exact(columns)) {
        if bounded {
            dual_softmax_row_on_bounds(engine, reviser, st, pos, s_row, truth, &mut results);
            continue;
        }
        let active = reviser.row_is_active(s_row);
        reviser.t2v_row(s_row, active, &mut st.t2v);
        let mut top = TopK::new(top_k);
        top.scan(&st.t2v, 0);
        results.top.push((engine.layout.order[pos], top.into_sorted()));
        if symmetric {
            reviser.v2t_row(s_row, pos, &mut st.v2t);
        }
        let v2t = if symmetric { &st.v2t } else { &st.t2v };
        if let Some(sink) = sink {
            sink.row(engine.layout.order[pos], &st.t2v, v2t)?;
        }
        if engine.layout.group[pos].is_none() {
            continue;
        }
        results.t2v_ranks.push((engine.layout.order[pos], 1 + count_greater(&st.t2v, truth.t2v[pos])));
        if engine.layout.starts_group(pos) {
            st.group_max.copy_from_slice(v2t);
        } else {
            for (g, &v) in st.group_max.iter_mut().zip(v2t) {
                *g = g.max(v);
            }
        }
        if engine.layout.ends_group(pos) {
            for ((beaten, &g), &own) in st.v2t_beaten.iter_mut().zip(&st.group_max).zip(&truth.v2t) {
                *beaten += u32::from(g > own);
            }
        }
    }
    Ok(results)
}

/// The second pass over one dual softmax row with the same top-k, rank and V2T counts as the
/// f64 row, computing f64 values only where their f32 bounds cannot decide: the columns that
/// might enter the top-k, and those whose bounds straddle the value compared with.
#[inline(always)]
fn dual_softmax_row_on_bounds(
    engine: &Engine,
    reviser: &Reviser,
    st: &mut PassTwoState,
    pos: usize,
    s_row: &[f32],
    truth: &Truths,
    results: &mut StripResults,
) {
    let (scale, factor) = (reviser.scale as f32, (reviser.scale * reviser.inv_tau) as f32);
    for ((((lower, upper), &s), &top), &inv_sum) in
        st.lower.iter_mut().zip(st.upper.iter_mut()).zip(s_row).zip(&reviser.col_top).zip(&reviser.col_inv_sum_f32)
    {
        (*lower, *upper) = dual_softmax_bounds(s, scale, factor, top, inv_sum);
    }
    let exact = |col: usize| reviser.t2v_value(s_row[col], col, false);
    let mut top = TopK::new(engine.options.top_k.min(engine.columns));
    top.scan_bounded(&st.upper, 0, exact);
    results.top.push((engine.layout.order[pos], top.into_sorted()));
    let Some(own_column) = engine.layout.group[pos].map(|c| c as usize) else {
        return;
    };

    // T2V: the columns above the row's own value. The own column always straddles it.
    let own = truth.t2v[pos];
    let (below, above) = (f32_below(own), f32_above(own));
    let (mut greater, mut straddling) = (0u32, 0u32);
    for (&lower, &upper) in st.lower.iter().zip(&st.upper) {
        let decided = greater_on_bounds(lower, upper, below, above);
        greater += u32::from(decided == Some(true));
        straddling += u32::from(decided.is_none());
    }
    let straddles = |bounds: (&[f32], &[f32]), col: usize, below: f32, above: f32| {
        greater_on_bounds(bounds.0[col], bounds.1[col], below, above).is_none()
    };
    let t2v_bounds = (&st.lower[..], &st.upper[..]);
    let columns_to_decide = if straddling > u32::from(straddles(t2v_bounds, own_column, below, above)) {
        0..engine.columns
    } else {
        own_column..own_column + 1
    };
    greater +=
        columns_to_decide.filter(|&col| straddles(t2v_bounds, col, below, above) && exact(col) > own).count() as u32;
    results.t2v_ranks.push((engine.layout.order[pos], 1 + greater));

    // V2T: whether some caption of this group beats each column's own best caption, on the
    // T2V values or, for the symmetric form, on the row's own softmax.
    let v2t_bounds = if reviser.revision == Revision::DslSym {
        let stats = reviser.row_stats[pos];
        // The cosine whose `S/τ` is the row's maximum: `to_x` keeps the order.
        let row_top = s_row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let inv_sum = (1.0 / stats.sum) as f32;
        for ((lower, upper), &s) in st.v2t_lower.iter_mut().zip(st.v2t_upper.iter_mut()).zip(s_row) {
            (*lower, *upper) = dual_softmax_bounds(s, scale, factor, row_top, inv_sum);
        }
        (&st.v2t_lower[..], &st.v2t_upper[..])
    } else {
        (&st.lower[..], &st.upper[..])
    };
    let exact = |col: usize| reviser.v2t_value(s_row[col], col, pos, false);
    if engine.layout.starts_group(pos) {
        st.beats_own.fill(0);
    }
    let mut straddling = 0u32;
    for ((((beats, &lower), &upper), &below), &above) in
        st.beats_own.iter_mut().zip(v2t_bounds.0).zip(v2t_bounds.1).zip(&truth.v2t_below).zip(&truth.v2t_above)
    {
        let decided = greater_on_bounds(lower, upper, below, above);
        *beats |= u8::from(decided == Some(true));
        straddling += u32::from(decided.is_none());
    }
    let v2t_straddles = |col: usize| straddles(v2t_bounds, col, truth.v2t_below[col], truth.v2t_above[col]);
    let columns_to_decide =
        if straddling > u32::from(v2t_straddles(own_column)) { 0..engine.columns } else { own_column..own_column + 1 };
    for col in columns_to_decide {
        if st.beats_own[col] == 0 && v2t_straddles(col) && exact(col) > truth.v2t[col] {
            st.beats_own[col] = 1;
        }
    }
    if engine.layout.ends_group(pos) {
        for (beaten, &beats) in st.v2t_beaten.iter_mut().zip(&st.beats_own) {
            *beaten += u32::from(beats);
        }
    }
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
    let bank = match (options.revision, problem.bank) {
        (Revision::Qbnorm, Some(bank)) if !bank.is_empty() && bank.len() % dim == 0 => Some(bank),
        (Revision::Qbnorm, _) => return Err(ScoreError::Invalid("QB-Norm needs a non-empty query bank".into())),
        _ => None,
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

/// What the first pass learns of a problem's rows, before any of it is installed in a
/// [`Reviser`]: the dual softmax's column statistics, the symmetric form's row statistics by
/// position, and each matched row's `(position, own cosine, top-1 column under QB-Norm)`, in
/// row order.
struct FirstPass {
    stats: Option<ColumnStats>,
    row_stats: Vec<(usize, SoftmaxStats)>,
    truths: Vec<(usize, f32, u32)>,
}

/// The first pass, when anything needs the whole matrix first (for a split score, one block's
/// rows: `split`).
fn gather_first_pass(engine: &Engine) -> FirstPass {
    let (options, columns) = (engine.options, engine.columns);
    let needs_column_stats = matches!(options.revision, Revision::Dsl | Revision::DslSym);
    let symmetric = options.revision == Revision::DslSym;
    let needs_top = options.revision == Revision::Qbnorm;
    let has_matches = engine.layout.group.iter().any(Option::is_some);
    if !(needs_column_stats || has_matches) {
        return FirstPass { stats: None, row_stats: Vec::new(), truths: Vec::new() };
    }
    let (scale, inv_tau) = (options.scale, 1.0 / options.temperature);
    let (stats, facts) = in_fixed_order(
        engine.layout.strips.len(),
        &|strips| {
            let mut stats = needs_column_stats.then(|| ColumnStats::new(columns));
            let (mut facts, mut row) = (Vec::new(), vec![0f64; if symmetric { columns } else { 0 }]);
            for index in strips {
                let range = engine.layout.strips[index].clone();
                let strip = engine.compute_strip(&range);
                let strip_facts = crate::simd::with_wide_vectors(
                    #[inline(always)]
                    || {
                        if let Some(stats) = stats.as_mut() {
                            stats.add_strip(&strip, columns, |s| scale * s as f64 * inv_tau);
                        }
                        let mut strip_facts = StripFacts::default();
                        for (pos, s_row) in range.zip(strip.chunks_exact(columns)) {
                            if symmetric {
                                kernels::logits(s_row, scale, &mut row);
                                strip_facts.row_stats.push((pos, kernels::row_stats(&row, inv_tau)));
                            }
                            if let Some(col) = engine.layout.group[pos] {
                                let top = if needs_top { argmax(s_row) as u32 } else { 0 };
                                strip_facts.truths.push((pos, s_row[col as usize], top));
                            }
                        }
                        strip_facts
                    },
                );
                facts.push(strip_facts);
                engine.keep_if_room(index, strip);
            }
            (stats, facts)
        },
        &|(a, mut fa): (Option<ColumnStats>, Vec<StripFacts>), (b, fb)| {
            fa.extend(fb);
            (a.zip(b).map(|(a, b)| a.merge(b)), fa)
        },
    );
    let mut pass = FirstPass { stats, row_stats: Vec::new(), truths: Vec::new() };
    for f in facts {
        pass.row_stats.extend(f.row_stats);
        pass.truths.extend(f.truths);
    }
    pass.truths.sort_unstable_by_key(|t| t.0);
    pass
}

/// The first pass of a whole score: its statistics installed in `reviser`; returns the truths.
fn first_pass(engine: &Engine, reviser: &mut Reviser, n: usize) -> Vec<(usize, f32, u32)> {
    let pass = gather_first_pass(engine);
    if let Some(stats) = pass.stats {
        reviser.install_columns(stats);
    }
    if engine.options.revision == Revision::DslSym {
        reviser.row_stats = vec![SoftmaxStats::EMPTY; n];
        for (pos, stats) in pass.row_stats {
            reviser.row_stats[pos] = stats;
        }
    }
    pass.truths
}

impl Reviser {
    /// Installs the dual softmax's column statistics.
    fn install_columns(&mut self, stats: ColumnStats) {
        (self.col_max, self.col_inv_sum, self.col_top) = stats.finish();
        self.col_inv_sum_f32 = self.col_inv_sum.iter().map(|&inv| inv as f32).collect();
    }

    /// Installs QB-Norm's bank statistics and activation set.
    fn install_bank(&mut self, stats: ColumnStats, active: Vec<bool>) {
        (self.col_max, self.col_inv_sum, _) = stats.finish();
        self.active_columns = active;
    }
}

/// Each matched text's own revised score, and each video's best own caption for V2T.
fn own_scores(engine: &Engine, reviser: &Reviser, truths: &[(usize, f32, u32)], n: usize) -> Truths {
    let columns = engine.columns;
    let mut truth = Truths {
        t2v: vec![f64::INFINITY; n],
        v2t: vec![f64::INFINITY; columns],
        v2t_below: Vec::new(),
        v2t_above: Vec::new(),
    };
    for &(pos, s, top) in truths {
        let active = reviser.is_active(top);
        let col = engine.layout.group[pos].expect("truths are matched rows") as usize;
        truth.t2v[pos] = reviser.t2v_value(s, col, active);
        let v = reviser.v2t_value(s, col, pos, active);
        truth.v2t[col] = if engine.layout.starts_group(pos) { v } else { truth.v2t[col].max(v) };
    }
    truth.v2t_below = truth.v2t.iter().map(|&v| f32_below(v)).collect();
    truth.v2t_above = truth.v2t.iter().map(|&v| f32_above(v)).collect();
    truth
}

/// The second pass: revise, rank, keep the top-k, count the groups that beat each video's
/// own. Returns those counts per column and each strip's results.
fn second_pass(
    engine: &Engine,
    reviser: &Reviser,
    truth: &Truths,
    sink: Option<&dyn RowSink>,
) -> Result<(Vec<u32>, Vec<StripResults>), std::io::Error> {
    let columns = engine.columns;
    let symmetric = engine.options.revision == Revision::DslSym;
    (0..engine.layout.strips.len())
        .into_par_iter()
        .try_fold(
            || PassTwoState {
                v2t_beaten: vec![0; columns],
                group_max: vec![0.0; columns],
                t2v: vec![0.0; columns],
                v2t: vec![0.0; columns],
                lower: vec![0.0; columns],
                upper: vec![0.0; columns],
                v2t_lower: vec![0.0; if symmetric { columns } else { 0 }],
                v2t_upper: vec![0.0; if symmetric { columns } else { 0 }],
                beats_own: vec![0; columns],
                results: Vec::new(),
            },
            |mut st, index| -> Result<PassTwoState, std::io::Error> {
                let range = engine.layout.strips[index].clone();
                let strip = engine.strip(index);
                let results = crate::simd::with_wide_vectors(
                    #[inline(always)]
                    || second_pass_strip(engine, reviser, &mut st, range, &strip, truth, sink),
                )?;
                st.results.push(results);
                Ok(st)
            },
        )
        .map(|st| st.map(|st| (st.v2t_beaten, st.results)))
        .try_reduce(
            || (vec![0; columns], Vec::new()),
            |(mut beaten, mut results), (other_beaten, other_results)| {
                for (a, b) in beaten.iter_mut().zip(other_beaten) {
                    *a += b;
                }
                results.extend(other_results);
                Ok((beaten, results))
            },
        )
}
