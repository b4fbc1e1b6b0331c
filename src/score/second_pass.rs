//! The second pass over the strips: revise each row, keep its top-k, count its T2V rank and the
//! caption groups that beat each video's own (V2T), against each text's own revised score.

use std::ops::Range;

use rayon::prelude::*;

use super::RowSink;
use super::engine::Engine;
use super::kernels::{count_greater, dual_softmax_bounds, f32_above, f32_below, greater_on_bounds};
use super::reviser::Reviser;
use super::topk::TopK;

/// What the second pass produces from one strip.
pub(super) struct StripResults {
    pub(super) top: Vec<(usize, Vec<(u32, f64)>)>,
    pub(super) t2v_ranks: Vec<(usize, u32)>,
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

/// Each matched text's own revised score (by position, T2V) and each video's best own caption
/// (V2T): what a row's values are ranked against.
pub(super) struct Truths {
    pub(super) t2v: Vec<f64>,
    pub(super) v2t: Vec<f64>,
    /// `v2t` rounded to f32 downwards and upwards, for comparisons with f32 bounds.
    pub(super) v2t_below: Vec<f32>,
    pub(super) v2t_above: Vec<f32>,
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
    let symmetric = reviser.revision.needs().row_stats;
    let mut results = StripResults { top: Vec::with_capacity(range.len()), t2v_ranks: Vec::new() };
    // Without `--dense` no row needs all its f64 values, only comparisons: dual softmax rows
    // are decided on f32 bounds.
    let bounded = sink.is_none() && reviser.revision.needs().bounds;
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
    let v2t_bounds = if reviser.revision.needs().row_stats {
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

/// Each matched text's own revised score, and each video's best own caption for V2T.
pub(super) fn own_scores(engine: &Engine, reviser: &Reviser, truths: &[(usize, f32, u32)], n: usize) -> Truths {
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
pub(super) fn second_pass(
    engine: &Engine,
    reviser: &Reviser,
    truth: &Truths,
    sink: Option<&dyn RowSink>,
) -> Result<(Vec<u32>, Vec<StripResults>), std::io::Error> {
    let columns = engine.columns;
    let symmetric = engine.options.revision.needs().row_stats;
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
