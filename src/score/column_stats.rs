//! Per-column softmax statistics (maximum and sum of exponentials), accumulated strip by strip
//! and merged in a fixed order: the dual softmax's prior over the texts, and QB-Norm's over the
//! query bank.

use super::kernels::{self, SoftmaxStats};

/// Per-column softmax statistics, accumulated strip by strip.
#[derive(Clone)]
pub(super) struct ColumnStats {
    /// Of `x = to_x(s)`, in f64: what the second pass subtracts.
    pub(super) max: Vec<f64>,
    /// The matrix value `s` that gives `max` (`max = to_x(top)`).
    pub(super) top: Vec<f32>,
    pub(super) sum: Vec<f64>,
}

impl ColumnStats {
    pub(super) fn new(columns: usize) -> ColumnStats {
        ColumnStats {
            max: vec![f64::NEG_INFINITY; columns],
            top: vec![f32::NEG_INFINITY; columns],
            sum: vec![0.0; columns],
        }
    }

    /// Adds the rows of one strip, given as `x = to_x(s)`: `s` times a positive factor (τ
    /// and scale, or β, folded in), computed in f64 exactly as the second pass computes it.
    #[inline(always)]
    pub(super) fn add_strip(&mut self, strip: &[f32], columns: usize, to_x: impl Fn(f32) -> f64) {
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

    pub(super) fn merge(mut self, other: ColumnStats) -> ColumnStats {
        for j in 0..self.max.len() {
            let merged = SoftmaxStats { max: self.max[j], sum: self.sum[j] }
                .merge(SoftmaxStats { max: other.max[j], sum: other.sum[j] });
            (self.max[j], self.sum[j]) = (merged.max, merged.sum);
            self.top[j] = self.top[j].max(other.top[j]);
        }
        self
    }

    /// `(max, 1/sum, top)` per column.
    pub(super) fn finish(self) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
        let inverse = self.sum.iter().map(|&s| 1.0 / s).collect();
        (self.max, inverse, self.top)
    }
}
