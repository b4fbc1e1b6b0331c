//! One score split over many machines (contract §7): the texts cut into N blocks, each scored
//! by its own task in two stages, and a last step that joins them, with the outcome of a single
//! [`super::score`] (its sums merged in another order: values agree to the last bits).
//!
//! 1. [`stats`], per block: the block's column statistics (dual softmax), the statistics of
//!    its slice of the query bank (QB-Norm), each matched text's own cosine and top-1 column,
//!    and each row's statistics (the symmetric form).
//! 2. [`rank`], per block: every block's stage-1 output merged in block order (so the result
//!    does not depend on which task ran when), the block revised with those global statistics:
//!    its texts' top-k and T2V ranks, and for each video how many of the block's caption groups
//!    beat the video's own captions, wherever those are.
//! 3. [`finish`]: the blocks' top-k and T2V ranks, and their V2T counts summed.
//!
//! Blocks end on caption-group boundaries ([`blocks`]), so a video's captions never straddle
//! two; the bank is cut into N equal slices. Every stage output is plain data (`serde`; the
//! column statistics' f64 and f32 values by their bits, since JSON cannot hold the infinite
//! maximum of a column a block has no row of; finite values round-trip exactly through
//! `serde_json`'s `float_roundtrip`).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::column_stats::ColumnStats;
use super::engine::Engine;
use super::first_pass::gather_first_pass;
use super::kernels::{SoftmaxStats, f32_above, f32_below};
use super::reviser::Reviser;
use super::second_pass::{StripResults, Truths, second_pass};
use super::{Outcome, Problem, ScoreError, ScoreOptions, StripLayout, check, v2t_ranks};

/// The texts of each block, in the engine's order (grouped by video, unmatched texts last):
/// `parts` blocks of about equal size, each ending on a caption-group boundary. Fixed by
/// `text_video` and `parts` alone, so every task of a split score cuts the same blocks.
pub fn blocks(text_video: &[Option<u32>], parts: usize) -> Vec<Vec<usize>> {
    let layout = StripLayout::with_strip_rows(text_video, text_video.len().div_ceil(parts.max(1)).max(1));
    let mut blocks: Vec<Vec<usize>> = layout.strips.iter().map(|s| layout.order[s.clone()].to_vec()).collect();
    blocks.resize(parts.max(1), Vec::new());
    blocks
}

/// The rows of the bank that part `part` of `parts` takes.
fn bank_slice(bank_rows: usize, part: usize, parts: usize) -> Range<usize> {
    let per = bank_rows.div_ceil(parts.max(1));
    (part * per).min(bank_rows)..((part + 1) * per).min(bank_rows)
}

/// Column statistics as the first pass leaves them, before they are finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Columns {
    #[serde(with = "f64_bits")]
    max: Vec<f64>,
    #[serde(with = "f32_bits")]
    top: Vec<f32>,
    #[serde(with = "f64_bits")]
    sum: Vec<f64>,
}

impl Columns {
    fn of(stats: ColumnStats) -> Columns {
        Columns { max: stats.max, top: stats.top, sum: stats.sum }
    }

    fn stats(&self) -> ColumnStats {
        ColumnStats { max: self.max.clone(), top: self.top.clone(), sum: self.sum.clone() }
    }
}

/// Stage 1's output for one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockStats {
    /// The dual softmax's column statistics over the block's rows.
    pub columns: Option<Columns>,
    /// QB-Norm: the column statistics of the block's slice of the bank, and the columns that
    /// are one of its queries' top-1.
    pub bank: Option<(Columns, Vec<u32>)>,
    /// `(text, own cosine, top-1 column under QB-Norm)` of each matched text of the block.
    pub truths: Vec<(usize, f32, u32)>,
    /// The symmetric form: `(text, row max, row sum)` of each text of the block, by bits.
    pub row_stats: Vec<(usize, u64, u64)>,
}

/// Stage 2's output for one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRanks {
    /// `(text, its top-k as (column, score))`.
    pub top: Vec<(usize, Vec<(u32, f64)>)>,
    /// `(text, rank)` of each matched text of the block.
    pub t2v_ranks: Vec<(usize, u32)>,
    /// For each column, how many of the block's caption groups beat its own captions.
    pub beaten: Vec<u32>,
}

/// The block's texts' embeddings and videos, to score as a problem of their own.
fn block_rows(problem: &Problem, block: &[usize]) -> (Vec<f32>, Vec<Option<u32>>) {
    let dim = problem.dim;
    let rows = block.iter().flat_map(|&t| problem.texts[t * dim..(t + 1) * dim].iter().copied()).collect();
    (rows, block.iter().map(|&t| problem.text_video[t]).collect())
}

/// Stage 1 for block `part` of `blocks`.
pub fn stats(
    problem: &Problem,
    options: &ScoreOptions,
    blocks: &[Vec<usize>],
    part: usize,
) -> Result<BlockStats, ScoreError> {
    let (_, columns, bank) = check(problem, options)?;
    let block = &blocks[part];
    let (rows, text_video) = block_rows(problem, block);
    let sub = Problem { texts: &rows, videos: problem.videos, dim: problem.dim, text_video: &text_video, bank: None };
    // Stage 2 runs in another process: a strip kept for it would only take memory.
    let options = &ScoreOptions { cache_bytes: 0, ..options.clone() };
    let engine = Engine::new(&sub, options, columns);
    let pass = gather_first_pass(&engine);
    let text_at = |pos: usize| block[engine.layout.order[pos]];
    let bank = bank.map(|bank| {
        let rows = bank_slice(bank.len() / problem.dim, part, blocks.len());
        let (stats, active) = engine.bank_statistics(&bank[rows.start * problem.dim..rows.end * problem.dim]);
        let active = active.iter().enumerate().filter(|(_, a)| **a).map(|(c, _)| c as u32).collect();
        (Columns::of(stats), active)
    });
    Ok(BlockStats {
        columns: pass.stats.map(Columns::of),
        bank,
        truths: pass.truths.iter().map(|&(pos, s, top)| (text_at(pos), s, top)).collect(),
        row_stats: pass.row_stats.iter().map(|(pos, r)| (text_at(*pos), r.max.to_bits(), r.sum.to_bits())).collect(),
    })
}

/// Stage 2 for block `part`, from every block's stage 1 (`all`, in block order).
pub fn rank(
    problem: &Problem,
    options: &ScoreOptions,
    blocks: &[Vec<usize>],
    part: usize,
    all: &[BlockStats],
) -> Result<BlockRanks, ScoreError> {
    let (n, columns, _) = check(problem, options)?;
    if all.len() != blocks.len() {
        return Err(ScoreError::Invalid(format!("{} stage-1 outputs for {} blocks", all.len(), blocks.len())));
    }
    let mut reviser = Reviser::new(options);
    // Merged in block order: the same sums whichever task ran first.
    let merge = |parts: Vec<ColumnStats>| parts.into_iter().reduce(ColumnStats::merge);
    if let Some(stats) = merge(all.iter().filter_map(|b| b.columns.as_ref().map(Columns::stats)).collect()) {
        reviser.install_columns(stats);
    }
    if let Some(stats) = merge(all.iter().filter_map(|b| b.bank.as_ref().map(|(c, _)| c.stats())).collect()) {
        let mut active = vec![false; columns];
        for column in all.iter().filter_map(|b| b.bank.as_ref()).flat_map(|(_, a)| a) {
            active[*column as usize] = true;
        }
        reviser.install_bank(stats, active);
    }
    let mut row_of_text: Vec<Option<SoftmaxStats>> = vec![None; n];
    for &(text, max, sum) in all.iter().flat_map(|b| &b.row_stats) {
        row_of_text[text] = Some(SoftmaxStats { max: f64::from_bits(max), sum: f64::from_bits(sum) });
    }

    let block = &blocks[part];
    let (rows, text_video) = block_rows(problem, block);
    let sub = Problem { texts: &rows, videos: problem.videos, dim: problem.dim, text_video: &text_video, bank: None };
    let engine = Engine::new(&sub, options, columns);
    let text_at = |pos: usize| block[engine.layout.order[pos]];
    if options.revision.needs().row_stats {
        reviser.row_stats =
            (0..block.len()).map(|pos| row_of_text[text_at(pos)].unwrap_or(SoftmaxStats::EMPTY)).collect();
    }
    // Each text's own score (this block's), and each video's best own caption (any block's).
    let mut truth = Truths {
        t2v: vec![f64::INFINITY; block.len()],
        v2t: vec![f64::INFINITY; columns],
        v2t_below: Vec::new(),
        v2t_above: Vec::new(),
    };
    let mut seen = vec![false; columns];
    let position_of: std::collections::HashMap<usize, usize> =
        (0..block.len()).map(|pos| (text_at(pos), pos)).collect();
    for &(text, s, top) in all.iter().flat_map(|b| &b.truths) {
        let col = problem.text_video[text].expect("truths are of matched texts") as usize;
        let active = reviser.is_active(top);
        if let Some(&pos) = position_of.get(&text) {
            truth.t2v[pos] = reviser.t2v_value(s, col, active);
        }
        let v = reviser.v2t_value_in_row(s, col, row_of_text[text], active);
        truth.v2t[col] = if seen[col] { truth.v2t[col].max(v) } else { v };
        seen[col] = true;
    }
    truth.v2t_below = truth.v2t.iter().map(|&v| f32_below(v)).collect();
    truth.v2t_above = truth.v2t.iter().map(|&v| f32_above(v)).collect();
    let (beaten, results) = second_pass(&engine, &reviser, &truth, None)?;
    let mut ranks = BlockRanks { top: Vec::new(), t2v_ranks: Vec::new(), beaten };
    for StripResults { top, t2v_ranks } in results {
        ranks.top.extend(top.into_iter().map(|(local, items)| (block[local], items)));
        ranks.t2v_ranks.extend(t2v_ranks.into_iter().map(|(local, rank)| (block[local], rank)));
    }
    ranks.top.sort_unstable_by_key(|t| t.0);
    ranks.t2v_ranks.sort_unstable();
    Ok(ranks)
}

/// The outcome of the whole score from every block's stage 2 (`all`, in block order).
pub fn finish(text_video: &[Option<u32>], columns: usize, all: Vec<BlockRanks>) -> Outcome {
    let mut top = vec![Vec::new(); text_video.len()];
    let (mut t2v_ranks, mut beaten) = (Vec::new(), vec![0u32; columns]);
    for block in all {
        for (text, items) in block.top {
            top[text] = items;
        }
        t2v_ranks.extend(block.t2v_ranks);
        for (total, b) in beaten.iter_mut().zip(block.beaten) {
            *total += b;
        }
    }
    t2v_ranks.sort_unstable();
    Outcome { top, t2v_ranks, v2t_ranks: v2t_ranks(text_video, &beaten) }
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        values.iter().map(|v| v.to_bits()).collect::<Vec<u64>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(f64::from_bits).collect())
    }
}

mod f32_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<u32>::deserialize(d)?.into_iter().map(f32::from_bits).collect())
    }
}
