//! The first pass over the strips: what a revision needs from the whole matrix before any row
//! can be revised (column and row softmax statistics, each matched text's own cosine and, for
//! QB-Norm, its row's top-1 column).

use super::column_stats::ColumnStats;
use super::engine::{Engine, in_fixed_order};
use super::kernels::{self, SoftmaxStats, argmax};
use super::reviser::Reviser;

/// What the first pass learns from one strip.
#[derive(Default)]
pub(super) struct StripFacts {
    /// `(position, own logit's cosine, the row's top-1 column under QB-Norm, else 0)` for rows
    /// with a video.
    pub(super) truths: Vec<(usize, f32, u32)>,
    /// `(position, row statistics)`, for the symmetric form.
    pub(super) row_stats: Vec<(usize, SoftmaxStats)>,
}

/// What the first pass learns of a problem's rows, before any of it is installed in a
/// [`Reviser`]: the dual softmax's column statistics, the symmetric form's row statistics by
/// position, and each matched row's `(position, own cosine, top-1 column under QB-Norm)`, in
/// row order.
pub(super) struct FirstPass {
    pub(super) stats: Option<ColumnStats>,
    pub(super) row_stats: Vec<(usize, SoftmaxStats)>,
    pub(super) truths: Vec<(usize, f32, u32)>,
}

/// The first pass, when anything needs the whole matrix first (for a split score, one block's
/// rows: `split`).
pub(super) fn gather_first_pass(engine: &Engine) -> FirstPass {
    let (options, columns) = (engine.options, engine.columns);
    let needs = options.revision.needs();
    let (needs_column_stats, symmetric, needs_top) = (needs.column_stats, needs.row_stats, needs.row_top);
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
pub(super) fn first_pass(engine: &Engine, reviser: &mut Reviser, n: usize) -> Vec<(usize, f32, u32)> {
    let pass = gather_first_pass(engine);
    if let Some(stats) = pass.stats {
        reviser.install_columns(stats);
    }
    if engine.options.revision.needs().row_stats {
        reviser.row_stats = vec![SoftmaxStats::EMPTY; n];
        for (pos, stats) in pass.row_stats {
            reviser.row_stats[pos] = stats;
        }
    }
    pass.truths
}
